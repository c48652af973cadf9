"""Analytic cycle models of the accelerator's units (pure functions of the three configs).

Compute unit (hw/compute.py), one layer of `rows` rows, k_in inputs, n_out outputs:
`linear_cycles` counts the cycles from the command handshake to the last output handshake with
streams that never stall (weights, queue entries and requested rows always available, outputs
always accepted). It follows the unit's schedule tile by tile:
  * the weight stream is read in order, one axi_data_bits beat per cycle: per output tile column
    the bias (bias_beats, when the mode has one), then kc tiles of tile_beats beats; a tile can
    only load while the shadow register is free, i.e. from the cycle its predecessor's pass
    starts (ping-pong);
  * a pass (one tile, R rows, one row chunk per cycle) starts once its tile is loaded, when the
    previous pass hands over its last row (passes run back to back), when its accumulator bank
    is free (the epilogue of column j-2 has read it), and for R = 1 only after the MAC pipeline
    emptied (row 0 must be written before it is read again);
  * after a column's last pass, the accumulator bank is complete mac_stages + 1 cycles later; the
    epilogue reads its R rows (one per cycle, plus one start cycle per column) and each row
    leaves epi_latency cycles later.
So a layer costs about nc * kc * max(R, tile_beats) cycles plus fill and drain: the weight load
dominates (memory-bound) when the rows of a pass are fewer than the beats of a tile, e.g. the
short expert queues. The cycles of the attention engine will be added here too.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinearTiming:
    cycles: int          # command handshake -> last output handshake, inclusive
    passes: int          # nc * kc
    load_cycles: int     # weight-stream beats of the layer
    compute_cycles: int  # passes * rows (cycles in which the MAC array takes a row chunk)
    stall_cycles: int    # cycles the array waited for weights (memory-bound part)


def _mode(mode):
    from edgemoe.quant.linear import get_mode
    return get_mode(mode)


def linear_timing(rows: int, k_in: int, n_out: int, hwcfg, qcfg, mode="qkv") -> LinearTiming:
    """The compute unit's cycles for one layer (module docstring), with the breakdown."""
    from edgemoe.hw.compute import compute_geometry
    md = _mode(mode)
    if rows < 1 or k_in < 1 or n_out < 1:
        raise ValueError(f"linear_cycles: rows {rows}, k_in {k_in}, n_out {n_out} must be >= 1")
    if rows > hwcfg.act_buffer_tokens:
        raise ValueError(f"linear_cycles: rows {rows} > HWConfig.act_buffer_tokens "
                         f"{hwcfg.act_buffer_tokens}")
    g = compute_geometry(qcfg, hwcfg)
    lay = g.layout
    R, kc, nc = rows, lay.chunks(k_in), lay.tiles(n_out)
    Bt, Bb = lay.tile_beats, (lay.bias_beats if lay.has_header(md.bias) else 0)
    ms = g.mac_stages
    epi = 1 + g.epi_latency(md.gelu)   # epilogue start -> first issue, issue -> y handshake

    # cycle 0: command handshake; every sequencer works from cycle 1
    loader = 1              # first cycle the loader may take a beat
    prev_start = None       # p_start cycle of the previous pass
    bias_free = 0           # bias shadow free from this cycle (freed by a column's first pass)
    bank_free = [0, 0]      # accumulator bank free for a new column from this cycle
    epi_free = 0            # epilogue may start a column from this cycle
    last_y = 0
    stall = 0
    for j in range(nc):
        for c in range(kc):
            if c == 0 and Bb:
                b0 = max(loader, bias_free)            # bias beats (bias shadow free)
                loader = b0 + Bb
            t0 = loader if prev_start is None else max(loader, prev_start)  # shadow free
            done = t0 + Bt - 1                          # last tile beat
            loader = done + 1
            s = done + 1                                # shadow full -> pass may start
            if prev_start is not None:
                s = max(s, prev_start + R)              # back to back with the previous pass
                if R == 1:
                    s = max(s, prev_start + 2 + ms)     # MAC pipeline empty
                stall += max(0, s - (prev_start + R))
            if c == 0:
                s = max(s, bank_free[j % 2])
                bias_free = s
            prev_start = s
        # column complete: last row handed over at s + R, written ms cycles later
        col_done = s + R + ms + 1
        e_start = max(col_done, epi_free)
        epi_free = e_start + R + 1
        bank_free[j % 2] = e_start + R + 2               # e1 releases the bank after its last row
        last_y = e_start + R + epi - 1
    passes = nc * kc
    return LinearTiming(cycles=last_y + 1, passes=passes,
                        load_cycles=lay.stream_beats(k_in, n_out, md.bias),
                        compute_cycles=passes * R, stall_cycles=stall)


def linear_cycles(rows: int, k_in: int, n_out: int, hwcfg, qcfg, mode="qkv") -> int:
    """Cycles of one layer on the compute unit (command handshake to last output, inclusive),
    weight-load time, pipeline fill and epilogue included; see the module docstring."""
    return linear_timing(rows, k_in, n_out, hwcfg, qcfg, mode).cycles


def linear_macs(rows: int, k_in: int, n_out: int) -> int:
    """Useful multiply-accumulates of one layer (padding excluded)."""
    return rows * k_in * n_out


def mac_utilisation(useful_macs: int, cycles: int, hwcfg) -> float:
    """Useful MACs / (T_in * T_out * cycles): the fraction of the array's peak actually used."""
    if cycles <= 0:
        raise ValueError(f"mac_utilisation: cycles = {cycles} must be > 0")
    return useful_macs / (hwcfg.t_in * hwcfg.t_out * cycles)


def attention_passes(n: int, heads: int, head_dim: int, hwcfg, qcfg=None) -> dict:
    """The pass timeline of hw/attention.AttentionEngine for one layer, streams never stalling,
    cycle 0 = the last write-port handshake. The engine runs the QK pass of a head (C =
    quant.schedule.attention_cycles(n, P) issue cycles) beside the AV pass of the previous one;
    its two sequencers give, head by head:
      QK(h) issues from qk[h]: qk[0] = 1, qk[h] = max(qk[h-1] + C + 1 (one cycle to restart the
        schedule), av[h-2] + C + 1 (it overwrites the score / stats bank AV(h-2) reads));
      AV(h) issues from av[h] = max(qk[h] + C + L + 4 (the last score through 3 pipeline stages
        and SoftmaxStats' L = LATENCY cycles, then the start), av[h-1] + C + 2);
      the last AV issue av[H-1] + C - 1, then 10 cycles (the score memory read, SoftmaxNorm (6),
        the MAC, the output register, the output FIFO) to the last output handshake: `cycles`.
    head_dim does not change the count (one dot product per lane per cycle). qcfg (default
    edge-moe-fixed) sets SoftmaxStats' divider depth."""
    from edgemoe.hw.softmax import recip_plan
    from edgemoe.quant.config import get_quant_preset
    from edgemoe.quant.schedule import attention_cycles
    if head_dim < 1:
        raise ValueError(f"attention_cycles_engine: head_dim = {head_dim} must be >= 1")
    q = qcfg if qcfg is not None else get_quant_preset("edge-moe-fixed")
    C = attention_cycles(n, hwcfg.attn_p)
    L = recip_plan(q).iters + 8                      # SoftmaxStats.LATENCY
    qk, av = [], []
    for h in range(heads):
        qk.append(1 if h == 0 else max(qk[-1] + C + 1, av[h - 2] + C + 1 if h >= 2 else 0))
        av.append(max(qk[h] + C + L + 4, av[-1] + C + 2 if h else 0))
    return {"C": C, "qk": qk, "av": av, "cycles": av[-1] + C - 1 + 10}


def attention_cycles_engine(n: int, heads: int, head_dim: int, hwcfg, qcfg=None) -> int:
    """Cycles of hw/attention.AttentionEngine for one layer, from the last write-port handshake
    to the last output-row handshake, streams never stalling (attention_passes)."""
    return attention_passes(n, heads, head_dim, hwcfg, qcfg)["cycles"]
