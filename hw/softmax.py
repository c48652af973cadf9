"""SoftmaxStats: online softmax statistics (running max m, rescaled running sum S, 1/S) per
query row, P lanes fed in the attention reorder order of quant/schedule.py.

Golden model: quant.approx.softmax_stats (datapath spec in the quant/approx.py module docstring);
exp2 widths from quant.approx.exp2_params via exp2_plan() below, ROM contents from
quant.approx.exp2_frac_table. Testbench: sim/tb_softmax.py, tests/test_softmax_rtl.py.
This file also holds the exp2 datapath pieces shared with hw/softmax_norm.py.

Lanes (P = hwcfg.attn_p): lane o works on query rows o, o+P, ... one at a time, one score per
beat, exactly as quant.schedule.attention_schedule drives it (row r of head h at step t sees
key row_key_order(n, P)[r, t]). Per lane and score s (edge-moe-fixed numbers in brackets):
  stage 0  c = ceil(s) = floor(s) + (frac(s) != 0)                       [11-bit signed]
           ROM read at i = s[low:F] (sync read port = the stage register) [64 x (25+19) bits]
  stage 1  running max (1-cycle loop per lane): m' = first ? c : max(m, c);
           d = first ? 0 : min(max(c - m, 0), sum.bits+1)                [0..33]
           slope * r, r = s[low-R:low] (DSP multiplier register)          [19 x 16 bits]
  stage 2  v = (T[i] << R) + slope * r  (2**frac(s) with TF+R fraction bits) [41 bits]
           n = min(m' - floor(s), exp_sum.frac + 2)                       [0..22]
  stage 3  e = round(v >> (TF + R - sum.frac + n))  = exp2(s - m'*2**F) in u21.20
  output   running sum (1-cycle loop per lane): S = sat_sum(round((first ? 0 : S) >> d) + e)
           [u32.20]; on a row's last score (S, m', row, head, sat) go to the lane's hold
           register.
The exponent's table part depends only on frac(s) (m' << F has zero fraction bits), so the ROM
and the multiply run in parallel with the running max; only the final shift n needs m'.
A 1-cycle loop on each of m and S keeps one score per lane per cycle although exp2 takes
four stages: the S update needs e and d, both computed from the same score.

Reciprocal: one shared, fully pipelined restoring divider (recip_plan: recip.bits + 1 = 25
compare-subtract stages of 33 bits for edge-moe-fixed; the quotient of the constant dividend
2**(sum.frac+recip.frac+1) gives round(2**42 / S) exactly), fed by a fixed-priority arbiter
over the P hold registers (lowest lane first) and writing into an output FIFO whose free space
is reserved when a row is issued (credit counter), so the divider never stalls and
o__ready has no combinational path through it. Why shared and pipelined rather than one
iterative (1 bit per cycle) divider per lane: the reorder schedule finishes rows on distinct
cycles (lane o finishes at cycles = o - 1 mod n), at most one per cycle, and a lane finishes
one row every n cycles. An iterative per-lane divider needs ~26 cycles per row, so it cannot
keep up for n < 27 (the tiny preset has n = 9, and P >= n is allowed); the shared pipelined
one keeps up for every n and P and its size does not grow with P. Measured (Yosys, xcup,
edge-moe-fixed): the divider, FIFO and arbiter take about 1.5k LUT and 1.7k FF, each lane about
0.4k LUT, 0.37k FF and one DSP48E2 (whole unit at P = 4: tests/baselines/synth_softmax.json).
Per-lane iterative dividers would save an estimated 1.2k LUT and 1.3k FF at P = 4 (< 0.5 % of an
XCZU9EG) but would stall the schedule whenever n < 27.
Resources (edge-moe, edge-moe-fixed, P = 4): about 3.1k LUT, 3.2k FF, 4 DSP48E2, no BRAM (Yosys
turns the 64-word exp2 ROMs into logic). Timing: the longest path is the S loop (variable
shift, rounding, add and saturate in one cycle, inherent to one score per lane per cycle);
ECP5-85k out of context reaches about 78 MHz (relative figure, see hw/synth.py).

Exported module `edgemoe_softmax` (hw/export.py naming rule), W = row_bits = bit length of
n_tokens - 1, H = head_bits = bit length of heads - 1 (both at least 1):
  clk, rst                in   1        sync domain, active-high synchronous reset
  i__valid                in   1        a beat (P lane slots) is available
  i__ready                out  1        beat accepted (combinational from the hold registers)
  i__payload__score       in   P*score.bits  lane o at bits [o*score.bits, ...), signed codes
  i__payload__active      in   P        bit o: lane o carries a score this beat
  i__payload__first       in   P        bit o: it is the first score of lane o's row
  i__payload__last        in   P        bit o: it is the last score of lane o's row
  i__payload__row         in   P*W      lane o's query row index (unsigned)
  i__payload__head        in   H        head of the whole beat (a schedule cycle has one head)
  o__valid                out  1        one finished row
  o__ready                in   1
  o__payload__recip       out  recip.bits   round(2**(sum.frac+recip.frac) / S), saturated
  o__payload__m           out  m_bits   ceil of the row max (signed integer, score.bits-F+1 bits)
  o__payload__row         out  W
  o__payload__head        out  H
  o__payload__sat         out  1        the row's sum or its reciprocal saturated (or wrapped)
  sat                     out  bits(P+1) saturation events this cycle, as quant.approx's
                                        SatCounter counts them: one per running-sum update that
                                        left `sum` (per score, "<name>.sum") plus one per
                                        reciprocal that left `recip` (per row, "<name>.recip");
                                        registered, independent of o__ready (a row's events are
                                        reported by the cycle the row comes out)
Rows come out in the order their last scores arrive; when several wait (more than one last
flag per beat, or output back-pressure) the lowest lane goes first, so a consumer places rows
by (head, row), which every output carries. S = 0 (not reachable: the row max contributes at
least 2**-1) would give a saturated reciprocal; the golden model rejects it.
Throughput: one beat (P scores) per cycle at steady state, whatever n and P; up to one finished
row per cycle into the divider and out of the FIFO.
Latency: LATENCY = recip_plan(q).iters + 8 cycles (33 for edge-moe-fixed) from the handshake
of a row's last score to that row's output handshake when nothing waits; driving the schedule
of one layer without gaps, the last row comes out attention_cycles(n, P, heads) - 1 + LATENCY
cycles after the first beat's handshake (asserted by tests/test_softmax_rtl.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from amaranth.hdl import Cat, Const, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from edgemoe.quant.approx import Exp2Params, exp2_frac_table, exp2_params, exp_sum_fmt, rshift_round
from edgemoe.quant.config import QuantConfig
from edgemoe.quant.fixed import Fmt, FormatError, Overflow, Rounding

from .config import HWConfig
from .pipeline import PipelineControl
from .requant import popcount


# ---------------------------------------------------------------------------------------------
# plans: every width derived from the QuantConfig, in one place
# ---------------------------------------------------------------------------------------------
def softmax_m_bits(qcfg: QuantConfig) -> int:
    """Signed width of m = ceil(score): ceil lies in [-2**(b-F-1), 2**(b-F-1)]."""
    s = qcfg.score
    if s.frac >= s.bits or not s.signed:
        raise FormatError(f"QuantConfig '{qcfg.name}': score {s} needs to be signed with an "
                          "integer part (softmax m = ceil(score))")
    return s.bits - s.frac + 1


@dataclass(frozen=True)
class Exp2Plan:
    """exp2(x) for x = s - m * 2**F <= 0 (quant.approx.exp2_fixed) with out format `out`."""
    p: Exp2Params
    out: Fmt
    low: int            # s[low:F] is the table index i, s[low-R:low] the fraction r
    t_bits: int         # ROM field T[i], i < 2**B (unsigned)
    d_bits: int         # ROM field T[i+1] - T[i] (unsigned: 2**x increases)
    rom: tuple = field(repr=False)  # word i = T[i] | (T[i+1]-T[i]) << t_bits
    v_bits: int         # v = (T[i] << R) + slope * r
    base: int           # e = round(v >> (base + n))
    n_max: int          # n = min(m - floor(s), n_max): longer shifts give 0 all the same
    n_bits: int
    e_bits: int         # width of the rounded value before fitting to `out`


def exp2_plan(qcfg: QuantConfig, out_fmt: Fmt | None = None) -> Exp2Plan:
    out = out_fmt or qcfg.exp
    p = exp2_params(qcfg)                      # raises FormatError for a bad score format
    if out.frac > p.table_frac:
        raise FormatError(f"exp2: output {out} finer than the table's {p.table_frac} fraction bits")
    tab = [int(v) for v in exp2_frac_table(qcfg)]
    nseg = 1 << p.table_bits
    t, d = tab[:nseg], [tab[i + 1] - tab[i] for i in range(nseg)]
    R = p.interp_bits
    v_max = max((t[i] << R) + d[i] * ((1 << R) - 1) for i in range(nseg))
    base = p.table_frac + R - out.frac          # >= GUARD_BITS > 0: always a rounded right shift
    e_max = int(rshift_round(v_max, base, qcfg.rounding))
    t_bits, d_bits = max(t).bit_length(), max(1, max(d).bit_length())
    return Exp2Plan(p, out, p.in_frac - p.table_bits, t_bits, d_bits,
                    tuple(ti | (di << t_bits) for ti, di in zip(t, d)), v_max.bit_length(),
                    base, out.frac + 2, (out.frac + 2).bit_length(), e_max.bit_length() + 1)


@dataclass(frozen=True)
class RecipPlan:
    """Restoring divider for recip = round(2**kk / S), kk = sum.frac + recip.frac."""
    kk: int
    iters: int          # quotient bits computed, one per stage (recip.bits + 1 under SAT; the
                        # whole quotient under WRAP, whose low bits the golden model keeps)
    r_init: int         # partial remainder before the first stage: 2**(kk+1) >> iters
    rem_bits: int       # 2R + 1 < 2 * S <= 2**(sum.bits+1)


def recip_plan(qcfg: QuantConfig) -> RecipPlan:
    kk = qcfg.sum.frac + qcfg.recip.frac
    if kk + 1 > 61:
        raise FormatError(f"reciprocal: sum.frac + recip.frac = {kk} exceeds 60 bits")
    iters = qcfg.recip.bits + 1 if qcfg.overflow is Overflow.SAT else kk + 2
    return RecipPlan(kk, iters, (1 << (kk + 1)) >> iters, qcfg.sum.bits + 1)


# ---------------------------------------------------------------------------------------------
# datapath helpers (expressions; the caller registers them)
# ---------------------------------------------------------------------------------------------
def round_shift(x, const: int, sh, rounding: Rounding):
    """round(x >> (const + sh)) of an unsigned value x; const >= 0 an int, sh an unsigned Value
    (the variable part) or None. Returns an unsigned Value one bit wider than the quotient."""
    x = Value.cast(x).as_unsigned()
    if const >= 1:
        x2 = x[const - 1:] if len(x) >= const else Const(0, 1)   # half bit at position 0
        sticky_c = x[:const - 1].any() if const >= 2 else Const(0, 1)
    else:
        x2 = Cat(Const(0, 1), x)
        sticky_c = Const(0, 1)
    t = x2 if sh is None else x2 >> sh
    half, q = t[0], (t[1:] if len(t) > 1 else Const(0, 1))
    r = Rounding(rounding)
    if r is Rounding.TRUNC:
        return q
    if r is Rounding.HALF_UP:
        return q + half
    sticky = sticky_c
    if sh is not None:                          # bits of x2 below the half bit, shifted out
        below = Cat(*[sh > k for k in range(len(x2))])
        sticky = sticky | (x2 & below).any()
    return q + (half & (sticky | q[0]))


def fit_unsigned(q, fmt: Fmt, overflow: Overflow):
    """(value in fmt, over) for an unsigned Value q: saturate or wrap, flag when out of range."""
    q = Value.cast(q).as_unsigned()
    if len(q) <= fmt.bits:
        return q, Const(0, 1)
    over = q > fmt.max_int
    if Overflow(overflow) is Overflow.SAT:
        return Mux(over, fmt.max_int, q[:fmt.bits]), over
    return q[:fmt.bits], over


ROM_PORTS = 2   # read ports per ROM copy: a true dual-port block (Yosys' memory_libmap fails on
                # one ROM with 16 read ports, and a RAMB18 / LUTRAM serves two ports anyway)


def exp2_read_ports(m: Module, plan: Exp2Plan, lanes: int, name: str = "exp2_rom") -> list:
    """One synchronous ROM read port per lane (addr, en, data), ROM_PORTS lanes per copy."""
    ports = []
    for c in range((lanes + ROM_PORTS - 1) // ROM_PORTS):
        rom = Memory(shape=unsigned(plan.t_bits + plan.d_bits), depth=len(plan.rom), init=plan.rom)
        m.submodules[f"{name}{c}"] = rom
        ports += [rom.read_port(domain="sync") for _ in range(min(ROM_PORTS, lanes - len(ports)))]
    return ports


def exp2_addr(score, plan: Exp2Plan):
    return score.as_unsigned()[plan.low:plan.p.in_frac]


def exp2_frac(score, plan: Exp2Plan):
    R = plan.p.interp_bits
    return score.as_unsigned()[plan.low - R:plan.low] if R else Const(0, 1)


def exp2_n(negk, plan: Exp2Plan):
    """n = min(m - floor(s), n_max) from the signed difference negk (>= 0 for x <= 0)."""
    return Mux(negk[-1], 0, Mux(negk > plan.n_max, plan.n_max, negk))[:plan.n_bits]


def exp2_out(v, n, plan: Exp2Plan, qcfg: QuantConfig):
    e, _ = fit_unsigned(round_shift(v, plan.base, n, qcfg.rounding), plan.out, qcfg.overflow)
    return e


def lowest_one(bits):
    """One-hot mask of the lowest set bit (fixed-priority arbiter)."""
    bits = Value.cast(bits)
    return (bits & (~bits + 1))[:len(bits)]


# ---------------------------------------------------------------------------------------------
# the unit
# ---------------------------------------------------------------------------------------------
class SoftmaxStats(wiring.Component):
    MAIN_DEPTH = 4      # stages 0..3 before the running-sum update

    def __init__(self, qcfg: QuantConfig, hwcfg: HWConfig, n_tokens: int, heads: int):
        for name, v in (("n_tokens", n_tokens), ("heads", heads)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"SoftmaxStats: {name} = {v!r} must be a positive integer")
        self.qcfg, self.hwcfg = qcfg, hwcfg
        self.lanes = P = hwcfg.attn_p
        self.n_tokens, self.heads = n_tokens, heads
        self.row_bits = max(1, (n_tokens - 1).bit_length())
        self.head_bits = max(1, (heads - 1).bit_length())
        self.m_bits = softmax_m_bits(qcfg)
        self.ex = exp2_plan(qcfg, exp_sum_fmt(qcfg))
        self.div = recip_plan(qcfg)
        if qcfg.sum.signed:
            raise FormatError(f"QuantConfig '{qcfg.name}': sum {qcfg.sum} must be unsigned")
        self.dmax = qcfg.sum.bits + 1           # a rescale shift this long already clears S
        self.fifo_depth = self.div.iters + 5    # credits for a full pipeline + FIFO latency
        self.LATENCY = self.div.iters + 8
        in_layout = data.StructLayout({
            "score": data.ArrayLayout(signed(qcfg.score.bits), P),
            "active": unsigned(P), "first": unsigned(P), "last": unsigned(P),
            "row": data.ArrayLayout(unsigned(self.row_bits), P),
            "head": unsigned(self.head_bits),
        })
        self.out_layout = data.StructLayout({
            "recip": unsigned(qcfg.recip.bits), "m": signed(self.m_bits),
            "row": unsigned(self.row_bits), "head": unsigned(self.head_bits), "sat": unsigned(1),
        })
        self.sat_bits = (P + 1).bit_length()
        super().__init__({"i": In(stream.Signature(in_layout)),
                          "o": Out(stream.Signature(self.out_layout)),
                          "sat": Out(unsigned(self.sat_bits))})

    @classmethod
    def from_model(cls, qcfg: QuantConfig, hwcfg: HWConfig, mcfg) -> "SoftmaxStats":
        """The registry's factory: row and head index widths from the ModelConfig."""
        if mcfg is None:
            raise ValueError("SoftmaxStats needs a ModelConfig (num_tokens and heads size the row "
                             "and head index ports)")
        return cls(qcfg, hwcfg, mcfg.num_tokens, mcfg.heads)

    def elaborate(self, platform):
        m = Module()
        q, P, ex, dv = self.qcfg, self.lanes, self.ex, self.div
        F, R, Mb = q.score.frac, ex.p.interp_bits, self.m_bits
        SB = q.sum.bits
        dbits = self.dmax.bit_length()
        inp = self.i.payload

        def reg(name, shape, reset_less=True):
            # datapath registers need no reset: only the valid bits say whether they hold data
            return Signal(shape, name=name, reset_less=reset_less)

        hold_v = Signal(P, name="hold_v")       # lane o's finished row waits for the divider
        grant = Signal(P, name="grant")
        blocked = Signal(P, name="blocked")
        ctl = PipelineControl(m, self.MAIN_DEPTH, self.i.valid, ~blocked.any(), name="sm")
        m.d.comb += self.i.ready.eq(ctl.in_ready)
        fire = ctl.out_valid & ~blocked.any()

        rports = exp2_read_ports(m, ex, P)
        head = [reg(f"head{k}", self.head_bits) for k in range(self.MAIN_DEPTH)]
        with m.If(ctl.load[0]):
            m.d.sync += head[0].eq(inp.head)
        for k in range(1, self.MAIN_DEPTH):
            with m.If(ctl.load[k]):
                m.d.sync += head[k].eq(head[k - 1])

        meta_layout = data.StructLayout({"m": signed(Mb), "row": unsigned(self.row_bits),
                                         "head": unsigned(self.head_bits), "sat": unsigned(1)})
        holds = []
        sum_ev = []                             # lane o's S update this cycle saturated
        for o in range(P):
            flags_in = Cat(inp.active[o], inp.first[o], inp.last[o])
            # stage 0: input register, ROM read (its data register belongs to this stage)
            s0, fl0 = reg(f"s0_{o}", signed(q.score.bits)), reg(f"flags0_{o}", 3)
            row0 = reg(f"row0_{o}", self.row_bits)
            rp = rports[o]
            m.d.comb += [rp.addr.eq(exp2_addr(inp.score[o], ex)), rp.en.eq(ctl.load[0])]
            with m.If(ctl.load[0]):
                m.d.sync += [s0.eq(inp.score[o]), fl0.eq(flags_in), row0.eq(inp.row[o])]
            floor0 = s0[F:].as_signed()
            c0 = Signal(signed(Mb), name=f"c0_{o}")
            m.d.comb += c0.eq(floor0 + s0[:F].any())

            # stage 1: running max (the m loop) and slope * r
            m_state = reg(f"m_state_{o}", signed(Mb))
            dif = Signal(signed(Mb + 1), name=f"dif_{o}")
            m.d.comb += dif.eq(c0 - m_state)
            first0 = fl0[1]
            m_new = Mux(first0 | (dif > 0), c0, m_state)
            d_new = Mux(first0 | (dif <= 0), 0, Mux(dif > self.dmax, self.dmax, dif))
            m1, d1 = reg(f"m1_{o}", signed(Mb)), reg(f"d1_{o}", dbits)
            fl1, row1 = reg(f"flags1_{o}", 3), reg(f"row1_{o}", self.row_bits)
            floor1 = reg(f"floor1_{o}", signed(q.score.bits - F))
            t1 = reg(f"t1_{o}", ex.t_bits)
            prod1 = reg(f"prod1_{o}", ex.d_bits + R)
            slope = rp.data[ex.t_bits:]
            with m.If(ctl.load[1]):
                m.d.sync += [m1.eq(m_new), d1.eq(d_new), fl1.eq(fl0), row1.eq(row0),
                             floor1.eq(floor0), t1.eq(rp.data[:ex.t_bits]),
                             prod1.eq(slope * exp2_frac(s0, ex) if R else 0)]
                with m.If(ctl.valid[0] & fl0[0]):
                    m.d.sync += m_state.eq(m_new)

            # stage 2: interpolation post-add, exponent shift n = min(m' - floor(s), n_max)
            v2, n2 = reg(f"v2_{o}", ex.v_bits), reg(f"n2_{o}", ex.n_bits)
            m2, d2 = reg(f"m2_{o}", signed(Mb)), reg(f"d2_{o}", dbits)
            fl2, row2 = reg(f"flags2_{o}", 3), reg(f"row2_{o}", self.row_bits)
            with m.If(ctl.load[2]):
                m.d.sync += [v2.eq((t1 << R) + prod1), n2.eq(exp2_n(m1 - floor1, ex)),
                             m2.eq(m1), d2.eq(d1), fl2.eq(fl1), row2.eq(row1)]

            # stage 3: e = exp2(s - m') in exp_sum_fmt
            e3 = reg(f"e3_{o}", ex.out.bits)
            m3, d3 = reg(f"m3_{o}", signed(Mb)), reg(f"d3_{o}", dbits)
            fl3, row3 = reg(f"flags3_{o}", 3), reg(f"row3_{o}", self.row_bits)
            with m.If(ctl.load[3]):
                m.d.sync += [e3.eq(exp2_out(v2, n2, ex, q)), m3.eq(m2), d3.eq(d2),
                             fl3.eq(fl2), row3.eq(row2)]

            # running sum (the S loop), committed when the stage-3 beat leaves the pipeline
            act3, first3, last3 = fl3[0], fl3[1], fl3[2]
            s_state = reg(f"S_{o}", SB)
            sat_state = reg(f"satrow_{o}", 1)
            s_prev = Mux(first3, 0, s_state)
            tot = round_shift(s_prev, 0, d3, q.rounding) + e3
            s_new, s_over = fit_unsigned(tot, q.sum, q.overflow)
            sat_new = Mux(first3, 0, sat_state) | s_over
            sum_ev.append(fire & act3 & s_over)
            hold = reg(f"hold_{o}", data.StructLayout({"S": unsigned(SB), "meta": meta_layout}))
            holds.append(hold)
            m.d.comb += blocked[o].eq(ctl.valid[-1] & act3 & last3 & hold_v[o] & ~grant[o])
            with m.If(grant[o]):
                m.d.sync += hold_v[o].eq(0)
            with m.If(fire & act3):
                m.d.sync += [s_state.eq(s_new), sat_state.eq(sat_new)]
                with m.If(last3):
                    m.d.sync += [hold.S.eq(s_new), hold.meta.m.eq(m3), hold.meta.row.eq(row3),
                                 hold.meta.head.eq(head[-1]), hold.meta.sat.eq(sat_new),
                                 hold_v[o].eq(1)]

        # ---- arbiter, credits, shared pipelined divider, output FIFO --------------------------
        fifo = SyncFIFOBuffered(width=len(Value.cast(Signal(self.out_layout))),
                                depth=self.fifo_depth)
        m.submodules.fifo = fifo
        pending = Signal(range(self.fifo_depth + 1), name="pending")   # issued, not yet read
        can_issue = pending < self.fifo_depth
        m.d.comb += grant.eq(lowest_one(hold_v) & Mux(can_issue, (1 << P) - 1, 0))
        issue = grant.any()
        read = fifo.r_rdy & self.o.ready
        m.d.sync += pending.eq(pending + issue - read)

        # one-hot select of the granted hold register (an AND-OR, no priority chain)
        sel = Signal.like(holds[0], name="sel")
        sel_or = Mux(grant[0], holds[0].as_value(), 0)
        for o in range(1, P):
            sel_or = sel_or | Mux(grant[o], holds[o].as_value(), 0)
        m.d.comb += sel.as_value().eq(sel_or)
        sel_s, sel_meta = sel.S, sel.meta

        # divider stage 0: the issued row; overflow when the quotient needs more than iters bits
        r_start = dv.r_init if dv.r_init < (1 << SB) else 0
        dvalid = Signal(name="div_v0")
        dS, dmeta = reg("div_S0", SB), reg("div_meta0", meta_layout)
        dovf = reg("div_ovf0", 1)
        m.d.sync += dvalid.eq(issue)
        m.d.sync += [dS.eq(sel_s), dmeta.eq(sel_meta), dovf.eq(sel_s <= dv.r_init)]
        rem = Const(r_start, dv.rem_bits)
        quo = None
        for j in range(dv.iters - 1, -1, -1):    # quotient bit j of 2**(kk+1) // S
            bit = ((1 << (dv.kk + 1)) >> j) & 1
            r2 = Cat(Const(bit, 1), rem[:dv.rem_bits - 1])          # 2R + dividend bit
            diff = Signal(dv.rem_bits + 1, name=f"div_diff_{j}")
            m.d.comb += diff.eq(r2 - dS)                  # one carry chain: compare = no borrow
            ge = ~diff[-1]
            nrem = reg(f"div_R_{j}", dv.rem_bits)
            nquo = reg(f"div_q_{j}", dv.iters - j)
            nv = Signal(name=f"div_v_{j}")
            nS, novf = reg(f"div_S_{j}", SB), reg(f"div_ovf_{j}", 1)
            nmeta = reg(f"div_meta_{j}", meta_layout)
            m.d.sync += [nrem.eq(Mux(ge, diff[:dv.rem_bits], r2)), nv.eq(dvalid), nS.eq(dS),
                         nmeta.eq(dmeta), novf.eq(dovf),
                         nquo.eq(Cat(ge, quo) if quo is not None else ge)]
            rem, quo, dvalid, dS, dmeta, dovf = nrem, nquo, nv, nS, nmeta, novf

        # rounding of the quotient (one extra bit) and fit to recip, straight into the FIFO
        if q.rounding is Rounding.TRUNC:
            rq = quo[1:]
        else:
            rq = (quo + 1)[1:]
            if q.rounding is Rounding.HALF_EVEN:
                tie = quo[0] & (rem == 0)
                rq = rq - (tie & rq[0])
        rq_fit, r_over = fit_unsigned(rq, q.recip, q.overflow)
        if q.overflow is Overflow.SAT:
            recip = Mux(dovf, q.recip.max_int, rq_fit)
            r_sat = dovf | r_over
        else:
            recip, r_sat = rq_fit, r_over
        out_w = Signal(self.out_layout, name="div_out")
        m.d.comb += [out_w.recip.eq(recip), out_w.m.eq(dmeta.m), out_w.row.eq(dmeta.row),
                     out_w.head.eq(dmeta.head), out_w.sat.eq(dmeta.sat | r_sat),
                     fifo.w_data.eq(out_w), fifo.w_en.eq(dvalid),
                     fifo.r_en.eq(self.o.ready), self.o.valid.eq(fifo.r_rdy),
                     self.o.payload.eq(fifo.r_data)]
        # event count: sums as they are committed, reciprocals as they enter the FIFO
        m.d.sync += self.sat.eq(popcount(sum_ev) + (dvalid & r_sat))
        return m
