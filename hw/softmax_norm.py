"""SoftmaxNorm: attention probabilities p = exp2(s - m) / S during A.V, L lanes per cycle.

Golden model: quant.approx.softmax_normalise (datapath spec in the quant/approx.py module
docstring); the exp2 datapath pieces and their widths come from hw/softmax.py (exp2_plan, one
place for both softmax units), ROM contents from quant.approx.exp2_frac_table.
Testbench: sim/tb_softmax_norm.py, tests/test_softmax_rtl.py.

One beat = L consecutive keys of ONE query row: the A.V datapath streams a query row's scores
against V (p goes into the MAC array's reduction lanes, one row at a time), so the row's
statistics (m, recip) from SoftmaxStats are one value per beat, not per lane. A row of n keys
takes ceil(n / L) beats; lanes past the row's end carry whatever score the engine pads with and
must meet zero V rows (or be dropped) downstream: the unit has no lane mask.
Per lane (edge-moe-fixed numbers in brackets), with F = score.frac:
  stage 0  input register; ROM read at i = s[low:F] (sync read port)   [64 x (25+19) bits]
  stage 1  slope * r (DSP multiplier register); n = min(m - floor(s), exp.frac + 2)  [0..18]
  stage 2  v = (T[i] << R) + slope * r                                  [41 bits]
  stage 3  e = fit_exp(round(v >> (TF + R - exp.frac + n)))            [u17.16]
  stage 4  e * recip (one DSP48E2: 17 x 24 bits unsigned)               [41 bits]
  stage 5  p = fit_prob(round(e * recip >> (exp.frac + recip.frac - prob.frac)))  [u17.16],
           plus one overflow flag per lane
Precondition (as in the golden model, which raises otherwise): s <= m * 2**F for every lane,
i.e. m is at least the ceiling of the row max; the hardware output is unspecified otherwise.
As in softmax_normalise, e is fitted to `exp` without being counted (it cannot saturate when
exp holds 1.0, as edge-moe-fixed's u17.16 does); p's saturation is counted in sat_count.

Exported module `edgemoe_softmax_norm` (hw/export.py naming rule), L = hwcfg.lanes:
  clk, rst                 in   1        sync domain, active-high synchronous reset
  i__valid                 in   1
  i__ready                 out  1        combinational from o__ready
  i__payload__score        in   L*score.bits  lane k at bits [k*score.bits, ...), signed codes
  i__payload__m            in   m_bits   the row's m (signed, hw.softmax.softmax_m_bits)
  i__payload__recip        in   recip.bits   the row's 1/S (unsigned)
  o__valid                 out  1
  o__ready                 in   1
  o__payload__prob         out  L*prob.bits   lane k at bits [k*prob.bits, ...), unsigned codes
  o__payload__sat_count    out  bit_length(L) lanes of this beat whose p left the prob range
Throughput: one L-lane beat per cycle at steady state (L probabilities per cycle).
Latency: LATENCY = 6 cycles (input handshake at edge t -> output valid after edge t+6).
Resources (zcu102-16x16, edge-moe-fixed; tests/baselines/synth_softmax_norm.json): about 2.3k
LUT, 3.2k FF, 32 DSP48E2 (two per lane), no BRAM (the exp2 ROMs, one per two lanes, become
logic). ECP5-85k out of context: about 79 MHz, limited by e * recip, which needs two 18 x 18
ECP5 multipliers and an adder (one DSP48E2 on the UltraScale+ target).
"""
from __future__ import annotations

from amaranth.hdl import Module, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from edgemoe.quant.config import QuantConfig
from edgemoe.quant.fixed import FormatError

from .config import HWConfig
from .pipeline import PipelineControl
from .requant import popcount
from .softmax import (exp2_addr, exp2_frac, exp2_n, exp2_out, exp2_plan, exp2_read_ports,
                      fit_unsigned, round_shift, softmax_m_bits)


class SoftmaxNorm(wiring.Component):
    LATENCY = 6

    def __init__(self, qcfg: QuantConfig, hwcfg: HWConfig):
        self.qcfg, self.hwcfg = qcfg, hwcfg
        self.lanes = L = hwcfg.lanes
        self.m_bits = softmax_m_bits(qcfg)
        self.ex = exp2_plan(qcfg, qcfg.exp)
        if qcfg.exp.bits + qcfg.recip.bits > 62:
            raise FormatError(f"softmax: exp {qcfg.exp} x recip {qcfg.recip} exceeds 62 bits")
        self.p_shift = qcfg.exp.frac + qcfg.recip.frac - qcfg.prob.frac
        self.sat_bits = L.bit_length()
        in_layout = data.StructLayout({
            "score": data.ArrayLayout(signed(qcfg.score.bits), L),
            "m": signed(self.m_bits), "recip": unsigned(qcfg.recip.bits)})
        out_layout = data.StructLayout({
            "prob": data.ArrayLayout(unsigned(qcfg.prob.bits), L),
            "sat_count": unsigned(self.sat_bits)})
        super().__init__({"i": In(stream.Signature(in_layout)),
                          "o": Out(stream.Signature(out_layout))})

    def elaborate(self, platform):
        m = Module()
        q, L, ex = self.qcfg, self.lanes, self.ex
        F, R = q.score.frac, ex.p.interp_bits
        inp = self.i.payload
        ctl = PipelineControl(m, self.LATENCY, self.i.valid, self.o.ready, name="smn")
        m.d.comb += self.i.ready.eq(ctl.in_ready)

        def reg(name, shape):
            # datapath registers need no reset: only the valid bits say whether they hold data
            return Signal(shape, name=name, reset_less=True)

        # the row's statistics travel with the beat
        m0, rc = reg("m0", signed(self.m_bits)), [reg(f"recip{k}", q.recip.bits) for k in range(4)]
        with m.If(ctl.load[0]):
            m.d.sync += [m0.eq(inp.m), rc[0].eq(inp.recip)]
        for k in range(1, 4):
            with m.If(ctl.load[k]):
                m.d.sync += rc[k].eq(rc[k - 1])

        rports = exp2_read_ports(m, ex, L)
        over = Signal(L, name="over", reset_less=True)
        prob = Signal(data.ArrayLayout(unsigned(q.prob.bits), L), name="prob", reset_less=True)
        for k in range(L):
            s_in = inp.score[k]
            s0 = reg(f"s0_{k}", signed(q.score.bits))
            rp = rports[k]
            m.d.comb += [rp.addr.eq(exp2_addr(s_in, ex)), rp.en.eq(ctl.load[0])]
            with m.If(ctl.load[0]):
                m.d.sync += s0.eq(s_in)

            t1, prod1 = reg(f"t1_{k}", ex.t_bits), reg(f"prod1_{k}", ex.d_bits + R)
            n1 = reg(f"n1_{k}", ex.n_bits)
            with m.If(ctl.load[1]):
                m.d.sync += [t1.eq(rp.data[:ex.t_bits]),
                             prod1.eq(rp.data[ex.t_bits:] * exp2_frac(s0, ex) if R else 0),
                             n1.eq(exp2_n(m0 - s0[F:].as_signed(), ex))]

            v2, n2 = reg(f"v2_{k}", ex.v_bits), reg(f"n2_{k}", ex.n_bits)
            with m.If(ctl.load[2]):
                m.d.sync += [v2.eq((t1 << R) + prod1), n2.eq(n1)]

            e3 = reg(f"e3_{k}", q.exp.bits)
            with m.If(ctl.load[3]):
                m.d.sync += e3.eq(exp2_out(v2, n2, ex, q))

            p4 = reg(f"p4_{k}", q.exp.bits + q.recip.bits)
            with m.If(ctl.load[4]):
                m.d.sync += p4.eq(e3 * rc[3])

            if self.p_shift > 0:
                pr = round_shift(p4, self.p_shift, None, q.rounding)
            else:
                pr = p4 << -self.p_shift
            pv, ov = fit_unsigned(pr, q.prob, q.overflow)
            with m.If(ctl.load[5]):
                m.d.sync += [prob[k].eq(pv), over[k].eq(ov)]

        m.d.comb += [self.o.valid.eq(ctl.out_valid), self.o.payload.prob.eq(prob),
                     self.o.payload.sat_count.eq(popcount(over[k] for k in range(L)))]
        return m
