"""GATE op engine of the accelerator top: L buffer -> hw.gate.Gate -> expert-queue memory.

Specification: quant.interpreter.Machine._op_gate, i.e. quant.approx.gate_fixed over the rows'
E gate_logit codes, then quant.schedule.build_expert_queues / active_experts. The top only starts
it for rows = N (cfg.num_tokens, fixed in the Gate unit) and n = E, top_k = cfg.top_k.

What it does (ports in the engine's view, AccelPlan of hw/accel_plan.py):
  * `start` also pulses the Gate unit's `start` (clears its queues, lengths, flags, sat_count).
  * read: from the cycle after `start`, row t's words 0 .. ceil(E/G)-1 are read from L (value e
    is lane e % G of word e // G, its low gate_logit.bits bits); the earlier words of a row wait
    in registers, the final one is used straight from `src.data` (held while en = 0), and the
    row goes to the unit's `i` as token t (`last` on t = rows-1). One row per ceil(E/G) cycles;
    a read is issued only when the previous row is accepted (the unit never back-pressures
    before `last`, the check only keeps the engine correct if it did).
  * drain: the unit's read stream (quant.schedule.scatter_order: expert by expert in increasing
    id, each queue in increasing token order, no bubbles) is written to the queue memory at
    positions 0, 1, 2, ... through `qw` (o.ready is always 1). Expert e's first position is
    recorded in `q_base[e]` (0 for an expert with an empty queue); `q_len` and `active` are the
    unit's lengths and occupancy vector. All three hold from `done` until the next `start`.
  * `done`: one cycle after the layer's final entry was written (so it is in the memory).
  * `sat`: per-cycle increments of the unit's cumulative sat_count = the SatCounter events of
    gate_fixed (sum, recip and gate_prob fits). The golden exp2 outputs are never fitted with a
    counter (gate_plan rejects an exp format without 1.0), so nothing is left uncounted.
  * `overflow`: the unit's sticky queue-overflow flag (a queue got more than N tokens); it cannot
    happen for rows <= N, the top turns it into an error.

Cycles from `start` to `done` (rows = N, k = top_k, W = ceil(E/G), L = Gate.LATENCY):
  1 + W*N (the last row is accepted) + L (its commit) + READ_LATENCY (3, first entry)
  + N*k - 1 (final entry) + 1 (done)  =  W*N + L + N*k + 4
  e.g. tiny (E = 4, k = 2, N = 9, edge-moe-fixed, L = 37): 9 + 37 + 18 + 4 = 68.
rows must be >= 1 (the top rejects other shapes; rows = 0 would never finish).
"""
from __future__ import annotations

from amaranth.hdl import Module, Signal, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from edgemoe.quant.config import QuantConfig

from .accel_plan import AccelPlan, accel_plan, buf_read_signature, queue_write_signature
from .config import HWConfig, HWConfigError
from .gate import Gate


def gate_op_cycles(plan: AccelPlan, latency: int, rows: int) -> int:
    """Cycles from start to done for `rows` rows (see the module docstring)."""
    W = -(-plan.experts // plan.G)
    return W * rows + latency + Gate.READ_LATENCY + rows * plan.top_k + 1


class GateOp(wiring.Component):
    def __init__(self, cfg, qcfg: QuantConfig, hwcfg: HWConfig):
        if not cfg.moe_blocks:
            raise HWConfigError(f"ModelConfig '{cfg.name}' has no MoE blocks: no GATE engine")
        self.plan = p = accel_plan(cfg, qcfg, hwcfg)
        if cfg.num_tokens > p.R:
            raise HWConfigError(f"HWConfig '{hwcfg.name}'.act_buffer_tokens = {p.R} is smaller than "
                                f"ModelConfig '{cfg.name}'.num_tokens = {cfg.num_tokens} (GATE rows)")
        if p.experts + 2 > 255:
            raise HWConfigError(f"ModelConfig '{cfg.name}': num_experts = {p.experts}: up to E + 2 "
                                "saturation events per cycle do not fit the 8-bit sat port")
        self.gate = Gate(qcfg, hwcfg, cfg)
        self.words = -(-p.experts // p.G)           # words of L holding a row's E logits
        assert self.words <= p.wpr["L"]
        self.latency = self.gate.LATENCY
        super().__init__({
            "start": In(1), "done": Out(1), "sat": Out(unsigned(8)),
            "rows": In(p.rows_bits),
            "src": Out(buf_read_signature(p)),
            "qw": Out(queue_write_signature(p)),
            "q_base": Out(data.ArrayLayout(unsigned(p.qpos_bits), p.experts)),
            "q_len": Out(data.ArrayLayout(unsigned(p.qpos_bits + 1), p.experts)),
            "active": Out(p.experts),
            "overflow": Out(1),
        })

    def cycles(self, rows: int | None = None) -> int:
        return gate_op_cycles(self.plan, self.latency, self.plan.tokens if rows is None else rows)

    def elaborate(self, platform):
        m = Module()
        p, g = self.plan, self.gate
        gp = g.plan
        m.submodules.gate = g
        E, G, W = p.experts, p.G, self.words
        m.d.comb += g.start.eq(self.start)

        # --- read the rows of L and feed the unit --------------------------------------------
        reading = Signal()                      # reads left to issue
        row = Signal(p.row_bits)
        word = Signal(range(W))
        pend = Signal()                         # src.data holds the word of the last read
        pend_word = Signal(range(W))
        pend_row = Signal(p.row_bits)
        pend_last = Signal()
        held = [Signal(p.word_width, name=f"held{w}") for w in range(W - 1)]

        row_last = row == self.rows - 1
        in_valid = pend & (pend_word == W - 1)
        issue = reading & ~(in_valid & ~g.i.ready)
        m.d.comb += [self.src.en.eq(issue), self.src.row.eq(row), self.src.word.eq(word)]
        with m.If(issue):
            m.d.sync += [pend.eq(1), pend_word.eq(word), pend_row.eq(row), pend_last.eq(row_last)]
            if W > 1:
                with m.If(word == W - 1):
                    m.d.sync += [word.eq(0), row.eq(row + 1)]
                with m.Else():
                    m.d.sync += word.eq(word + 1)
            else:
                m.d.sync += row.eq(row + 1)
            with m.If(row_last & (word == W - 1)):
                m.d.sync += reading.eq(0)
        with m.Elif(~in_valid | g.i.ready):      # a partial word is latched now, a final one taken
            m.d.sync += pend.eq(0)
        for w in range(W - 1):
            with m.If(pend & (pend_word == w)):
                m.d.sync += held[w].eq(self.src.data)

        def lane(word_value, ln):
            return word_value[ln * p.vb: ln * p.vb + gp.lg_bits]

        for e in range(E):
            wv = self.src.data if e // G == W - 1 else held[e // G]
            m.d.comb += g.i.payload.logits[e].eq(lane(wv, e % G))
        m.d.comb += [g.i.valid.eq(in_valid), g.i.payload.token.eq(pend_row),
                     g.i.payload.last.eq(pend_last)]

        # --- drain the read stream into the queue memory ---------------------------------------
        wpos = Signal(p.qpos_bits + 1)
        first = Signal()                        # the next entry opens an expert's queue
        q_base = [Signal(p.qpos_bits, name=f"q_base{e}") for e in range(E)]
        ent = g.o.valid                         # o.ready = 1: every valid entry is taken
        m.d.comb += [g.o.ready.eq(1),
                     self.qw.en.eq(ent), self.qw.pos.eq(wpos[:p.qpos_bits]),
                     self.qw.token.eq(g.o.payload.token), self.qw.weight.eq(g.o.payload.weight)]
        with m.If(ent):
            m.d.sync += [wpos.eq(wpos + 1), first.eq(g.o.payload.last)]
            with m.If(first):
                for e in range(E):
                    with m.If(g.o.payload.expert == e):
                        m.d.sync += q_base[e].eq(wpos[:p.qpos_bits])
        m.d.sync += self.done.eq(ent & g.o.payload.final)
        m.d.comb += [self.q_base[e].eq(q_base[e]) for e in range(E)]
        m.d.comb += [self.q_len[e].eq(g.lengths[e]) for e in range(E)]
        m.d.comb += [self.active.eq(g.active), self.overflow.eq(g.overflow)]

        # --- saturation: increments of the unit's cumulative counter -------------------------
        sat_prev = Signal.like(g.sat_count)
        m.d.sync += sat_prev.eq(g.sat_count)
        m.d.comb += self.sat.eq(g.sat_count - sat_prev)

        with m.If(self.start):
            m.d.sync += [reading.eq(1), row.eq(0), word.eq(0), pend.eq(0), wpos.eq(0),
                         first.eq(1), sat_prev.eq(0), self.done.eq(0)]
            m.d.sync += [b.eq(0) for b in q_base]
        return m
