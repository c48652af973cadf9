"""GATE op engine (hw/gate_op.py) in amaranth.sim against quant.interpreter.Machine._op_gate:
the L buffer and the expert-queue memory as Amaranth memories wired as the top wires them,
queue memory, q_base / q_len / active, saturation count and cycles compared as integers."""
from __future__ import annotations

import gc

import numpy as np
import pytest
from amaranth.hdl import Cat, Elaboratable, Module
from amaranth.lib.memory import Memory
from amaranth.sim import Simulator

from edgemoe.hw.accel_plan import accel_plan
from edgemoe.hw.config import get_hw_preset
from edgemoe.hw.export import port_list, to_verilog
from edgemoe.hw.gate_op import GateOp
from edgemoe.model.config import get_preset
from edgemoe.quant.compiler import buffer_plan
from edgemoe.quant.config import get_quant_preset
from edgemoe.quant.fixed import Fmt
from edgemoe.quant.interpreter import FlatMemory, Machine, Registers, RunStats
from edgemoe.quant.program import Buf, Instr, Op

TINY = get_preset("tiny")                  # E = 4, k = 2, N = 9
FIXED = get_quant_preset("edge-moe-fixed")
# narrow sum / gate_prob so both saturate (4 equal experts: S = 4.0 > u22.20's max; a dominant
# expert: p = 1.0 > u16.16's max), as tests/test_gate_rtl.py does for the unit
SATQ = FIXED.replace(name="gate-op-sat", sum=Fmt(22, 20, False), gate_prob=Fmt(16, 16, False))


def hw(name):
    return get_hw_preset(name).replace(act_buffer_tokens=16)


class Bench(Elaboratable):
    """GateOp + the L buffer (read port with enable, non-transparent) + the queue memory."""

    def __init__(self, cfg, q, h, l_words, q_init):
        self.op = op = GateOp(cfg, q, h)
        p = op.plan
        self.l_mem = Memory(shape=p.word_width, depth=p.depth("L"), init=l_words)
        self.q_mem = Memory(shape=p.row_bits + p.gate_bits, depth=p.q_entries, init=q_init)

    def elaborate(self, platform):
        m = Module()
        op, p = self.op, self.op.plan
        m.submodules.op = op
        m.submodules.l_mem = self.l_mem
        m.submodules.q_mem = self.q_mem
        rd = self.l_mem.read_port()                 # sync, enable, no transparency
        m.d.comb += [rd.en.eq(op.src.en), rd.addr.eq(op.src.row * p.wpr["L"] + op.src.word),
                     op.src.data.eq(rd.data)]
        wr = self.q_mem.write_port()
        m.d.comb += [wr.en.eq(op.qw.en), wr.addr.eq(op.qw.pos),
                     wr.data.eq(Cat(op.qw.token, op.qw.weight))]
        return m


def logit_rows(rng, q, N, E):
    """gate_logit codes [N, E]: ties, format extremes, wide and narrow spreads."""
    f = q.gate_logit
    lo, hi = f.min_int, f.max_int
    rows = [np.full(E, hi), np.full(E, lo), np.resize([lo, hi], E), np.resize([0, 0, 1], E)]
    while len(rows) < N:
        c = int(rng.integers(lo // 2, hi // 2))
        spread = 1 << int(rng.integers(0, f.frac + 4))
        r = np.clip(c + rng.integers(-spread, spread + 1, E), lo, hi)
        if rng.random() < 0.3:                      # a tied pair
            r[rng.integers(0, E)] = r[rng.integers(0, E)]
        rows.append(r)
    rows = np.array(rows[:N], dtype=np.int64)
    return rows[rng.permutation(N)]


def l_words(rng, p, codes):
    """L buffer contents: rows' values at lanes, everything else (lanes >= E, other rows) random."""
    W = p.wpr["L"]
    vals = rng.integers(-(1 << (p.vb - 1)), 1 << (p.vb - 1), (p.R, W * p.G))
    vals[:codes.shape[0], :codes.shape[1]] = codes
    mask = (1 << p.vb) - 1
    words = []
    for r in range(p.R):
        for w in range(W):
            words.append(sum((int(vals[r, w * p.G + ln]) & mask) << (ln * p.vb) for ln in range(p.G)))
    return words


def golden(cfg, q, h, codes):
    m = Machine(q, h, buffer_plan(cfg, q, h), FlatMemory(64))
    m._st, m._cur = RunStats(), [0, 0]
    m.bufs[Buf.L][:codes.shape[0], :codes.shape[1]] = codes
    m._op_gate(Instr(Op.GATE, src=Buf.L, rows=codes.shape[0], n=cfg.num_experts, arg=cfg.top_k),
               0, Registers(0, 0, 0, 0), None)
    return m.queues, m.metaqueue, m._st.sat.saturated()


def run_engine(cfg, q, h, seed, runs=2):
    """`runs` GATE ops back to back (the next start in the cycle after done), new L data each;
    returns the measured cycles of each."""
    rng = np.random.default_rng(seed)
    N, E = cfg.num_tokens, cfg.num_experts
    datasets = [logit_rows(rng, q, N, E) for _ in range(runs)]
    p = accel_plan(cfg, q, h)
    q_init = [int(v) for v in rng.integers(0, 1 << (p.row_bits + p.gate_bits), p.q_entries)]
    dut = Bench(cfg, q, h, l_words(rng, p, datasets[0]), q_init)
    op = dut.op
    results = []

    async def tb(ctx):
        for i, codes in enumerate(datasets):
            if i:
                for a, v in enumerate(l_words(rng, p, codes)):
                    ctx.set(dut.l_mem.data[a], v)
            ctx.set(op.rows, N)
            ctx.set(op.start, 1)
            sat, cyc, writes = ctx.get(op.sat), 0, []
            await ctx.tick()
            ctx.set(op.start, 0)
            while True:
                cyc += 1
                assert cyc < 10 * op.cycles(), "no done"
                sat += ctx.get(op.sat)
                if ctx.get(op.qw.en):
                    writes.append(ctx.get(op.qw.pos))
                if ctx.get(op.done):
                    break
                await ctx.tick()
            mem = [ctx.get(dut.q_mem.data[a]) for a in range(p.q_entries)]
            outs = ([ctx.get(op.q_base[e]) for e in range(E)], [ctx.get(op.q_len[e]) for e in range(E)],
                    ctx.get(op.active), ctx.get(op.overflow))
            results.append((codes, cyc, sat, writes, mem, outs))
            await ctx.tick()
        # after the last op: idle, no writes, no sat, no second done; outputs hold
        for _ in range(5):
            assert not ctx.get(op.done) and not ctx.get(op.qw.en) and ctx.get(op.sat) == 0
            assert [ctx.get(op.q_len[e]) for e in range(E)] == results[-1][5][1]
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()

    tb_mask = (1 << p.row_bits) - 1
    cycles = []
    for codes, cyc, sat, writes, mem, (base, length, active, overflow) in results:
        queues, meta, gsat = golden(cfg, q, h, codes)
        n_ent = sum(len(t) for t, _ in queues)
        assert n_ent == N * cfg.top_k
        assert writes == list(range(n_ent)), f"queue writes at positions {writes}"
        tok = np.array([v & tb_mask for v in mem[:n_ent]])
        wts = np.array([v >> p.row_bits for v in mem[:n_ent]])
        for e, (gt, gw) in enumerate(queues):
            assert length[e] == len(gt), f"expert {e}: q_len {length[e]} != {len(gt)}"
            if len(gt):
                sl = slice(base[e], base[e] + length[e])
                np.testing.assert_array_equal(tok[sl], gt, err_msg=f"expert {e} tokens")
                np.testing.assert_array_equal(wts[sl], gw, err_msg=f"expert {e} weights")
        assert [e for e in range(E) if active >> e & 1] == meta
        assert overflow == 0
        assert sat == gsat, f"sat {sat} != golden {gsat}"
        assert cyc == op.cycles(), f"cycles {cyc} != documented {op.cycles()}"
        cycles.append((cyc, sat))
    print(f"\nGATE {cfg.name} E={E} k={cfg.top_k} N={N} {h.name} {q.name}: (cycles, sat) {cycles}; "
          f"unit latency {op.latency}, {op.words} word(s)/row")
    return cycles


@pytest.mark.parametrize("hwname", ["small-8x8", "zcu102-16x16"])
def test_gate_op_tiny_fixed(hwname):
    run_engine(TINY, FIXED, hw(hwname), seed=1)


def test_gate_op_saturation():
    res = run_engine(TINY, SATQ, hw("small-8x8"), seed=2)
    assert all(s > 0 for _, s in res)          # the data saturate: the count is exercised


def test_gate_op_w8a16():
    run_engine(TINY, get_quant_preset("w8a16"), hw("zcu102-16x16"), seed=3, runs=1)


def test_gate_op_multiword_rows():
    # E = 12 > G = 8: a row's logits span two words of L
    cfg = TINY.replace(num_experts=12, top_k=3)
    run_engine(cfg, FIXED, hw("small-8x8"), seed=4, runs=1)


@pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")
def test_gate_op_config_errors():
    with pytest.raises(Exception, match="act_buffer_tokens"):
        GateOp(TINY, FIXED, get_hw_preset("small-8x8").replace(act_buffer_tokens=8))
    with pytest.raises(Exception, match="no MoE blocks"):
        GateOp(TINY.replace(moe_blocks=()), FIXED, hw("small-8x8"))
    gc.collect()                               # their UnusedElaboratable warnings, here


def test_gate_op_export():
    op = GateOp(TINY, FIXED, hw("small-8x8"))
    ports = port_list(op)
    assert ports["qw__pos"] == (5, "o") and ports["src__data"] == (8 * 32, "i")
    assert ports["q_len"] == (4 * 6, "o") and ports["overflow"] == (1, "o")
    v = to_verilog(op, "edgemoe_gate_op")
    assert "module edgemoe_gate_op" in v and "qw__weight" in v
