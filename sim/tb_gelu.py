"""cocotb testbench of hw/gelu.py (module edgemoe_gelu) against quant.approx.gelu_fixed.

tb_config (from sim.runner.run_cocotb): {"qcfg": QuantConfig dict, "hwcfg": HWConfig dict,
"phases": [{"n_beats": int, "stim_seed": int, "gap_prob": float, "stall_prob": float}, ...]}
(a phase with "all_codes": true sends every gelu_in code instead of n_beats random vectors).
The phases run one after another in one simulation (after one reset; each drains before the
next starts), so a random run and a run without gaps/back-pressure share the simulator start-up.
Result: {"lanes", "compared", "sim_cycles_per_s", "phases": [per phase: "n_beats", "elements",
"compared", "sat_total", "first_in_cycle", "last_in_cycle", "first_out_cycle",
"last_out_cycle", "latency", "cycles", "cycles_per_beat"]}.
"""
from __future__ import annotations

import time

import numpy as np

from edgemoe.hw.gelu import gelu_plan


def gelu_interp(x, qcfg):
    """The un-rounded d = (T[i] << R) + (T[i+1] - T[i]) * r of each code x (0 outside the
    table) and the segment index i (-1 outside): what the stimulus aims at."""
    pl = gelu_plan(qcfg)
    p = pl.p
    t = np.abs(np.asarray(x, dtype=np.int64))
    i = t >> pl.low
    inside = i < p.segments
    ic = np.where(inside, i, 0)
    r = (t & ((1 << pl.low) - 1)) >> (pl.low - p.interp_bits)
    rt, rs = np.array(pl.rom_t, dtype=np.int64), np.array(pl.rom_s, dtype=np.int64)
    d = np.where(inside, (rt[ic] << p.interp_bits) + rs[ic] * r, 0)
    return d, np.where(inside, i, -1)


def _tie_pool(qcfg, rng, max_segments: int = 24, per_segment: int = 8) -> np.ndarray:
    """Non-negative codes t whose d has exactly one half in the bits that round(d >> s) drops,
    from up to max_segments segments (both quotient parities occur)."""
    pl = gelu_plan(qcfg)
    p, s, R = pl.p, pl.d_shift, pl.p.interp_bits
    if s <= 0:
        return np.zeros(0, dtype=np.int64)
    segs = rng.permutation(p.segments)[:max_segments]
    r = np.arange(1 << R, dtype=np.int64)
    out = []
    for i in segs:
        d = (pl.rom_t[i] << R) + pl.rom_s[i] * r
        hit = r[(d & ((1 << s) - 1)) == (1 << (s - 1))]
        if hit.size:
            pick = rng.choice(hit, size=min(per_segment, hit.size), replace=False)
            drop = pl.low - R                  # input bits below r do not reach d
            below = rng.integers(0, 1 << drop, size=pick.size) if drop else 0
            out.append((int(i) << pl.low) + (pick << drop) + below)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def gelu_stimulus(qcfg, lanes: int, n_beats: int, seed: int) -> np.ndarray:
    """gelu_in codes, int64 (n_beats, lanes), mixing: uniform full range, dense values in and
    just beyond the table range, segment boundaries +-1 LSB, exact rounding ties of d (and of
    relu's requantization when gelu_in.frac > act.frac), and format extremes."""
    rng = np.random.default_rng(seed)
    fi = qcfg.gelu_in
    pl = gelu_plan(qcfg)
    shape = (n_beats, lanes)
    n = n_beats * lanes

    def uni(lo, hi, size=n):
        return rng.integers(lo, hi, size=size, endpoint=True, dtype=np.int64)

    sign = np.where(rng.integers(0, 2, size=n) == 1, -1, 1)
    end = (pl.p.segments + 1) << pl.low             # a little beyond the table
    knots = (uni(0, pl.p.segments) << pl.low) + uni(-1, 1)
    ties = _tie_pool(qcfg, rng)
    sr = pl.relu_shift
    relu_ties = (uni(0, fi.max_int >> sr) << sr) + (1 << (sr - 1)) if sr > 0 else uni(0, fi.max_int)
    extremes = np.array([fi.min_int, fi.max_int, 0, 1, -1, fi.min_int + 1, fi.max_int - 1,
                         end, -end, pl.p.segments << pl.low, -(pl.p.segments << pl.low)], dtype=np.int64)
    kinds = {
        0: uni(fi.min_int, fi.max_int),
        1: sign * uni(0, end),
        2: sign * knots,
        3: sign * (rng.choice(ties, size=n) if ties.size else uni(0, end)),
        4: relu_ties,
        5: rng.choice(extremes, size=n),
    }
    kind = rng.integers(0, len(kinds), size=n)
    x = np.zeros(n, dtype=np.int64)
    for k, v in kinds.items():
        x[kind == k] = v[kind == k]
    x = np.clip(x, fi.min_int, fi.max_int).reshape(shape)
    # the first beats: every lane at an extreme, so even a tiny run covers them
    if n_beats >= 2:
        x[0], x[1] = fi.max_int, fi.min_int
    return x


def gelu_all_codes(qcfg, lanes: int) -> np.ndarray:
    """Every gelu_in code once, ascending, as (beats, lanes) (the last beat padded with 0)."""
    fi = qcfg.gelu_in
    if fi.bits > 20:
        raise ValueError(f"gelu_in {fi}: {2 ** fi.bits} codes are too many for an exhaustive run")
    x = np.arange(fi.min_int, fi.max_int + 1, dtype=np.int64)
    return np.concatenate([x, np.zeros(-len(x) % lanes, dtype=np.int64)]).reshape(-1, lanes)


def phase_stimulus(qcfg, lanes: int, phase: dict) -> np.ndarray:
    """A phase's inputs: {"all_codes": true} or {"n_beats", "stim_seed"} (gelu_stimulus)."""
    if phase.get("all_codes"):
        return gelu_all_codes(qcfg, lanes)
    return gelu_stimulus(qcfg, lanes, int(phase["n_beats"]), int(phase["stim_seed"]))


try:
    import cocotb
except ImportError:  # importable without cocotb for gelu_stimulus
    cocotb = None

if cocotb is not None:
    from cocotb.triggers import RisingEdge

    from edgemoe.hw.config import HWConfig
    from edgemoe.hw.gelu import Gelu
    from edgemoe.quant.approx import gelu_fixed
    from edgemoe.quant.config import QuantConfig
    from edgemoe.quant.fixed import SatCounter
    from edgemoe.sim.tb_common import (StreamDriver, StreamSink, first_mismatch, pack_lanes, start_clock_and_reset,
                               tb_config, unpack_lanes, write_result)

    LATENCY = Gelu.LATENCY

    @cocotb.test()
    async def gelu_stream(dut):
        cfg = tb_config()
        q = QuantConfig.from_dict(cfg["qcfg"])
        h = HWConfig(**cfg["hwcfg"])
        L = h.lanes
        can_sat = gelu_plan(q).can_saturate
        counter = await start_clock_and_reset(dut, idle_inputs={"i__valid": 0, "o__ready": 0})
        seed = int(cfg["seed"])
        sink = StreamSink(dut, "o", dut.clk, counter, fields=("data", "sat_count") if can_sat else ("data",),
                          seed=seed + 1)
        results, sim_cycles, wall = [], 0, 0.0
        for ph_i, ph in enumerate(cfg["phases"]):
            x = phase_stimulus(q, L, ph)
            n = len(x)
            exp_out = gelu_fixed(x, q)
            exp_sat = []
            for b in range(n):           # per-vector saturation counts of the golden model
                sc = SatCounter()
                gelu_fixed(x[b], q, sc, "gelu")
                exp_sat.append(sc.saturated("gelu"))

            sink.stall_prob = float(ph.get("stall_prob", 0.0))
            driver = StreamDriver(dut, "i", dut.clk, counter, fields=("data",),
                                  gap_prob=float(ph.get("gap_prob", 0.0)), seed=seed + 10 * ph_i)
            beats = [{"data": pack_lanes(x[b], q.gelu_in.bits)} for b in range(n)]
            first = len(sink.beats)
            t0 = time.perf_counter()
            c0 = counter.cycle
            in_cycles = await driver.send(beats)
            await sink.wait_for(first + n, max_cycles=100 + 50 * n)
            got = sink.beats[first:first + n]
            wall += time.perf_counter() - t0
            sim_cycles += counter.cycle - c0

            got_out = np.array([unpack_lanes(g["data"], q.act.bits, L, signed=q.act.signed) for g in got],
                               dtype=np.int64)
            out_cycles = [g["cycle"] for g in got]
            # element = one lane of one beat; compared as integers, the first difference reported
            inputs = [f"phase {ph_i} beat {b} lane {k}: x={int(x[b, k])}" for b in range(n) for k in range(L)]
            first_mismatch(exp_out.reshape(-1).tolist(), got_out.reshape(-1).tolist(), inputs,
                           [c for c in out_cycles for _ in range(L)], what="element")
            if can_sat:
                got_sat = [g["sat_count"] for g in got]
                first_mismatch(exp_sat, got_sat, [f"phase {ph_i} beat {b}" for b in range(n)], out_cycles,
                               what="sat_count of beat")
            else:
                assert sum(exp_sat) == 0, "golden model saturated where gelu_plan proved it cannot"
                got_sat = exp_sat
            # no extra beat may appear after the last one
            for _ in range(LATENCY + 2):
                await RisingEdge(dut.clk)
            assert len(sink.beats) == first + n, f"{len(sink.beats) - first - n} unexpected extra output beats"
            results.append({
                "n_beats": n, "elements": n * L, "compared": int(got_out.size),
                "sat_total": int(sum(got_sat)),
                "first_in_cycle": in_cycles[0], "last_in_cycle": in_cycles[-1],
                "first_out_cycle": out_cycles[0], "last_out_cycle": out_cycles[-1],
                "latency": out_cycles[0] - in_cycles[0],
                "cycles": out_cycles[-1] - in_cycles[0] + 1,
                "cycles_per_beat": (out_cycles[-1] - in_cycles[0] + 1) / n,
            })

        write_result({"lanes": L, "phases": results,
                      "compared": sum(r["compared"] for r in results),
                      "sim_cycles_per_s": sim_cycles / wall if wall > 0 else None})
