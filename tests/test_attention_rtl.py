"""Attention engine: golden function vs GoldenModel, RTL (cocotb) vs golden on Verilator and
Icarus at P = 1, 2, 4, 8, constant read bandwidth vs quant.schedule.schedule_stats, cycles vs
sim.perf.attention_cycles_engine, export/lint and the synthesis resource baseline."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from edgemoe.hw.attention import AttentionEngine
from edgemoe.hw.config import HWConfig, get_hw_preset
from edgemoe.hw.export import port_list
from edgemoe.hw.units import build_unit
from edgemoe.model.config import get_preset
from edgemoe.quant.attention import attention_golden
from edgemoe.quant.config import get_quant_preset
from edgemoe.quant.schedule import schedule_stats
from edgemoe.sim.perf import attention_cycles_engine
from edgemoe.sim.runner import lint_verilator, run_cocotb, simulator_available
from edgemoe.sim.tb_attention import attention_stimulus

TOP = "edgemoe_attention"
TB = "edgemoe.sim.tb_attention"
Q = get_quant_preset("edge-moe-fixed")
TINY = get_preset("tiny")          # n = 9, 2 heads, head_dim 32


def hw_p(P):
    return HWConfig(name=f"attn-p{P}", attn_p=P)


# --- golden ------------------------------------------------------------------------------------
def test_golden_equals_golden_model_block():
    """attention_golden reproduces GoldenModel's block-0 attention tensors from its qkv."""
    import torch
    from edgemoe.model.m3vit import M3ViT
    from edgemoe.quant.golden import GoldenModel
    from edgemoe.quant.qweights import quantize_weights
    cfg = TINY
    m = M3ViT(cfg, seed=0).eval()
    x = torch.rand(3, cfg.img_h, cfg.img_w, generator=torch.Generator().manual_seed(0)).numpy()
    for P in (2, 4):
        t = GoldenModel(cfg, Q, quantize_weights(cfg, Q, m.state_dict()), attn_p=P).forward(
            x, 0, keep=True).tensors
        g = attention_golden(t["blocks.0.qkv"], Q, cfg, P)
        np.testing.assert_array_equal(g.scores, t["blocks.0.scores"])
        np.testing.assert_array_equal(g.m, t["blocks.0.softmax_max"])
        np.testing.assert_array_equal(g.recip, t["blocks.0.softmax_recip"])
        np.testing.assert_array_equal(g.probs, t["blocks.0.probs"])
        np.testing.assert_array_equal(g.out, t["blocks.0.attn_out"])


def test_golden_order_matters_and_shape_checked():
    """The stimulus saturates scores and holds the act extremes; the key order (P) changes bits
    of the online softmax only rarely (S keeps 20 fraction bits), e.g. one recip of stimulus 128."""
    n, H, dh = 9, 2, 32
    qkv = attention_stimulus(Q, n, H * dh, 1)
    cfg = SimpleNamespace(num_tokens=n, heads=H, head_dim=dh, dim=H * dh)
    g = attention_golden(qkv, Q, cfg, 1)
    assert ((g.scores == Q.score.max_int) | (g.scores == Q.score.min_int)).any()
    assert (qkv == Q.act.max_int).any() and (qkv == Q.act.min_int).any()
    x = attention_stimulus(Q, n, H * dh, 128)
    assert (attention_golden(x, Q, cfg, 2).recip != attention_golden(x, Q, cfg, 4).recip).sum() == 1
    with pytest.raises(ValueError, match="qkv shape"):
        attention_golden(qkv[:, :-1], Q, cfg, 2)


def test_cycle_formula_shape():
    """~(H + 1) n^2 / P: the AV pass of each head runs beside the next head's QK pass, so a
    layer takes H + 1 schedule passes, not 2 H; halving P roughly doubles the cycles."""
    c4 = attention_cycles_engine(129, 3, 64, hw_p(4))
    c2 = attention_cycles_engine(129, 3, 64, hw_p(2))
    assert 1.8 < c2 / c4 < 2.05
    assert (3 + 1) * 129 * 129 // 4 < c4 < 1.05 * (3 + 1) * 129 * 129 // 4


# --- export and lint -------------------------------------------------------------------------------
def test_export_ports_and_lint():
    e = build_unit("attention", Q, get_hw_preset("zcu102-16x16"), TINY)
    ports = port_list(e)
    assert ports["w__payload__data"] == (32 * Q.attn_in.bits, "i")
    assert ports["o__payload__data"] == (32 * Q.act.bits, "o")
    for p in ("k_rd", "q_rd", "v_rd", "av"):
        assert ports[p] == (1, "o")
    lint_verilator(AttentionEngine(Q, hw_p(2), 9, 2, 32), TOP)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="heads"):
        AttentionEngine(Q, hw_p(2), 9, 0, 32)
    from edgemoe.quant.fixed import Fmt, FormatError
    with pytest.raises(FormatError, match="score.frac"):
        AttentionEngine(Q.replace(score=Fmt(40, 33)), hw_p(2), 9, 2, 32)


# --- RTL simulation ------------------------------------------------------------------------------
def run_attention(P, n=9, H=2, dh=32, simulator="verilator", gap=0.0, stall=0.0, seed=1):
    ok, why = simulator_available(simulator)
    if not ok:
        pytest.skip(why)
    h = hw_p(P)
    cfg = {"qcfg": Q.to_dict(), "hwcfg": h.to_dict(), "n": n, "heads": H, "head_dim": dh,
           "stim_seed": seed + 100, "seed": seed, "gap_prob": gap, "stall_prob": stall}
    res = run_cocotb(AttentionEngine(Q, h, n, H, dh), TOP, TB, simulator=simulator, tb_config=cfg,
                     seed=seed, timeout_s=600)
    assert res["rows"] == H * n and res["compared"] == H * n * dh
    return res


def check_bandwidth(res, n, H, P):
    """Exactly the reads of the schedule: the QK pass reads one K block per cycle and one Q block
    per row, the AV pass one V block per cycle (its scores come from the score memory, not
    recomputed), and from the second head on the two passes run side by side. No cycle reads
    more than one block of each kind."""
    s = schedule_stats(n, P, H)
    assert s.max_k_reads_per_cycle == 1 and s.max_q_reads_per_cycle == 1
    assert res["k_reads"] == s.k_reads == res["qk_cycles"] == s.cycles
    assert res["q_reads"] == s.q_reads == H * n
    assert res["v_reads"] == res["av_cycles"] == s.cycles
    assert res["max_reads_per_cycle"] <= 3       # K + V + Q, whatever P is
    # AV of head h beside QK of head h + 1: all but the first QK pass overlap an AV pass
    assert res["overlap_cycles"] >= (H - 1) * s.cycles // H - 2 * H * n


@pytest.mark.parametrize("P", [1, 2, 4, 8])
def test_attention_bandwidth_and_cycles(P):
    """No gaps / back-pressure: constant read bandwidth and the cycle formula (exact)."""
    res = run_attention(P, seed=P)
    check_bandwidth(res, 9, 2, P)
    assert res["cycles"] == attention_cycles_engine(9, 2, 32, hw_p(P))


def test_attention_three_heads_cycles():
    """Three heads: the QK pass of head 2 waits for the AV pass of head 0 (it overwrites that
    head's score and statistics bank): the formula's second recurrence term, to the cycle."""
    res = run_attention(2, n=5, H=3, dh=4, seed=5)
    check_bandwidth(res, 5, 3, 2)
    assert res["cycles"] == attention_cycles_engine(5, 3, 4, hw_p(2))


@pytest.mark.parametrize("P", [1, 2, 4])
def test_attention_random_streams(P):
    """Write gaps and output back-pressure (the AV schedule pauses on a full output FIFO)."""
    res = run_attention(P, gap=0.3, stall=0.5, seed=10 + P)
    check_bandwidth(res, 9, 2, P)
    assert res["cycles"] >= attention_cycles_engine(9, 2, 32, hw_p(P))


def test_attention_catches_wrong_rounding():
    """RTL built with TRUNC rounding, checked against the HALF_EVEN golden model: must fail with
    the first-mismatch report."""
    ok, why = simulator_available("verilator")
    if not ok:
        pytest.skip(why)
    h = hw_p(2)
    cfg = {"qcfg": Q.to_dict(), "hwcfg": h.to_dict(), "n": 5, "heads": 1, "head_dim": 4,
           "stim_seed": 101, "seed": 1, "gap_prob": 0.0, "stall_prob": 0.0}
    rtl = AttentionEngine(Q.replace(rounding="trunc"), h, 5, 1, 4)
    with pytest.raises(AssertionError, match=r"first mismatch at output code \d+ \(cycle \d+\): "
                                             r"inputs head \d+ row \d+ col \d+, expected"):
        run_cocotb(rtl, TOP, TB, tb_config=cfg, seed=1, timeout_s=600)


def test_attention_icarus_small():
    res = run_attention(2, n=5, H=1, dh=4, simulator="icarus", gap=0.2, stall=0.3, seed=7)
    check_bandwidth(res, 5, 1, 2)


@pytest.mark.full
def test_attention_edge_moe_shape():
    cfg = get_preset("edge-moe")
    res = run_attention(4, n=cfg.num_tokens, H=cfg.heads, dh=cfg.head_dim, seed=3)
    check_bandwidth(res, cfg.num_tokens, cfg.heads, 4)
    f = attention_cycles_engine(cfg.num_tokens, cfg.heads, cfg.head_dim, hw_p(4))
    assert abs(res["cycles"] - f) <= 0.05 * f


# --- synthesis ------------------------------------------------------------------------------------
def _synth_tiny():
    from edgemoe.hw.export import to_rtlil
    return to_rtlil(build_unit("attention", Q, get_hw_preset("zcu102-16x16"), TINY), TOP)


@pytest.mark.slow
def test_synth_attention_resource_baseline():
    """Tiny shape (n = 9, 2 heads, head_dim 32, P = 4): QK lanes use P*dh multipliers of
    attn_in x attn_in, AV lanes P*dh of prob x attn_in."""
    from edgemoe.hw.synth import check_synth_baseline, synth_xilinx
    res = synth_xilinx(_synth_tiny(), TOP, timeout_s=1800)
    res["config"] = {"quant": Q.name, "hw": "zcu102-16x16", "model": "tiny"}
    assert res["dsp"] >= 4 * 32
    check_synth_baseline("attention", res)
