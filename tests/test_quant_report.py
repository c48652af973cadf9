"""The fidelity report (quant/report.py) and `edgemoe quant-report`."""
import json
import math

import numpy as np
import pytest
import torch

from edgemoe.model import get_preset
from edgemoe.model.checkpoint import default_edge_moe_dir
from edgemoe.quant.config import EDGE_MOE_FIXED, W8A16
from edgemoe.quant.golden import GoldenModel
from edgemoe.quant.qweights import quantize_weights
from edgemoe.quant.report import (RANDOM_EXPERTS, WEIGHT_GROUPS, _routing_attribution, _routing_changes,
                                  _routing_weight_groups, _weights_real, weight_group,
                                  float_reference, load_weights, metrics)
from edgemoe.sim.cli import main

REAL = default_edge_moe_dir()


def test_metrics_known_values():
    ref = np.array([3.0, -4.0, 0.0, 0.0])
    m = metrics(ref, ref + np.array([0.3, 0.0, -0.4, 0.0]))
    assert m["sqnr_db"] == pytest.approx(10 * math.log10(25 / 0.25))        # 20 dB
    assert m["mse"] == pytest.approx(0.25 / 4) and m["mae"] == pytest.approx(0.7 / 4)
    assert m["max_abs"] == pytest.approx(0.4)
    assert m["cosine"] == pytest.approx((9.9 + 16) / (5 * math.sqrt(3.3 ** 2 + 16 + 0.16)))
    assert metrics(ref, ref)["sqnr_db"] is None and metrics(ref, ref)["cosine"] == pytest.approx(1.0)


def test_routing_changes_counts_sets_and_material_swaps():
    cfg = get_preset("tiny")                                   # moe blocks 1, 3; 4 experts, top-2
    lsb = W8A16.gate_prob.lsb
    probs = np.array([[0.5, 0.3, 0.2, 0.0], [0.9, 0.1, 0.0, 0.0], [1.0, 0.0, 0.4 * lsb, 0.0]])
    fl = {b: {"topk_idx": np.array([[0, 1], [0, 1], [0, 1]]), "probs": probs} for b in (1, 3)}
    gd = {1: {"topk_idx": np.array([[1, 0], [0, 2], [0, 2]])},    # same set, material swap, tiny swap
          3: {"topk_idx": np.array([[0, 1], [0, 1], [0, 1]])}}
    r = _routing_changes(cfg, W8A16, gd, fl)
    assert r["1"] == {"changed_tokens": 2, "material": 1, "tokens": 3, "fraction": 2 / 3}
    assert r["3"]["changed_tokens"] == 0


@pytest.mark.parametrize("qname", ["w8a16", "w8a16-channel"])
def test_routing_attribution_sides(qname):
    """The router weights as the datapath applies them are the float ones to half a step; the
    attribution counts float-top-k changes from each side, and a side that is not perturbed
    changes nothing."""
    from edgemoe.quant.config import get_quant_preset
    from edgemoe.quant.qweights import fold_scales
    cfg = get_preset("tiny")
    q = get_quant_preset(qname)
    w = load_weights(cfg, "seeded")
    folded = fold_scales(cfg, w.state_dict)
    qw = quantize_weights(cfg, q, w.state_dict)
    x = np.random.default_rng(3).random((3, cfg.img_h, cfg.img_w))
    ref = float_reference(cfg, w, folded, x, 0)
    res = GoldenModel(cfg, q, qw).forward(x, 0, keep=True)
    for b in cfg.moe_blocks:
        key = f"blocks.{b}.mlp.routers.0.weight"
        wf, wq = np.asarray(folded[key], np.float64), _weights_real(q, qw, key)
        step = (np.abs(wf).max(1, keepdims=True) / 127 if q.granularity == "channel"
                else q.linear_w.lsb)
        assert np.all(np.abs(wq - wf) <= 0.5 * step * (1 + 1e-3)) and not np.array_equal(wq, wf)
    att = _routing_attribution(cfg, q, qw, folded, ref["trace"], res.tensors, 0)
    assert set(att) == {str(b) for b in cfg.moe_blocks}
    assert all(0 <= v[k] <= cfg.num_tokens for v in att.values() for k in v)
    # the golden model's own LayerNorm output fed back as "float" input: no input-side change
    tr = type("T", (), {"tensors": {**ref["trace"].tensors, **{
        f"blocks.{b}.norm2": res.tensors[f"blocks.{b}.norm2"] * qw.scale(f"blocks.{b}.norm2", q.act)
        for b in cfg.moe_blocks}}})()
    assert all(v["router_input_only"] == 0
               for v in _routing_attribution(cfg, q, qw, folded, tr, res.tensors, 0).values())


@pytest.mark.parametrize("qname", ["w8a16", "w8a16-channel"])
def test_routing_weight_groups(qname):
    """Every matmul weight of every group, applied as the datapath applies it, is the float one
    to half a step (experts and the 4-D patch embedding included). Wrecking the router's codes
    moves the router-only and all-groups counts and leaves every other group's count as it was."""
    from dataclasses import replace

    from edgemoe.quant.config import get_quant_preset
    from edgemoe.quant.qweights import fold_scales
    cfg = get_preset("tiny")
    q = get_quant_preset(qname)
    w = load_weights(cfg, "seeded")
    folded = fold_scales(cfg, w.state_dict)
    qw = quantize_weights(cfg, q, w.state_dict)
    groups = {weight_group(k) for k in folded} - {None}
    assert groups == set(WEIGHT_GROUPS)
    for k in folded:
        if weight_group(k) is None:
            continue
        wf = np.asarray(folded[k], np.float64)
        wq = _weights_real(q, qw, k).reshape(wf.shape)
        # per output channel (per expert and channel): the reduction axes of the scale's max
        axes = (1, 2, 3) if wf.ndim == 4 else (wf.ndim - 1,)
        if q.granularity == "channel":
            # half a step, plus the code (<= 127) times the epilogue multiplier's rounding
            # (M rounded to mult_bits significant bits: relative error <= 2**-mult_bits)
            step = np.abs(wf).max(axis=axes, keepdims=True) / 127
            tol = step * (0.5 + 127 * 2.0 ** -q.mult_bits)
        else:
            tol = 0.5 * qw.fmt[k].lsb
        assert np.all(np.abs(wq - wf) <= tol), k
    x = np.random.default_rng(5).random((3, cfg.img_h, cfg.img_w))
    tr = float_reference(cfg, w, folded, x, 0)["trace"]
    base = _routing_weight_groups(cfg, q, qw, folded, x, tr, 0)
    assert set(base) == {"all", *WEIGHT_GROUPS}
    assert all(0 <= n <= len(cfg.moe_blocks) * cfg.num_tokens for n in base.values())
    codes = {k: (-v if weight_group(k) == "router" else v) for k, v in qw.codes.items()}
    bad = _routing_weight_groups(cfg, q, replace(qw, codes=codes), folded, x, tr, 0)
    # negated router weights rank the experts backwards: nearly every token's set changes
    assert bad["router"] >= 0.9 * len(cfg.moe_blocks) * cfg.num_tokens > base["router"]
    assert bad["all"] > base["all"]
    assert {g: n for g, n in bad.items() if g not in ("router", "all")} == \
        {g: n for g, n in base.items() if g not in ("router", "all")}


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("qr")
    assert main(["quant-report", "--preset", "tiny", "--quant", "edge-moe-fixed,w8a16",
                 "--out", str(out)]) == 0
    return out, json.loads((out / "quant_report.json").read_text())


def test_cli_tiny_writes_json_and_png(tiny_report):
    out, rep = tiny_report
    cfg = get_preset("tiny")
    assert rep["model"] == "tiny" and rep["tasks"] == list(cfg.tasks)
    assert rep["weights"]["kind"] == "seeded" and rep["warning"] is None
    assert set(rep["presets"]) == {"edge-moe-fixed", "w8a16"}
    assert rep["mirror_vs_m3vit_max_abs"] < 1e-4
    for name, p in rep["presets"].items():
        assert p["formats"]["act"] == {"edge-moe-fixed": "s32.22", "w8a16": "s16.7"}[name]
        for k in ("exp2_abs_max", "gelu_abs_max", "rsqrt_rel_max", "softmax_abs_max", "layernorm_abs_max"):
            assert 0 < p["approx_errors"][k] < 0.05
        assert len(p["runs"]) == cfg.num_tasks
        for r in p["runs"]:
            assert r["golden_seconds"] > 0 and set(r["final"]) >= {"mse", "mae", "cosine", "sqnr_db"}
            assert len(r["blocks"]) == cfg.depth
            assert set(r["routing"]) == {str(b) for b in cfg.moe_blocks}
            assert all(0 <= v["material"] <= v["changed_tokens"] <= v["tokens"] == cfg.num_tokens
                       for v in r["routing"].values())
            assert set(r["routing_attribution"]) == set(r["routing"])
            assert set(r["routing_weight_groups"]) == {"all", *WEIGHT_GROUPS}
            for key in ("blocks.0.qkv", "blocks.0.scores", "blocks.0.attn_out", "blocks.0.proj",
                        "blocks.0.mlp.fc2", "blocks.1.mlp.moe_out", "blocks.1.mlp.gate_logits", "blocks.3.out"):
                assert -1 <= r["layers"][key]["cosine"] <= 1 + 1e-12
            assert r["saturated_total"] == sum(v["saturated"] for v in r["saturation"].values())
    fx, w8 = (rep["presets"][n]["runs"][0] for n in ("edge-moe-fixed", "w8a16"))
    assert fx["final"]["cosine"] > 0.9999 and fx["saturated_total"] == 0
    assert 0.5 < w8["final"]["cosine"] < fx["final"]["cosine"]
    for a, b in zip(fx["blocks"], w8["blocks"]):      # 32-bit act / 16-bit weights beat w8a16 everywhere
        assert a["out_sqnr_db"] > b["out_sqnr_db"] + 10
    png = out / "quant_report.png"
    import matplotlib.image as mpimg
    img = mpimg.imread(png)
    assert img.ndim == 3 and img.shape[0] > 500 and img.shape[1] > 1000


def test_cli_tiny_final_metrics_match_an_independent_run(tiny_report):
    """The JSON's final cosine/MSE equal a direct golden vs float computation."""
    out, rep = tiny_report
    from edgemoe.model.images import load_image
    cfg = get_preset("tiny")
    w = load_weights(cfg, "seeded")
    x, _ = load_image(cfg)
    with torch.no_grad():
        f = w.model.forward_features(x, 1)[0].double().numpy()
    q = EDGE_MOE_FIXED
    g = q.act.dequantize(GoldenModel(cfg, q, quantize_weights(cfg, q, w.state_dict)).forward(
        x[0].numpy().astype(np.float64), 1).features)
    run = rep["presets"]["edge-moe-fixed"]["runs"][1]
    assert run["task"] == "depth"
    assert run["final"]["mse"] == pytest.approx(float(((g - f) ** 2).mean()), rel=1e-9)
    assert run["final"]["cosine"] == pytest.approx(float((g * f).sum() / np.linalg.norm(g) / np.linalg.norm(f)),
                                                   abs=1e-12)


def test_missing_weight_folder_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEMOE_SHARED", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match=r"nowhere.*does not\s+exist"):
        main(["quant-report", "--preset", "edge-moe", "--weights", "edge-moe-bin", "--out", str(tmp_path)])
    assert not (tmp_path / "quant_report.json").exists()


@pytest.mark.skipif(not (REAL / "l0_qkv_weight.float32.bin").exists(),
                    reason=f"Edge-MoE weights not present in {REAL}")
def test_cli_real_weights_flags_random_experts(tmp_path):
    """Also the w8a16 fidelity threshold on the real weights (measured 0.99112 semseg)."""
    assert main(["quant-report", "--preset", "edge-moe", "--weights", "edge-moe-bin",
                 "--quant", "w8a16", "--task", "semseg", "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "quant_report.json").read_text())
    assert RANDOM_EXPERTS in rep["weights"]["banner"] and RANDOM_EXPERTS in rep["warning"]
    assert len(rep["weights"]["random_tensors"]) == 12
    assert all("htoh4_weight" in k or "h4toh_weight" in k for k in rep["weights"]["random_tensors"])
    p = rep["presets"]["w8a16"]
    run = p["runs"][0]
    qmax = [b["qkv_absmax_float"] for b in run["blocks"]]
    # the |qkv| ~ 53 outliers of the trained blocks 10-11 were K biases, dropped by the fold
    assert max(qmax) < 16 < p["attn_in_range"]
    assert all(b["attn_in_saturated"] == 0 for b in run["blocks"])
    assert p["weights_saturated_total"] == 0 and run["saturated_total"] == 0
    assert run["final"]["cosine"] >= 0.990
    assert (tmp_path / "quant_report.png").stat().st_size > 10_000


def test_w8a8_study_tiny():
    """8-bit activations everywhere: every stored activation format is 8 bits wide, and the
    features are measurably further from float than w8a16-channel's on the same image."""
    from edgemoe.model.images import load_image
    from edgemoe.quant.report import quant_report, w8a8_study, w8a8_variant
    cfg = get_preset("tiny")
    q = w8a8_variant(4)
    assert all(getattr(q, f).bits == 8 for f in ("act", "gelu_in", "attn_in", "gate_logit"))
    w = load_weights(cfg, "seeded")
    x, desc = load_image(cfg)
    r = w8a8_study(cfg, w, x[0].numpy(), desc, fracs=(3, 4), tasks=[0])
    assert [v["act"] for v in r["variants"]] == ["s8.3", "s8.4"]
    ref = quant_report(cfg, w, ["w8a16-channel"], x[0].numpy(), desc, [0])
    c16 = ref["presets"]["w8a16-channel"]["summary"]["final_cosine_min"]
    assert 0.5 < r["best"]["final_cosine_min"] < c16
    assert r["reaches_target"] == (r["best"]["final_cosine_min"] >= 0.99)
