"""LoadOp / StoreOp (hw/move_op.py) in amaranth.sim against quant.interpreter's LOAD_ROWS / STORE
semantics: act rows <-> container beats, ADD saturating, bad containers flagged."""
import numpy as np
import pytest
from amaranth.hdl import Elaboratable, Module
from amaranth.lib.memory import Memory
from amaranth.sim import Simulator

from edgemoe.hw.accel_plan import accel_plan
from edgemoe.hw.config import get_hw_preset
from edgemoe.hw.move_op import LoadOp, StoreOp
from edgemoe.model.config import get_preset
from edgemoe.quant.config import get_quant_preset
from edgemoe.quant.program import align, container_bytes, decode_values, encode_values


def _setup(hw, quant):
    cfg = get_preset("tiny")
    q = get_quant_preset(quant)
    h = get_hw_preset(hw).replace(act_buffer_tokens=16)
    return cfg, q, h, accel_plan(cfg, q, h)


def _words_to_rows(words, p, width, vb):
    """Memory words [R*wpr] -> values [R, wpr*G] (signed vb-bit lanes)."""
    out = np.zeros((len(words), p.G), dtype=np.int64)
    for i, w in enumerate(words):
        for l in range(p.G):
            v = (int(w) >> (l * vb)) & ((1 << vb) - 1)
            out[i, l] = v - (1 << vb) if v >> (vb - 1) else v
    return out.reshape(p.R, -1)[:, :width]


def _rows_to_words(vals, p, vb):
    words = []
    for row in vals:
        for j in range(0, len(row), p.G):
            w = 0
            for l, v in enumerate(row[j:j + p.G]):
                w |= (int(v) & ((1 << vb) - 1)) << (l * vb)
            words.append(w)
    return words


class _Wrap(Elaboratable):
    def __init__(self, op, p, init_words):
        self.op, self.p, self.init = op, p, init_words

    def elaborate(self, platform):
        m = Module()
        p = self.p
        m.submodules.op = self.op
        m.submodules.mem = self.mem = mem = Memory(shape=p.word_width, depth=p.depth("W"), init=self.init)
        rd, wr = mem.read_port(transparent_for=()), mem.write_port()
        wpr = p.wpr["W"]
        for port in [getattr(self.op, n) for n in ("dst_rd", "src") if hasattr(self.op, n)]:
            m.d.comb += [rd.addr.eq(port.row * wpr + port.word), rd.en.eq(port.en), port.data.eq(rd.data)]
        if hasattr(self.op, "dst_wr"):
            w = self.op.dst_wr
            m.d.comb += [wr.addr.eq(w.row * wpr + w.word), wr.en.eq(w.en), wr.data.eq(w.data)]
        return m


@pytest.mark.parametrize("hw,quant,add", [("small-8x8", "edge-moe-fixed", False),
                                          ("zcu102-16x16", "edge-moe-fixed", True),
                                          ("small-8x8", "w8a16", True),
                                          ("zcu102-16x16", "w8a16", False)])
def test_load_rows(hw, quant, add):
    cfg, q, h, p = _setup(hw, quant)
    rng = np.random.default_rng(1)
    rows, k, off = 5, 3 * p.G * 2 if p.wpr["W"] >= 6 else p.G, 3
    k = min(k, p.wpr["W"] * p.G)
    W = p.wpr["W"] * p.G
    ext = [q.act.min_int, q.act.max_int, 0, -1]
    init = rng.integers(q.act.min_int, q.act.max_int + 1, size=(p.R, W))
    init[0, :4] = ext
    codes = rng.integers(q.act.min_int, q.act.max_int + 1, size=(rows, k))
    codes[0, :4] = ext
    codes[1, :4] = ext[::-1]
    init[off + 1, :4] = ext                      # max + min, min + max, saturating sums in row 1
    data = encode_values(codes, q.act, "codes")
    B = p.beat_bytes
    data = np.concatenate([data, np.zeros(align(data.size, B) - data.size, np.uint8)])
    beats = [int.from_bytes(data[i:i + B].tobytes(), "little") for i in range(0, data.size, B)]
    op = LoadOp(p, q)
    wrap = _Wrap(op, p, _rows_to_words(init, p, p.vb))
    sim = Simulator(wrap)
    sim.add_clock(1e-8)
    res = {}

    async def tb(ctx):
        ctx.set(op.row_off, off); ctx.set(op.words, rows * k // p.G); ctx.set(op.wpr_k, k // p.G)
        ctx.set(op.add, add); ctx.set(op.start, 1)
        await ctx.tick()
        ctx.set(op.start, 0)
        sat, cycles, i = 0, 0, 0
        while True:
            ctx.set(op.d.valid, i < len(beats) and rng.random() < 0.8)
            if i < len(beats):
                ctx.set(op.d.payload, beats[i])
            sat += ctx.get(op.sat)
            done = ctx.get(op.done)
            if ctx.get(op.d.valid) and ctx.get(op.d.ready):
                i += 1
            await ctx.tick()
            cycles += 1
            if done:
                break
            assert cycles < 5000, "LoadOp never finished"
        res["sat"] = sat
        res["words"] = [ctx.get(wrap.mem.data[a]) for a in range(p.depth("W"))]
    sim.add_testbench(tb)
    sim.run()
    got = _words_to_rows(res["words"], p, W, p.vb)
    exp = init.copy()
    sl = slice(off, off + rows)
    if add:
        s = exp[sl, :k] + codes
        exp_sat = int(((s < q.act.min_int) | (s > q.act.max_int)).sum())
        exp[sl, :k] = np.clip(s, q.act.min_int, q.act.max_int)
    else:
        exp_sat = 0
        exp[sl, :k] = codes
    np.testing.assert_array_equal(got, exp)
    assert res["sat"] == exp_sat
    assert not add or exp_sat > 0


@pytest.mark.parametrize("hw,quant", [("small-8x8", "edge-moe-fixed"), ("zcu102-16x16", "edge-moe-fixed"),
                                      ("small-8x8", "w8a16"), ("zcu102-16x16", "w8a16")])
@pytest.mark.parametrize("full_rate", [False, True])
def test_store(hw, quant, full_rate):
    cfg, q, h, p = _setup(hw, quant)
    rng = np.random.default_rng(2)
    W = p.wpr["W"] * p.G
    init = rng.integers(q.act.min_int, q.act.max_int + 1, size=(p.R, W))
    init[0, :2] = [q.act.min_int, q.act.max_int]
    rows, k = 3, p.G * 3
    op = StoreOp(p, q)
    wrap = _Wrap(op, p, _rows_to_words(init, p, p.vb))
    sim = Simulator(wrap)
    sim.add_clock(1e-8)
    got = []

    async def tb(ctx):
        ctx.set(op.words, rows * k // p.G); ctx.set(op.wpr_k, k // p.G); ctx.set(op.start, 1)
        await ctx.tick()
        ctx.set(op.start, 0)
        cycles = 0
        while True:
            ctx.set(op.d.ready, full_rate or rng.random() < 0.7)
            if ctx.get(op.d.valid) and ctx.get(op.d.ready):
                got.append(ctx.get(op.d.payload))
            done = ctx.get(op.done)
            await ctx.tick()
            cycles += 1
            if done:
                break
            assert cycles < 5000
        res["cycles"] = cycles
    res = {}
    sim.add_testbench(tb)
    sim.run()
    n = rows * k * container_bytes(q.act)
    assert len(got) == -(-n // p.beat_bytes)
    if full_rate:     # one word (buffer read) and one beat per cycle after a short fill
        assert res["cycles"] <= max(len(got), rows * k // p.G) + 5, (res["cycles"], len(got))
    data = b"".join(g.to_bytes(p.beat_bytes, "little") for g in got)[:n]
    np.testing.assert_array_equal(decode_values(np.frombuffer(data, np.uint8), rows * k, q.act).reshape(rows, k),
                                  init[:rows, :k])
