"""LinearOp: the LINEAR opcode (quant/interpreter.py Machine._op_linear, math quant.linear
.linear_golden) on the accelerator top's buffers, in every mode of the Flag bits (BIAS GELU GATE
RESID LOGIT PATCH GATHER SCATTER), around one hw/compute.ComputeUnit.

Ports (engine view, hw/accel_plan.py conventions):
  start In(1), done Out(1), sat Out(8)   engine control; sat = the unit's y.sat_count in each y
                                         handshake (requantize + gate multiply + residual add
                                         saturations: every narrowing linear_golden counts;
                                         GELU cannot saturate in a config the unit accepts)
  flags In(8)       quant.program.Flag bits (the top has already rejected illegal combinations)
  rows In(rows_bits)  non-queue modes: the instruction's rows; queue modes (GATHER / SCATTER /
                    GATE): the current expert's queue length (>= 1), from the top
  row_off In(row_bits)  first destination row (non-scatter modes; 0 in queue modes)
  k, n In(16)       input / output widths in values: kc = ceil(k/G) chunks, nc = ceil(n/To) tiles
  q_base In(qpos_bits)  queue modes: queue position of the expert's first entry
  w In(stream of beat_bits)  the weight stream beats as stored (quant.linear layout), passed
                    straight to the unit's w port ({data: KI beats, wide} words when
                    hwcfg.weight_intake_beats = KI > 1: the compute unit's w_shape)
  src Out(BufRead)  input chunks: row r (GATHER: token[r]), word = chunk
  dst_rd Out(BufRead)   residual slices (RESID): row row_off + r (SCATTER: token[r]), slice = tile
  dst_wr Out(BufWrite)  results: row row_off + r (SCATTER: token[r]), slice `tile` of To lanes
                    (word tile // (G/To), under its mask; the whole word when To = G); y lanes are
                    vb = max(act, gate_logit) bits, i.e. exactly the buffer lanes (LOGIT writes
                    gate_logit codes, the others act codes sign-extended to vb)
  queue Out(QueueRead)  entries q_base .. q_base + rows - 1, in order, into the unit's q stream
The command inputs are used directly (the top holds them from start to done).

Adapters: each buffer reader is one response register deep. A request is accepted (and the
memory read enabled) only in a cycle in which the response slot is empty or being taken, so the
read port's held data is the slot (BufRead: data stays while en = 0): no data is lost under
back-pressure and requests are served back to back at one per cycle. The queue reader works the
same way. y is always accepted and written in its handshake cycle.

Buffer lanes are vb bits, the unit's x / r lanes act.bits: the low act.bits of each lane are
taken (the buffer holds act codes there; lanes past k / n are don't-care: the weight stream's
zero padding makes their x values irrelevant, and a pad residual lane gets y = 0 added, which
cannot overflow). The writes cover whole slices: lanes n .. nc*To - 1 of each written row
receive the unit's pad results (0 plain, the old residual value in RESID modes); the buffer
contract (hw/accel_plan.py) leaves lanes beyond a row's width undefined.

done: the cycle after the unit's busy drops (its last y handshake = the last buffer write).
A zero field (rows, kc or nc) makes the unit's command a no-op: done follows in the next cycle.
Cycles, start to done inclusive, with stall-free weight beats: sim/perf.linear_cycles + 1 (the
done cycle): the one-cycle buffer reads keep up with the unit, the adapters add no stall
(tests/test_linear_op.py asserts the equality; e.g. tiny fc1 at 8x8: 2339 cycles).
"""
from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, Value, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from edgemoe.quant.config import QuantConfig
from edgemoe.quant.program import Flag

from .accel_plan import (accel_plan, buf_read_signature, buf_write_signature,
                         queue_read_signature)
from .compute import ComputeUnit
from .config import HWConfig, HWConfigError


class LinearOp(wiring.Component):
    def __init__(self, cfg, qcfg: QuantConfig, hwcfg: HWConfig):
        self.cfg, self.qcfg, self.hwcfg = cfg, qcfg, hwcfg
        self.plan = p = accel_plan(cfg, qcfg, hwcfg)
        self.cu = ComputeUnit(qcfg, hwcfg, cfg)
        g = self.cu.geom
        if g.y_bits != p.vb:       # both are max(act, gate_logit).bits: a guard, not a choice
            raise HWConfigError(f"LinearOp: compute y lanes {g.y_bits} bits != buffer lanes {p.vb}")
        super().__init__({
            "start": In(1), "done": Out(1), "sat": Out(unsigned(8)),
            "flags": In(8), "rows": In(p.rows_bits), "row_off": In(p.row_bits),
            "k": In(16), "n": In(16), "q_base": In(p.qpos_bits),
            "w": In(stream.Signature(self.cu.w_shape)),     # beat_bits, or KI-beat words
            "src": Out(buf_read_signature(p)),
            "dst_rd": Out(buf_read_signature(p)),
            "dst_wr": Out(buf_write_signature(p)),
            "queue": Out(queue_read_signature(p)),
        })

    def elaborate(self, platform):
        m = Module()
        p, cu = self.plan, self.cu
        m.submodules.cu = cu
        G, To, A = p.G, p.To, self.qcfg.act.bits
        cb = cu.geom.count_bits
        so = (G // To).bit_length() - 1      # a To-lane result is slice j % 2^so of word j >> so

        def flag(f):
            return self.flags[int(f).bit_length() - 1]

        gather, scatter, gate = flag(Flag.GATHER), flag(Flag.SCATTER), flag(Flag.GATE)
        queue_mode = gather | scatter | gate

        def ceil_div(v, t):
            # t = t_in or t_out: a power of two in every preset, otherwise a constant divider
            if t & (t - 1) == 0:
                return (v + (t - 1)) >> (t.bit_length() - 1)
            return (v + (t - 1)) // t

        # ---- command: one layer, issued in the start cycle (the unit is idle then) ----------
        c = cu.cmd.payload
        m.d.comb += [
            cu.cmd.valid.eq(self.start),
            c.rows.eq(self.rows), c.kc.eq(ceil_div(self.k, G)[:cb]), c.nc.eq(ceil_div(self.n, To)[:cb]),
            c.bias.eq(flag(Flag.BIAS)), c.gelu.eq(flag(Flag.GELU)), c.gate.eq(gate),
            c.resid.eq(flag(Flag.RESID)), c.logit.eq(flag(Flag.LOGIT)), c.gather.eq(gather),
            c.scatter.eq(scatter),
        ]
        run = Signal()
        with m.If(self.start):
            m.d.sync += run.eq(1)
        with m.Elif(run & ~cu.busy):     # busy rises the cycle after start for a real command
            m.d.comb += self.done.eq(1)
            m.d.sync += run.eq(0)

        # ---- weights: the top's beats as they are --------------------------------------------
        wiring.connect(m, wiring.flipped(self.w), cu.w)

        # ---- queue memory -> q stream ----------------------------------------------------------
        q_run, q_v = Signal(), Signal()
        q_i = Signal(p.rows_bits)
        q_load = ~q_v | cu.q.ready
        q_issue = q_run & q_load
        m.d.comb += [self.queue.en.eq(q_issue), self.queue.pos.eq(self.q_base + q_i),
                     cu.q.valid.eq(q_v), cu.q.payload.token.eq(self.queue.token),
                     cu.q.payload.gate.eq(self.queue.weight)]
        with m.If(q_load):
            m.d.sync += q_v.eq(q_issue)
        with m.If(self.start):
            m.d.sync += [q_run.eq(queue_mode & (self.rows != 0)), q_i.eq(0)]
        with m.Elif(q_issue):
            m.d.sync += q_i.eq(q_i + 1)
            with m.If(q_i == self.rows - 1):
                m.d.sync += q_run.eq(0)

        # ---- buffer readers: request stream -> BufRead -> response stream ----------------------
        def reader(port, req, resp, row, word, lanes):
            # word: the request's word index in `lanes`-lane slices; the slot's slice index is
            # registered with the read (the port holds the whole word)
            sh = (G // lanes).bit_length() - 1
            v = Signal()
            load = ~v | resp.ready
            take = req.valid & load
            m.d.comb += [req.ready.eq(load), port.en.eq(take), port.row.eq(row),
                         port.word.eq(word >> sh), resp.valid.eq(v)]
            with m.If(load):
                m.d.sync += v.eq(req.valid)
            sub = 0
            if sh:
                sub = Signal(sh)
                with m.If(take):
                    m.d.sync += sub.eq(word[:sh])
            m.d.comb += resp.payload.eq(p.lanes_of(port.data, lanes, sub, A))

        reader(self.src, cu.xr, cu.x, cu.xr.payload.row, cu.xr.payload.chunk, G)
        # the unit names residual rows like y rows: token (scatter) or the layer row
        reader(self.dst_rd, cu.rr, cu.r,
               Mux(scatter, cu.rr.payload.row, cu.rr.payload.row + self.row_off), cu.rr.payload.tile, To)

        # ---- results -> destination buffer -----------------------------------------------------
        y = cu.y
        m.d.comb += [
            y.ready.eq(1),
            self.dst_wr.en.eq(y.valid),
            self.dst_wr.row.eq(Mux(scatter, y.payload.row, y.payload.row + self.row_off)),
            self.dst_wr.word.eq(y.payload.tile >> so),
            self.dst_wr.data.eq(Value.cast(y.payload.data).replicate(G // To)),
            self.dst_wr.mask.eq(p.slice_mask(To, y.payload.tile[:so] if so else 0)),
            self.sat.eq(Mux(y.valid, y.payload.sat_count, 0)),
        ]
        return m
