"""cocotb testbench of hw/attention.py (module edgemoe_attention) against
quant.attention.attention_golden: one layer (all heads), Q/K/V written through the write port in
random order (with valid gaps), output rows taken with random back-pressure, every output code
compared as an integer; the K/Q/V read strobes are counted per cycle and per pass; the `sat`
port summed over the run must equal the golden SatCounter total less attn_in (the engine takes
attn_in codes).

tb_config: {"qcfg", "hwcfg", "n", "heads", "head_dim", "stim_seed", "seed", "gap_prob",
"stall_prob"}. Result: {"rows", "compared", "cycles", "qk_k_reads", "qk_q_reads", "av_k_reads",
"av_v_reads", "av_q_reads", "max_reads_per_cycle", "qk_cycles", "sat_events", "sat_golden"
({name: count} of the golden SatCounter), "sim_cycles_per_s", ...}.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np


def attention_stimulus(qcfg, n: int, dim: int, seed: int) -> np.ndarray:
    """qkv [n, 3*dim] act codes: N(0, 1) reals (realistic scores), a few entries at the act
    extremes / zero / +-1 LSB, one token all most-positive and one all most-negative (saturated
    scores, a dominant key), so score and output saturation and ties all occur."""
    rng = np.random.default_rng(seed)
    a = qcfg.act
    x = np.round(rng.normal(0.0, 1.0, (n, 3 * dim)) * (1 << a.frac)).astype(np.int64)
    x = np.clip(x, a.min_int, a.max_int)
    pick = rng.random(x.shape) < 0.03
    x[pick] = rng.choice(np.array([a.min_int, a.max_int, 0, 1, -1]), int(pick.sum()))
    if n >= 3:
        x[1, :] = a.max_int
        x[2, :] = a.min_int
    return x


try:
    import cocotb
except ImportError:  # importable without cocotb for the stimulus function
    cocotb = None

if cocotb is not None:
    from cocotb.triggers import ReadOnly, RisingEdge

    from edgemoe.hw.config import HWConfig
    from edgemoe.quant.attention import attention_golden
    from edgemoe.quant.config import QuantConfig
    from edgemoe.quant.fixed import SatCounter
    from edgemoe.sim.tb_common import (StreamDriver, StreamSink, first_mismatch, pack_lanes, read_uint,
                               start_clock_and_reset, tb_config, unpack_lanes, write_result)

    @cocotb.test()
    async def attention_layer(dut):
        cfg = tb_config()
        q = QuantConfig.from_dict(cfg["qcfg"])
        h = HWConfig(**cfg["hwcfg"])
        n, H, dh = int(cfg["n"]), int(cfg["heads"]), int(cfg["head_dim"])
        D, P = H * dh, h.attn_p
        qkv = attention_stimulus(q, n, D, int(cfg["stim_seed"]))
        gsat = SatCounter()
        g = attention_golden(qkv, q, SimpleNamespace(num_tokens=n, heads=H, head_dim=dh, dim=D), P,
                             gsat, "attn")
        exp_events = gsat.saturated() - gsat.saturated("attn.attn_in")

        rng = np.random.default_rng(int(cfg["seed"]))
        writes = [(s, hd, r) for s in range(3) for hd in range(H) for r in range(n)]
        order = rng.permutation(len(writes))
        beats = []
        for i in order:
            s, hd, r = writes[i]
            vals = g.qkv_in[r, s * D + hd * dh: s * D + (hd + 1) * dh]
            beats.append({"sel": s, "head": hd, "row": r, "data": pack_lanes(vals, q.attn_in.bits)})

        counter = await start_clock_and_reset(dut, idle_inputs={"w__valid": 0, "o__ready": 0})
        seed = int(cfg["seed"])
        sink = StreamSink(dut, "o", dut.clk, counter, fields=("row", "head", "data"),
                          stall_prob=float(cfg.get("stall_prob", 0.0)), seed=seed + 1)
        driver = StreamDriver(dut, "w", dut.clk, counter, fields=("sel", "head", "row", "data"),
                              gap_prob=float(cfg.get("gap_prob", 0.0)), seed=seed)
        # K / Q block reads (QK pass), V block reads (AV pass), issue cycles of each pass and the
        # cycles in which both passes issue (the AV pass of a head beside the next head's QK)
        per_cycle = {"max": 0, "k": 0, "q": 0, "v": 0, "qk_cycles": 0, "av_cycles": 0,
                     "overlap": 0, "sat": 0}

        async def monitor():
            while True:
                await ReadOnly()
                k, qq, v = read_uint(dut.k_rd), read_uint(dut.q_rd), read_uint(dut.v_rd)
                av = read_uint(dut.av)
                per_cycle["k"] += k
                per_cycle["q"] += qq
                per_cycle["v"] += v
                per_cycle["qk_cycles"] += k
                per_cycle["av_cycles"] += av
                per_cycle["overlap"] += k & av
                per_cycle["max"] = max(per_cycle["max"], k + qq + v)
                per_cycle["sat"] += read_uint(dut.sat)
                await RisingEdge(dut.clk)

        mon = cocotb.start_soon(monitor())
        t0 = time.perf_counter()
        c0 = counter.cycle
        in_cycles = await driver.send(beats)
        got = await sink.wait_for(H * n, max_cycles=200 + 4 * H * (n * n + 200))
        wall = time.perf_counter() - t0
        sim_cycles = counter.cycle - c0
        for _ in range(20):
            await RisingEdge(dut.clk)
        mon.cancel()
        assert len(sink.beats) == H * n, f"{len(sink.beats) - H * n} unexpected extra output rows"

        tags = [(b["head"], b["row"]) for b in got]
        assert sorted(tags) == [(hd, r) for hd in range(H) for r in range(n)], \
            f"output tags are not every (head, row) exactly once: {tags}"
        exp_rows = [g.out[r, hd * dh:(hd + 1) * dh].tolist() for hd, r in tags]
        got_rows = [unpack_lanes(b["data"], q.act.bits, dh, signed=True) for b in got]
        first_mismatch([x for row in exp_rows for x in row], [x for row in got_rows for x in row],
                       [f"head {hd} row {r} col {c}" for hd, r in tags for c in range(dh)],
                       [b["cycle"] for b in got for _ in range(dh)], what="output code")
        # heads come out in order
        heads_seen = [hd for hd, _ in tags]
        assert heads_seen == sorted(heads_seen), f"heads out of order: {heads_seen}"
        assert per_cycle["sat"] == exp_events, \
            f"sat port counted {per_cycle['sat']} events, golden {gsat.report()} less attn_in"
        out_cycles = [b["cycle"] for b in got]
        write_result({
            "rows": len(got), "compared": len(got) * dh, "P": P,
            "cycles": out_cycles[-1] - in_cycles[-1],           # last write -> last output
            "k_reads": per_cycle["k"], "q_reads": per_cycle["q"], "v_reads": per_cycle["v"],
            "qk_cycles": per_cycle["qk_cycles"], "av_cycles": per_cycle["av_cycles"],
            "overlap_cycles": per_cycle["overlap"],
            "max_reads_per_cycle": per_cycle["max"],
            "sat_scores": int(((g.scores == q.score.max_int) | (g.scores == q.score.min_int)).sum()),
            "sat_out": int(((g.out == q.act.max_int) | (g.out == q.act.min_int)).sum()),
            "sat_events": per_cycle["sat"],
            "sat_golden": {k: v["saturated"] for k, v in gsat.report().items()},
            "sim_cycles_per_s": sim_cycles / wall if wall > 0 else None,
        })
