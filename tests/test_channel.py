"""Per-channel weight / per-tensor activation quantisation (quant/channel.py, preset w8a16-channel)."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from edgemoe.model.config import get_preset
from edgemoe.quant.channel import (ChannelEpilogue, channel_requant, mse_scale, multiplier,
                                   weight_scales)
from edgemoe.quant.config import get_quant_preset
from edgemoe.quant.fixed import Fmt, FormatError, Rounding, SatCounter

Q = get_quant_preset("w8a16-channel")


# ---------------------------------------------------------------------------------------------
# integers of the epilogue
# ---------------------------------------------------------------------------------------------
def test_multiplier_is_normalised_and_accurate():
    rng = np.random.default_rng(1)
    m = np.exp(rng.uniform(np.log(1e-7), np.log(50.0), 5000))
    for bits in (8, 16, 24):
        M, S = multiplier(m, bits)
        assert np.all(M >= 1 << (bits - 1)) and np.all(M < 1 << bits)
        rel = np.abs(M * np.exp2(-S.astype(float)) - m) / m
        assert rel.max() <= 2.0 ** -bits * 1.0000001        # half an LSB of a normalised M
    # a value that rounds up into a new bit stays normalised
    M, S = multiplier(np.array([2.0 - 1e-9]), 8)
    assert M[0] == 128 and S[0] == 6


@pytest.mark.parametrize("m", [0.0, -1.0, float("nan"), float("inf")])
def test_multiplier_rejects_bad_scales(m):
    with pytest.raises(FormatError, match="layer_x"):
        multiplier(np.array([1.0, m]), 16, "layer_x")


def test_multiplier_rejects_shift_out_of_range():
    with pytest.raises(FormatError, match="channel 1 needs a shift"):
        multiplier(np.array([1.0, 1e-30]), 16, "tiny_scale")


def _ref_requant(acc, bias, M, S, fmt: Fmt, rounding):
    """Python-int reference: round((acc + bias) * M / 2**S) per rounding, then saturate."""
    out = []
    for a, b, m, s in zip(acc, bias, M, S):
        v = Fraction((int(a) + int(b)) * int(m), 1 << int(s))
        fl = v.numerator // v.denominator
        rem = v - fl
        if rounding is Rounding.TRUNC:
            r = fl
        elif rounding is Rounding.HALF_UP:
            r = fl + (rem >= Fraction(1, 2))
        else:
            r = fl + (rem > Fraction(1, 2) or (rem == Fraction(1, 2) and fl % 2 == 1))
        out.append(min(max(r, fmt.min_int), fmt.max_int))
    return np.array(out, dtype=np.int64)


@pytest.mark.parametrize("rounding", list(Rounding))
def test_channel_requant_matches_integer_reference(rounding):
    rng = np.random.default_rng(2)
    n = 64
    q = Q.replace(rounding=rounding)
    M, S = multiplier(np.exp(rng.uniform(np.log(1e-6), np.log(1e-2), n)), q.mult_bits)
    ep = ChannelEpilogue(rng.integers(-2**20, 2**20, n), M, S, 1.0, 1.0)
    acc = rng.integers(-2**34, 2**34, (40, n))
    sat = SatCounter()
    got = channel_requant(acc, ep, q.act, q, sat, "t")
    want = np.stack([_ref_requant(row, ep.bias, M, S, q.act, rounding) for row in acc])
    assert np.array_equal(got, want)
    # the random accumulators do overflow s16 sometimes: counted, not silent
    assert sat.saturated() == int(np.count_nonzero((want == q.act.max_int) | (want == q.act.min_int)))
    assert sat.saturated() > 0


# ---------------------------------------------------------------------------------------------
# scales
# ---------------------------------------------------------------------------------------------
def _mse(w, s, bits):
    L = (1 << (bits - 1)) - 1
    return float(((np.clip(np.round(w / s[..., None]), -L, L) * s[..., None] - w) ** 2).sum())


def test_per_channel_scales_beat_per_tensor_and_max():
    rng = np.random.default_rng(3)
    # channels of very different magnitude, each with one outlier: the case per-channel fixes
    w = rng.normal(size=(32, 256)) * np.exp(rng.uniform(-3, 1, 32))[:, None]
    w[:, 0] *= 6
    s = weight_scales(w, 8)
    per_tensor = np.full(32, np.abs(w).max() / 127)
    per_channel_max = np.abs(w).max(axis=1) / 127
    assert _mse(w, s, 8) <= _mse(w, per_channel_max, 8)
    assert _mse(w, s, 8) < 0.2 * _mse(w, per_tensor, 8)
    # at 4 bits clipping a Gaussian's tails pays: chosen on (nearly) every channel
    g = rng.normal(size=(16, 2048))
    s4 = weight_scales(g, 4)
    assert np.mean(s4 < np.abs(g).max(axis=1) / 7 * 0.999) > 0.8
    assert _mse(g, s4, 4) < _mse(g, np.abs(g).max(axis=1) / 7, 4)


def test_mse_scale_clips_heavy_tails_and_counts_them():
    rng = np.random.default_rng(4)
    x = rng.laplace(size=100000)
    s, info = mse_scale(x, 4)                           # 4 bits: clipping the tails pays
    L = 7
    assert info["max"] == np.abs(x).max() and info["clip"] < 0.6 * info["max"]
    assert info["clipped"] == int(np.count_nonzero(np.abs(x) > s * (L + 0.5))) > 0
    err = lambda sc: ((np.clip(np.round(x / sc), -L, L) * sc - x) ** 2).sum()   # noqa: E731
    assert err(s) < err(info["max"] / L)
    # a wide 16-bit format keeps the whole range: nothing clipped
    s16, info16 = mse_scale(x, 16)
    assert info16["clipped"] == 0


# ---------------------------------------------------------------------------------------------
# the preset: refused where it is not built yet, and its fidelity
# ---------------------------------------------------------------------------------------------
def test_preset_fields():
    assert Q.granularity == "channel" and Q.linear_w.bits == 8 and Q.linear_w.frac == 0
    with pytest.raises(FormatError, match="granularity"):
        Q.replace(granularity="tensor")
    with pytest.raises(FormatError, match="mult_bits"):
        Q.replace(mult_bits=40)


def test_channel_program_runs_golden_exact():
    """The compiled w8a16-channel program (per-channel headers in every weight stream, Q/K/V and
    the attention output in attn_in codes) on the program executor equals GoldenModel as
    integers, both tasks; the features are not trivial."""
    from edgemoe.hw.config import get_hw_preset
    from edgemoe.quant.compiler import compile_program, synthetic_state_dict
    from edgemoe.quant.golden import GoldenModel
    from edgemoe.quant.interpreter import run_program
    from edgemoe.quant.qweights import quantize_weights

    cfg = get_preset("tiny")
    hw = get_hw_preset("small-8x8")
    qw = quantize_weights(cfg, Q, synthetic_state_dict(cfg, 0))
    prog = compile_program(cfg, Q, hw, qw)
    gm = GoldenModel(cfg, Q, qw, hw.attn_p)
    img = np.random.default_rng(3).uniform(-1, 1, (cfg.in_chans, cfg.img_h, cfg.img_w))
    for task in cfg.tasks:
        gold = gm.forward(img, task)
        got = run_program(prog, img, task)
        np.testing.assert_array_equal(got.features, gold.features)
        assert np.abs(gold.features).max() > 100 and len(np.unique(gold.features)) > 100
    # a channel program needs the per-channel epilogue of its weights
    class_qw = quantize_weights(cfg, get_quant_preset("w8a16"), synthetic_state_dict(cfg, 0))
    with pytest.raises(FormatError, match="per-channel epilogue"):
        compile_program(cfg, Q, hw, class_qw)


def _fidelity(cfg, weights, tasks=None, quants=(Q,)):
    from edgemoe.model.images import load_image
    from edgemoe.quant.report import quant_report
    x, desc = load_image(cfg, None)
    rep = quant_report(cfg, weights, list(quants), x[0].numpy(), desc, tasks)
    return rep["presets"][Q.name] if len(quants) == 1 else rep["presets"]


# ---------------------------------------------------------------------------------------------
# GPTQ weight rounding (preset w8a16-gptq)
# ---------------------------------------------------------------------------------------------
def _correlated_layer(seed):
    rng = np.random.default_rng(seed)
    N, K, R = 24, 48, 400
    X = rng.standard_normal((R, K)) @ (np.eye(K) + 0.8 * rng.standard_normal((K, K)) / np.sqrt(K))
    X[:, :4] *= 6                                   # a few dominant input channels, as after LN
    w = rng.standard_normal((N, K))
    return X, w, weight_scales(w, 8)


@pytest.mark.parametrize("seed", range(3))
def test_gptq_lowers_the_layer_output_error(seed):
    """On correlated inputs GPTQ's codes give well under the output error of round-to-nearest
    (X (W - Q s)), at the same scales; every code is in range and the clipped count is returned."""
    from edgemoe.quant.channel import gptq_codes
    X, w, s = _correlated_layer(seed)
    qg, clipped = gptq_codes(w, s, X.T @ X, 8)
    qn = np.clip(np.round(w / s[:, None]), -127, 127)
    err = lambda q: float(((X @ (w - q * s[:, None]).T) ** 2).sum())   # noqa: E731
    assert err(qg) < 0.6 * err(qn)
    assert qg.dtype == np.int64 and np.abs(qg).max() <= 127
    assert 0 <= clipped < w.size // 50 and not np.array_equal(qg, qn)
    # per weight GPTQ is no closer than nearest (it trades weight error for output error)
    assert ((w - qg * s[:, None]) ** 2).sum() > ((w - qn * s[:, None]) ** 2).sum()


def test_gptq_with_uncorrelated_inputs_is_nearest():
    """A diagonal Hessian carries no error to other columns: the codes are round(w / s)."""
    from edgemoe.quant.channel import gptq_codes
    _, w, s = _correlated_layer(0)
    d = np.random.default_rng(5).uniform(0.5, 3.0, w.shape[1])
    d[7] = 0.0                                       # an input no calibration row reached
    q, clipped = gptq_codes(w, s, np.diag(d), 8)
    np.testing.assert_array_equal(q, np.clip(np.round(w / s[:, None]), -127, 127))
    assert clipped == 0
    with pytest.raises(ValueError, match="Hessian shape"):
        gptq_codes(w, s, np.eye(5), 8)


def test_gptq_config_is_checked():
    from edgemoe.hw.config import get_hw_preset
    from edgemoe.quant.program import config_hash
    g = get_quant_preset("w8a16-gptq")
    assert g.weight_rounding == "gptq"
    # the same hardware: a GPTQ program runs on the w8a16-channel bitstream, not on another
    hw = get_hw_preset("zcu102-w8-64x16")
    assert config_hash(g, hw) == config_hash(Q, hw) != config_hash(Q.replace(mult_bits=15), hw)
    assert config_hash(g, hw) != config_hash(g, get_hw_preset("zcu102-w8-32x32"))
    with pytest.raises(FormatError, match="weight_rounding"):
        Q.replace(weight_rounding="stochastic")
    with pytest.raises(FormatError, match="weight_rounding.*granularity 'channel'"):
        get_quant_preset("w8a16").replace(weight_rounding="gptq")


def test_gptq_codes_same_epilogue_other_codes():
    """w8a16-gptq changes only the codes: the epilogue integers (scales) and formats are those of
    w8a16-channel, and the golden features on the tiny seeded model are closer to float."""
    from edgemoe.quant.compiler import synthetic_state_dict
    from edgemoe.quant.qweights import quantize_weights
    cfg = get_preset("tiny")
    sd = synthetic_state_dict(cfg, 0)
    g = get_quant_preset("w8a16-gptq")
    qn, qg = quantize_weights(cfg, Q, sd), quantize_weights(cfg, g, sd)
    assert qn.codes.keys() == qg.codes.keys() and qn.epi.keys() == qg.epi.keys()
    for k, e in qn.epi.items():
        for f in ("bias", "mult", "shift"):
            np.testing.assert_array_equal(getattr(e, f), getattr(qg.epi[k], f), err_msg=f"{k}.{f}")
    changed = [k for k in qn.epi if not np.array_equal(qn.codes[k], qg.codes[k])]
    assert len(changed) == len(qn.epi), set(qn.epi) - set(changed)   # every linear layer is GPTQ'd
    for k in qn.codes:
        if k not in qn.epi:                          # LN parameters, cls / pos: untouched
            np.testing.assert_array_equal(qn.codes[k], qg.codes[k], err_msg=k)


def test_tiny_layers_track_float():
    from edgemoe.quant.report import load_weights
    cfg = get_preset("tiny")
    p = _fidelity(cfg, load_weights(cfg, "seeded", 0))
    assert p["summary"]["final_cosine_min"] >= 0.9999
    assert p["summary"]["saturated_total"] == 0 and p["weights_saturated_total"] == 0
    for r in p["runs"]:
        for name in ("blocks.0.qkv", "blocks.0.attn_out", "blocks.1.out", "blocks.3.out"):
            assert r["layers"][name]["cosine"] >= 0.9999, (r["task"], name, r["layers"][name])
    cal = p["activation_calibration"]
    assert len(cal["scales"]) == 5 * cfg.depth and len(cal["source"]) >= 2 * cfg.num_tasks


@pytest.mark.parametrize("qname", ["w8a16-channel", "w8a16-gptq"])
def test_tiny_trained_checkpoint_task_metrics(qname):
    """Issue-12 target on the shipped checkpoint: |dmIoU| <= 0.005, dRMSE <= 1 % vs float."""
    from pathlib import Path

    from edgemoe.model.evaluate import evaluate_checkpoint
    ckpt = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny.pt"
    rep = evaluate_checkpoint(ckpt, quant=(qname,), n=16)
    f, g = rep["backends"]["float"], rep["backends"][qname]
    assert abs(g["semseg"]["miou"] - f["semseg"]["miou"]) <= 0.005
    assert g["depth"]["rmse"] - f["depth"]["rmse"] <= 0.01 * f["depth"]["rmse"]
    assert g["saturated"] == 0


def test_edge_moe_seeded_fidelity():
    """Full-size seeded weights: cosine >= 0.999 (issue 12), routing pinned where it stands:
    2.8 % of tokens change their top-k set (the issue's 0.5 % is not reached yet)."""
    from edgemoe.quant.report import load_weights
    cfg = get_preset("edge-moe")
    p = _fidelity(cfg, load_weights(cfg, "seeded", 0), tasks=["semseg"])
    s = p["summary"]
    assert s["final_cosine_min"] >= 0.999
    assert s["routing_changed_material"] <= 0.04 * s["routing_tokens"]


def test_edge_moe_trained_fidelity():
    """The trained Edge-MoE weights (experts seeded, flagged in the report): cosine >= 0.999."""
    from edgemoe.quant.report import load_weights
    cfg = get_preset("edge-moe")
    try:
        w = load_weights(cfg, "edge-moe-bin", 0)
    except FileNotFoundError as e:
        pytest.skip(f"trained Edge-MoE weights absent: {e}")
    assert w.random                                      # experts are seeded: must be flagged
    ps = _fidelity(cfg, w, tasks=["semseg"], quants=(Q, get_quant_preset("w8a16-gptq")))
    p, g = ps[Q.name]["summary"], ps["w8a16-gptq"]["summary"]
    assert p["final_cosine_min"] >= 0.999
    assert p["routing_changed_material"] <= 0.04 * p["routing_tokens"]
    # GPTQ on the held-out calibration set (measured: final SQNR 37.0 -> 39.4 dB, 25 -> 11
    # materially changed routings of 774): closer to float, fewer changed routings
    sq = {k: v["runs"][0]["final"]["sqnr_db"] for k, v in ps.items()}
    assert sq["w8a16-gptq"] >= sq[Q.name] + 1.0, sq
    assert g["final_cosine_min"] > p["final_cosine_min"]
    assert g["routing_changed_material"] <= 0.025 * g["routing_tokens"]
    assert g["routing_changed_material"] < p["routing_changed_material"]


def test_default_calibration_holds_out_the_evaluation_image():
    """quant-report / eval / simulate evaluate on the Cityscapes image by default: the activation
    scales must not be calibrated on it (the class-format literals of w8a16 still are)."""
    from edgemoe.model.checkpoint import default_edge_moe_dir
    from edgemoe.quant.calibrate import calibration_images
    from edgemoe.quant.channel import CALIB_SYNTHETIC, default_act_scales
    from edgemoe.quant.qweights import fold_scales
    from edgemoe.quant.report import load_weights
    cfg = get_preset("tiny")
    held, hdesc = calibration_images(cfg, synthetic=CALIB_SYNTHETIC, eval_image=False)
    full, fdesc = calibration_images(cfg, synthetic=CALIB_SYNTHETIC)
    assert not any("Cityscapes" in d for d in hdesc) and len(held) == 1 + CALIB_SYNTHETIC
    if (default_edge_moe_dir() / "image.float32.bin").exists():
        assert len(full) == len(held) + 1 and "Cityscapes" in fdesc[0]
    w = load_weights(cfg, "seeded")
    act = default_act_scales(cfg, get_quant_preset("w8a16-channel"), fold_scales(cfg, w.state_dict))
    assert len(act.source) == len(held) * cfg.num_tasks
    assert not any("Cityscapes" in s for s in act.source)
