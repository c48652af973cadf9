"""cocotb testbench of hw/softmax_norm.py (module edgemoe_softmax_norm) against
quant.approx.softmax_normalise: one beat = L scores of one row with the row's (m, recip).

tb_config (from sim.runner.run_cocotb): {"qcfg": QuantConfig dict, "hwcfg": HWConfig dict,
"n_beats": int, "stim_seed": int, "gap_prob": float, "stall_prob": float}.
Result: {"n_beats", "lanes", "elements", "compared", "sat_total", "first_in_cycle",
"last_in_cycle", "first_out_cycle", "last_out_cycle", "latency", "cycles", "cycles_per_beat",
"sim_cycles_per_s"}.
"""
from __future__ import annotations

import time

import numpy as np

from edgemoe.quant.approx import softmax_normalise
from edgemoe.quant.fixed import Fmt


def _ceil_range(qcfg):
    f = qcfg.score
    return -((-f.min_int) >> f.frac), -((-f.max_int) >> f.frac)


def norm_stimulus(qcfg, lanes: int, n_beats: int, seed: int):
    """(scores [n_beats, lanes], m [n_beats], recip [n_beats]) int64, with s <= m * 2**F
    everywhere (the golden precondition). Exponents x = s - m*2**F: exactly 0 (p = recip),
    (-1, 0], down to the underflow boundary -(exp.frac+1) +- 1 LSB and beyond, exp2 table
    knots +- 1 LSB, the most negative score with the largest m (x = -2**(bits)), uniform
    scores. recip: realistic 2**kk / S, the format extremes, uniform."""
    rng = np.random.default_rng(seed)
    fs, F = qcfg.score, qcfg.score.frac
    lo_m, hi_m = _ceil_range(qcfg)
    kk = qcfg.sum.frac + qcfg.recip.frac
    m = rng.integers(lo_m, hi_m, n_beats, endpoint=True)
    m[rng.random(n_beats) < 0.1] = hi_m
    m[rng.random(n_beats) < 0.1] = lo_m
    top = np.minimum(m << F, fs.max_int)          # largest allowed score of each beat
    shape = (n_beats, lanes)
    kind = rng.integers(0, 7, shape)
    one = 1 << F
    knot = 1 << (F - qcfg.exp_table_bits)
    uf = (qcfg.exp.frac + 1) << F                   # exp2 underflow boundary (in score codes)
    u = np.select(
        [kind == 0, kind == 1, kind == 2, kind == 3, kind == 4, kind == 5],
        [np.zeros(shape, np.int64),
         rng.integers(0, one, shape),
         rng.integers(0, uf + 2 * one, shape),
         uf + rng.integers(-2, 3, shape),
         rng.integers(0, 24 << qcfg.exp_table_bits, shape) * knot + rng.integers(-1, 2, shape),
         np.full(shape, 1 << 62)],                  # clipped to the most negative score below
        rng.integers(0, (top - fs.min_int)[:, None] + 1, shape))      # uniform scores
    s = np.clip(top[:, None] - np.abs(u), fs.min_int, top[:, None])
    # whole beats with the most negative score under the largest m: x = -2**bits
    ext = rng.random(n_beats) < 0.03
    m[ext] = hi_m
    s[ext] = fs.min_int
    rmax = qcfg.recip.max_int
    rk = rng.integers(0, 4, n_beats)
    S = rng.integers(1 << max(qcfg.sum.frac - 1, 0), qcfg.sum.max_int, n_beats, endpoint=True)
    recip = np.select([rk == 0, rk == 1, rk == 2],
                      [np.minimum((1 << kk) // S, rmax),
                       rng.choice(np.array([0, 1, rmax, rmax - 1,
                                            min(1 << qcfg.recip.frac, rmax)]), n_beats),
                       np.full(n_beats, rmax)],
                      rng.integers(0, rmax, n_beats, endpoint=True))
    if n_beats >= 2:
        m[0], s[0], recip[0] = hi_m, fs.min_int, rmax
        m[1], s[1], recip[1] = lo_m, fs.min_int, rmax     # x = 0 when min_int is an integer
    return s.astype(np.int64), m.astype(np.int64), recip.astype(np.int64)


def norm_expected(s, m, recip, qcfg):
    """(p [n_beats, lanes] prob codes, sat_count [n_beats]) from the golden function; the count
    is that of lanes whose unsaturated p (the same function with a wide prob format) is out of
    the prob range."""
    p = softmax_normalise(s, m, recip, qcfg)
    wide = qcfg.replace(prob=Fmt(qcfg.exp.bits + qcfg.recip.bits + 1, qcfg.prob.frac, False))
    pw = softmax_normalise(s, m, recip, wide)
    return p, ((pw < qcfg.prob.min_int) | (pw > qcfg.prob.max_int)).sum(axis=-1)


try:
    import cocotb
except ImportError:  # importable without cocotb for the stimulus functions
    cocotb = None

if cocotb is not None:
    from cocotb.triggers import RisingEdge

    from edgemoe.hw.config import HWConfig
    from edgemoe.hw.softmax_norm import SoftmaxNorm
    from edgemoe.quant.config import QuantConfig
    from edgemoe.sim.tb_common import (StreamDriver, StreamSink, first_mismatch, pack_lanes,
                               start_clock_and_reset, tb_config, unpack_lanes, write_result)

    @cocotb.test()
    async def softmax_norm_stream(dut):
        cfg = tb_config()
        q = QuantConfig.from_dict(cfg["qcfg"])
        h = HWConfig(**cfg["hwcfg"])
        L, n = h.lanes, int(cfg["n_beats"])
        s, mm, recip = norm_stimulus(q, L, n, int(cfg["stim_seed"]))
        exp_p, exp_sat = norm_expected(s, mm, recip, q)
        mb = SoftmaxNorm(q, h).m_bits

        counter = await start_clock_and_reset(dut, idle_inputs={"i__valid": 0, "o__ready": 0})
        seed = int(cfg["seed"])
        sink = StreamSink(dut, "o", dut.clk, counter, fields=("prob", "sat_count"),
                          stall_prob=float(cfg.get("stall_prob", 0.0)), seed=seed + 1)
        driver = StreamDriver(dut, "i", dut.clk, counter, fields=("score", "m", "recip"),
                              gap_prob=float(cfg.get("gap_prob", 0.0)), seed=seed)
        beats = [{"score": pack_lanes(s[b], q.score.bits), "m": int(mm[b]) & ((1 << mb) - 1),
                  "recip": int(recip[b])} for b in range(n)]
        t0 = time.perf_counter()
        c0 = counter.cycle
        in_cycles = await driver.send(beats)
        got = await sink.wait_for(n, max_cycles=100 + 50 * n)
        wall = time.perf_counter() - t0
        sim_cycles = counter.cycle - c0

        got_p = np.array([unpack_lanes(g["prob"], q.prob.bits, L, signed=False) for g in got],
                         dtype=np.int64)
        got_sat = [g["sat_count"] for g in got]
        out_cycles = [g["cycle"] for g in got]
        inputs = [f"beat {b} lane {k}: score={int(s[b, k])} m={int(mm[b])} recip={int(recip[b])}"
                  for b in range(n) for k in range(L)]
        first_mismatch(exp_p.reshape(-1).tolist(), got_p.reshape(-1).tolist(), inputs,
                       [c for c in out_cycles for _ in range(L)], what="probability")
        first_mismatch(exp_sat.tolist(), got_sat, [f"beat {b}" for b in range(n)], out_cycles,
                       what="sat_count of beat")
        for _ in range(SoftmaxNorm.LATENCY + 2):
            await RisingEdge(dut.clk)
        assert len(sink.beats) == n, f"{len(sink.beats) - n} unexpected extra output beats"

        write_result({
            "n_beats": n, "lanes": L, "elements": n * L, "compared": int(got_p.size),
            "sat_total": int(sum(got_sat)), "zero_probs": int((exp_p == 0).sum()),
            "first_in_cycle": in_cycles[0], "last_in_cycle": in_cycles[-1],
            "first_out_cycle": out_cycles[0], "last_out_cycle": out_cycles[-1],
            "latency": out_cycles[0] - in_cycles[0],
            "cycles": out_cycles[-1] - in_cycles[0] + 1,
            "cycles_per_beat": (out_cycles[-1] - in_cycles[0] + 1) / n,
            "sim_cycles_per_s": sim_cycles / wall if wall > 0 else None,
        })
