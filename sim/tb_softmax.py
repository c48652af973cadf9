"""cocotb testbench of hw/softmax.py (module edgemoe_softmax) against quant.approx.softmax_stats.

The input is the exact cycle-by-cycle sequence of quant.schedule.attention_schedule(n, P, heads):
one beat per schedule cycle, lane o = row mod P carrying that row's score for the cycle's key,
with first/last flags at the row's first/last step. Random valid gaps (between beats) and
output back-pressure come from tb_common's driver and sink.

tb_config (from sim.runner.run_cocotb): {"qcfg": QuantConfig dict, "hwcfg": HWConfig dict,
"n": tokens, "heads": int, "stim_seed": int, "gap_prob": float, "stall_prob": float}.
The unit's `sat` port (saturation events per cycle) is summed over the run and must equal the
golden SatCounter total (sum saturations per score plus reciprocal saturations per row).
Result: {"rows", "compared", "sat_rows", "sat_events", "beats", "schedule_cycles", "first_in_cycle",
"last_in_cycle", "last_out_cycle", "in_order", "latency_min", "latency_max", "sim_cycles_per_s"}.
"""
from __future__ import annotations

import time

import numpy as np

from edgemoe.quant.approx import softmax_stats
from edgemoe.quant.fixed import SatCounter
from edgemoe.quant.schedule import attention_schedule, row_key_order

ROW_KINDS = ("uniform", "normal", "equal", "growing", "dominant", "extremes", "falling", "jump")


def softmax_scores(qcfg, n: int, heads: int, P: int, seed: int, kinds=ROW_KINDS) -> np.ndarray:
    """Score codes [heads, n rows, n keys] (natural key index), one kind per row, cycling through
    `kinds` (the first rows of every head cover each kind, so tiny runs see them all):
    uniform over the whole format; N(0, sigma) for sigma in 1, 3, 8 (base-2 units); all equal
    (random, the format extremes, integers and integers +-1 LSB); growing (strictly increasing
    by >= 1.0 in the row's processing order, so m grows and S is rescaled at every step, with
    steps beyond sum.bits+1 when the range allows); one dominant score; a per-element mix of
    extremes and boundaries (min, max, 0, +-1 LSB, integers, exp2 table knots +-1); falling
    (max first, never rescaled); jump (most negative scores, then the maximum code)."""
    rng = np.random.default_rng(seed)
    fs = qcfg.score
    F, lo, hi = fs.frac, fs.min_int, fs.max_int
    one = 1 << F
    knot = 1 << (F - qcfg.exp_table_bits)
    order = row_key_order(n, P)
    out = np.zeros((heads, n, n), dtype=np.int64)
    equal_vals = [lo, hi, 0, -1, 1, one, -one, one + 1, -one - 1]
    for h in range(heads):
        for r in range(n):
            kind = kinds[(r + h) % len(kinds)]
            if kind == "uniform":
                row = rng.integers(lo, hi, n, endpoint=True)
            elif kind == "normal":
                row = fs.quantize(rng.normal(0.0, [1.0, 3.0, 8.0][rng.integers(3)], n))
            elif kind == "equal":
                v = equal_vals[rng.integers(len(equal_vals))] if rng.random() < 0.6 else \
                    int(rng.integers(lo, hi, endpoint=True))
                row = np.full(n, v, dtype=np.int64)
            elif kind in ("growing", "falling"):
                span = hi - lo
                step = int(rng.integers(one, max(one, span // max(n - 1, 1)), endpoint=True))
                start = int(rng.integers(lo, hi - step * (n - 1), endpoint=True))
                seq = start + step * np.arange(n, dtype=np.int64)
                seq = seq + rng.integers(0, min(step - one, one) + 1, n) * (rng.random() < 0.5)
                seq = np.minimum(np.maximum.accumulate(seq), hi)
                if kind == "falling":
                    seq = seq[::-1]
                row = np.empty(n, dtype=np.int64)
                row[order[r]] = seq                       # in the row's processing order
            elif kind == "dominant":
                row = fs.quantize(rng.normal(0.0, 1.0, n))
                row[rng.integers(n)] = fs.quantize(rng.uniform(8.0, 40.0))
            elif kind == "extremes":
                k = rng.integers(lo >> F, (hi >> F) + 1, n)
                cand = np.stack([np.full(n, lo), np.full(n, hi), np.zeros(n, np.int64),
                                 np.full(n, -1), np.full(n, 1), k << F, (k << F) + 1, (k << F) - 1,
                                 (k << F) + rng.integers(0, 1 << qcfg.exp_table_bits, n) * knot
                                 + rng.integers(-1, 2, n)])
                row = np.clip(cand[rng.integers(0, len(cand), n), np.arange(n)], lo, hi)
            elif kind == "jump":
                seq = np.full(n, lo, dtype=np.int64)
                seq[n // 2:] = hi                         # d = huge: S shifted to zero
                row = np.empty(n, dtype=np.int64)
                row[order[r]] = seq
            else:
                raise ValueError(f"unknown score row kind {kind!r}")
            out[h, r] = row
    return np.clip(out, lo, hi)


def softmax_expected(scores, qcfg, P: int):
    """Golden (recip, m, sat) [heads, n] with the hardware's key order; sat[h, r] = the row's
    sum or reciprocal saturated (per-row golden calls, only for heads that saturate at all)."""
    heads, n, _ = scores.shape
    order = row_key_order(n, P)
    recip = np.zeros((heads, n), dtype=np.int64)
    m = np.zeros((heads, n), dtype=np.int64)
    sat = np.zeros((heads, n), dtype=np.int64)
    for h in range(heads):
        cnt = SatCounter()
        recip[h], m[h] = softmax_stats(scores[h], order, qcfg, cnt)
        if cnt.saturated():
            for r in range(n):
                c = SatCounter()
                softmax_stats(scores[h, r:r + 1], order[r:r + 1], qcfg, c)
                sat[h, r] = int(c.saturated() > 0)
    return recip, m, sat


def schedule_beats(n: int, P: int, heads: int):
    """One beat per attention_schedule cycle: lists of per-lane (active, first, last, head, row,
    key) tuples (None for an idle lane), and {(head, row): beat index of its last score}."""
    beats, last_beat = [], {}
    step = {}
    for t, cyc in enumerate(attention_schedule(n, P, heads)):
        lanes = [None] * P
        for (h, r, key) in cyc.pairs:
            s = step.get((h, r), 0)
            step[(h, r)] = s + 1
            lanes[r % P] = (s == 0, s == n - 1, h, r, key)
            if s == n - 1:
                last_beat[(h, r)] = t
        beats.append(lanes)
    return beats, last_beat


try:
    import cocotb
except ImportError:  # importable without cocotb for the stimulus functions
    cocotb = None

if cocotb is not None:
    from cocotb.triggers import ReadOnly, RisingEdge

    from edgemoe.hw.config import HWConfig
    from edgemoe.hw.softmax import SoftmaxStats
    from edgemoe.quant.config import QuantConfig
    from edgemoe.sim.tb_common import (StreamDriver, StreamSink, first_mismatch, pack_lanes, read_uint,
                               start_clock_and_reset, tb_config, write_result)

    @cocotb.test()
    async def softmax_stats_schedule(dut):
        cfg = tb_config()
        q = QuantConfig.from_dict(cfg["qcfg"])
        hw = HWConfig(**cfg["hwcfg"])
        n, heads, P = int(cfg["n"]), int(cfg["heads"]), hw.attn_p
        unit = SoftmaxStats(q, hw, n, heads)           # widths only (not elaborated)
        kinds = tuple(cfg.get("kinds", ROW_KINDS))
        scores = softmax_scores(q, n, heads, P, int(cfg["stim_seed"]), kinds)
        exp_recip, exp_m, exp_sat = softmax_expected(scores, q, P)
        exp_events = SatCounter()
        softmax_stats(scores, row_key_order(n, P), q, exp_events)
        lanes, last_beat = schedule_beats(n, P, heads)

        beats = []
        for lane in lanes:
            act = first = last = 0
            sc, rw = [0] * P, [0] * P
            head = 0
            for o, x in enumerate(lane):
                if x is None:
                    continue
                f, l, h, r, key = x
                act |= 1 << o
                first |= int(f) << o
                last |= int(l) << o
                sc[o], rw[o], head = int(scores[h, r, key]), r, h
            beats.append({"score": pack_lanes(sc, q.score.bits), "active": act, "first": first,
                          "last": last, "row": pack_lanes(rw, unit.row_bits), "head": head})

        counter = await start_clock_and_reset(dut, idle_inputs={"i__valid": 0, "o__ready": 0})
        seed = int(cfg["seed"])
        sink = StreamSink(dut, "o", dut.clk, counter, fields=("recip", "m", "row", "head", "sat"),
                          stall_prob=float(cfg.get("stall_prob", 0.0)), seed=seed + 1)
        driver = StreamDriver(dut, "i", dut.clk, counter,
                              fields=("score", "active", "first", "last", "row", "head"),
                              gap_prob=float(cfg.get("gap_prob", 0.0)), seed=seed)
        rows = heads * n
        events = [0]

        async def count_sat():
            while True:
                await ReadOnly()
                events[0] += read_uint(dut.sat)
                await RisingEdge(dut.clk)

        mon = cocotb.start_soon(count_sat())
        t0 = time.perf_counter()
        c0 = counter.cycle
        in_cycles = await driver.send(beats)
        got = await sink.wait_for(rows, max_cycles=200 + 20 * rows + unit.LATENCY)
        wall = time.perf_counter() - t0
        sim_cycles = counter.cycle - c0
        for _ in range(unit.LATENCY + 4):
            await RisingEdge(dut.clk)
        mon.cancel()
        assert len(sink.beats) == rows, f"{len(sink.beats) - rows} unexpected extra output rows"
        assert events[0] == exp_events.saturated(), \
            f"sat port counted {events[0]} events, golden {exp_events.report()}"

        mb = unit.m_bits
        rec = []
        for g in got:
            mv = g["m"] - (1 << mb) if g["m"] >> (mb - 1) else g["m"]
            rec.append((g["head"], g["row"], g["recip"], mv, g["sat"], g["cycle"]))
        keys = [(h, r) for h, r, *_ in rec]
        assert len(set(keys)) == rows and all(h < heads and r < n for h, r in keys), \
            f"output rows are not each (head, row) exactly once: {sorted(keys)[:20]}..."
        expected_order = sorted(last_beat, key=lambda hr: (last_beat[hr], hr[1] % P))
        in_order = keys == expected_order
        rec.sort(key=lambda x: (x[0], x[1]))
        order = row_key_order(n, P)

        def describe(h, r):
            s = scores[h, r, order[r]]
            head_txt = ", ".join(str(int(v)) for v in s[:6])
            return (f"head {h} row {r} (lane {r % P}, last score in at cycle "
                    f"{in_cycles[last_beat[(h, r)]]}): scores in key order [{head_txt}"
                    f"{', ...' if n > 6 else ''}] (max {int(s.max())})")
        first_mismatch([(h, r, int(exp_recip[h, r]), int(exp_m[h, r]), int(exp_sat[h, r]))
                        for h in range(heads) for r in range(n)],
                       [x[:5] for x in rec], [describe(x[0], x[1]) for x in rec],
                       [x[5] for x in rec], what="row (head, row, recip, m, sat)")
        lat = [x[5] - in_cycles[last_beat[(x[0], x[1])]] for x in rec]
        write_result({
            "rows": rows, "compared": len(rec), "sat_rows": int(exp_sat.sum()),
            "sat_events": events[0],
            "beats": len(beats), "first_in_cycle": in_cycles[0], "last_in_cycle": in_cycles[-1],
            "last_out_cycle": max(x[5] for x in rec), "in_order": in_order,
            "latency_min": min(lat), "latency_max": max(lat), "latency": unit.LATENCY,
            "sim_cycles": sim_cycles,
            "sim_cycles_per_s": sim_cycles / wall if wall > 0 else None,
        })
