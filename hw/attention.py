"""AttentionEngine: softmax(Q.K^T) . V of one layer, all heads, on its own dot-product lanes.

Golden model: quant.attention.attention_golden (= GoldenModel.attention from qkv onward).
Testbench: sim/tb_attention.py, tests/test_attention_rtl.py. Cycle model:
sim.perf.attention_cycles_engine.

Data flow (one layer; n tokens, H heads, head_dim dh, P = hwcfg.attn_p, lanes = min(P, n)):
  LOAD   the write port `w` takes the Q, K and V rows of every head as attn_in codes (the caller
         requantizes qkv from act to attn_in; the compute unit's epilogue can emit attn_in
         directly), one dh-vector per beat, tagged (sel: 0 Q / 1 K / 2 V, head, row). Each of
         the 3*H*n rows must be written exactly once; the engine starts when the count is reached.
  per head h:
  QK     the Edge-MoE constant-bandwidth reorder of quant/schedule.py: a key counter walks the
         keys 0, 1, ..., n-1, 0, ... and reads ONE K block (K[h, key], dh codes) per cycle, which
         is broadcast to the lanes; lane o holds query rows o, o+P, ... one at a time and loads
         the next one (ONE Q block read, into the lane's resident Q register) when the key
         counter reaches o. Each busy lane computes q_row . k_key over dh in one cycle (dh
         multipliers per lane) and the score is requantized to `score`. The P scores of a cycle
         form one beat of hw/softmax.SoftmaxStats (lane o = lane o, rows in row_key_order(n, P)
         order, as the golden model's online softmax), whose (recip, m, row) outputs go to the
         stats memory, and one word of the score memory (address = the schedule cycle).
  AV     once all n rows' stats are in, a second copy of the schedule runs the same order again:
         each lane's score, read back from the score memory, goes through its own 1-lane
         hw/softmax_norm.SoftmaxNorm with the (m, recip) of the lane's row (read from the stats
         memory when the row starts); p . V[key] accumulates over the row's n keys into dh
         accumulators per lane (the V block of the key is read once per cycle, as K is in QK), and
         the finished row is requantized to act and streamed out with its (head, row) tag.
  Overlap: the score and stats memories have two banks (head parity), so the AV pass of head h
         runs beside the QK pass of head h + 1 on their own lanes (QK: the dot products, AV: the
         normalisers and the p * V multipliers). QK of head h + 2 waits until AV of head h has
         issued its last cycle (it overwrites that bank). A layer takes about H + 1 schedule
         passes instead of 2 H.
Why a score memory in schedule order: the QK lanes produce scores column-wise (P rows, one key
per cycle) and the per-lane normalisers consume them in exactly that order, so no transpose is
needed: C words of lanes * score.bits per bank (C = attention_cycles(n, P): 2,193 x 128 bits at
n = 129, P = 8, about 8 BRAM36 for both banks). The design before it recomputed Q.K^T in the AV
pass, which kept the dot lanes busy there and serialised the heads. Why per-lane 1-lane
normalisers rather than one L-lane beat per row: in the reorder every lane holds a different
row, each with its own (m, recip) -- exactly the case SoftmaxNorm handles one row per beat; P
1-lane instances keep one probability per lane per cycle. Padding never occurs (a lane without a
row is masked by its `active` flag).

Read strobes (for the bandwidth check; one per memory read port): k_rd and q_rd (the QK pass),
v_rd (the AV pass) and av (the AV pass issues this cycle). At most one K, one V and one Q block
per cycle.
Exported module `edgemoe_attention`, W = bits of n-1, Hb = bits of heads-1 (both >= 1):
  clk, rst            in  1   sync domain, active-high synchronous reset
  w__valid/ready      in/out  write port (ready only in the LOAD phase)
  w__payload__sel     in  2   0: Q row, 1: K row, 2: V row
  w__payload__head    in  Hb
  w__payload__row     in  W
  w__payload__data    in  dh*attn_in.bits  element c at bits [c*attn_in.bits, ...), signed
  o__valid/ready      out/in  output rows
  o__payload__row     out W
  o__payload__head    out Hb
  o__payload__data    out dh*act.bits   o[row, head*dh + c] at bits [c*act.bits, ...), signed
  k_rd, q_rd, v_rd    out 1   a K / Q (QK pass) / V (AV pass) block is read this cycle
  av                  out 1   the AV pass issues a schedule cycle this cycle
  sat                 out Sb  saturation events this cycle (registered), Sb = bits of
                              2*lanes + attn_p + 1 + dh: every event Machine._op_attention's
                              SatCounter counts after attn_in -- score requantize (per score, in
                              the QK pass; the AV pass reads the stored codes), softmax sum (per
                              score) and recip (per row) from SoftmaxStats.sat, prob (per
                              probability, active lanes only) from SoftmaxNorm.sat_count, output
                              requantize (per output code). A layer's events are all reported by
                              the cycle its last output row is handed over.
Rows of a head come out in the order they finish (lane o's rows end at distinct cycles), heads
in order; the consumer places them by tag.
Throughput: P (query row, key) pairs per cycle in each pass (both passes at utilisation
schedule_stats(n, P).utilisation), the passes of consecutive heads side by side: about
(H + 1) n^2 / P cycles per layer. The output FIFO has room for every row in flight; the AV
schedule pauses while it is nearly full (output back-pressure).
Latency: a layer takes, from the last write to the last output row, exactly
sim.perf.attention_passes(...)["cycles"] (sim.perf.attention_cycles_engine: the two sequencers'
recurrence per head) when the output is never stalled (asserted by the tests for P = 1..8 and
three heads). Edge-moe shape n = 129, H = 3, P = 8: 8,857 cycles (the recomputing design: 13,283).
Pipeline: QK: issue (schedule registers, K / Q addresses) -> s1 read data (resident Q
registers) -> s2 dot products (dh multiplies + adder tree, one cycle) -> s3 score requantize ->
SoftmaxStats and the score memory. AV: issue (score / stats addresses) -> s1 read data (resident
stats registers) -> SoftmaxNorm (6) -> MAC (dh accumulators per lane; the V block read
SoftmaxNorm.LATENCY cycles after the issue, so it arrives with the probability) -> output
register -> requantize into a 32-deep output FIFO.
Resources (Yosys synth_xilinx xcup, edge-moe-fixed, zcu102-16x16 (P = 4), tiny shape n = 9,
H = 2, dh = 32; tests/baselines/synth_attention.json): about 30.4k LUT, 17.1k FF, 396 DSP48E2
(QK: P*dh 24x24 multiplies at two DSPs each = 256, AV: P*dh 17x24 = 128, SoftmaxStats 4,
SoftmaxNorm 2 per lane), no BRAM (the Q/K/V memories of 18 rows become LUTRAM; measured before
the score memory, which adds 2 x attention_cycles(n, P) words of P scores). DSPs grow as
3*P*dh: 768 at the edge-moe shape (dh = 64), about 30 % of an XCZU9EG.
ECP5-85k out of context: the tiny shape at P = 4 does not fit (784 MULT18X18D needed, 156
there); P = 1, n = 9, H = 2, dh = 8 reaches about 41 MHz (the one-cycle dot product and the
SoftmaxStats S loop).
Not handled: the dot product is one adder tree per cycle (no pipelined DSP cascade), which
limits Fmax.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from edgemoe.quant.config import QuantConfig
from edgemoe.quant.fixed import Fmt, FormatError, Overflow, Rounding
from edgemoe.quant.schedule import attention_cycles

from .config import HWConfig
from .requant import popcount
from .softmax import SoftmaxStats, softmax_m_bits
from .softmax_norm import SoftmaxNorm


def requant_signed(x, shift: int, dst: Fmt, rounding: Rounding, overflow: Overflow):
    """edgemoe.quant.fixed.requantize of a signed Value by a right shift >= 1: (code, over), both
    expressions; over = the rounded value left dst's range (counted under SAT and WRAP alike,
    as quant.fixed.Fmt.fit counts)."""
    if shift < 1:
        raise FormatError(f"attention: requantize shift {shift} must be >= 1")
    x = x.as_signed()
    fl = x[shift:].as_signed()
    half = x[shift - 1]
    sticky = x[:shift - 1].any() if shift >= 2 else Const(0, 1)
    r = Rounding(rounding)
    if r is Rounding.TRUNC:
        qv = fl
    elif r is Rounding.HALF_UP:
        qv = fl + half
    else:
        qv = fl + (half & (sticky | fl[0]))
    over = (qv > dst.max_int) | (qv < dst.min_int)
    if Overflow(overflow) is Overflow.SAT:
        code = Mux(qv > dst.max_int, dst.max_int, Mux(qv < dst.min_int, dst.min_int, qv))
        return code[:dst.bits], over
    return qv[:dst.bits], over


class AttentionEngine(wiring.Component):
    PIPE = 3            # issue -> score register (s1 read data, s2 dot, s3 score)
    FIFO_DEPTH = 32

    def __init__(self, qcfg: QuantConfig, hwcfg: HWConfig, n: int, heads: int, head_dim: int):
        for name, v in (("num_tokens", n), ("heads", heads), ("head_dim", head_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"AttentionEngine: {name} = {v!r} must be a positive integer")
        self.qcfg, self.hwcfg = qcfg, hwcfg
        self.n, self.heads, self.dh = n, heads, head_dim
        self.P = hwcfg.attn_p
        self.lanes = min(self.P, n)
        self.C = attention_cycles(n, self.P)     # schedule cycles of one pass of one head
        self.row_bits = max(1, (n - 1).bit_length())
        self.head_bits = max(1, (heads - 1).bit_length())
        self.m_bits = softmax_m_bits(qcfg)
        ain = qcfg.attn_in
        self.score_shift = 2 * ain.frac - qcfg.score.frac
        self.out_shift = qcfg.prob.frac + ain.frac - qcfg.act.frac
        for nm, s in (("2*attn_in.frac - score.frac", self.score_shift),
                      ("prob.frac + attn_in.frac - act.frac", self.out_shift)):
            if s < 1:
                raise FormatError(f"QuantConfig '{qcfg.name}': {nm} = {s} must be >= 1 "
                                  "(the engine rounds by a right shift)")
        self.NORM_LAT = SoftmaxNorm.LATENCY
        # most events in one cycle: scores + sums + a recip + probs + an output row (a head's
        # AV tail can overlap the next head's QK pass)
        self.sat_max = self.lanes + self.P + 1 + self.lanes + head_dim
        w_layout = data.StructLayout({
            "sel": unsigned(2), "head": unsigned(self.head_bits), "row": unsigned(self.row_bits),
            "data": data.ArrayLayout(signed(ain.bits), head_dim)})
        self.o_layout = data.StructLayout({
            "row": unsigned(self.row_bits), "head": unsigned(self.head_bits),
            "data": data.ArrayLayout(signed(qcfg.act.bits), head_dim)})
        super().__init__({"w": In(stream.Signature(w_layout)),
                          "o": Out(stream.Signature(self.o_layout)),
                          "k_rd": Out(1), "q_rd": Out(1), "v_rd": Out(1), "av": Out(1),
                          "sat": Out(unsigned(self.sat_max.bit_length()))})

    @classmethod
    def from_model(cls, qcfg, hwcfg, mcfg) -> "AttentionEngine":
        if mcfg is None:
            raise ValueError("AttentionEngine needs a ModelConfig (num_tokens, heads, head_dim)")
        return cls(qcfg, hwcfg, mcfg.num_tokens, mcfg.heads, mcfg.head_dim)

    def elaborate(self, platform):
        m = Module()
        q, n, H, dh, P, NL = self.qcfg, self.n, self.heads, self.dh, self.P, self.lanes
        ain = q.attn_in
        Wr, Hb = self.row_bits, self.head_bits
        # built here, not in __init__, so an unelaborated engine leaves no unused submodules
        m.submodules.stats = st = SoftmaxStats(q, self.hwcfg, n, H)
        norms = [SoftmaxNorm(q, self.hwcfg.replace(lanes=1)) for _ in range(NL)]
        for o, nm in enumerate(norms):
            m.submodules[f"norm{o}"] = nm

        def reg(name, shape, reset_less=True):
            return Signal(shape, name=name, reset_less=reset_less)

        # ---- memories -------------------------------------------------------------------------
        vec = data.ArrayLayout(signed(ain.bits), dh)
        mems = {}
        for nm in ("q", "k", "v"):
            mems[nm] = Memory(shape=vec, depth=H * n, init=[])
            m.submodules[f"mem_{nm}"] = mems[nm]
        stat_layout = data.StructLayout({"recip": unsigned(q.recip.bits),
                                         "m": signed(self.m_bits)})
        # two banks (head parity): the AV pass of head h reads bank h % 2 while the QK pass of
        # head h + 1 writes the other one
        nb = 2 if H > 1 else 1
        smem = Memory(shape=stat_layout, depth=nb * n, init=[])
        m.submodules.mem_stats = smem
        # the QK pass's scores of a head, one word of `lanes` scores per schedule cycle, in
        # schedule order: the AV pass runs the same schedule and reads them back in that order
        C = self.C
        score_vec = data.ArrayLayout(signed(q.score.bits), NL)
        scmem = Memory(shape=score_vec, depth=nb * C, init=[])
        m.submodules.mem_scores = scmem

        def parity(h):
            return h[0] if H > 1 else Const(0, 1)

        # ---- control --------------------------------------------------------------------------
        LOAD, COMPUTE = range(2)
        phase = Signal(range(2), name="phase", init=LOAD)
        wcount = Signal(range(3 * H * n + 1), name="wcount")
        stats_cnt = Signal(range(n + 1), name="stats_cnt")
        stats_heads = Signal(range(H + 1), name="stats_heads")   # heads whose n stats are in
        out_cnt = Signal(range(H * n + 1), name="out_cnt")
        qk_run = Signal(name="qk_run")
        qk_head = Signal(range(max(H, 2)), name="qk_head")
        av_run = Signal(name="av_run")
        av_head = Signal(range(H + 1), name="av_head")   # = AV passes finished

        # write port
        wp = self.w.payload
        m.d.comb += self.w.ready.eq(phase == LOAD)
        waddr = wp.head * n + wp.row
        for s, nm in enumerate(("q", "k", "v")):
            port = mems[nm].write_port()
            m.d.comb += [port.addr.eq(waddr), port.data.eq(wp.data),
                         port.en.eq(self.w.valid & self.w.ready & (wp.sel == s))]

        # ---- schedules (quant.schedule.attention_schedule as registers), one per pass --------
        def schedule(tag, issue):
            key = Signal(range(n), name=f"key_{tag}")
            busy = [Signal(name=f"busy_{tag}{o}") for o in range(NL)]
            row = [Signal(range(n), name=f"row_{tag}{o}") for o in range(NL)]
            left = [Signal(range(n + 1), name=f"left_{tag}{o}") for o in range(NL)]
            nxt = [Signal(range(n + P + 1), name=f"next_{tag}{o}") for o in range(NL)]
            s = {"key": key, "pending": Cat(*[busy[o] | (nxt[o] < n) for o in range(NL)]).any(),
                 "load": [Signal(name=f"load_{tag}{o}") for o in range(NL)],
                 "act": [Signal(name=f"act_{tag}{o}") for o in range(NL)],
                 "cur": [Signal(range(n), name=f"cur_{tag}{o}") for o in range(NL)],
                 "last": [Signal(name=f"last_{tag}{o}") for o in range(NL)],
                 "load_row": Signal(range(n), name=f"load_row_{tag}")}
            for o in range(NL):
                ld = s["load"][o]
                m.d.comb += [ld.eq((key == o) & ~busy[o] & (nxt[o] < n)),
                             s["act"][o].eq(ld | busy[o]),
                             s["cur"][o].eq(Mux(ld, nxt[o], row[o])),
                             s["last"][o].eq(s["act"][o] & Mux(ld, n == 1, left[o] == 1))]
                with m.If(issue):
                    with m.If(ld):
                        m.d.sync += [row[o].eq(nxt[o]), nxt[o].eq(nxt[o] + P), left[o].eq(n - 1),
                                     busy[o].eq(n > 1)]
                    with m.Elif(busy[o]):
                        m.d.sync += [left[o].eq(left[o] - 1), busy[o].eq(left[o] != 1)]
                with m.If(ld):
                    m.d.comb += s["load_row"].eq(nxt[o])
            with m.If(issue):
                m.d.sync += key.eq(Mux(key == n - 1, 0, key + 1))
            s["any_load"] = Cat(*s["load"]).any()

            def reset():
                m.d.sync += key.eq(0)
                for o in range(NL):
                    m.d.sync += [busy[o].eq(0), nxt[o].eq(o)]
            s["reset"] = reset
            return s

        fifo = SyncFIFOBuffered(width=len(Signal(self.o_layout).as_value()), depth=self.FIFO_DEPTH)
        m.submodules.fifo = fifo
        room = fifo.level <= self.FIFO_DEPTH - (self.PIPE + self.NORM_LAT + 4)
        issue_a, issue_b = Signal(name="issue_qk"), Signal(name="issue_av")
        A = schedule("qk", issue_a)
        B = schedule("av", issue_b)
        # QK of head h overwrites the banks AV of head h - 2 reads: it waits for that pass
        m.d.comb += [issue_a.eq(qk_run & A["pending"] & (qk_head <= av_head + 1)),
                     issue_b.eq(av_run & B["pending"] & room)]

        # phase machine and the two pass sequencers
        with m.If(phase == LOAD):
            with m.If(self.w.valid & self.w.ready):
                m.d.sync += wcount.eq(wcount + 1)
                with m.If(wcount == 3 * H * n - 1):
                    m.d.sync += [phase.eq(COMPUTE), wcount.eq(0), qk_run.eq(1), qk_head.eq(0),
                                 av_run.eq(0), av_head.eq(0), out_cnt.eq(0), stats_cnt.eq(0),
                                 stats_heads.eq(0)]
                    A["reset"]()
                    B["reset"]()
        with m.Else():
            with m.If(qk_run & ~A["pending"]):
                A["reset"]()
                with m.If(qk_head == H - 1):
                    m.d.sync += qk_run.eq(0)
                with m.Else():
                    m.d.sync += qk_head.eq(qk_head + 1)
            with m.If(av_run & ~B["pending"]):
                B["reset"]()
                m.d.sync += [av_run.eq(0), av_head.eq(av_head + 1)]
            with m.Elif(~av_run & (av_head < H) & (stats_heads > av_head)):
                m.d.sync += av_run.eq(1)
            with m.If(out_cnt == H * n):
                m.d.sync += phase.eq(LOAD)
        m.d.comb += [self.k_rd.eq(issue_a), self.q_rd.eq(issue_a & A["any_load"]),
                     self.av.eq(issue_b)]

        # ---- QK pass: issue -> s1 operands -> s2 dot products -> s3 scores ----------------------
        rk, rq = mems["k"].read_port(domain="sync"), mems["q"].read_port(domain="sync")
        base_a = qk_head * n
        m.d.comb += [rk.addr.eq(base_a + A["key"]), rq.addr.eq(base_a + A["load_row"]),
                     rk.en.eq(1), rq.en.eq(1)]
        v1 = Signal(name="v1")
        h1 = reg("head1", Hb)
        m.d.sync += [v1.eq(issue_a), h1.eq(qk_head)]
        fl1 = [reg(f"fl1_{o}", 3) for o in range(NL)]      # active, first, last
        rw1 = [reg(f"row1_{o}", Wr) for o in range(NL)]
        for o in range(NL):
            m.d.sync += [fl1[o].eq(Cat(A["act"][o] & issue_a, A["load"][o], A["last"][o])),
                         rw1[o].eq(A["cur"][o])]
        def resident(name, shape, first, valid, rdata):
            """A lane's operand held for its row: the read data on the row's first cycle (and
            kept in a register), the register after that."""
            r_, e_ = reg(f"{name}res", shape), Signal(shape, name=f"{name}eff")
            m.d.comb += e_.eq(Mux(first, rdata, r_))
            with m.If(valid & first):
                m.d.sync += r_.eq(rdata)
            return e_

        qe_l = [resident(f"q{o}_", vec, fl1[o][1], v1, rq.data) for o in range(NL)]

        dbits = 2 * ain.bits + max(1, (dh - 1).bit_length()) + 1
        v2 = Signal(name="v2")
        h2 = reg("head2", Hb)
        m.d.sync += [v2.eq(v1), h2.eq(h1)]
        dot2 = [reg(f"dot2_{o}", signed(dbits)) for o in range(NL)]
        fl2 = [reg(f"fl2_{o}", 3) for o in range(NL)]
        rw2 = [reg(f"row2_{o}", Wr) for o in range(NL)]
        for o in range(NL):
            acc = qe_l[o][0] * rk.data[0]
            for c in range(1, dh):
                acc = acc + qe_l[o][c] * rk.data[c]
            m.d.sync += [dot2[o].eq(acc), fl2[o].eq(fl1[o]), rw2[o].eq(rw1[o])]

        v3 = Signal(name="v3")
        h3 = reg("head3", Hb)
        m.d.sync += [v3.eq(v2), h3.eq(h2)]
        sc3 = [reg(f"score3_{o}", signed(q.score.bits)) for o in range(NL)]
        sov3 = [reg(f"score_sat3_{o}", 1) for o in range(NL)]
        fl3 = [reg(f"fl3_{o}", 3) for o in range(NL)]
        rw3 = [reg(f"row3_{o}", Wr) for o in range(NL)]
        for o in range(NL):
            sc, ov = requant_signed(dot2[o], self.score_shift, q.score, q.rounding, q.overflow)
            m.d.sync += [sc3[o].eq(sc), sov3[o].eq(v2 & fl2[o][0] & ov),
                         fl3[o].eq(fl2[o]), rw3[o].eq(rw2[o])]

        # scores -> the score memory (bank = head parity, address = the head's schedule cycle)
        widx = Signal(range(C), name="score_widx")
        sw_ = scmem.write_port()
        m.d.comb += [sw_.addr.eq(parity(h3) * C + widx), sw_.en.eq(v3)]
        m.d.comb += [sw_.data[o].eq(sc3[o]) for o in range(NL)]
        with m.If(v3):
            m.d.sync += widx.eq(Mux(widx == C - 1, 0, widx + 1))
        with m.If((phase == LOAD) & self.w.valid & self.w.ready & (wcount == 3 * H * n - 1)):
            m.d.sync += widx.eq(0)

        # scores -> SoftmaxStats (its input is always ready here: at most one row ends per
        # cycle and its output is always taken, so no hold register ever blocks)
        sp = st.i.payload
        m.d.comb += [st.i.valid.eq(v3), sp.head.eq(h3), st.o.ready.eq(1)]
        for o in range(NL):
            m.d.comb += [sp.score[o].eq(sc3[o]), sp.active[o].eq(fl3[o][0]),
                         sp.first[o].eq(fl3[o][1]), sp.last[o].eq(fl3[o][2]), sp.row[o].eq(rw3[o])]
        swp = smem.write_port()
        m.d.comb += [swp.addr.eq(parity(st.o.payload.head) * n + st.o.payload.row),
                     swp.data.recip.eq(st.o.payload.recip), swp.data.m.eq(st.o.payload.m),
                     swp.en.eq(st.o.valid)]
        with m.If(st.o.valid):
            with m.If(stats_cnt == n - 1):
                m.d.sync += [stats_cnt.eq(0), stats_heads.eq(stats_heads + 1)]
            with m.Else():
                m.d.sync += stats_cnt.eq(stats_cnt + 1)

        # ---- AV pass: issue (score and stats reads) -> s1 -> SoftmaxNorm -> MAC ----------------
        rsc = scmem.read_port(domain="sync", transparent_for=())
        rs = smem.read_port(domain="sync", transparent_for=())
        ridx = Signal(range(C), name="score_ridx")
        m.d.comb += [rsc.addr.eq(parity(av_head) * C + ridx), rsc.en.eq(1),
                     rs.addr.eq(parity(av_head) * n + B["load_row"]), rs.en.eq(1)]
        with m.If(issue_b):
            m.d.sync += ridx.eq(Mux(ridx == C - 1, 0, ridx + 1))
        with m.If(phase == LOAD):
            m.d.sync += ridx.eq(0)
        vb1 = Signal(name="vb1")
        hb1 = reg("headb1", Hb)
        m.d.sync += [vb1.eq(issue_b), hb1.eq(av_head)]
        flb1 = [reg(f"flb1_{o}", 3) for o in range(NL)]
        rwb1 = [reg(f"rowb1_{o}", Wr) for o in range(NL)]
        for o in range(NL):
            m.d.sync += [flb1[o].eq(Cat(B["act"][o] & issue_b, B["load"][o], B["last"][o])),
                         rwb1[o].eq(B["cur"][o])]
        for o in range(NL):
            se = resident(f"s{o}_", stat_layout, flb1[o][1], vb1, rs.data)
            nm = norms[o]
            m.d.comb += [nm.i.valid.eq(vb1), nm.i.payload.score[0].eq(rsc.data[o]),
                         nm.i.payload.m.eq(se.m), nm.i.payload.recip.eq(se.recip),
                         nm.o.ready.eq(1)]
        # tags ride along with the normalisers; the V block is read NORM_LAT cycles after the
        # issue so that it arrives with the probabilities (no dh-wide delay registers)
        dl_v, dl_h = [vb1], [hb1]
        dl_fl, dl_rw = [[flb1[o]] for o in range(NL)], [[rwb1[o]] for o in range(NL)]
        vk = [(issue_b, av_head, B["key"])]
        for k in range(self.NORM_LAT):
            nv = Signal(name=f"dv{k}")
            nh = reg(f"dh{k}", Hb)
            m.d.sync += [nv.eq(dl_v[-1]), nh.eq(dl_h[-1])]
            dl_v.append(nv)
            dl_h.append(nh)
            for o in range(NL):
                f, r = reg(f"dfl{k}_{o}", 3), reg(f"drw{k}_{o}", Wr)
                m.d.sync += [f.eq(dl_fl[o][-1]), r.eq(dl_rw[o][-1])]
                dl_fl[o].append(f)
                dl_rw[o].append(r)
            kv, kh, kk = Signal(name=f"vk_v{k}"), reg(f"vk_h{k}", Hb), reg(f"vk_k{k}", Wr)
            m.d.sync += [kv.eq(vk[-1][0]), kh.eq(vk[-1][1]), kk.eq(vk[-1][2])]
            vk.append((kv, kh, kk))
        rv = mems["v"].read_port(domain="sync")
        m.d.comb += [rv.addr.eq(vk[-1][1] * n + vk[-1][2]), rv.en.eq(1), self.v_rd.eq(vk[-1][0])]

        # ---- MAC: o[row] += p * V[key] ---------------------------------------------------------
        vm, hm, vbm = dl_v[-1], dl_h[-1], rv.data
        abits = q.prob.bits + ain.bits + max(1, n.bit_length()) + 1
        out_acc = Signal(data.ArrayLayout(signed(abits), dh), name="out_acc")
        out_v = Signal(name="out_v")
        out_row, out_head = reg("out_row", Wr), reg("out_head", Hb)
        m.d.sync += out_v.eq(0)
        for o in range(NL):
            flm, rwm = dl_fl[o][-1], dl_rw[o][-1]
            p = norms[o].o.payload.prob[0]
            accs = [reg(f"acc{o}_{c}", signed(abits)) for c in range(dh)]
            nsum = [Mux(flm[1], 0, accs[c]) + p * vbm[c] for c in range(dh)]
            with m.If(vm & flm[0]):
                m.d.sync += [accs[c].eq(nsum[c]) for c in range(dh)]
                with m.If(flm[2]):
                    m.d.sync += [out_v.eq(1), out_row.eq(rwm), out_head.eq(hm)]
                    m.d.sync += [out_acc[c].eq(nsum[c]) for c in range(dh)]

        # ---- output requantize -> FIFO -> o ----------------------------------------------------
        ow = Signal(self.o_layout, name="out_word")
        m.d.comb += [ow.row.eq(out_row), ow.head.eq(out_head)]
        out_ov = []
        for c in range(dh):
            code, ov = requant_signed(out_acc[c], self.out_shift, q.act, q.rounding, q.overflow)
            m.d.comb += ow.data[c].eq(code)
            out_ov.append(ov)
        m.d.comb += [fifo.w_data.eq(ow), fifo.w_en.eq(out_v), fifo.r_en.eq(self.o.ready),
                     self.o.valid.eq(fifo.r_rdy), self.o.payload.eq(fifo.r_data)]
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += out_cnt.eq(out_cnt + 1)

        # ---- saturation events (observation only: no effect on data or timing) ----------------
        prob_ev = [Mux(vm & dl_fl[o][-1][0], norms[o].o.payload.sat_count, 0) for o in range(NL)]
        m.d.sync += self.sat.eq(popcount(sov3) + st.sat + popcount(prob_ev)
                                + Mux(out_v, popcount(out_ov), 0))
        return m
