"""cocotb testbench of hw/channel_requant.py (module edgemoe_channel_requant) against
quant.channel.channel_epilogue.

tb_config (from sim.runner.run_cocotb): {"qcfg": QuantConfig dict, "hwcfg": HWConfig dict,
"n_beats": int, "stim_seed": int, "gap_prob": float, "stall_prob": float}.
Result: {"n_beats", "lanes", "elements", "compared", "sat_total", "first_in_cycle",
"last_in_cycle", "first_out_cycle", "last_out_cycle", "latency", "cycles", "cycles_per_beat"}.
"""
from __future__ import annotations

import numpy as np

from edgemoe.quant.channel import MAX_SHIFT


def channel_stimulus(qcfg, lanes: int, n_beats: int, seed: int):
    """(acc, bias, mult, shift) int64 arrays (n_beats, lanes) mixing: uniform full range (mostly
    saturating), results aimed inside the output range, exact rounding ties of both parities
    (power-of-two multipliers), shift 0, and format extremes. Every value is inside its field."""
    rng = np.random.default_rng(seed)
    A, B, Y, MB = qcfg.acc, qcfg.bias, qcfg.act, qcfg.mult_bits
    shape = (n_beats, lanes)

    def uni(lo, hi, size=shape):  # inclusive bounds
        return rng.integers(lo, hi, size=size, endpoint=True, dtype=np.int64)

    acc, bias = uni(A.min_int, A.max_int), uni(B.min_int, B.max_int)
    mult, shift = uni(1 << (MB - 1), (1 << MB) - 1), uni(0, MAX_SHIFT)
    kind = rng.integers(0, 5, size=shape)
    lo_sum, hi_sum = A.min_int + B.min_int, A.max_int + B.max_int

    def set_sum(sel, total):       # acc + bias = total where it can be split
        total = np.clip(total, lo_sum, hi_sum)
        b = np.clip(total - acc, B.min_int, B.max_int)
        a = np.clip(total - b, A.min_int, A.max_int)
        acc[sel], bias[sel] = a[sel], b[sel]

    # 1: in range. s with (2**s / M) * Y.max inside the sum range, sum = r * 2**s / M
    sel = kind == 1
    s_max = np.floor(np.log2(max(hi_sum, 1) * mult.astype(float) / max(Y.max_int, 1))).astype(np.int64)
    shift[sel] = np.clip(rng.integers(0, np.maximum(s_max, 0) + 1), 0, MAX_SHIFT)[sel]
    r = uni(Y.min_int - 2, Y.max_int + 2).astype(float)
    set_sum(sel, np.clip(np.round(r * np.exp2(shift.astype(float)) / mult), lo_sum, hi_sum).astype(np.int64))
    # 2: ties: M = 2**(MB-1), s >= MB: p / 2**s = sum / 2**t, t = s - MB + 1; sum = k*2**t + 2**(t-1)
    sel = kind == 2
    mult[sel] = 1 << (MB - 1)
    t = uni(1, 12)
    shift[sel] = (t + MB - 1)[sel]
    k = uni(Y.min_int // 2, Y.max_int // 2)
    set_sum(sel, (k << t) + (1 << (t - 1)))
    # 3: shift 0 and small sums
    sel = kind == 3
    shift[sel] = 0
    set_sum(sel, uni(-4, 4))
    # 4: extremes
    sel = kind == 4
    acc[sel] = rng.choice(np.array([A.min_int, A.max_int, 0, -1, 1]), size=int(sel.sum()))
    bias[sel] = rng.choice(np.array([B.min_int, B.max_int, 0, -1]), size=int(sel.sum()))
    mult[sel] = rng.choice(np.array([1 << (MB - 1), (1 << MB) - 1]), size=int(sel.sum()))
    shift[sel] = rng.choice(np.array([0, 1, MAX_SHIFT]), size=int(sel.sum()))
    if n_beats >= 2:
        acc[0], bias[0], mult[0], shift[0] = A.max_int, B.max_int, (1 << MB) - 1, 0
        acc[1], bias[1], mult[1], shift[1] = A.min_int, B.min_int, (1 << MB) - 1, MAX_SHIFT
    return acc, bias, mult, shift


try:
    import cocotb
except ImportError:  # importable without cocotb for channel_stimulus
    cocotb = None

if cocotb is not None:
    from cocotb.triggers import RisingEdge

    from edgemoe.hw.channel_requant import ChannelRequant
    from edgemoe.hw.config import HWConfig
    from edgemoe.quant.channel import SHIFT_BITS, channel_epilogue
    from edgemoe.quant.config import QuantConfig
    from edgemoe.sim.tb_common import (StreamDriver, StreamSink, first_mismatch, pack_lanes,
                                       start_clock_and_reset, tb_config, unpack_lanes, write_result)

    @cocotb.test()
    async def channel_requant_stream(dut):
        cfg = tb_config()
        q = QuantConfig.from_dict(cfg["qcfg"])
        h = HWConfig(**cfg["hwcfg"])
        L, n = h.lanes, int(cfg["n_beats"])
        acc, bias, mult, shift = channel_stimulus(q, L, n, int(cfg["stim_seed"]))
        exp_out, over = channel_epilogue(acc, bias, mult, shift, q.act, q)
        exp_sat = over.sum(axis=-1)

        counter = await start_clock_and_reset(dut, idle_inputs={"i__valid": 0, "o__ready": 0})
        seed = int(cfg["seed"])
        sink = StreamSink(dut, "o", dut.clk, counter, fields=("data", "sat_count"),
                          stall_prob=float(cfg.get("stall_prob", 0.0)), seed=seed + 1)
        driver = StreamDriver(dut, "i", dut.clk, counter, fields=("acc", "bias", "mult", "shift"),
                              gap_prob=float(cfg.get("gap_prob", 0.0)), seed=seed)
        beats = [{"acc": pack_lanes(acc[b], q.acc.bits), "bias": pack_lanes(bias[b], q.bias.bits),
                  "mult": pack_lanes(mult[b], q.mult_bits), "shift": pack_lanes(shift[b], SHIFT_BITS)}
                 for b in range(n)]
        in_cycles = await driver.send(beats)
        got = await sink.wait_for(n, max_cycles=100 + 50 * n)
        got_out = np.array([unpack_lanes(g["data"], q.act.bits, L) for g in got], dtype=np.int64)
        got_sat = [g["sat_count"] for g in got]
        out_cycles = [g["cycle"] for g in got]
        inputs = [f"beat {b} lane {k}: acc={int(acc[b, k])} bias={int(bias[b, k])} "
                  f"mult={int(mult[b, k])} shift={int(shift[b, k])}" for b in range(n) for k in range(L)]
        first_mismatch(exp_out.reshape(-1).tolist(), got_out.reshape(-1).tolist(), inputs,
                       [c for c in out_cycles for _ in range(L)], what="element")
        first_mismatch(exp_sat.tolist(), got_sat, [f"beat {b}" for b in range(n)], out_cycles,
                       what="sat_count of beat")
        for _ in range(ChannelRequant.LATENCY + 2):
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
        })
