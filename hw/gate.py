"""Gate + patch reordering: router softmax over E experts, top-k, per-expert token queues.

Golden model: quant.approx.gate_fixed (per-token probabilities and top-k) and
quant.schedule.scatter_order / build_expert_queues / active_experts (queue and read order).
Widths come from quant.approx.exp2_params / exp_sum_fmt via gate_plan() below; the exp2 ROM
from edgemoe.quant.approx.exp2_frac_table. Testbench: sim/tb_gate.py, tests/test_gate_rtl.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from amaranth.hdl import Cat, Const, Module, Mux, ResetInserter, Shape, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from edgemoe.quant.approx import exp2_frac_table, exp2_params, exp_sum_fmt
from edgemoe.quant.config import QuantConfig
from edgemoe.quant.fixed import FormatError, Overflow, Rounding

from .config import HWConfig
from .pipeline import PipelineControl
from .requant import popcount

# tree levels between two registers: one 32-bit (max) or 17-bit (top-k) compare-select per
# stage, two adders per stage in the sum tree (chained carry chains overlap)
MAX_LEVELS_PER_STAGE, SUM_LEVELS_PER_STAGE, TOPK_LEVELS_PER_STAGE = 1, 2, 1
ROM_PORTS = 2               # exp2 ROM read ports per copy (Yosys 0.70's memory_libmap crashes on
                            # one ROM with 16 read ports)


def _bits(v: int) -> int:
    return max(1, int(v).bit_length())


@dataclass(frozen=True)
class GatePlan:
    """Every width and stage count of the gate datapath, derived in one place."""
    E: int              # experts
    k: int              # top-k
    N: int              # queue capacity (tokens per layer)
    tok_bits: int       # token index field
    exp_bits: int       # expert id field
    len_bits: int       # queue length 0..N
    addr_bits: int      # queue position 0..N-1
    lg_bits: int        # gate_logit bits
    lg_signed: bool
    in_frac: int        # F: gate_logit fraction bits
    table_bits: int     # B: ROM index bits
    interp_bits: int    # R: interpolation fraction bits
    table_frac: int     # TF: ROM entry fraction bits
    rom_t: tuple        # T[i], i < 2**B
    rom_d: tuple        # T[i+1] - T[i]
    t_bits: int         # ROM field widths
    d_bits: int
    v_bits: int         # v = (T << R) + D * r < 2**v_bits
    f_hi: int           # max(exp.frac, sum.frac): the finest exp2 output
    n_max: int          # exponent clamp: -k beyond f_hi + 2 gives 0 in both outputs
    c_shift: int        # constant part of the v shift: v >> (c_shift + n) has f_hi + 1 frac bits
    w_bits: int         # width of that shifted value
    e_frac: int         # exp.frac
    s_frac: int         # sum.frac
    s_max: int          # largest possible (saturated) sum code
    s_min: int          # smallest possible sum code (the top expert contributes exactly 1.0)
    s_bits: int
    sum_can_sat: bool
    q_bits: int         # restoring divider quotient bits (one per stage)
    div_init: int       # initial partial remainder 2**(kk + 1 - q_bits)
    recip_max: int      # largest reciprocal before the fit
    recip_bits: int
    recip_can_sat: bool
    p_shift: int        # p = round(e * recip >> p_shift)
    p_bits: int         # gate_prob bits (weights are never negative)
    p_can_sat: bool
    max_stages: int
    sum_stages: int
    topk_stages: int    # per top-k round
    sat_bits: int


def _tree_stages(n: int, per_stage: int) -> int:
    levels = math.ceil(math.log2(n)) if n > 1 else 0
    return math.ceil(levels / per_stage)


def gate_plan(qcfg: QuantConfig, num_experts: int, top_k: int, num_tokens: int) -> GatePlan:
    for nm, v in (("num_experts", num_experts), ("top_k", top_k), ("num_tokens", num_tokens)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"gate: {nm} = {v!r} must be a positive integer")
    if top_k > num_experts:
        raise ValueError(f"gate: top_k = {top_k} exceeds num_experts = {num_experts}")
    q = qcfg
    p = exp2_params(q, q.gate_logit)
    es = exp_sum_fmt(q)
    for fmt, nm in ((q.exp, "exp"), (es, "sum (exp2 on the sum path)")):
        if fmt.max_int < 1 << fmt.frac:
            raise FormatError(f"gate: QuantConfig '{q.name}': {nm} format {fmt} cannot hold 1.0, "
                              "the top expert's exp2(0); the gate unit needs it exactly")
    if q.exp.bits + q.recip.bits > 62:
        raise FormatError(f"gate: exp {q.exp} x recip {q.recip} exceeds 62 bits")
    tab = [int(v) for v in exp2_frac_table(q)]
    if len(tab) != (1 << p.table_bits) + 1:
        raise FormatError("gate: exp2 table size does not match exp_table_bits")
    rom_t = tuple(tab[:-1])
    rom_d = tuple(tab[i + 1] - tab[i] for i in range(len(tab) - 1))
    R = p.interp_bits
    v_max = max((t << R) + d * ((1 << R) - 1) for t, d in zip(rom_t, rom_d))
    f_hi = max(q.exp.frac, es.frac)
    c_shift = p.table_frac + R - f_hi - 1
    if c_shift < 0:
        raise FormatError("gate: exp2 table finer than its outputs expected (table_frac + R > f_hi)")
    w_max = v_max >> c_shift
    # sum: every token has one expert at exactly 2**sum.frac; all-equal logits give E times that
    s_full_max = num_experts << es.frac
    s_max = min(s_full_max, q.sum.max_int)
    s_min = min(1 << es.frac, q.sum.max_int)
    sum_can_sat = s_full_max > q.sum.max_int
    if sum_can_sat and q.overflow is Overflow.WRAP:
        raise FormatError(f"gate: QuantConfig '{q.name}': sum {q.sum} overflows for {num_experts} "
                          "experts and would wrap (possibly to 0: a division by zero); use "
                          "overflow=sat or a wider sum")
    kk = q.sum.frac + q.recip.frac
    if kk + 1 > 61:
        raise FormatError(f"gate: sum.frac + recip.frac = {kk} exceeds 60 bits")
    q2_max = (1 << (kk + 1)) // s_min
    q_bits = _bits(q2_max)
    recip_max = (q2_max + 1) >> 1
    recip_can_sat = recip_max > q.recip.max_int
    recip_hi = min(recip_max, q.recip.max_int)
    p_shift = q.exp.frac + q.recip.frac - q.gate_prob.frac
    prod_max = (1 << q.exp.frac) * recip_hi
    p_max = (prod_max + (1 << (p_shift - 1))) >> p_shift if p_shift > 0 else prod_max << -p_shift
    p_can_sat = p_max > q.gate_prob.max_int
    n = num_tokens
    sat_events = n * ((1 if sum_can_sat else 0) + (1 if recip_can_sat else 0)
                      + (num_experts if p_can_sat else 0))
    return GatePlan(
        E=num_experts, k=top_k, N=n, tok_bits=_bits(n - 1), exp_bits=_bits(num_experts - 1),
        len_bits=_bits(n), addr_bits=_bits(n - 1), lg_bits=q.gate_logit.bits,
        lg_signed=q.gate_logit.signed, in_frac=p.in_frac, table_bits=p.table_bits,
        interp_bits=R, table_frac=p.table_frac, rom_t=rom_t, rom_d=rom_d,
        t_bits=_bits(max(rom_t)), d_bits=_bits(max(rom_d)), v_bits=_bits(v_max), f_hi=f_hi,
        n_max=f_hi + 2, c_shift=c_shift, w_bits=_bits(w_max), e_frac=q.exp.frac,
        s_frac=es.frac, s_max=s_max, s_min=s_min, s_bits=_bits(s_max), sum_can_sat=sum_can_sat,
        q_bits=q_bits, div_init=1 << (kk + 1 - q_bits), recip_max=recip_max,
        recip_bits=_bits(recip_hi), recip_can_sat=recip_can_sat, p_shift=p_shift,
        p_bits=q.gate_prob.bits, p_can_sat=p_can_sat, max_stages=_tree_stages(num_experts, MAX_LEVELS_PER_STAGE),
        sum_stages=_tree_stages(num_experts, SUM_LEVELS_PER_STAGE),
        topk_stages=_tree_stages(num_experts, TOPK_LEVELS_PER_STAGE),
        sat_bits=_bits(sat_events))


def gate_latency(p: GatePlan) -> int:
    """Register stages from the input to the commit: in, max tree, x, rom, mul, add, shift,
    round, sum tree, divider, recip, pmul, prob. The k top-k trees run on the logits in parallel
    (they need k * topk_stages of those stages, far fewer)."""
    lat = 10 + p.max_stages + p.sum_stages + p.q_bits
    if p.k * p.topk_stages + 1 > lat:
        raise ValueError(f"gate: {p.k} top-k rounds of {p.topk_stages} stages do not fit the "
                         f"{lat}-stage probability pipeline (top_k too large for this shape)")
    return lat


# --- small datapath helpers (Amaranth expressions on unsigned values) ------------------------
def _round_shift(x, sh: int, rounding: Rounding, sticky_in=0):
    """round(x * 2**-sh) for unsigned x and a constant sh (sh <= 0: exact left shift); sticky_in
    says that x itself was already truncated (non-zero bits below its LSB)."""
    if sh <= 0:
        return x << -sh
    qv = x[sh:]
    half = x[sh - 1]
    if rounding is Rounding.TRUNC:
        return qv
    if rounding is Rounding.HALF_UP:
        return qv + half
    sticky = (x[:sh - 1].any() if sh >= 2 else 0) | sticky_in
    return qv + (half & (sticky | qv[0]))


def _fit_unsigned(x, fmt, overflow: Overflow, can_sat: bool):
    """(value, overflow flag) of a non-negative x brought into `fmt` (saturate or wrap)."""
    if not can_sat:
        return x, Const(0, 1)
    over = x > fmt.max_int
    if overflow is Overflow.SAT:
        return Mux(over, fmt.max_int, x), over
    return x[:fmt.bits], over


def _lowest_set(vec, n: int):
    """Index of the lowest set bit of an n-bit vector (priority encoder; 0 when none)."""
    res = Const(0, _bits(n - 1))
    for i in reversed(range(n)):
        res = Mux(vec[i], i, res)
    return res


class Gate(wiring.Component):
    """Router softmax + top-k + patch-reordering memory of one MoE layer.

    Design decision: the router logits come from the unified compute unit (the MAC array
    computes h2 @ Wr^T like any linear layer; the compiler folds log2(e) into Wr so the logits
    are base-2 exponents in gate_logit format). This unit's input is therefore a stream of
    per-token logit vectors, one beat = the E logits of one token plus its token index, tokens
    in increasing index order, `last` on the layer's final token.

    Per token (E lanes in parallel, all stages registered, no stalls: the queue memory always
    accepts, so the gating pipeline is a fixed-latency shift of valid bits):
      stage  0            input register
      stages 1..M         max tree over E logits (exact, one compare-select level per stage)
      x                   x_e = l_e - max  (gate_logit.bits + 1, <= 0)
      rom                 ROM[i] = (T[i], T[i+1] - T[i]) read with i = x[F-B:F] (one port per
                          lane); r = x[F-B-R:F-B]; n = min(-(x >> F), f_hi + 2)
      mul                 D * r  (unsigned 19 x 16 bits: one DSP48E2 per lane)
      add                 v = (T << R) + D * r   (= 2**f with TF + R fraction bits)
      shift               w = v >> (c + n): 2**x with f_hi + 1 fraction bits, plus a sticky bit
      round               e = round to exp.frac, es = round to sum.frac (exact golden rounding:
                          a longer clamp than the golden's per-output one gives 0 all the same)
      sum tree            S = sum es (exact), saturated to `sum` (2 adder levels per stage)
      divider x Q         restoring divider for round(2**(sum.frac+recip.frac) / S): Q = 24
                          pipelined stages of one compare-subtract on S's width (25 bits for E=16)
      recip               round(q2 / 2) (ties by the final remainder), fit to `recip`
      pmul                e_j * recip  (unsigned 17 x 23 bits: one DSP48E2 per lane); the e
                          vector waits in a fixed delay line (shift registers) while S divides
      prob                p_j = fit(round(e_j * recip >> (exp.frac + recip.frac - prob.frac)))
      top-k x k           in parallel from stage 0: round r is a masked arg-max tree over
                          (l_j, j) with the experts won in rounds < r masked; a node's left
                          operand holds the lower ids and wins equal logits, so the k winners
                          are exactly golden's stable top-k by logit code (E-1 comparators per
                          round, one level per stage); the E-bit mask then waits for the probs
      commit              every selected expert j's queue gets (token, p_j) at position len_j
    The pipelined divider is needed for throughput: the compute unit can deliver a token's E
    logits every ceil(D/t_in) * ceil(E/t_out) cycles (12 for edge-moe on zcu102-16x16, 4 for
    tiny), or one per cycle when its epilogue streams a finished tile; an iterative radix-2
    divider (Q = 24 cycles per token) would not keep up, a pipelined one never stalls.

    Patch-reordering memory: E banks (one per expert) of N entries (token, weight), so the k
    distinct experts of a token are written in one cycle, plus E length counters and an E-bit
    occupancy vector (the metaqueue). When the token with `last` commits, the read stream
    starts: for each non-empty expert in increasing id (priority encoder over the occupancy
    vector masked above the current expert, no bubble between experts) its entries in queue
    order (= increasing token index), i.e. exactly quant.schedule.scatter_order. After the
    final entry `done` rises; the queues, `lengths` and `active` stay readable until `start`.

    Exported module `edgemoe_gate` (hw/export.py naming rule); E = num_experts, k = top_k,
    N = num_tokens, TB = bits(N-1), EB = bits(E-1), LB = bits(N), P = gate_prob.bits:
      clk, rst            in   1      sync domain, active-high synchronous reset
      start               in   1      pulse: clears the queues, lengths, flags and every token in
                                      flight (synchronous clear; i.ready and o.valid are low in
                                      that cycle). Not needed after reset.
      i__valid            in   1
      i__ready            out  1      high while gating (until a `last` beat is accepted; then low
                                      until `start`); never low for back-pressure otherwise
      i__payload__logits  in   E*gate_logit.bits   logit of expert e at bits [e*G, (e+1)*G)
      i__payload__token   in   TB     token index (increasing within a layer)
      i__payload__last    in   1      the layer's final token
      o__valid            out  1      read stream of the queues, after the last token's commit
      o__ready            in   1
      o__payload__expert  out  EB
      o__payload__token   out  TB
      o__payload__weight  out  P      gate weight (gate_prob code)
      o__payload__last    out  1      last entry of this expert's queue
      o__payload__final   out  1      last entry of the layer
      lengths             out  E*LB   queue length of expert e at bits [e*LB, (e+1)*LB)
      active              out  E      occupancy vector (bit e: expert e's queue is not empty)
      done                out  1      the read stream has delivered its final entry
      overflow            out  1      sticky: a selected expert's queue was full (more than N
                                      tokens in the layer); that entry was dropped
      sat_count           out  bits(N*(sum/recip/prob sat events))  saturations of sum, recip
                                      and prob since start (counted like quant's SatCounter)
      dbg__valid          out  1      one cycle per committed token (no back-pressure)
      dbg__token          out  TB
      dbg__sel            out  E      the token's top-k set as a mask
      dbg__probs          out  E*P    all E gate probabilities of the token
    Throughput: one token per cycle at the input (E logits/cycle); the read stream one
    (expert, token, weight) entry per cycle, N*k entries per layer without bubbles.
    Latency: LATENCY (= 40 for E = 16, 37 for E = 4, k = 2, edge-moe-fixed) cycles from a token's
    input handshake to its commit (dbg__valid); READ_LATENCY = 3 more cycles from the commit of
    the `last` token to the first read entry. Drain after the last input: LATENCY +
    READ_LATENCY + N*k - 1 cycles to the final entry at full read rate (300 for edge-moe).
    Resources (edge-moe, zcu102-16x16, edge-moe-fixed; tests/baselines/synth_gate.json, Yosys
    synth_xilinx xcup): about 6.7k LUT, 7.1k FF, 32 DSP48E2, 8 BRAM36 (the 16 queue banks as
    RAMB18); ECP5-85k Fmax (nextpnr, tiny shape) about 109 MHz, limited by the 19 x 16-bit
    interpolation multiply that ECP5 splits over two 18 x 18 blocks.
    """

    READ_LATENCY = 3

    def __init__(self, qcfg: QuantConfig, hwcfg: HWConfig, mcfg):
        if mcfg is None:
            raise ValueError("gate: needs the ModelConfig (num_experts, top_k, num_tokens)")
        self.qcfg, self.hwcfg, self.mcfg = qcfg, hwcfg, mcfg
        self.plan = p = gate_plan(qcfg, mcfg.num_experts, mcfg.top_k, mcfg.num_tokens)
        self.LATENCY = gate_latency(p)
        # the compute unit's fastest token interval for the gate linear (for the docs/tests)
        self.token_interval = (-(-mcfg.dim // hwcfg.t_in)) * (-(-p.E // hwcfg.t_out))
        lg = Shape(p.lg_bits, p.lg_signed)
        super().__init__({
            "start": In(1),
            "i": In(stream.Signature(data.StructLayout({
                "logits": data.ArrayLayout(lg, p.E), "token": unsigned(p.tok_bits),
                "last": 1}))),
            "o": Out(stream.Signature(data.StructLayout({
                "expert": unsigned(p.exp_bits), "token": unsigned(p.tok_bits),
                "weight": unsigned(p.p_bits), "last": 1, "final": 1}))),
            "lengths": Out(data.ArrayLayout(unsigned(p.len_bits), p.E)),
            "active": Out(p.E),
            "done": Out(1),
            "overflow": Out(1),
            "sat_count": Out(p.sat_bits),
            "dbg": Out(data.StructLayout({
                "valid": 1, "token": unsigned(p.tok_bits), "sel": p.E,
                "probs": data.ArrayLayout(unsigned(p.p_bits), p.E)})),
        })

    def elaborate(self, platform):
        m = Module()
        p, q = self.plan, self.qcfg
        E, rnd = p.E, q.rounding

        def reg(value, name, shape=None):
            s = Signal(shape if shape is not None else value.shape(), name=name, reset_less=True)
            m.d.sync += s.eq(value)
            return s

        def regs(values, name, shape=None):
            return [reg(v, f"{name}{j}", shape) for j, v in enumerate(values)]

        def delay(value, n, name):
            for j in range(n):
                value = reg(value, f"{name}_d{j}")
            return value

        stage = 0                        # stage whose registers the current values live in

        # --- input and layer state ----------------------------------------------------------
        got_last = Signal()                  # the layer's last token was accepted
        m.d.comb += self.i.ready.eq(~got_last & ~self.start)
        take = self.i.valid & self.i.ready
        with m.If(take & self.i.payload.last):
            m.d.sync += got_last.eq(1)
        lg = regs([self.i.payload.logits[e] for e in range(E)], "lg", Shape(p.lg_bits, p.lg_signed))
        tok0 = reg(self.i.payload.token, "tok0")
        last0 = reg(self.i.payload.last, "last0")

        # --- max tree -------------------------------------------------------------------------
        vals, level = list(lg), 0
        while len(vals) > 1:
            vals = [Mux(vals[j] >= vals[j + 1], vals[j], vals[j + 1]) if j + 1 < len(vals)
                    else vals[j] for j in range(0, len(vals), 2)]
            level += 1
            if level % MAX_LEVELS_PER_STAGE == 0 or len(vals) == 1:
                vals = regs(vals, f"mx{stage}_", Shape(p.lg_bits, p.lg_signed))
                stage += 1
        mx = vals[0]
        assert stage == p.max_stages
        lgd = [delay(v, p.max_stages, f"lg{e}") for e, v in enumerate(lg)]

        # --- top-k: k rounds of a masked arg-max tournament over the LOGITS (E-1 compare-selects
        # each), in parallel with the probability datapath. A node is (ok, l, id); its left
        # operand holds the lower expert ids, so it wins equal logits: exactly golden's stable
        # top-k by logit code. The logits order the experts as their probabilities do, but
        # without the ties of probabilities that round to the same (often 0) gate_prob code.
        won, ts = Const(0, E), 0                           # experts taken by earlier rounds
        keys = list(lg)
        for rk in range(p.k):
            nodes = [(~won[j], keys[j], Const(j, p.exp_bits)) for j in range(E)]
            level = 0
            while len(nodes) > 1:
                nxt = []
                for j in range(0, len(nodes), 2):
                    if j + 1 == len(nodes):
                        nxt.append(nodes[j])
                        continue
                    (oa, la, ia), (ob, lb, ib) = nodes[j], nodes[j + 1]
                    a_wins = oa & (~ob | (la >= lb))
                    nxt.append((oa | ob, Mux(a_wins, la, lb), Mux(a_wins, ia, ib)))
                nodes, level = nxt, level + 1
                if level % TOPK_LEVELS_PER_STAGE == 0 or len(nodes) == 1:
                    nodes = [(reg(o, f"tk{rk}_{ts}_o{j}", unsigned(1)),
                              reg(ll, f"tk{rk}_{ts}_l{j}", Shape(p.lg_bits, p.lg_signed)),
                              reg(ii, f"tk{rk}_{ts}_i{j}", unsigned(p.exp_bits)))
                             for j, (o, ll, ii) in enumerate(nodes)]
                    keys = [reg(keys[j], f"tk_l{j}_{ts}") for j in range(E)]
                    won = reg(won, f"won{ts}", unsigned(E))
                    ts += 1
            winner = nodes[0][2]
            won = won | Cat(*[winner == j for j in range(E)]) if E > 1 else Const(1, 1)
        assert ts == p.k * p.topk_stages

        # --- x = l - max; ROM address, interpolation fraction and exponent clamp ---------------
        F, B, R = p.in_frac, p.table_bits, p.interp_bits
        x = regs([lgd[e] - mx for e in range(E)], "x", Shape(p.lg_bits + 1, True))
        stage += 1
        rom_rd, r, n = [], [], []
        for e in range(E):
            if e % ROM_PORTS == 0:       # a copy per ROM_PORTS lanes (a dual-port block)
                rom = Memory(shape=unsigned(p.t_bits + p.d_bits), depth=1 << B,
                             init=[t | (d << p.t_bits) for t, d in zip(p.rom_t, p.rom_d)])
                m.submodules[f"exp2_rom{e // ROM_PORTS}"] = rom
            port = rom.read_port()
            m.d.comb += port.addr.eq(x[e][F - B:F])
            rom_rd.append(port.data)
            neg_k = -x[e][F:].as_signed()                  # 0 .. 2**(G-F)
            r.append(reg(x[e][F - B - R:F - B], f"r{e}"))
            n.append(reg(Mux(neg_k > p.n_max, p.n_max, neg_k)[:_bits(p.n_max)], f"n{e}",
                         unsigned(_bits(p.n_max))))
        stage += 1
        # --- D * r (DSP), then v = (T << R) + D * r ------------------------------------------
        prod = [reg(rom_rd[e][p.t_bits:] * r[e], f"dr{e}") for e in range(E)]
        tt = [reg(rom_rd[e][:p.t_bits], f"tt{e}") for e in range(E)]
        n = [reg(n[e], f"n{e}_m") for e in range(E)]
        stage += 1
        v = [reg((tt[e] << R) + prod[e], f"v{e}", unsigned(p.v_bits)) for e in range(E)]
        n = [reg(n[e], f"n{e}_a") for e in range(E)]
        stage += 1
        # --- w = v >> (c + n) with a sticky bit of everything shifted out --------------------
        w, sticky = [], []
        for e in range(E):
            val = v[e][p.c_shift:]
            st = v[e][:p.c_shift].any() if p.c_shift else Const(0, 1)
            for b in range(len(n[e])):
                amt = 1 << b
                st = Mux(n[e][b], st | val[:amt].any(), st)
                val = Mux(n[e][b], val >> amt, val)
            w.append(reg(val[:p.w_bits], f"w{e}", unsigned(p.w_bits)))
            sticky.append(reg(st, f"st{e}"))
        stage += 1
        # --- round to exp (e) and to sum.frac (es) -----------------------------------------
        ev = [reg(_round_shift(w[j], p.f_hi - p.e_frac + 1, rnd, sticky[j]), f"e{j}",
                  unsigned(p.e_frac + 1)) for j in range(E)]
        es = [reg(_round_shift(w[j], p.f_hi - p.s_frac + 1, rnd, sticky[j]), f"es{j}",
                  unsigned(p.s_frac + 1)) for j in range(E)]
        stage += 1
        e_stage = stage

        # --- sum tree, fit to `sum` ----------------------------------------------------------
        vals, level, st0 = list(es), 0, stage
        while len(vals) > 1:
            vals = [vals[j] + vals[j + 1] if j + 1 < len(vals) else vals[j]
                    for j in range(0, len(vals), 2)]
            level += 1
            if level % SUM_LEVELS_PER_STAGE == 0 or len(vals) == 1:
                vals = regs(vals, f"sum{stage}_")
                stage += 1
        assert stage - st0 == p.sum_stages
        s_val, sum_ovf = _fit_unsigned(vals[0], q.sum, q.overflow, p.sum_can_sat)
        sum_stage = stage
        sat_events = [(sum_stage, sum_ovf)]

        # --- restoring divider: q2 = floor(2**(kk+1) / S), one quotient bit per stage --------
        rem = Const(p.div_init, p.s_bits)
        den = s_val[:p.s_bits]
        quo = Const(0, 1)
        for j in range(p.q_bits):
            two = Cat(Const(0, 1), rem)                    # 2 * rem < 2 * S
            diff = two - den
            ge = two >= den
            rem = reg(Mux(ge, diff, two)[:p.s_bits], f"dv_r{j}", unsigned(p.s_bits))
            den = reg(den, f"dv_s{j}", unsigned(p.s_bits))
            quo = reg(Cat(ge, quo) if j else ge, f"dv_q{j}", unsigned(j + 1))
            stage += 1
        # --- recip = round(q2 / 2) (remainder != 0 is the sticky), fit to `recip` --------------
        rq = _round_shift(quo, 1, rnd, rem.any())
        rq, recip_ovf = _fit_unsigned(rq, q.recip, q.overflow, p.recip_can_sat)
        recip = reg(rq, "recip", unsigned(p.recip_bits))
        recip_ovf = reg(recip_ovf, "recip_ovf")
        stage += 1
        sat_events.append((stage, recip_ovf))
        # e vector waits in a delay line while the sum is divided
        ed = [delay(ev[j], stage - e_stage, f"e{j}") for j in range(E)]
        # --- p = fit(round(e * recip >> p_shift)) ----------------------------------------------
        pr = [reg(ed[j] * recip, f"pm{j}") for j in range(E)]
        stage += 1
        pv, povf = [], []
        for j in range(E):
            val, o = _fit_unsigned(_round_shift(pr[j], p.p_shift, rnd), q.gate_prob, q.overflow,
                                   p.p_can_sat)
            pv.append(reg(val[:p.p_bits], f"p{j}", unsigned(p.p_bits)))
            povf.append(reg(o, f"p_ovf{j}"))
        stage += 1
        sat_events.append((stage, popcount(povf)))
        assert stage == self.LATENCY - 1, (stage, self.LATENCY)
        sel = Signal(E, name="sel")
        m.d.comb += sel.eq(delay(won, stage - ts, "sel"))   # won: the mask after stage ts
        tok = delay(tok0, stage, "tok")
        last = delay(last0, stage, "last")

        # valid bits (reset by rst and by start): valid[s] = a token sits in stage s's registers
        valid = [Signal(name=f"gv{s}") for s in range(stage + 1)]
        m.d.sync += valid[0].eq(take)
        for s in range(1, stage + 1):
            m.d.sync += valid[s].eq(valid[s - 1])
        commit = valid[stage]                              # sel registers hold a token

        # --- saturation counter ---------------------------------------------------------------
        sat_count = Signal(p.sat_bits)
        m.d.sync += sat_count.eq(sat_count + sum(Mux(valid[s], f, 0) for s, f in sat_events))
        m.d.comb += self.sat_count.eq(sat_count)

        # --- queue memory, lengths, occupancy -------------------------------------------------
        lens = [Signal(p.len_bits, name=f"len{e}") for e in range(E)]
        active = Signal(E)
        overflow = Signal()
        banks = []
        for e in range(E):
            bank = Memory(shape=unsigned(p.tok_bits + p.p_bits), depth=p.N, init=[])
            m.submodules[f"queue{e}"] = bank
            wp = bank.write_port()
            full = lens[e] == p.N
            m.d.comb += [wp.addr.eq(lens[e][:p.addr_bits]), wp.data.eq(Cat(tok, pv[e])),
                         wp.en.eq(commit & sel[e] & ~full)]
            with m.If(commit & sel[e]):
                with m.If(full):
                    m.d.sync += overflow.eq(1)
                with m.Else():
                    m.d.sync += [lens[e].eq(lens[e] + 1), active[e].eq(1)]
            banks.append(bank)
        m.d.comb += [self.lengths[e].eq(lens[e]) for e in range(E)]
        m.d.comb += [self.active.eq(active), self.overflow.eq(overflow)]
        m.d.comb += [self.dbg.valid.eq(commit), self.dbg.token.eq(tok), self.dbg.sel.eq(sel)]
        m.d.comb += [self.dbg.probs[e].eq(pv[e]) for e in range(E)]

        # --- read stream: generator -> [s0: bank address] -> [s1: bank data] -> o ------------
        gen_on = Signal()                                  # entries left to issue
        ctl = PipelineControl(m, 2, gen_on, self.o.ready, name="rd")
        e_cur = Signal(p.exp_bits)
        pos = Signal(p.addr_bits)
        len_cur = Cat(*lens).word_select(e_cur, p.len_bits) if E > 1 else lens[0]
        above = Signal(E)                                  # active experts after e_cur
        m.d.comb += above.eq(active & (Const((1 << E) - 1, E) << (e_cur + 1))[:E])
        is_last = pos + 1 == len_cur
        is_final = is_last & ~above.any()
        s0_e, s1_e = Signal(p.exp_bits), Signal(p.exp_bits)
        s0_pos = Signal(p.addr_bits)
        s0_last, s0_final, s1_last, s1_final = Signal(), Signal(), Signal(), Signal()
        with m.If(gen_on & ctl.load[0]):
            m.d.sync += [s0_e.eq(e_cur), s0_pos.eq(pos), s0_last.eq(is_last),
                         s0_final.eq(is_final)]
            with m.If(is_last):
                with m.If(is_final):
                    m.d.sync += gen_on.eq(0)
                with m.Else():
                    m.d.sync += [e_cur.eq(_lowest_set(above, E)), pos.eq(0)]
            with m.Else():
                m.d.sync += pos.eq(pos + 1)
        with m.If(commit & last):                          # the layer's last token: start reading
            m.d.sync += [gen_on.eq(1), e_cur.eq(_lowest_set(active | sel, E)), pos.eq(0)]
        with m.If(ctl.load[1]):
            m.d.sync += [s1_e.eq(s0_e), s1_last.eq(s0_last), s1_final.eq(s0_final)]
        words = []
        for bank in banks:
            rp = bank.read_port()
            m.d.comb += [rp.addr.eq(s0_pos), rp.en.eq(ctl.load[1])]
            words.append(rp.data)
        width = p.tok_bits + p.p_bits
        word = Cat(*words).word_select(s1_e, width) if E > 1 else words[0]
        done = Signal()
        m.d.comb += [
            self.o.valid.eq(ctl.out_valid & ~self.start),
            self.o.payload.expert.eq(s1_e),
            self.o.payload.token.eq(word[:p.tok_bits]),
            self.o.payload.weight.eq(word[p.tok_bits:]),
            self.o.payload.last.eq(s1_last),
            self.o.payload.final.eq(s1_final),
            self.done.eq(done),
        ]
        with m.If(self.o.valid & self.o.ready & s1_final):
            m.d.sync += done.eq(1)
        # `start` clears every register that has a reset value (valid bits, lengths, flags,
        # counters, read state); datapath registers and memories need none.
        return ResetInserter(self.start)(m)
