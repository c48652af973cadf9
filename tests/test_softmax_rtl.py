"""Softmax units: SoftmaxStats (online max/sum/reciprocal in the attention reorder order) and
SoftmaxNorm (probabilities during A.V), RTL (cocotb) vs the golden functions
quant.approx.softmax_stats / softmax_normalise on Verilator and Icarus, export/lint, and the
synthesis resource baselines."""
from __future__ import annotations

import numpy as np
import pytest

from edgemoe.hw.config import HWConfig, get_hw_preset
from edgemoe.hw.export import port_list, to_rtlil, to_verilog
from edgemoe.hw.softmax import SoftmaxStats, exp2_plan, recip_plan, softmax_m_bits
from edgemoe.hw.softmax_norm import SoftmaxNorm
from edgemoe.hw.units import build_unit
from edgemoe.model.config import get_preset
from edgemoe.quant.approx import exp_sum_fmt, softmax_normalise, softmax_stats
from edgemoe.quant.config import get_quant_preset
from edgemoe.quant.fixed import Fmt, FormatError, Overflow, Rounding
from edgemoe.quant.schedule import attention_cycles, row_key_order
from edgemoe.sim.runner import lint_verilator, run_cocotb, simulator_available
from edgemoe.sim.tb_softmax import ROW_KINDS, schedule_beats, softmax_expected, softmax_scores
from edgemoe.sim.tb_softmax_norm import norm_expected, norm_stimulus

DEFAULT_Q = get_quant_preset("edge-moe-fixed")
DEFAULT_HW = get_hw_preset("zcu102-16x16")
TINY = get_preset("tiny")            # n = 9 tokens, 2 heads
EDGE = get_preset("edge-moe")        # n = 129 tokens, 3 heads


def narrow_q(rounding="half_even", overflow="sat"):
    """Narrow formats: a long flat row saturates the sum (u12.8 holds < 16), a peaky row
    saturates the reciprocal (u7.7 holds < 1), and probabilities saturate often."""
    return DEFAULT_Q.replace(name=f"softmax-narrow-{rounding}-{overflow}", score=Fmt(16, 8),
                             exp=Fmt(9, 8, False), sum=Fmt(12, 8, False), recip=Fmt(7, 7, False),
                             prob=Fmt(8, 7, False), rounding=Rounding(rounding),
                             overflow=Overflow(overflow))


def narrow_norm_q(rounding="half_even", overflow="sat"):
    """narrow_q with a reciprocal up to 4.0, so that p = e * recip saturates prob (u8.7 < 2)."""
    return narrow_q(rounding, overflow).replace(recip=Fmt(10, 8, False))


def hw_p(P: int) -> HWConfig:
    return HWConfig(name=f"attn-p{P}", attn_p=P)


def _need(sim):
    ok, why = simulator_available(sim)
    if not ok:
        pytest.skip(why)


# --- stats: stimulus and golden (no simulator) -------------------------------------------------
def test_stats_stimulus_covers_edge_cases():
    """Every row kind is present; the growing rows make m grow (and S rescale) at every step,
    with shifts beyond the sum width; the format extremes and all-equal rows are there."""
    q, n, P = DEFAULT_Q, EDGE.num_tokens, 4
    s = softmax_scores(q, n, 1, P, seed=3)
    order = row_key_order(n, P)
    sp = np.take_along_axis(s[0], order, axis=-1)
    c = -((-sp) >> q.score.frac)
    grows_every_step = (np.diff(c, axis=-1) >= 1).all(axis=-1)
    assert grows_every_step.sum() >= n // len(ROW_KINDS)
    assert (np.diff(c, axis=-1) > q.sum.bits + 1).any()                 # clamped rescale
    assert ((s[0] == s[0][:, :1]).all(axis=-1)).sum() >= n // len(ROW_KINDS)
    assert (s == q.score.min_int).any() and (s == q.score.max_int).any()
    knots = s & ((1 << (q.score.frac - q.exp_table_bits)) - 1)
    assert (knots == 0).mean() > 0.02                                   # exp2 table boundaries


def test_stats_narrow_config_saturates():
    """The narrow config's stimulus really saturates the sum and the reciprocal (so the sat
    output is tested), and the default config never does."""
    q = narrow_q()
    s = softmax_scores(q, EDGE.num_tokens, 1, 4, seed=5)
    _, _, sat = softmax_expected(s, q, 4)
    assert 0 < sat.sum() < sat.size
    s = softmax_scores(DEFAULT_Q, EDGE.num_tokens, 1, 4, seed=5)
    assert softmax_expected(s, DEFAULT_Q, 4)[2].sum() == 0


def test_schedule_beats_match_schedule():
    for n, P, heads in ((9, 4, 2), (9, 8, 2), (129, 4, 1)):
        beats, last = schedule_beats(n, P, heads)
        assert len(beats) == attention_cycles(n, P, heads)
        assert len(last) == n * heads
        # at most one row finishes per cycle in the reorder schedule (one divider suffices)
        per_beat = [sum(1 for x in b if x is not None and x[1]) for b in beats]
        assert max(per_beat) == 1


def test_recip_and_exp2_plans():
    dv = recip_plan(DEFAULT_Q)
    assert (dv.kk, dv.iters, dv.r_init, dv.rem_bits) == (42, 25, 1 << 18, 33)
    assert recip_plan(narrow_q(overflow="wrap")).iters == 8 + 7 + 2
    ex = exp2_plan(DEFAULT_Q, exp_sum_fmt(DEFAULT_Q))
    assert (ex.t_bits, ex.d_bits, ex.v_bits, ex.base, ex.n_max) == (25, 19, 41, 20, 22)
    assert softmax_m_bits(DEFAULT_Q) == 11
    with pytest.raises(FormatError, match="score"):
        softmax_m_bits(DEFAULT_Q.replace(score=Fmt(22, 22)))


# --- stats: export and lint ----------------------------------------------------------------------
def test_stats_export_names_and_ports():
    u = build_unit("softmax", DEFAULT_Q, DEFAULT_HW, EDGE)
    P = DEFAULT_HW.attn_p
    assert port_list(u) == {
        "i__payload__score": (P * 32, "i"), "i__payload__active": (P, "i"),
        "i__payload__first": (P, "i"), "i__payload__last": (P, "i"),
        "i__payload__row": (P * 8, "i"), "i__payload__head": (2, "i"),
        "i__valid": (1, "i"), "i__ready": (1, "o"),
        "o__payload__recip": (24, "o"), "o__payload__m": (11, "o"), "o__payload__row": (8, "o"),
        "o__payload__head": (2, "o"), "o__payload__sat": (1, "o"),
        "o__valid": (1, "o"), "o__ready": (1, "i"), "sat": (3, "o")}
    v = to_verilog(u, "edgemoe_softmax")
    assert "module edgemoe_softmax(" in v
    with pytest.raises(ValueError, match="ModelConfig"):
        build_unit("softmax", DEFAULT_Q, DEFAULT_HW)


@pytest.mark.parametrize("q,P,mcfg", [(DEFAULT_Q, 4, EDGE), (narrow_q("trunc", "wrap"), 2, TINY)],
                         ids=["default", "narrow-wrap"])
def test_stats_verilator_lint(q, P, mcfg):
    lint_verilator(SoftmaxStats(q, hw_p(P), mcfg.num_tokens, mcfg.heads), "edgemoe_softmax")


# --- stats: RTL simulation ---------------------------------------------------------------------
def run_stats(q, P, mcfg, simulator="verilator", gap=0.0, stall=0.0, seed=1, kinds=ROW_KINDS):
    _need(simulator)
    n, heads = mcfg.num_tokens, mcfg.heads
    hw = hw_p(P)
    cfg = {"qcfg": q.to_dict(), "hwcfg": hw.to_dict(), "n": n, "heads": heads,
           "stim_seed": seed + 100, "gap_prob": gap, "stall_prob": stall, "kinds": list(kinds)}
    unit = SoftmaxStats(q, hw, n, heads)
    res = run_cocotb(unit, "edgemoe_softmax", "edgemoe.sim.tb_softmax", simulator=simulator,
                     tb_config=cfg, seed=seed, timeout_s=300)
    assert res["compared"] == res["rows"] == n * heads
    assert res["beats"] == attention_cycles(n, P, heads)
    if stall == 0.0:
        # nothing waits: every row comes out LATENCY cycles after its last score, in order
        assert res["latency_min"] == res["latency_max"] == unit.LATENCY
        assert res["in_order"]
    if gap == 0.0 and stall == 0.0:
        # the schedule runs at full speed: one beat per cycle, then the last row's latency
        assert res["last_in_cycle"] - res["first_in_cycle"] == res["beats"] - 1
        assert res["last_out_cycle"] - res["first_in_cycle"] == \
            attention_cycles(n, P, heads) - 1 + unit.LATENCY
    return res


@pytest.mark.parametrize("P", [1, 2, 4, 8])
def test_stats_verilator_tiny_full_speed(P):
    run_stats(DEFAULT_Q, P, TINY, seed=P)


def test_stats_verilator_tiny_gaps_backpressure():
    """Narrow formats with truncating rounding, valid gaps and output back-pressure."""
    res = run_stats(narrow_q("trunc"), 4, TINY, gap=0.3, stall=0.7, seed=11)
    assert res["latency_max"] > res["latency"]          # rows waited for the sink


def test_stats_verilator_edge_full_speed():
    res = run_stats(DEFAULT_Q, 4, EDGE, seed=21)
    assert res["rows"] == 387


def test_stats_verilator_edge_heavy_backpressure():
    """The sink takes a row on 1 % of the cycles: the output FIFO fills, its credits run out,
    finished rows wait in the hold registers (several lanes at once: the arbiter picks) and
    the input stalls; every row must still arrive exactly once and bit-exact."""
    res = run_stats(DEFAULT_Q, 4, EDGE, gap=0.2, stall=0.99, seed=22)
    assert res["last_in_cycle"] - res["first_in_cycle"] > 2 * res["beats"]   # input stalled
    assert res["latency_max"] > 10 * res["latency"]


def test_stats_verilator_narrow_saturation():
    """Narrow formats with half-even rounding: sum and reciprocal saturation flags per row;
    the `sat` event count (checked against the golden SatCounter in the testbench) counts the
    sum per score, so it exceeds the number of saturated rows."""
    res = run_stats(narrow_q(), 4, EDGE.replace(heads=1), gap=0.1, seed=31)
    assert 0 < res["sat_rows"] < res["rows"]
    assert res["sat_events"] > res["sat_rows"]


def test_stats_testbench_catches_wrong_rounding():
    """RTL generated for TRUNC, checked against the HALF_UP golden model: the testbench must
    report the first mismatching row."""
    _need("verilator")
    q, hw = DEFAULT_Q, hw_p(2)
    cfg = {"qcfg": q.to_dict(), "hwcfg": hw.to_dict(), "n": TINY.num_tokens,
           "heads": TINY.heads, "stim_seed": 7, "gap_prob": 0.0, "stall_prob": 0.0,
           "kinds": ["growing", "normal"]}
    wrong = SoftmaxStats(q.replace(rounding=Rounding.TRUNC), hw, TINY.num_tokens, TINY.heads)
    with pytest.raises(AssertionError, match=r"first mismatch at row .*head \d+ row \d+"):
        run_cocotb(wrong, "edgemoe_softmax", "edgemoe.sim.tb_softmax", tb_config=cfg, timeout_s=300)


def test_stats_icarus_tiny():
    """Narrow formats, half-up rounding, wrapping reciprocal (the full-quotient divider)."""
    res = run_stats(narrow_q("half_up", "wrap"), 2, TINY, simulator="icarus", gap=0.2,
                    stall=0.5, seed=41)
    assert res["sat_rows"] > 0


# --- norm: stimulus, golden, export ------------------------------------------------------------
def test_norm_stimulus_covers_edge_cases():
    q, L = DEFAULT_Q, DEFAULT_HW.lanes
    s, m, recip = norm_stimulus(q, L, 400, seed=3)
    x = s - (m[:, None] << q.score.frac)
    assert (x <= 0).all() and (x == 0).any() and (x == -(1 << q.score.bits)).any()
    assert (s == q.score.min_int).any() and (recip == 0).any() and (recip == q.recip.max_int).any()
    uf = (q.exp.frac + 1) << q.score.frac
    assert (-x == uf).any() and (-x == uf + 1).any() and (-x == uf - 1).any()
    p, sat = norm_expected(s, m, recip, q)
    assert 0 < sat.sum() < p.size // 2 and 0 < (p == 0).sum() < p.size // 2


def test_norm_export_names_and_ports():
    L = DEFAULT_HW.lanes
    u = build_unit("softmax_norm", DEFAULT_Q, DEFAULT_HW)
    assert port_list(u) == {
        "i__payload__score": (L * 32, "i"), "i__payload__m": (11, "i"),
        "i__payload__recip": (24, "i"), "i__valid": (1, "i"), "i__ready": (1, "o"),
        "o__payload__prob": (L * 17, "o"), "o__payload__sat_count": (5, "o"),
        "o__valid": (1, "o"), "o__ready": (1, "i")}
    assert "module edgemoe_softmax_norm(" in to_verilog(u, "edgemoe_softmax_norm")


@pytest.mark.parametrize("q,hw", [(DEFAULT_Q, DEFAULT_HW),
                                  (narrow_norm_q("trunc", "wrap"), HWConfig(lanes=4))],
                         ids=["default", "narrow-wrap"])
def test_norm_verilator_lint(q, hw):
    lint_verilator(SoftmaxNorm(q, hw), "edgemoe_softmax_norm")


# --- norm: RTL simulation ----------------------------------------------------------------------
def run_norm(q, hw, n_beats, simulator="verilator", gap=0.3, stall=0.3, seed=1):
    _need(simulator)
    cfg = {"qcfg": q.to_dict(), "hwcfg": hw.to_dict(), "n_beats": n_beats, "stim_seed": seed + 100,
           "gap_prob": gap, "stall_prob": stall}
    res = run_cocotb(SoftmaxNorm(q, hw), "edgemoe_softmax_norm", "edgemoe.sim.tb_softmax_norm",
                     simulator=simulator, tb_config=cfg, seed=seed, timeout_s=300)
    s, m, recip = norm_stimulus(q, hw.lanes, n_beats, seed + 100)
    _, sat = norm_expected(s, m, recip, q)
    assert res["compared"] == n_beats * hw.lanes == res["elements"]
    assert res["sat_total"] == int(sat.sum()) > 0
    if gap == 0.0 and stall == 0.0:
        # one beat per cycle after LATENCY cycles of fill
        assert res["latency"] == SoftmaxNorm.LATENCY
        assert res["last_out_cycle"] - res["first_in_cycle"] == n_beats - 1 + SoftmaxNorm.LATENCY
        assert res["last_in_cycle"] - res["first_in_cycle"] == n_beats - 1
    return res


def test_norm_verilator_default_random_stream():
    res = run_norm(DEFAULT_Q, DEFAULT_HW, 400)
    assert res["cycles_per_beat"] > 1.2     # gaps and stalls really happened


def test_norm_verilator_default_full_throughput():
    run_norm(DEFAULT_Q, DEFAULT_HW, 300, gap=0.0, stall=0.0, seed=2)


def test_norm_verilator_narrow():
    run_norm(narrow_norm_q(), HWConfig(lanes=4), 400, gap=0.2, stall=0.4, seed=3)


def test_norm_icarus_tiny():
    run_norm(narrow_norm_q("trunc", "wrap"), HWConfig(lanes=4), 150, simulator="icarus", seed=4)


# --- synthesis ------------------------------------------------------------------------------------
def _synth_stats():
    return to_rtlil(build_unit("softmax", DEFAULT_Q, DEFAULT_HW, EDGE), "edgemoe_softmax")


def _synth_norm():
    return to_rtlil(build_unit("softmax_norm", DEFAULT_Q, DEFAULT_HW), "edgemoe_softmax_norm")


def test_synth_softmax_resource_baseline():
    from edgemoe.hw.synth import check_synth_baseline, synth_xilinx
    res = synth_xilinx(_synth_stats(), "edgemoe_softmax", timeout_s=300)
    res["config"] = {"quant": DEFAULT_Q.name, "hw": DEFAULT_HW.name, "model": EDGE.name}
    P = DEFAULT_HW.attn_p
    # one DSP per lane (slope * r, 19 x 16 bits); the divider's 25 remainder registers at least
    assert res["dsp"] == P
    assert res["ff"] >= recip_plan(DEFAULT_Q).iters * 33
    check_synth_baseline("softmax", res)


@pytest.mark.slow
def test_synth_softmax_norm_resource_baseline():
    from edgemoe.hw.synth import check_synth_baseline, synth_xilinx
    res = synth_xilinx(_synth_norm(), "edgemoe_softmax_norm", timeout_s=300)
    res["config"] = {"quant": DEFAULT_Q.name, "hw": DEFAULT_HW.name}
    L = DEFAULT_HW.lanes
    # two DSP48E2 per lane: slope * r (19 x 16) and e * recip (17 x 24), each fits 27 x 18
    assert res["dsp"] == 2 * L
    assert res["ff"] >= L * DEFAULT_Q.prob.bits
    check_synth_baseline("softmax_norm", res)


@pytest.mark.slow
@pytest.mark.parametrize("unit", ["softmax", "softmax_norm"])
def test_synth_softmax_ecp5_fmax(unit):
    from edgemoe.hw.synth import synth_ecp5_fmax
    rtl = _synth_stats() if unit == "softmax" else _synth_norm()
    res = synth_ecp5_fmax(rtl, f"edgemoe_{unit}", timeout_s=600)
    assert res["fmax_mhz"] is not None, res["reason"]
    assert res["fmax_mhz"] > 50


# --- full-size runs -------------------------------------------------------------------------------
@pytest.mark.full
def test_stats_full_edge_many_layers():
    """The edge-moe shape (n = 129, 3 heads, P = 4) with several seeds, gaps and back-pressure."""
    for seed in range(4):
        run_stats(DEFAULT_Q, 4, EDGE, gap=0.1 * seed, stall=0.2 * seed, seed=100 + seed)
    run_stats(narrow_q("half_up"), 8, EDGE, seed=110)


@pytest.mark.full
def test_norm_full_100k():
    """100k probabilities of the default configuration (6250 beats of 16 lanes)."""
    run_norm(DEFAULT_Q, DEFAULT_HW, 6250, gap=0.1, stall=0.1, seed=200)
