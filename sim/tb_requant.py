"""cocotb testbench of hw/requant.py (module edgemoe_requant) against quant.epilogue.requant_golden.

tb_config (from sim.runner.run_cocotb): {"qcfg": QuantConfig dict, "hwcfg": HWConfig dict,
"n_beats": int, "stim_seed": int, "gap_prob": float, "stall_prob": float}.
Result: {"n_beats", "elements", "compared", "sat_total", "first_in_cycle", "last_out_cycle",
"latency", "cycles", "cycles_per_beat", "sim_cycles_per_s"}.
"""
from __future__ import annotations

import time

import numpy as np

from edgemoe.quant.epilogue import requant_plan


def requant_stimulus(qcfg, lanes: int, n_beats: int, seed: int):
    """(acc, bias) int64 arrays of shape (n_beats, lanes) mixing: format extremes, uniform full
    range (mostly saturating), in-range results, exact rounding ties (odd and even quotients)
    and results just inside/outside the act range. Every value is inside its format."""
    rng = np.random.default_rng(seed)
    A, B, Y = qcfg.acc, qcfg.bias, qcfg.act
    plan = requant_plan(qcfg)
    sb, s = plan.bias_shift, plan.round_shift
    shape = (n_beats, lanes)

    def uni(lo, hi, size=shape):  # inclusive bounds
        return rng.integers(lo, hi, size=size, endpoint=True, dtype=np.int64)

    bias = uni(B.min_int, B.max_int)
    acc = uni(A.min_int, A.max_int)
    kind = rng.integers(0, 6, size=shape)
    unit = 1 << max(s, 0)
    half = (1 << (s - 1)) if s > 0 else 0
    # target sums (in acc.frac units) for the structured kinds
    r_in = uni(Y.min_int, Y.max_int)                                # any in-range result
    r_edge = np.where(rng.integers(0, 2, size=shape) == 1, Y.max_int, Y.min_int) + uni(-2, 2)
    low = uni(0, unit - 1) if s > 0 else np.zeros(shape, dtype=np.int64)
    tie_q = uni(Y.min_int // 4, Y.max_int // 4)
    target = {
        2: r_in * unit + low,
        3: tie_q * unit + half,                                     # exact tie
        4: r_edge * unit + np.where(rng.integers(0, 2, size=shape) == 1, half, low),
    }
    for k, t in target.items():
        sel = kind == k
        a = t - (bias << sb)
        ok = sel & (a >= A.min_int) & (a <= A.max_int)
        acc[ok] = a[ok]
        fallback = sel & ~ok                                        # bias too big to absorb
        bias[fallback] = 0
        acc[fallback] = np.clip(t[fallback], A.min_int, A.max_int)
    ext = kind == 5
    acc[ext] = rng.choice(np.array([A.min_int, A.max_int, 0, -1, 1], dtype=np.int64), size=int(ext.sum()))
    bias[ext] = rng.choice(np.array([B.min_int, B.max_int, 0, -1], dtype=np.int64), size=int(ext.sum()))
    # the first beats: every lane at an extreme, so even a tiny run covers them
    if n_beats >= 2:
        acc[0], bias[0] = A.max_int, B.max_int
        acc[1], bias[1] = A.min_int, B.min_int
    return acc, bias


try:
    import cocotb
except ImportError:  # importable without cocotb for requant_stimulus
    cocotb = None

if cocotb is not None:
    from cocotb.triggers import RisingEdge

    from edgemoe.hw.config import HWConfig
    from edgemoe.hw.requant import Requant
    from edgemoe.quant.config import QuantConfig
    from edgemoe.quant.epilogue import requant_golden
    from edgemoe.sim.tb_common import (StreamDriver, StreamSink, first_mismatch, pack_lanes, start_clock_and_reset,
                               tb_config, unpack_lanes, write_result)

    LATENCY = Requant.LATENCY

    @cocotb.test()
    async def requant_stream(dut):
        cfg = tb_config()
        q = QuantConfig.from_dict(cfg["qcfg"])
        h = HWConfig(**cfg["hwcfg"])
        L, n = h.lanes, int(cfg["n_beats"])
        acc, bias = requant_stimulus(q, L, n, int(cfg["stim_seed"]))
        exp_out, exp_sat = requant_golden(acc, bias, q)

        counter = await start_clock_and_reset(dut, idle_inputs={"i__valid": 0, "o__ready": 0})
        seed = int(cfg["seed"])
        sink = StreamSink(dut, "o", dut.clk, counter, fields=("data", "sat_count"),
                          stall_prob=float(cfg.get("stall_prob", 0.0)), seed=seed + 1)
        driver = StreamDriver(dut, "i", dut.clk, counter, fields=("acc", "bias"),
                              gap_prob=float(cfg.get("gap_prob", 0.0)), seed=seed)
        beats = [{"acc": pack_lanes(acc[b], q.acc.bits), "bias": pack_lanes(bias[b], q.bias.bits)}
                 for b in range(n)]
        t0 = time.perf_counter()
        c0 = counter.cycle
        in_cycles = await driver.send(beats)
        got = await sink.wait_for(n, max_cycles=100 + 50 * n)
        wall = time.perf_counter() - t0
        sim_cycles = counter.cycle - c0

        got_out = np.array([unpack_lanes(g["data"], q.act.bits, L) for g in got], dtype=np.int64)
        got_sat = [g["sat_count"] for g in got]
        out_cycles = [g["cycle"] for g in got]
        # element = one lane of one beat; compared as integers, the first difference reported
        inputs = [f"beat {b} lane {k}: acc={int(acc[b, k])} bias={int(bias[b, k])}"
                  for b in range(n) for k in range(L)]
        first_mismatch(exp_out.reshape(-1).tolist(), got_out.reshape(-1).tolist(), inputs,
                       [c for c in out_cycles for _ in range(L)], what="element")
        first_mismatch(exp_sat.tolist(), got_sat, [f"beat {b}" for b in range(n)], out_cycles,
                       what="sat_count of beat")
        # no extra beat may appear after the last one
        for _ in range(LATENCY + 2):
            await RisingEdge(dut.clk)
        assert len(sink.beats) == n, f"{len(sink.beats) - n} unexpected extra output beats"

        write_result({
            "n_beats": n, "lanes": L, "elements": n * L, "compared": int(got_out.size),
            "sat_total": int(sum(got_sat)),
            "first_in_cycle": in_cycles[0], "last_in_cycle": in_cycles[-1],
            "first_out_cycle": out_cycles[0], "last_out_cycle": out_cycles[-1],
            "latency": out_cycles[0] - in_cycles[0],
            "cycles": out_cycles[-1] - in_cycles[0] + 1,
            "cycles_per_beat": (out_cycles[-1] - in_cycles[0] + 1) / n,
            "sim_cycles_per_s": sim_cycles / wall if wall > 0 else None,
        })
