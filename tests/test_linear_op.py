"""LinearOp (hw/linear_op.py): the LINEAR opcode on buffer memories vs quant.interpreter.Machine.

Every mode the compiler emits (qkv, proj, fc1, fc2, router, expert_fc1, expert_fc2,
patch_embed), taken from a compiled tiny program (real weight streams from the memory image,
synthetic weights), runs in amaranth.sim on a wrapper with one Memory per buffer it touches
(the top's wiring: address = row * wpr + word) plus the expert-queue memory, on random act codes
with rows at the format extremes. The final buffer contents must equal Machine._op_linear's on
the same initial buffers (lanes past n inside the last written word excepted: undefined by the
buffer contract), the sum of `sat` must equal Machine's SatCounter total, and the cycle count is
checked against the unit's cycle model (sim/perf.linear_cycles).
"""
from __future__ import annotations

import functools
import time

import numpy as np
import pytest
from amaranth.hdl import Elaboratable, Module
from amaranth.lib.memory import Memory
from amaranth.sim import Simulator

from edgemoe.hw.accel_plan import accel_plan
from edgemoe.hw.config import get_hw_preset
from edgemoe.hw.linear_op import LinearOp
from edgemoe.model.config import get_preset
from edgemoe.quant.compiler import buffer_plan, compile_program, synthetic_state_dict
from edgemoe.quant.config import get_quant_preset
from edgemoe.quant.interpreter import FlatMemory, Machine, Registers, RunStats
from edgemoe.quant.linear import MODES, tile_layout
from edgemoe.quant.program import Buf, Index, linear_mode, stream_bytes, weight_stream
from edgemoe.quant.schedule import build_expert_queues
from edgemoe.sim.perf import linear_cycles

TINY = get_preset("tiny")
Q = get_quant_preset("edge-moe-fixed")
W8 = get_quant_preset("w8a16")
HW8 = get_hw_preset("small-8x8").replace(act_buffer_tokens=16)
HW16 = get_hw_preset("zcu102-16x16").replace(act_buffer_tokens=16)
HW8N = HW8.replace(name="small-8x8-axi32", axi_data_bits=32)     # 16-beat tiles at w8a16
HW84 = get_hw_preset("small-8x4").replace(act_buffer_tokens=16)   # results are half-word slices
HW82 = HW84.replace(name="small-8x2", t_out=2, lanes=2)
HWS = {h.name: h for h in (HW8, HW16, HW8N, HW84, HW82)}

# instruction names of the compiled tiny program -> linear mode (block 0 dense, block 1 MoE)
INSTR = {"qkv": "blocks.0.qkv", "proj": "blocks.0.proj", "fc1": "blocks.0.mlp.fc1",
         "fc2": "blocks.0.mlp.fc2", "router": "blocks.1.mlp.gate_logits",
         "expert_fc1": "blocks.1.mlp.expert_fc1", "expert_fc2": "blocks.1.mlp.expert_fc2",
         "patch_embed": "patch_embed"}


@functools.lru_cache(maxsize=None)
def compiled(qname: str, hwname: str):
    q = get_quant_preset(qname)
    hw = HWS[hwname]
    prog = compile_program(TINY, q, hw, synthetic_state_dict(TINY))
    mem = FlatMemory(len(prog.image))
    mem.write(0, prog.image)
    r = prog.regions
    regs = Registers(r["program"].offset, r["weights"].offset, r["image"].offset,
                     r["output"].offset, task=1)
    return prog, mem, regs


def random_buffers(q, plan, R, T, rng):
    """Machine buffers (R x width) of random codes: act codes (std 2.0 in real units), L
    gate_logit codes; token rows 1, 2 and T-1 (the last token) at the format extremes."""
    bufs = {}
    for b in plan.buffers:
        if b.name not in Buf.__members__ or Buf[b.name] is Buf.NONE:
            continue
        fmt = q.gate_logit if b.name == "L" else q.act
        a = fmt.quantize(rng.normal(0.0, 2.0, (R, b.width)))
        a[T - 1] = fmt.max_int
        a[1] = fmt.min_int
        a[2, ::2], a[2, 1::2] = fmt.max_int, fmt.min_int
        bufs[Buf[b.name]] = a
    return bufs


def random_routing(q, T, E, k, rng):
    """Top-k expert ids (distinct per token) and gate_prob weights in [1.0, max] (not a
    softmax: so that a saturated row saturates again in the gate multiply). Expert E-1 gets
    only the last token, at the largest gate weight: a one-row queue."""
    idx = np.stack([rng.permutation(E - 1)[:k] for _ in range(T)])
    one = 1 << q.gate_prob.frac
    w = rng.integers(min(one, q.gate_prob.max_int), q.gate_prob.max_int, (T, k), endpoint=True)
    idx[T - 1, 0], w[T - 1, 0] = E - 1, q.gate_prob.max_int
    return idx, w


def extreme_stream(q, lay, ins, md, rng):
    """A random weight stream for the instruction's shape: N(0, 1/k) weights with channel 1 at
    the largest code and a bias at both extremes, so that every narrowing saturates somewhere."""
    fmt = q.patch_w if md.patch else q.linear_w
    w = fmt.quantize(rng.normal(0.0, 1.0 / np.sqrt(ins.k), (ins.n, ins.k)))
    w[1] = fmt.max_int
    b = None
    if md.bias:
        b = q.bias.quantize(rng.normal(0.0, 0.05, ins.n))
        b[0], b[-1] = q.bias.max_int, q.bias.min_int
    return weight_stream(w, b, lay, fmt, q.bias)


def to_words(a, G, vb, wpr, rng):
    """Buffer rows -> memory words (G lanes of vb bits); lanes past the row width random."""
    R, width = a.shape
    full = rng.integers(-(1 << (vb - 1)), 1 << (vb - 1), (R, wpr * G), dtype=np.int64)
    full[:, :width] = a
    mask = (1 << vb) - 1
    words = []
    for row in full:
        for j in range(wpr):
            v = 0
            for lane, x in enumerate(row[j * G:(j + 1) * G].tolist()):
                v |= (int(x) & mask) << (lane * vb)
            words.append(v)
    return words, full


def from_words(words, R, G, vb, wpr):
    out = np.zeros((R, wpr * G), dtype=np.int64)
    mask, half = (1 << vb) - 1, 1 << (vb - 1)
    for i, v in enumerate(words):
        r, j = divmod(i, wpr)
        for lane in range(G):
            x = (v >> (lane * vb)) & mask
            out[r, j * G + lane] = x - (1 << vb) if x >= half else x
    return out


class Harness(Elaboratable):
    """LinearOp + the buffer memories it uses + the queue memory, wired as the top wires them."""

    def __init__(self, cfg, q, hw, src: str, dst: str, init: dict, qinit: list):
        self.dut = LinearOp(cfg, q, hw)
        p = self.plan = self.dut.plan
        self.src, self.dst = src, dst
        self.mems = {b: Memory(shape=p.word_width, depth=p.depth(b), init=init[b]) for b in init}
        self.qmem = Memory(shape=p.row_bits + p.gate_bits, depth=p.q_entries, init=qinit)

    def elaborate(self, platform):
        m = Module()
        p, d = self.plan, self.dut
        m.submodules.dut = d
        m.submodules.qmem = self.qmem
        for b, mem in self.mems.items():
            m.submodules[f"mem_{b}"] = mem

        def read(port, mem, wpr):
            rp = mem.read_port(domain="sync", transparent_for=())
            m.d.comb += [rp.en.eq(port.en), rp.addr.eq(port.row * wpr + port.word),
                         port.data.eq(rp.data)]

        read(d.src, self.mems[self.src], p.wpr[self.src])
        dm, dw = self.mems[self.dst], p.wpr[self.dst]
        read(d.dst_rd, dm, dw)
        if p.mask_bits > 1:            # the top's slice writes (hw/accel.py)
            wp = dm.write_port(granularity=p.wg * p.vb)
            m.d.comb += wp.en.eq(d.dst_wr.mask & d.dst_wr.en.replicate(p.mask_bits))
        else:
            wp = dm.write_port()
            m.d.comb += wp.en.eq(d.dst_wr.en)
        m.d.comb += [wp.addr.eq(d.dst_wr.row * dw + d.dst_wr.word), wp.data.eq(d.dst_wr.data)]
        qp = self.qmem.read_port(domain="sync", transparent_for=())
        m.d.comb += [qp.en.eq(d.queue.en), qp.addr.eq(d.queue.pos),
                     d.queue.token.eq(qp.data[:p.row_bits]), d.queue.weight.eq(qp.data[p.row_bits:])]
        return m


def run_case(mode: str, qname="edge-moe-fixed", hwname="small-8x8", seed=0, w_gap=0.0,
             experts=("longest",), extreme=False):
    """Run the `mode` instruction of the compiled tiny program on LinearOp and on Machine from
    the same random buffers and compare. Queue modes run once per entry of `experts`
    ("longest": the longest queue, "single": the one-token queue), back to back (the next start
    in the cycle after done). extreme: replace the weight stream by extreme_stream's.
    Returns (cycles per op, unit cycle model per op, Machine's SatCounter)."""
    prog, mem0, regs = compiled(qname, hwname)
    q, hw, cfg = prog.qcfg, prog.hwcfg, prog.cfg
    plan = accel_plan(cfg, q, hw)
    lay = tile_layout(q, hw)
    G, vb, R, T = plan.G, plan.vb, plan.R, cfg.num_tokens
    rng = np.random.default_rng(seed)
    pc = prog.names.index(INSTR[mode])
    ins = prog.instrs[pc]
    md = linear_mode(ins.flags)
    assert md.gelu == MODES[mode].gelu and md.scatter == MODES[mode].scatter   # the right instr

    # ops: (expert, queue base, rows, weight beats); golden: Machine on the same buffers
    mem = FlatMemory(mem0.size)
    mem.data[:] = mem0.data
    mach = Machine(q, hw, buffer_plan(cfg, q, hw), mem)
    init_bufs = random_buffers(q, mach.plan, R, T, rng)
    mach.bufs = {b: a.copy() for b, a in init_bufs.items()}
    mach._st = RunStats()
    queues, qinit = None, [0] * plan.q_entries
    if md.queue:
        idx, wts = random_routing(q, T, cfg.num_experts, cfg.top_k, rng)
        queues = mach.queues = build_expert_queues(idx, wts, cfg.num_experts)
        lens = [len(t) for t, _ in queues]
        pick = {"longest": int(np.argmax(lens)), "single": cfg.num_experts - 1}
        es = [pick[x] for x in experts]
        assert lens[pick["single"]] == 1
        bases = np.concatenate([[0], np.cumsum(lens)])
        for ex, (toks, ws) in enumerate(queues):      # every queue back to back, expert order
            for i, (t, wv) in enumerate(zip(toks.tolist(), np.asarray(ws).tolist())):
                qinit[bases[ex] + i] = int(t) | (int(wv) << plan.row_bits)
    else:
        es = [None]
    ops, written = [], np.zeros(R, bool)
    for e in es:
        idx_val = {Index.NONE: 0, Index.TASK: regs.task, Index.EXPERT: e or 0}[ins.index]
        addr = regs.weights_base + ins.addr + idx_val * ins.stride
        if extreme:
            mem.write(addr, extreme_stream(q, lay, ins, md, rng))
        raw = mem.read(addr, stream_bytes(lay, ins.k, ins.n, md.bias))
        B = plan.beat_bytes
        beats = [int.from_bytes(raw[i:i + B].tobytes(), "little") for i in range(0, len(raw), B)]
        mach._cur = [0, 0]
        mach._op_linear(ins, pc, regs, e)
        if md.queue:
            ops.append((int(bases[e]), lens[e], beats))
            written[queues[e].tokens if md.scatter else slice(0, lens[e])] = True
        else:
            ops.append((0, ins.rows, beats))
            written[ins.row_off:ins.row_off + ins.rows] = True
    want_sat = mach._st.sat.saturated()

    src, dst = ins.src.name, ins.dst.name
    init, full = {}, {}
    for b in {src, dst}:
        init[b], full[b] = to_words(init_bufs[Buf[b]], G, vb, plan.wpr[b], rng)
    h = Harness(cfg, q, hw, src, dst, init, qinit)
    d = h.dut
    res = {"cycles": [], "sat": 0}

    async def bench(ctx):
        grng = np.random.default_rng(seed + 1)
        for q_base, rows, beats in ops:
            for port, v in ((d.flags, ins.flags), (d.rows, rows), (d.row_off, ins.row_off),
                            (d.k, ins.k), (d.n, ins.n), (d.q_base, q_base)):
                ctx.set(port, v)
            ctx.set(d.start, 1)
            cycles, bi, done = 0, 0, False
            while not done:
                valid = bi < len(beats) and not (w_gap and grng.random() < w_gap)
                ctx.set(d.w.valid, valid)
                if valid:
                    ctx.set(d.w.payload, beats[bi])
                ready = ctx.get(d.w.ready)
                res["sat"] += ctx.get(d.sat)
                done = ctx.get(d.done)
                await ctx.tick()
                ctx.set(d.start, 0)
                cycles += 1
                bi += bool(valid and ready)
                assert cycles < 30_000, "LinearOp did not finish (30000 cycles)"
            assert bi == len(beats), f"{len(beats) - bi} weight beats not taken"
            res["cycles"].append(cycles)
        ctx.set(d.w.valid, 0)
        for _ in range(4):                    # done was a pulse; nothing is written after it
            assert not ctx.get(d.done) and not ctx.get(d.dst_wr.en) and not ctx.get(d.sat)
            await ctx.tick()
        res["mem"] = {b: [ctx.get(h.mems[b].data[i]) for i in range(plan.depth(b))] for b in h.mems}

    sim = Simulator(h)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    t0 = time.time()
    sim.run()
    wall = time.time() - t0

    for b in sorted({src, dst}):
        got = from_words(res["mem"][b], R, G, vb, plan.wpr[b])
        want = full[b].copy()
        width = init_bufs[Buf[b]].shape[1]
        want[:, :width] = mach.bufs[Buf[b]]
        if b == dst:   # lanes n .. nc*t_out-1 of the written slices: undefined, not compared
            # (lanes past them in the word are not written: they keep their old values)
            pad = np.ix_(written, np.arange(ins.n, -(-ins.n // plan.To) * plan.To))
            want[pad] = got[pad]
        bad = np.argwhere(got != want)
        assert not len(bad), (f"{mode} {hwname} {qname}: buffer {b}: first mismatch at row "
                              f"{bad[0][0]}, value {bad[0][1]}: expected {want[tuple(bad[0])]}, "
                              f"got {got[tuple(bad[0])]} ({len(bad)} mismatches)")
    assert res["sat"] == want_sat, f"{mode}: sat {res['sat']} != Machine's {want_sat}"
    model = [linear_cycles(rows, ins.k, ins.n, hw, q, MODES[mode]) for _, rows, _ in ops]
    print(f"\n{mode:12s} {hwname} {qname}: rows {[o[1] for o in ops]} k {ins.k} n {ins.n}: "
          f"cycles {res['cycles']} (unit model {model}), sat {res['sat']}, {wall:.1f} s sim")
    return res["cycles"], model, mach._st.sat


def _events(sat, suffix):
    return sum(v[0] for k, v in sat.counts.items() if k.endswith(suffix))


@pytest.mark.parametrize("mode", list(INSTR))
def test_modes_8x8_extreme(mode):
    """Every compiled mode at 8x8 with saturating weights and extreme rows; queue modes run the
    longest queue, then the one-token queue, back to back. Stall-free weight beats: the op
    takes the unit's modelled cycles + 1 (done), so the adapters add no stall."""
    cycles, model, sat = run_case(mode, extreme=True, experts=("longest", "single"))
    assert cycles == [c + 1 for c in model]
    assert _events(sat, ".linear") > 0            # requantize saturated somewhere
    if MODES[mode].resid:
        assert _events(sat, ".resid") > 0
    if MODES[mode].gate:
        assert _events(sat, ".weighted") > 0


@pytest.mark.parametrize("mode", ["qkv", "router", "expert_fc1", "expert_fc2"])
def test_modes_8x8_compiled_weights(mode):
    """The compiler's own weight streams (router: the TASK-indexed one, experts: the
    EXPERT-indexed ones) at their symbols in the memory image."""
    cycles, model, _ = run_case(mode, seed=5, experts=("single", "longest"))
    assert cycles == [c + 1 for c in model]


@pytest.mark.parametrize("mode", ["expert_fc2", "patch_embed", "fc1"])
def test_modes_16x16(mode):
    """16x16 (memory-bound on tiny: a 16-beat tile per pass of <= 9 rows): the gate / residual
    / scatter mode, the patch embedding (row_off 1, residual) and GELU."""
    cycles, model, _ = run_case(mode, hwname="zcu102-16x16", seed=2, extreme=True,
                                experts=("longest", "single"))
    assert cycles == [c + 1 for c in model]


@pytest.mark.parametrize("mode", ["qkv", "router", "expert_fc1", "expert_fc2", "patch_embed", "fc1"])
def test_modes_narrow_output_slices(mode):
    """t_out < t_in (8x4: two 4-lane slices per buffer word; 8x2 for the router and the
    scatter mode: four): each result is a slice of a word, written under its lane mask, and the
    residual read takes its slice of the word. Buffer contents (lanes past the written slices
    keep their old values), saturation and cycles are checked as at 8x8."""
    for hwname in (("small-8x4", "small-8x2") if mode in ("router", "expert_fc2") else ("small-8x4",)):
        cycles, model, _ = run_case(mode, hwname=hwname, seed=4, extreme=True,
                                    experts=("longest", "single"))
        assert cycles == [c + 1 for c in model]


@pytest.mark.parametrize("mode", ["proj", "expert_fc2"])
def test_w8a16_weight_gaps(mode):
    """Narrow formats (frequent saturation), a 32-bit weight port (16 beats per tile: memory-
    bound) and a weight stream with gaps half the time: the passes wait for their tiles, so the
    x requests back up behind the unit's x.ready."""
    cycles, model, sat = run_case(mode, qname="w8a16", hwname="small-8x8-axi32", seed=3,
                                  extreme=True, w_gap=0.5, experts=("single", "longest"))
    assert all(c > 1.5 * m for c, m in zip(cycles, model))
    assert sat.saturated() > 20


def test_export_rtlil_verilog_lint():
    """LinearOp exports through hw.export (RTLIL, Verilog) with the accel_plan port names and
    widths, and the Verilog passes verilator --lint-only."""
    from edgemoe.hw.export import port_list, to_rtlil, to_verilog
    from edgemoe.sim.runner import lint_verilator
    op = LinearOp(TINY, Q, HW8)
    p = op.plan
    ports = port_list(op)
    assert ports["src__data"] == (p.G * p.vb, "i") and ports["dst_wr__data"] == (p.G * p.vb, "o")
    assert ports["w__payload"] == (HW8.axi_data_bits, "i") and ports["w__ready"] == (1, "o")
    assert ports["queue__pos"] == (p.qpos_bits, "o") and ports["queue__weight"] == (p.gate_bits, "i")
    assert ports["rows"] == (p.rows_bits, "i") and ports["sat"] == (8, "o")
    text = to_rtlil(op, "edgemoe_linear_op")
    assert "module \\edgemoe_linear_op" in text
    for name in ports:
        assert f"\\{name}" in text, name
    lint_verilator(to_verilog(LinearOp(TINY, Q, HW8), "edgemoe_linear_op"), "edgemoe_linear_op")
