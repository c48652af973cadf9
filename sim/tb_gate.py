"""cocotb testbench of hw/gate.py (module edgemoe_gate) against quant.approx.gate_fixed and
quant.schedule.scatter_order / build_expert_queues / active_experts.

tb_config (from sim.runner.run_cocotb): {"qcfg": QuantConfig dict, "num_experts", "top_k",
"num_tokens", "latency", "layers": [{"n": tokens, "sparse": bool}], "stim_seed", "gap_prob",
"stall_prob"}. A sparse layer uses a random increasing subset of the token indices 0..N-1.
Test `gate_layers`: every layer (start pulse between layers) is driven with random valid gaps,
the read stream taken with random back-pressure; compared as integers: every (expert, token,
weight, last, final) of the read stream in order with scatter_order, every token's probabilities
and top-k mask (dbg port) with gate_fixed, the per-expert lengths, the occupancy vector (the
metaqueue), done, overflow and the saturation count.
Result: {"layers": [per-layer cycles], "tokens", "entries", "compared", "sat_total",
"cycles_per_token", "latency", "read_latency", "drain", "sim_cycles_per_s"}.
Test `gate_overflow_flush`: N+1 tokens overflow the queues (overflow flag, lengths capped at N,
the dropped entry absent from the read stream); `start` while tokens are in flight drops them.
"""
from __future__ import annotations

import time

import numpy as np

from edgemoe.quant.approx import LOG2E


def gate_stimulus(qcfg, n_exp: int, n_tok: int, seed: int) -> np.ndarray:
    """gate_logit codes [n_tok, n_exp] mixing realistic router logits, the full format range,
    all-equal rows (ties), one dominant logit, near-ties (0..3 LSB), format extremes, and
    differences on the exp2 table's segment boundaries and around the exponent clamp."""
    rng = np.random.default_rng(seed)
    f = qcfg.gate_logit
    lo, hi, F = f.min_int, f.max_int, f.frac
    seg = 1 << max(F - qcfg.exp_table_bits, 0)
    out = np.zeros((n_tok, n_exp), dtype=np.int64)
    kinds = rng.integers(0, 8, n_tok)
    for t in range(n_tok):
        kind = kinds[t]
        if kind == 0:                                    # realistic: N(0, 1.5) natural units
            row = f.quantize(rng.normal(0.0, 1.5, n_exp) * LOG2E)
        elif kind == 1:                                  # uniform over the whole format
            row = rng.integers(lo, hi, n_exp, endpoint=True)
        elif kind == 2:                                  # all equal: every p ties
            row = np.full(n_exp, rng.choice([lo, hi, 0, int(rng.integers(lo, hi))]))
        elif kind == 3:                                  # one dominant logit
            row = f.quantize(rng.normal(0.0, 1.0, n_exp))
            row[rng.integers(n_exp)] = f.quantize(rng.uniform(6.0, 30.0))
        elif kind == 4:                                  # near-ties of a few LSB
            base = int(rng.integers(lo // 2, hi // 2))
            row = base - rng.integers(0, 4, n_exp)
            if rng.random() < 0.5:
                row = base - rng.integers(0, 1 << 10, n_exp)     # p codes collide, e differ
        elif kind == 5:                                  # format extremes
            row = rng.choice(np.array([lo, hi, 0, -1, 1, lo + 1, hi - 1]), n_exp)
        elif kind == 6:                                  # exp2 table segment boundaries
            base = int(rng.integers(lo // 2, hi // 2))
            row = base - rng.integers(0, 1 << qcfg.exp_table_bits, n_exp) * seg \
                - rng.integers(-1, 2, n_exp)
            row[rng.integers(n_exp)] = base
        else:                                            # around the exponent clamp (-k ~ 17..24)
            base = int(rng.integers(lo // 2, hi // 2))
            row = base - (rng.integers(15, 26, n_exp) << F) - rng.integers(-1, 2, n_exp)
            row[rng.integers(n_exp)] = base
        out[t] = np.clip(row, lo, hi)
    fixed = [np.full(n_exp, hi), np.full(n_exp, lo), np.r_[hi, np.full(n_exp - 1, lo)],
             np.r_[np.full(n_exp - 1, lo), hi]]
    for t, row in enumerate(fixed[:n_tok]):
        out[t] = row
    return out


def golden_layer(logits, tokens, qcfg, n_exp: int, top_k: int):
    """(probs, topk_idx, topk_w, sat_total, read stream [(expert, token, weight, last, final)],
    lengths, active mask) of one layer; `tokens` maps row -> token index."""
    from edgemoe.quant.approx import gate_fixed
    from edgemoe.quant.fixed import SatCounter
    from edgemoe.quant.schedule import active_experts, build_expert_queues, scatter_order
    sat = SatCounter()
    idx, w, probs = gate_fixed(logits, qcfg, top_k, sat)
    exp, row, _, wts = scatter_order(idx, w, n_exp)
    tok = np.asarray(tokens, dtype=np.int64)[row]
    stream = []
    for j in range(len(exp)):
        last = j + 1 == len(exp) or exp[j + 1] != exp[j]
        stream.append((int(exp[j]), int(tok[j]), int(wts[j]), int(last), int(j + 1 == len(exp))))
    queues = build_expert_queues(idx, w, n_exp)
    lengths = [len(qe.tokens) for qe in queues]
    act = sum(1 << e for e in active_experts(queues))
    return probs, idx, w, sat.saturated(), stream, lengths, act


try:
    import cocotb
except ImportError:  # importable without cocotb for gate_stimulus / golden_layer
    cocotb = None

if cocotb is not None:
    from cocotb.triggers import ReadOnly, RisingEdge

    from edgemoe.quant.config import QuantConfig
    from edgemoe.sim.tb_common import (StreamDriver, StreamSink, first_mismatch, pack_lanes, read_uint,
                               start_clock_and_reset, tb_config, unpack_lanes, write_result)

    IDLE = {"i__valid": 0, "o__ready": 0, "start": 0}
    OUT_FIELDS = ("expert", "token", "weight", "last", "final")

    class DbgMonitor:
        """Collects the dbg port (token, sel, probs) of every committed token."""

        def __init__(self, dut, counter):
            self.dut, self.counter, self.beats = dut, counter, []
            cocotb.start_soon(self._run())

        async def _run(self):
            while True:
                await ReadOnly()
                if read_uint(self.dut.dbg__valid):
                    self.beats.append({"token": read_uint(self.dut.dbg__token),
                                       "sel": read_uint(self.dut.dbg__sel),
                                       "probs": read_uint(self.dut.dbg__probs),
                                       "cycle": self.counter.cycle})
                await RisingEdge(self.dut.clk)

    def _setup(cfg):
        q = QuantConfig.from_dict(cfg["qcfg"])
        E, k, N = int(cfg["num_experts"]), int(cfg["top_k"]), int(cfg["num_tokens"])
        return q, E, k, N, max(1, (N - 1).bit_length())

    async def _pulse_start(dut):
        dut.start.value = 1
        await ReadOnly()
        assert read_uint(dut.i__ready) == 0 and read_uint(dut.o__valid) == 0, \
            "i.ready / o.valid must be low while start is high"
        await RisingEdge(dut.clk)
        dut.start.value = 0

    def _beats(logits, tokens, q, tb):
        n = len(tokens)
        return [{"logits": pack_lanes(logits[t], q.gate_logit.bits), "token": int(tokens[t]) % (1 << tb),
                 "last": int(t == n - 1)} for t in range(n)]

    async def _check_state(dut, lengths, act, done, overflow, where):
        await ReadOnly()
        E = len(lengths)
        lb = len(dut.lengths) // E
        got_len = unpack_lanes(read_uint(dut.lengths), lb, E, signed=False)
        first_mismatch(lengths, got_len, [f"{where}: expert {e}" for e in range(E)],
                       what="queue length of expert")
        assert read_uint(dut.active) == act, \
            f"{where}: active (metaqueue) {read_uint(dut.active):#x}, expected {act:#x}"
        assert read_uint(dut.done) == done, f"{where}: done = {read_uint(dut.done)}, expected {done}"
        assert read_uint(dut.overflow) == overflow, \
            f"{where}: overflow = {read_uint(dut.overflow)}, expected {overflow}"
        await RisingEdge(dut.clk)

    @cocotb.test()
    async def gate_layers(dut):
        cfg = tb_config()
        q, E, k, N, tb = _setup(cfg)
        pb = q.gate_prob.bits
        seed = int(cfg["seed"])
        counter = await start_clock_and_reset(dut, idle_inputs=IDLE)
        sink = StreamSink(dut, "o", dut.clk, counter, fields=OUT_FIELDS,
                          stall_prob=float(cfg.get("stall_prob", 0.0)), seed=seed + 1)
        driver = StreamDriver(dut, "i", dut.clk, counter, fields=("logits", "token", "last"),
                              gap_prob=float(cfg.get("gap_prob", 0.0)), seed=seed)
        mon = DbgMonitor(dut, counter)
        rng = np.random.default_rng(int(cfg["stim_seed"]))
        layers, compared, sat_total, n_tok, n_ent = [], 0, 0, 0, 0
        t0, c0 = time.perf_counter(), counter.cycle
        for li, spec in enumerate(cfg["layers"]):
            n = int(spec["n"])
            tokens = (np.sort(rng.choice(N, n, replace=False)) if spec.get("sparse")
                      else np.arange(n))
            logits = gate_stimulus(q, E, n, int(cfg["stim_seed"]) + 17 * li)
            probs, idx, _, sat, stream, lengths, act = golden_layer(logits, tokens, q, E, k)
            if li:
                await _pulse_start(dut)
                await _check_state(dut, [0] * E, 0, 0, 0, f"layer {li} after start")
            assert read_uint(dut.sat_count) == 0, "sat_count not cleared by start"
            nb, nd = len(sink.beats), len(mon.beats)
            in_cycles = await driver.send(_beats(logits, tokens, q, tb))
            got = (await sink.wait_for(nb + len(stream), 200 + 60 * (n * k + N)))[nb:]
            await RisingEdge(dut.clk)
            assert len(mon.beats) - nd == n, f"layer {li}: {len(mon.beats) - nd} commits for {n} tokens"
            dbg = mon.beats[nd:]
            where = [f"layer {li} token {int(tokens[t])}: logits {logits[t].tolist()}" for t in range(n)]
            first_mismatch([int(t) for t in tokens], [d["token"] for d in dbg], where,
                           [d["cycle"] for d in dbg], what="committed token")
            first_mismatch([tuple(int(v) for v in r) for r in probs],
                           [tuple(unpack_lanes(d["probs"], pb, E, signed=False)) for d in dbg],
                           where, [d["cycle"] for d in dbg], what="gate probabilities of row")
            first_mismatch([sum(1 << int(e) for e in r) for r in idx], [d["sel"] for d in dbg],
                           where, [d["cycle"] for d in dbg], what="top-k mask of row")
            first_mismatch(stream, [tuple(g[f] for f in OUT_FIELDS) for g in got],
                           [f"layer {li} entry {j}" for j in range(len(stream))],
                           [g["cycle"] for g in got], what="read-stream entry (expert, token, weight, last, final)")
            await _check_state(dut, lengths, act, 1, 0, f"layer {li} after the read stream")
            assert read_uint(dut.i__ready) == 0, "i.ready must stay low after `last` until start"
            assert read_uint(dut.sat_count) == sat, \
                f"layer {li}: sat_count {read_uint(dut.sat_count)}, golden SatCounter {sat}"
            for _ in range(4):                              # no extra read entries
                await RisingEdge(dut.clk)
            assert len(sink.beats) == nb + len(stream), "extra read-stream entries"
            compared += len(stream) + n * (E + 1)
            sat_total += sat
            n_tok += n
            n_ent += len(stream)
            layers.append({"n": n, "entries": len(stream), "first_in": in_cycles[0],
                           "last_in": in_cycles[-1], "first_commit": dbg[0]["cycle"],
                           "last_commit": dbg[-1]["cycle"], "first_read": got[0]["cycle"],
                           "final_read": got[-1]["cycle"]})
        wall = time.perf_counter() - t0
        l0 = layers[0]
        write_result({
            "layers": layers, "tokens": n_tok, "entries": n_ent, "compared": compared,
            "sat_total": sat_total,
            "cycles_per_token": (l0["last_in"] - l0["first_in"] + 1) / l0["n"],
            "latency": l0["first_commit"] - l0["first_in"],
            "read_latency": l0["first_read"] - l0["last_commit"],
            "read_cycles": l0["final_read"] - l0["first_read"] + 1,
            "drain": l0["final_read"] - l0["last_in"],
            "sim_cycles_per_s": (counter.cycle - c0) / wall if wall > 0 else None,
        })

    @cocotb.test()
    async def gate_overflow_flush(dut):
        cfg = tb_config()
        q, E, k, N, tb = _setup(cfg)
        counter = await start_clock_and_reset(dut, idle_inputs=IDLE)
        sink = StreamSink(dut, "o", dut.clk, counter, fields=OUT_FIELDS, stall_prob=0.2, seed=3)
        driver = StreamDriver(dut, "i", dut.clk, counter, fields=("logits", "token", "last"),
                              gap_prob=0.2, seed=4)
        # 1. N+1 tokens with equal logits: experts 0..k-1 every time, their queues overflow
        logits = np.zeros((N + 1, E), dtype=np.int64)
        tokens = np.arange(N + 1)
        probs, _, _, _, _, _, _ = golden_layer(logits[:1], [0], q, E, k)
        await driver.send(_beats(logits, tokens, q, tb))
        want = [(e, t % (1 << tb), int(probs[0, e]), int(t == N - 1), int(e == k - 1 and t == N - 1))
                for e in range(k) for t in range(N)]
        got = await sink.wait_for(len(want), 200 + 60 * len(want))
        first_mismatch(want, [tuple(g[f] for f in OUT_FIELDS) for g in got], what="overflow entry")
        await _check_state(dut, [N] * k + [0] * (E - k), (1 << k) - 1, 1, 1, "after overflow")
        # 2. start clears everything
        await _pulse_start(dut)
        await _check_state(dut, [0] * E, 0, 0, 0, "after start")
        # 3. tokens in flight when start comes are dropped
        rng = np.random.default_rng(5)
        junk = rng.integers(q.gate_logit.min_int, q.gate_logit.max_int, (3, E))
        drv = StreamDriver(dut, "i", dut.clk, counter, fields=("logits", "token", "last"), seed=6)
        await drv.send(_beats(junk, np.arange(3), q, tb)[:3])
        await _pulse_start(dut)
        n = min(N, 5)
        logits = gate_stimulus(q, E, n, 11)
        _, _, _, _, stream, lengths, act = golden_layer(logits, np.arange(n), q, E, k)
        nb = len(sink.beats)
        await drv.send(_beats(logits, np.arange(n), q, tb))
        got = (await sink.wait_for(nb + len(stream), 200 + 60 * len(stream) + 100))[nb:]
        first_mismatch(stream, [tuple(g[f] for f in OUT_FIELDS) for g in got],
                       what="entry after a flushing start")
        await _check_state(dut, lengths, act, 1, 0, "after the flushed layer")
        write_result({"overflow_entries": len(want), "flush_entries": len(stream)})
