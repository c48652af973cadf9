"""Requant: the compute unit's output epilogue (bias add, requantize, saturate), L lanes/cycle.

Golden model: quant.epilogue.requant_golden (the widths come from quant.epilogue.requant_plan).
Testbench: sim/tb_requant.py, tests/test_requant_rtl.py.

Per lane k:  out[k] = fit_act( shift_round(acc[k] + (bias[k] << bias_shift), round_shift) )
with the rounding mode (trunc / half_up / half_even) and overflow mode (sat / wrap) of the
QuantConfig fixed at generation time; sat_count = number of lanes whose rounded value left the
act range (saturated, or wrapped under Overflow.WRAP).

Exported module `edgemoe_requant` (hw/export.py naming rule), L = hwcfg.lanes:
  clk, rst                 in   1        sync domain, active-high synchronous reset
  i__valid                 in   1        input vector available
  i__ready                 out  1        input vector accepted (combinational from o__ready)
  i__payload__acc          in   L*acc.bits    lane k at bits [k*acc.bits, (k+1)*acc.bits)
  i__payload__bias         in   L*bias.bits   lane k at bits [k*bias.bits, ...)
  o__valid                 out  1
  o__ready                 in   1
  o__payload__data         out  L*act.bits    lane k at bits [k*act.bits, ...)
  o__payload__sat_count    out  bit_length(L) saturated lanes in this vector (unsigned)
All lanes are two's complement. Throughput: one vector per cycle at steady state.
Latency: LATENCY = 3 cycles (input handshake at edge t -> output valid after edge t+3).
Stages: (1) bias add, (2) shift and round, (3) saturate/wrap with one overflow flag per lane;
o__payload__data is registered, o__payload__sat_count is a popcount of the registered flags.
Resources (zcu102-16x16, edge-moe-fixed; tests/baselines/synth_requant.json): about 1.2k LUT,
2.1k FF, no DSP/BRAM.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from edgemoe.quant.config import QuantConfig
from edgemoe.quant.epilogue import requant_plan
from edgemoe.quant.fixed import FormatError, Overflow, Rounding

from .config import HWConfig
from .pipeline import PipelineControl


def popcount(bits):
    """Balanced adder tree over a list of 1-bit values (log depth, not a chain)."""
    vals = list(bits)
    if not vals:
        return 0
    while len(vals) > 1:
        vals = [vals[i] + vals[i + 1] if i + 1 < len(vals) else vals[i]
                for i in range(0, len(vals), 2)]
    return vals[0]


class Requant(wiring.Component):
    LATENCY = 3

    def __init__(self, qcfg: QuantConfig, hwcfg: HWConfig):
        self.qcfg, self.hwcfg = qcfg, hwcfg
        self.lanes = L = hwcfg.lanes
        self.plan = requant_plan(qcfg)
        if self.plan.round_shift >= self.plan.sum_fmt.bits:
            raise FormatError(f"QuantConfig '{qcfg.name}': acc.frac - act.frac = {self.plan.round_shift} "
                              f"shifts out every bit of the {self.plan.sum_fmt.bits}-bit sum")
        self.sat_bits = L.bit_length()
        in_layout = data.StructLayout({
            "acc": data.ArrayLayout(signed(qcfg.acc.bits), L),
            "bias": data.ArrayLayout(signed(qcfg.bias.bits), L),
        })
        out_layout = data.StructLayout({
            "data": data.ArrayLayout(signed(qcfg.act.bits), L),
            "sat_count": unsigned(self.sat_bits),
        })
        super().__init__({"i": In(stream.Signature(in_layout)),
                          "o": Out(stream.Signature(out_layout))})

    def elaborate(self, platform):
        m = Module()
        q, L, plan = self.qcfg, self.lanes, self.plan
        sb, s, A = plan.bias_shift, plan.round_shift, q.act.bits
        sum_bits = plan.sum_fmt.bits
        r_bits = sum_bits - s + (0 if s <= 0 or q.rounding is Rounding.TRUNC else 1)

        ctl = PipelineControl(m, 3, self.i.valid, self.o.ready, name="rq")
        m.d.comb += self.i.ready.eq(ctl.in_ready)

        # Datapath registers need no reset: only the valid bits say whether they hold data.
        s1 = Signal(data.ArrayLayout(signed(sum_bits), L), reset_less=True)
        s2 = Signal(data.ArrayLayout(signed(r_bits), L), reset_less=True)
        s3 = Signal(data.ArrayLayout(signed(A), L), reset_less=True)
        over = Signal(L, reset_less=True)
        sat_count = Signal(self.sat_bits, reset_less=True)

        for k in range(L):
            acc, bias = self.i.payload.acc[k], self.i.payload.bias[k]
            # (1) bias add. The aligned bias has sb zero low bits, so only acc[sb:] meets an adder.
            if 0 < sb < q.acc.bits:
                total = Cat(acc[:sb], acc[sb:].as_signed() + bias).as_signed()
            else:
                total = acc + (bias << sb)
            with m.If(ctl.load[0]):
                m.d.sync += s1[k].eq(total)

            # (2) shift and round: q = floor(sum / 2**s); the dropped bits decide the increment.
            x = s1[k]
            if s <= 0:
                r = x << -s
            else:
                qv = x[s:].as_signed()
                half = x[s - 1]
                if q.rounding is Rounding.TRUNC:
                    r = qv
                elif q.rounding is Rounding.HALF_UP:
                    r = qv + half                      # floor(x/2**s + 1/2)
                else:                                  # HALF_EVEN: ties go to the even neighbour
                    sticky = x[:s - 1].any() if s >= 2 else 0
                    r = qv + (half & (sticky | qv[0]))
            with m.If(ctl.load[1]):
                m.d.sync += s2[k].eq(r)

            # (3) fit to act: r is in range iff its bits above A-1 all equal the sign, a cheaper
            # test than two wide constant compares.
            y = s2[k]
            if r_bits <= A:
                ovf, res = 0, y
            else:
                top = y[A - 1:]
                ovf = ~(top.all() | ~top.any())
                if q.overflow is Overflow.SAT:
                    res = Mux(ovf, Mux(y[-1], q.act.min_int, q.act.max_int), y[:A].as_signed())
                else:
                    res = y[:A].as_signed()
            with m.If(ctl.load[2]):
                m.d.sync += [s3[k].eq(res), over[k].eq(ovf)]

        m.d.comb += sat_count.eq(popcount(over[k] for k in range(L)))
        m.d.comb += [
            self.o.valid.eq(ctl.out_valid),
            self.o.payload.data.eq(s3),
            self.o.payload.sat_count.eq(sat_count),
        ]
        return m
