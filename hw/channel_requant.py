"""ChannelRequant: the compute unit's per-channel epilogue (QuantConfig.granularity "channel"):
bias add, integer multiplier, variable rounding shift, saturate; L lanes per cycle.

Golden model: quant.channel.channel_epilogue (the integers come from quant.channel.multiplier,
computed once in quantize_channel and carried in the weight stream's column headers,
quant.linear.header_lanes). Testbench: sim/tb_channel_requant.py, tests/test_channel_rtl.py.

Per lane k:  out[k] = fit_out( shift_round((acc[k] + bias[k]) * mult[k], shift[k]) )
with the rounding mode (trunc / half_up / half_even) and overflow mode (sat / wrap) of the
QuantConfig fixed at generation time; out has act.bits (the channel datapath keeps attn_in,
gelu_in and gate_logit at act's width: quant.channel.check_channel_datapath). sat_count =
lanes whose rounded value left that range.

Exported module `edgemoe_channel_requant`, L = hwcfg.lanes:
  clk, rst                 in   1        sync domain, active-high synchronous reset
  i__valid / i__ready      in / out      input vector (ready combinational from o__ready)
  i__payload__acc          in   L*acc.bits      lane k at bits [k*acc.bits, ...), signed
  i__payload__bias         in   L*bias.bits     signed
  i__payload__mult         in   L*mult_bits     unsigned
  i__payload__shift        in   L*SHIFT_BITS    unsigned, 0..63
  o__valid / o__ready      out / in
  o__payload__data         out  L*act.bits      signed
  o__payload__sat_count    out  bit_length(L)
Latency: LATENCY = 4 (input handshake at edge t -> output valid after edge t+4). Stages:
(1) bias add, (2) multiply (one 37 x 16 product per lane at w8a16-channel: two DSP48E2),
(3) variable shift with rounding (a barrel shifter), (4) saturate with one flag per lane.
Throughput: one vector per cycle.
"""
from __future__ import annotations

from amaranth.hdl import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from edgemoe.quant.channel import SHIFT_BITS, check_channel_datapath
from edgemoe.quant.config import QuantConfig
from edgemoe.quant.fixed import FormatError, Rounding

from .compute import fit_signed
from .config import HWConfig
from .pipeline import PipelineControl
from .requant import popcount


class ChannelRequant(wiring.Component):
    LATENCY = 4

    def __init__(self, qcfg: QuantConfig, hwcfg: HWConfig):
        if qcfg.granularity != "channel":
            raise FormatError(f"QuantConfig '{qcfg.name}': ChannelRequant is the epilogue of "
                              f"granularity 'channel' (got '{qcfg.granularity}'; use hw/requant.py)")
        check_channel_datapath(qcfg)
        for f in ("acc", "bias", "act"):
            if not getattr(qcfg, f).signed:
                raise FormatError(f"QuantConfig '{qcfg.name}': ChannelRequant needs a signed {f}")
        self.qcfg, self.hwcfg = qcfg, hwcfg
        self.lanes = L = hwcfg.lanes
        self.sat_bits = L.bit_length()
        self.sum_bits = max(qcfg.acc.bits, qcfg.bias.bits) + 1
        self.prod_bits = self.sum_bits + qcfg.mult_bits     # signed x unsigned, exact
        in_layout = data.StructLayout({
            "acc": data.ArrayLayout(signed(qcfg.acc.bits), L),
            "bias": data.ArrayLayout(signed(qcfg.bias.bits), L),
            "mult": data.ArrayLayout(unsigned(qcfg.mult_bits), L),
            "shift": data.ArrayLayout(unsigned(SHIFT_BITS), L),
        })
        out_layout = data.StructLayout({
            "data": data.ArrayLayout(signed(qcfg.act.bits), L),
            "sat_count": unsigned(self.sat_bits),
        })
        super().__init__({"i": In(stream.Signature(in_layout)),
                          "o": Out(stream.Signature(out_layout))})

    def elaborate(self, platform):
        m = Module()
        q, L = self.qcfg, self.lanes
        A, PB = q.act.bits, self.prod_bits
        ctl = PipelineControl(m, self.LATENCY, self.i.valid, self.o.ready, name="crq")
        m.d.comb += self.i.ready.eq(ctl.in_ready)

        def reg(name, shape):   # datapath registers: only the valid bits say they hold data
            return Signal(shape, name=name, reset_less=True)

        over = Signal(L, reset_less=True)
        out = reg("out", data.ArrayLayout(signed(A), L))
        for k in range(L):
            p = self.i.payload
            s1 = reg(f"sum{k}", signed(self.sum_bits))
            sh1 = reg(f"sh1_{k}", unsigned(SHIFT_BITS))
            m1 = reg(f"mult{k}", unsigned(q.mult_bits))
            with m.If(ctl.load[0]):
                m.d.sync += [s1.eq(p.acc[k] + p.bias[k]), m1.eq(p.mult[k]), sh1.eq(p.shift[k])]
            s2 = reg(f"prod{k}", signed(PB))
            sh2 = reg(f"sh2_{k}", unsigned(SHIFT_BITS))
            with m.If(ctl.load[1]):
                m.d.sync += [s2.eq(s1 * m1), sh2.eq(sh1)]
            # (3) r = floor(p / 2**s) + increment; the increment reads the bit below the cut
            # (half) and, for half-even, whether anything lies below it (sticky)
            qv = s2 >> sh2                       # arithmetic: s2 is signed
            if q.rounding is Rounding.TRUNC:
                r = qv
            else:
                below = (s2 << 1) >> sh2         # bit 0 = the bit just below the cut
                half = Mux(sh2 == 0, 0, below[0])
                if q.rounding is Rounding.HALF_UP:
                    r = qv + half
                else:
                    mask = (Const(1, PB + SHIFT_BITS + 1) << sh2) >> 1
                    mask_m1 = Mux(sh2 == 0, 0, mask - 1)       # bits [0, s-1)
                    lowbits = s2.as_unsigned() & mask_m1
                    sticky = lowbits.any()
                    r = qv + (half & (sticky | qv[0]))
            s3 = reg(f"rnd{k}", signed(PB + 1))
            with m.If(ctl.load[2]):
                m.d.sync += s3.eq(r)
            # (4) fit to A bits (saturate or wrap), one overflow flag per lane
            res, ovf = fit_signed(s3, A, q.overflow)
            with m.If(ctl.load[3]):
                m.d.sync += [out[k].eq(res), over[k].eq(ovf)]
        m.d.comb += [self.o.valid.eq(ctl.out_valid), self.o.payload.data.eq(out),
                     self.o.payload.sat_count.eq(popcount(over[k] for k in range(L)))]
        return m
