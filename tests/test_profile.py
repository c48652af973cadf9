"""Analytic workload profile (model/profile.py) and the `edgemoe profile` command."""
import json

import numpy as np
import pytest

from edgemoe.model.config import ConfigError, get_preset
from edgemoe.model.profile import layer_table, routing_profile, summary
from edgemoe.sim.cli import main as cli_main

EDGE = get_preset("edge-moe")
TINY = get_preset("tiny")

# ---------------------------------------------------------------- edge-moe, written out by hand
# D = 192, N = 128 patches + 1 class token = 129 tokens, 12 blocks (6 dense, 6 MoE), 3 heads of 64,
# dense hidden 768, 16 experts of hidden 384, top-2, 2 tasks (one 16x192 router each).
P_PATCH = 192 * 3 * 16 * 16 + 192                     # conv weight + bias
P_CLS = 192
P_POS = 129 * 192
P_NORMS = 2 * (192 + 192)                             # norm1, norm2: gamma + beta
P_QKV = 576 * 192 + 576
P_PROJ = 192 * 192 + 192
P_DENSE = (768 * 192 + 768) + (192 * 768 + 192)
P_MOE = 2 * 16 * 192 + 16 * (384 * 192 + 384) + 16 * (192 * 384 + 192)
EDGE_PARAMS = P_PATCH + P_CLS + P_POS + 12 * (P_NORMS + P_QKV + P_PROJ) + 6 * P_DENSE + 6 * P_MOE

M_PATCH = 128 * 192 * (3 * 16 * 16)                   # the class token is not convolved
M_QKV = 129 * 192 * 576
M_QK = 3 * 129 * 129 * 64                             # per head [129, 64] x [64, 129]
M_AV = 3 * 129 * 129 * 64
M_PROJ = 129 * 192 * 192
M_DENSE = 129 * 192 * 768 + 129 * 768 * 192
M_ROUTER = 129 * 192 * 16                             # one task's router
M_EXPERTS = 129 * 2 * (192 * 384 + 384 * 192)         # every token through its 2 experts
EDGE_MACS = M_PATCH + 12 * (M_QKV + M_QK + M_AV + M_PROJ) + 6 * M_DENSE + 6 * (M_ROUTER + M_EXPERTS)


def test_edge_moe_exact_totals():
    assert EDGE_PARAMS == 17_983_680
    assert EDGE_MACS == 782_719_488
    s = summary(EDGE)
    assert s["backbone_params"] == EDGE_PARAMS
    assert s["macs_per_image"] == EDGE_MACS
    assert s["macs_per_image_per_task"] == {"semseg": EDGE_MACS, "depth": EDGE_MACS}
    assert s["weight_bytes_16"] == 2 * EDGE_PARAMS
    assert s["weight_bytes_8"] == EDGE_PARAMS
    # one task reads its own router only
    assert s["params_read_per_task"] == EDGE_PARAMS - 6 * 16 * 192
    assert round(s["backbone_params"] / 1e6, 2) == 17.98
    assert round(s["macs_per_image"] / 1e9, 2) == 0.78


def test_wrong_counts_are_caught():
    """The pinned integers discriminate the usual mistakes (each would fail the test above)."""
    all_experts = EDGE_MACS - 6 * M_EXPERTS + 6 * 129 * 16 * (192 * 384 + 384 * 192)
    no_cls = (M_PATCH + 12 * (128 * 192 * 576 + 2 * 128 * 128 * 192 + 128 * 192 * 192)
              + 6 * 128 * 192 * 1536 + 6 * (128 * 192 * 16 + 128 * 2 * 2 * 192 * 384))
    both_routers = EDGE_MACS + 6 * M_ROUTER
    top1 = EDGE_MACS - 6 * M_EXPERTS // 2
    s = summary(EDGE)
    for wrong in (all_experts, no_cls, both_routers, top1):
        assert s["macs_per_image"] != wrong
    no_pos_cls = EDGE_PARAMS - P_CLS - P_POS
    one_router = EDGE_PARAMS - 6 * 16 * 192
    for wrong in (no_pos_cls, one_router):
        assert s["backbone_params"] != wrong


def test_edge_moe_per_layer_breakdown_matches_design():
    """DESIGN.md section 5: patch 18.9 M, per block QKV 14.3, QK^T 3.2, A.V 3.2, proj 4.8,
    MLP or top-2 experts 38.0, router 0.4 (M MAC)."""
    rows = layer_table(EDGE)
    by = {}
    for r in rows:
        by.setdefault(r["type"], []).append(r)

    def per(t):
        ms = {r["macs"] for r in by[t]}
        assert len(ms) == 1, t
        return ms.pop()

    assert per("patch_embed") == M_PATCH and round(M_PATCH / 1e6, 1) == 18.9
    assert len(by["qkv"]) == 12 and per("qkv") == M_QKV and round(M_QKV / 1e6, 1) == 14.3
    assert per("qk") == M_QK and round(M_QK / 1e6, 1) == 3.2
    assert per("av") == M_AV and round(M_AV / 1e6, 1) == 3.2
    assert per("proj") == M_PROJ and round(M_PROJ / 1e6, 1) == 4.8
    assert len(by["mlp_fc1"]) == 6 and per("mlp_fc1") + per("mlp_fc2") == M_DENSE
    assert round(M_DENSE / 1e6, 1) == 38.0
    assert len(by["expert_fc1"]) == 6 and per("expert_fc1") + per("expert_fc2") == M_EXPERTS
    assert round(M_EXPERTS / 1e6, 1) == 38.0
    assert per("router") == M_ROUTER and round(M_ROUTER / 1e6, 1) == 0.4
    # MoE layers sit on the odd blocks only
    assert [r["block"] for r in by["router"]] == [1, 3, 5, 7, 9, 11]
    assert [r["block"] for r in by["mlp_fc1"]] == [0, 2, 4, 6, 8, 10]
    # parameters per row
    assert by["router"][0]["params"] == 2 * 16 * 192 and by["router"][0]["params_read"] == 16 * 192
    assert by["expert_fc1"][0]["params"] == 16 * (384 * 192 + 384)
    assert [r["params"] for r in by["embed"]] == [P_CLS + P_POS]
    # activation sizes (elements): experts see the gathered token slots
    assert by["expert_fc1"][0]["act_in"] == 129 * 2 * 192
    assert by["expert_fc2"][0]["act_out"] == 129 * 2 * 192
    assert by["qk"][0]["act_out"] == 3 * 129 * 129
    assert by["softmax"][0]["act_in"] == 3 * 129 * 129
    s = summary(EDGE)["by_type"]
    assert s["qkv"] == {"count": 12, "macs": 12 * M_QKV, "params": 12 * P_QKV,
                        "weight_bytes_16": 24 * P_QKV}
    assert sum(v["params"] for v in s.values()) == EDGE_PARAMS


def test_bytes_follow_precision():
    r16 = layer_table(EDGE, weight_bits=16, act_bits=32)
    r8 = layer_table(EDGE, weight_bits=8, act_bits=16)
    r4 = layer_table(EDGE, weight_bits=4, act_bits=8)
    for a, b, c in zip(r16, r8, r4):
        assert a["weight_bytes"] == 2 * a["params"]
        assert b["weight_bytes"] == a["params"]
        assert c["weight_bytes"] == (a["params"] * 4 + 7) // 8
        assert a["act_in_bytes"] == 4 * a["act_in"] and b["act_out_bytes"] == 2 * b["act_out"]
        assert c["act_in_bytes"] == a["act_in"]
    assert sum(r["weight_bytes"] for r in r8) == EDGE_PARAMS


def test_bad_arguments():
    with pytest.raises(ValueError, match="weight_bits = 0"):
        layer_table(TINY, weight_bits=0)
    with pytest.raises(ValueError, match="act_bits"):
        layer_table(TINY, act_bits=-1)
    with pytest.raises(ConfigError, match="unknown task 'normals'"):
        layer_table(TINY, task="normals")


# ---------------------------------------------------------------- cross-check with the network

@pytest.mark.parametrize("cfg", [TINY, TINY.replace(gating="task_cond"),
                                 TINY.replace(moe_blocks=(0, 1, 2), top_k=3)],
                         ids=["tiny", "tiny-task_cond", "tiny-top3"])
def test_matches_the_float_network(cfg):
    """Parameters = the network's backbone parameters; MACs = half the FLOPs torch counts while
    the network runs (conv, linear, attention matmuls, per-expert gathered linears, router)."""
    torch = pytest.importorskip("torch")
    m3vit = pytest.importorskip("edgemoe.model.m3vit")
    from torch.utils.flop_counter import FlopCounterMode

    model = m3vit.M3ViT(cfg, seed=0).eval()
    s = summary(cfg)
    assert s["backbone_params"] == m3vit.count_params(model)
    x = torch.rand(1, cfg.in_chans, cfg.img_h, cfg.img_w, generator=torch.Generator().manual_seed(0))
    for t in range(cfg.num_tasks):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model.forward_features(x, t)
        assert fc.get_total_flops() == 2 * s["macs_per_image_per_task"][cfg.tasks[t]]


def test_edge_moe_params_match_network():
    torch = pytest.importorskip("torch")
    m3vit = pytest.importorskip("edgemoe.model.m3vit")
    model = m3vit.M3ViT(EDGE, seed=None)          # uninitialised: shapes only, fast
    assert m3vit.count_params(model) == EDGE_PARAMS


# ---------------------------------------------------------------- routing profile

def test_routing_profile_synthetic():
    torch = pytest.importorskip("torch")
    # block 1: 2 images, 3 tokens, top-2 over 5 experts
    idx1 = torch.tensor([[[0, 1], [1, 2], [1, 0]],
                         [[4, 1], [0, 1], [2, 0]]])
    # block 3: everything on experts 3 and 2
    idx3 = torch.tensor([[[3, 2], [3, 2], [2, 3]]])
    aux = {"routing": {3: {"topk_idx": idx3, "probs": torch.rand(1, 3, 5)},
                       1: {"topk_idx": idx1, "logits": torch.rand(2, 3, 5)}}}
    p = routing_profile(aux)
    assert list(p) == [1, 3]
    assert p[1]["tokens_per_expert"] == [4, 5, 2, 0, 1]
    assert p[1]["active_experts"] == 4 and p[1]["max_load"] == 5
    assert p[1]["token_slots"] == 12 and p[1]["images"] == 2
    assert p[1]["imbalance"] == pytest.approx(5 / (12 / 5))
    assert p[3]["tokens_per_expert"] == [0, 0, 3, 3, 0]
    assert p[3]["active_experts"] == 2 and p[3]["max_load"] == 3
    # numpy input and explicit num_experts (no probs/logits)
    q = routing_profile({"routing": {5: {"topk_idx": np.array([[[6, 0]]])}}}, num_experts=8)
    assert q[5]["tokens_per_expert"] == [1, 0, 0, 0, 0, 0, 1, 0]


def test_routing_profile_bad_input():
    with pytest.raises(ValueError, match="'routing' key"):
        routing_profile({"block_out": {}})
    with pytest.raises(ValueError, match="pass num_experts"):
        routing_profile({"routing": {1: {"topk_idx": np.zeros((1, 3, 2), dtype=np.int64)}}})
    with pytest.raises(ValueError, match=r"\['topk_idx'\] holds expert 4, out of range 0..3"):
        routing_profile({"routing": {1: {"topk_idx": np.array([[[4, 0]]])}}}, num_experts=4)
    with pytest.raises(ValueError, match=r"must be an integer \[B, N\+1, k\] tensor, got shape \[3, 2\]"):
        routing_profile({"routing": {1: {"topk_idx": np.zeros((3, 2), dtype=np.int64)}}}, num_experts=4)


def test_routing_profile_of_the_network():
    torch = pytest.importorskip("torch")
    m3vit = pytest.importorskip("edgemoe.model.m3vit")
    model = m3vit.M3ViT(TINY, seed=3).eval()
    x = torch.rand(2, 3, TINY.img_h, TINY.img_w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, aux = model.forward_features(x, 0, return_aux=True)
    p = routing_profile(aux)
    assert list(p) == list(TINY.moe_blocks)
    for b, r in p.items():
        assert len(r["tokens_per_expert"]) == TINY.num_experts
        assert sum(r["tokens_per_expert"]) == 2 * TINY.num_tokens * TINY.top_k
        # a token uses k distinct experts, so no expert holds more slots than there are tokens
        assert r["max_load"] <= 2 * TINY.num_tokens
        ref = np.bincount(aux["routing"][b]["topk_idx"].reshape(-1).numpy(), minlength=TINY.num_experts)
        assert r["tokens_per_expert"] == ref.tolist()


# ---------------------------------------------------------------- CLI

@pytest.mark.parametrize("preset,bits,task", [("tiny", 16, None), ("edge-moe", 16, "depth"),
                                              ("edge-moe", 8, "1")])
def test_cli_json(tmp_path, capsys, preset, bits, task):
    out = tmp_path / "p.json"
    argv = ["profile", "--preset", preset, "--weight-bits", str(bits), "--json", str(out)]
    if task is not None:
        argv += ["--task", task]
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    d = json.loads(out.read_text())
    cfg = get_preset(preset)
    s = summary(cfg)
    assert d["preset"] == preset and d["weight_bits"] == bits
    assert d["task"] == ("semseg" if task is None else "depth")
    assert d["totals"]["params"] == s["backbone_params"]
    assert d["totals"]["macs"] == s["macs_per_image"]
    assert d["totals"]["weight_bytes"] == s["backbone_params"] * bits // 8
    assert len(d["layers"]) == len(layer_table(cfg))
    assert "routing" not in d
    if preset == "edge-moe":
        assert d["totals"] == {"macs": EDGE_MACS, "params": EDGE_PARAMS,
                               "weight_bytes": EDGE_PARAMS * bits // 8}
        assert "17.98 M parameters" in text and "0.783 GMAC" in text
    assert f"{s['backbone_params']:,}" in text and "expert_fc1" in text


def test_cli_routing_tiny(tmp_path, capsys):
    pytest.importorskip("edgemoe.model.m3vit")
    out = tmp_path / "r.json"
    assert cli_main(["profile", "--preset", "tiny", "--routing", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    blocks = d["routing"]["blocks"]
    assert sorted(int(b) for b in blocks) == list(TINY.moe_blocks)
    for r in blocks.values():
        assert sum(r["tokens_per_expert"]) == TINY.num_tokens * TINY.top_k
    assert "tokens per expert" in capsys.readouterr().out


def test_cli_bad_preset():
    with pytest.raises(ConfigError, match="unknown model preset 'nope'"):
        cli_main(["profile", "--preset", "nope"])


def test_cli_routing_fallback_image(tmp_path, monkeypatch, capsys):
    """Without the shared Cityscapes image the command uses matplotlib's sample photo."""
    pytest.importorskip("edgemoe.model.m3vit")
    monkeypatch.setenv("EDGEMOE_SHARED", str(tmp_path))      # no edge-moe-cityscapes there
    assert cli_main(["profile", "--preset", "tiny", "--routing"]) == 0
    assert "grace_hopper.jpg resized" in capsys.readouterr().out


def test_cli_routing_without_network(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "edgemoe.model.m3vit", None)     # import now fails
    with pytest.raises(SystemExit, match="needs the float network model.m3vit.M3ViT"):
        cli_main(["profile", "--preset", "tiny", "--routing"])


def test_cli_bad_bin_image(tmp_path):
    pytest.importorskip("edgemoe.model.m3vit")
    bad = tmp_path / "x.bin"
    np.zeros(10, dtype="<f4").tofile(bad)
    with pytest.raises(ValueError, match="holds 10 float32 values"):
        cli_main(["profile", "--preset", "tiny", "--image", str(bad)])
