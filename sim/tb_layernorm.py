"""cocotb testbench of hw/layernorm.py (module edgemoe_layernorm) against
quant.approx.layernorm_fixed (intermediates and saturation flags from quant.ln_steps).

tb_config (from sim.runner.run_cocotb): {"qcfg": QuantConfig dict, "hwcfg": HWConfig dict,
"d": int, "eps": float, "n_tokens": int per phase, "phases": [[gap_prob, stall_prob], ...],
"stim_seed": int, "p_gap_prob": float}.
Each phase is one "layer" with its own parameter set (phase i uses set i % 2: trained-like, then
full-range): write gamma/beta through the p stream (shuffled beat order, plus an ignored write
to an address >= D/L where the address field has room for one), stream n_tokens rows with
random input gaps (gap_prob) and output back-pressure (stall_prob), wait until every output
beat arrived and `busy` fell; then the next phase.
Every output element is compared as an integer with the golden function, and per beat
sat_count (lanes whose y left the act range), stat_sat (the token's rstd saturated) and last.
Result: {"tokens", "beats", "elements", "compared", "y_sat_total", "stat_sat_beats", "busy_seen",
"plan_latency", "sim_cycles_per_s", "phases": [per phase {"first_in_cycle", "last_in_cycle",
"first_out_cycle", "last_out_cycle", "latency", "in_span", "out_span", "cycles_per_beat",
"in_stall_cycles" (cycles with i__valid high and i__ready low)}]}.
"""
from __future__ import annotations

import time

import numpy as np

ROW_KINDS = ("n1", "n10", "outlier", "const", "extreme", "near_const", "uniform", "big_mean",
             "alternate", "tiny_spread")


def layernorm_rows_stim(qcfg, d: int, n_rows: int, seed: int):
    """(x [n_rows, d] act codes, kinds [n_rows]): the first len(ROW_KINDS) rows cover every kind,
    then random kinds. Kinds: N(0,1); N(0,10); N(0,1) with one +-55 outlier; constant rows
    (var = eps only: extremes, zero or random); every element at min_int or max_int; a constant
    with +-1 LSB noise; uniform codes over the whole act range; a large mean (+-90% of the range)
    with a tiny spread (cancellation in E[x^2] - mean^2); alternating min/max; spread of a few
    LSBs around a random value."""
    rng = np.random.default_rng(seed)
    act = qcfg.act
    lo, hi = act.min_int, act.max_int
    extra = rng.integers(0, len(ROW_KINDS), max(0, n_rows - len(ROW_KINDS)))
    kinds = (list(ROW_KINDS) + [ROW_KINDS[i] for i in extra])[:n_rows]
    x = np.zeros((n_rows, d), dtype=np.int64)
    for r, kind in enumerate(kinds):
        if kind == "n1":
            row = act.quantize(rng.normal(0.0, 1.0, d))
        elif kind == "n10":
            row = act.quantize(rng.normal(0.0, 10.0, d))
        elif kind == "outlier":
            row = act.quantize(rng.normal(0.0, 1.0, d))
            row[rng.integers(0, d)] = act.quantize(55.0 * rng.choice([-1.0, 1.0]))
        elif kind == "const":
            c = rng.choice([lo, hi, 0, -1, int(rng.integers(lo, hi, endpoint=True))])
            row = np.full(d, c, dtype=np.int64)
        elif kind == "extreme":
            row = rng.choice(np.array([lo, hi], dtype=np.int64), d)
        elif kind == "near_const":
            c = int(rng.integers(lo + 1, hi))
            row = c + rng.integers(-1, 1, d, endpoint=True)
        elif kind == "uniform":
            row = rng.integers(lo, hi, d, endpoint=True)
        elif kind == "big_mean":
            mu = rng.choice([-0.9, 0.9]) * act.max_value
            row = act.quantize(mu + rng.normal(0.0, rng.choice([1e-3, 1e-2, 1.0]), d))
        elif kind == "alternate":
            row = np.where(np.arange(d) % 2 == 0, lo, hi).astype(np.int64)
        else:  # tiny_spread
            c = int(rng.integers(lo // 2, hi // 2))
            row = c + rng.integers(-40, 40, d, endpoint=True)
        x[r] = np.clip(row, lo, hi)
    return x, kinds


def layernorm_params_stim(qcfg, d: int, which: int, seed: int):
    """gamma, beta [d] codes. Set 0: trained-like (approx.layernorm_params_random) with the
    format extremes and zero at a few positions; set 1: uniform over the whole formats with
    extremes."""
    from edgemoe.quant.approx import layernorm_params_random
    rng = np.random.default_rng(seed + 31 * which)
    G, E = qcfg.ln_gamma, qcfg.ln_beta
    if which == 0:
        g, b = layernorm_params_random(d, qcfg, seed)
        g, b = g.copy(), b.copy()
    else:
        g = rng.integers(G.min_int, G.max_int, d, endpoint=True)
        b = rng.integers(E.min_int, E.max_int, d, endpoint=True)
    idx = rng.permutation(d)[:min(d, 6)]
    for i, (gv, bv) in zip(idx, [(G.max_int, E.max_int), (G.min_int, E.min_int), (0, 0),
                                 (G.max_int, E.min_int), (G.min_int, E.max_int), (1, -1)]):
        g[i], b[i] = gv, bv
    return g.astype(np.int64), b.astype(np.int64)


try:
    import cocotb
except ImportError:  # importable without cocotb for the stimulus functions
    cocotb = None

if cocotb is not None:
    from cocotb.triggers import ReadOnly, RisingEdge

    from edgemoe.hw.config import HWConfig
    from edgemoe.hw.layernorm import layernorm_plan
    from edgemoe.quant.config import QuantConfig
    from edgemoe.quant.ln_steps import layernorm_steps
    from edgemoe.sim.tb_common import (StreamDriver, StreamSink, first_mismatch, pack_lanes, read_uint,
                               start_clock_and_reset, tb_config, unpack_lanes, write_result)

    class _Inputs:
        """Lazy per-element description for first_mismatch (built only for the reported one)."""

        def __init__(self, x, g, b, st, B, L):
            self.x, self.g, self.b, self.st, self.B, self.L = x, g, b, st, B, L

        def __len__(self):
            return self.x.size

        def __getitem__(self, i):
            d = self.x.shape[1]
            t, e = divmod(i, d)
            st = self.st
            return (f"token {t} beat {e // self.L} lane {e % self.L} (element {e}): x={int(self.x[t, e])} "
                    f"gamma={int(self.g[e])} beta={int(self.b[e])}; row mean={int(st['mean'][t])} "
                    f"var={int(st['var'][t])} rstd={int(st['rstd'][t])} xhat={int(st['xhat'][t, e])}")

    @cocotb.test()
    async def layernorm_stream(dut):
        cfg = tb_config()
        q = QuantConfig.from_dict(cfg["qcfg"])
        h = HWConfig(**cfg["hwcfg"])
        d, eps = int(cfg["d"]), float(cfg.get("eps", 1e-6))
        plan = layernorm_plan(q, h, d, eps)
        L, B = h.lanes, plan.beats
        n_tok = int(cfg["n_tokens"])
        phases = [(float(g), float(st_)) for g, st_ in cfg["phases"]]
        seed, stim_seed = int(cfg["seed"]), int(cfg["stim_seed"])
        A = q.act.bits

        counter = await start_clock_and_reset(
            dut, idle_inputs={"i__valid": 0, "o__ready": 0, "p__valid": 0})
        sink = StreamSink(dut, "o", dut.clk, counter, fields=("data", "sat_count", "stat_sat", "last"),
                          stall_prob=0.0, seed=seed + 1)
        driver = StreamDriver(dut, "i", dut.clk, counter, fields=("data",), gap_prob=0.0, seed=seed)
        pdrv = StreamDriver(dut, "p", dut.clk, counter, fields=("addr", "gamma", "beta"),
                            gap_prob=float(cfg.get("p_gap_prob", 0.3)), seed=seed + 2)
        rng = np.random.default_rng(stim_seed + 5)
        in_stalls = [0]          # cycles with i__valid high and i__ready low (buffer full)

        async def stall_monitor():
            while True:
                await ReadOnly()
                if read_uint(dut.i__valid) and not read_uint(dut.i__ready):
                    in_stalls[0] += 1
                await RisingEdge(dut.clk)

        cocotb.start_soon(stall_monitor())
        addr_bits = max(1, (B - 1).bit_length())
        busy_seen = False
        res = []
        sim_wall = 0.0           # wall time of the simulated stretches (golden model excluded)
        sim_cycles = 0
        total_out = 0
        y_sat_total = stat_sat_beats = 0
        for s, (gap, stall) in enumerate(phases):
            x, _ = layernorm_rows_stim(q, d, n_tok, stim_seed + 1000 * s)
            g, b = layernorm_params_stim(q, d, s % 2, stim_seed)
            st = layernorm_steps(x, g, b, q, eps)
            # parameters: shuffled beat order; an out-of-range address must be ignored
            pbeats = [{"addr": j, "gamma": pack_lanes(g[j * L:(j + 1) * L], q.ln_gamma.bits),
                       "beta": pack_lanes(b[j * L:(j + 1) * L], q.ln_beta.bits)}
                      for j in rng.permutation(B)]
            if (1 << addr_bits) > B:
                junk = {"addr": B, "gamma": pack_lanes([q.ln_gamma.max_int] * L, q.ln_gamma.bits),
                        "beta": pack_lanes([q.ln_beta.min_int] * L, q.ln_beta.bits)}
                pbeats.insert(int(rng.integers(0, len(pbeats) + 1)), junk)
            t0, c0 = time.perf_counter(), counter.cycle
            await pdrv.send(pbeats)
            driver.gap_prob, sink.stall_prob = gap, stall
            stalls0 = in_stalls[0]
            await RisingEdge(dut.clk)
            beats = [{"data": pack_lanes(x[t, j * L:(j + 1) * L], A)} for t in range(n_tok)
                     for j in range(B)]
            n0 = len(sink.beats)
            in_cycles = await driver.send(beats)
            await ReadOnly()
            busy_seen |= bool(read_uint(dut.busy))
            got = (await sink.wait_for(n0 + len(beats), max_cycles=200 + 60 * len(beats)))[n0:]
            # busy must fall once everything is out (it may lag the last beat by a cycle)
            for _ in range(4):
                await RisingEdge(dut.clk)
            await ReadOnly()
            assert not read_uint(dut.busy), "busy still high after the last output beat"
            assert len(sink.beats) == n0 + len(beats), \
                f"{len(sink.beats) - n0 - len(beats)} unexpected extra output beats"
            await RisingEdge(dut.clk)
            sim_wall += time.perf_counter() - t0
            sim_cycles += counter.cycle - c0

            got_y = np.array([unpack_lanes(gb["data"], A, L) for gb in got], dtype=np.int64)
            out_cycles = [gb["cycle"] for gb in got]
            first_mismatch(st["y"].reshape(-1).tolist(), got_y.reshape(-1).tolist(),
                           _Inputs(x, g, b, st, B, L), [c for c in out_cycles for _ in range(L)],
                           what=f"element (phase {s})")
            exp_sat = st["y_over"].reshape(n_tok * B, L).sum(axis=1)
            beat_desc = [f"token {i // B} beat {i % B}" for i in range(n_tok * B)]
            first_mismatch(exp_sat.tolist(), [gb["sat_count"] for gb in got], beat_desc, out_cycles,
                           what=f"sat_count of beat (phase {s})")
            exp_ss = np.repeat(st["rstd_over"] | st["var_over"], B).astype(int)
            first_mismatch(exp_ss.tolist(), [gb["stat_sat"] for gb in got], beat_desc, out_cycles,
                           what=f"stat_sat of beat (phase {s})")
            exp_last = [int(i % B == B - 1) for i in range(n_tok * B)]
            first_mismatch(exp_last, [gb["last"] for gb in got], beat_desc, out_cycles,
                           what=f"last flag of beat (phase {s})")
            total_out += got_y.size
            y_sat_total += int(exp_sat.sum())
            stat_sat_beats += int(exp_ss.sum())
            res.append({
                "first_in_cycle": in_cycles[0], "last_in_cycle": in_cycles[-1],
                "first_out_cycle": out_cycles[0], "last_out_cycle": out_cycles[-1],
                "latency": out_cycles[0] - in_cycles[0],
                "in_span": in_cycles[-1] - in_cycles[0] + 1,
                "out_span": out_cycles[-1] - out_cycles[0] + 1,
                "cycles_per_beat": (out_cycles[-1] - in_cycles[0] + 1) / len(beats),
                "in_stall_cycles": in_stalls[0] - stalls0,
            })
            sink.stall_prob = 0.0
        n_ph = len(phases)
        write_result({
            "phases": res, "tokens": n_tok * n_ph, "beats": n_tok * B * n_ph,
            "elements": n_tok * d * n_ph, "compared": total_out, "y_sat_total": y_sat_total,
            "stat_sat_beats": stat_sat_beats, "busy_seen": busy_seen, "plan_latency": plan.latency,
            "sim_cycles_per_s": sim_cycles / sim_wall if sim_wall > 0 else None,
        })
