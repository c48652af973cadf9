"""The golden model: agreement with float, named intermediates, order/queue semantics, saturation."""
import numpy as np
import pytest
import torch

from edgemoe.model import get_preset
from edgemoe.model.m3vit import M3ViT
from edgemoe.quant import approx
from edgemoe.quant.config import get_quant_preset
from edgemoe.quant.fixed import Fmt
from edgemoe.quant.golden import GoldenModel
from edgemoe.quant.qweights import LOG2E, quantize_weights

Q = get_quant_preset("edge-moe-fixed")


def _setup(name, seed=0):
    cfg = get_preset(name)
    m = M3ViT(cfg, seed=seed).eval()
    x = torch.rand(1, 3, cfg.img_h, cfg.img_w, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        f, aux = m.forward_features(x, 0, return_aux=True)
    return cfg, m, x, f, aux


def _cos(a, b):
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def tiny():
    return _setup("tiny")


def test_tiny_matches_float_and_keeps_tensors(tiny):
    cfg, m, x, f, aux = tiny
    gm = GoldenModel(cfg, Q, quantize_weights(cfg, Q, m.state_dict()))
    r = gm.forward(x[0].numpy(), "semseg", keep=True)
    assert r.features.dtype == np.int64 and r.features.shape == (cfg.num_tokens, cfg.dim)
    g = Q.act.dequantize(r.features)
    assert _cos(g, f[0].double().numpy()) > 0.9999
    for i in range(cfg.depth):   # every block output close to float
        gb = Q.act.dequantize(r.tensors[f"blocks.{i}.out"])
        assert np.abs(gb - aux["block_out"][i][0].double().numpy()).max() < 5e-3
    for name in ("embed", "blocks.0.qkv", "blocks.0.scores", "blocks.0.probs", "blocks.0.mlp.gelu",
                 "blocks.1.mlp.gate_logits", "blocks.1.mlp.topk_idx", "blocks.3.out"):
        assert name in r.tensors, name
    assert r.sat.saturated() == 0
    # routing decisions equal the float model's on this input
    for b in cfg.moe_blocks:
        np.testing.assert_array_equal(np.sort(r.routing[b]["topk_idx"], 1),
                                      np.sort(aux["routing"][b]["topk_idx"][0].numpy(), 1))


def test_tiny_attention_and_moe_follow_the_spec(tiny):
    """Recompute block 0 attention and block 1 MoE from the approximators directly."""
    cfg, m, x, f, aux = tiny
    qw = quantize_weights(cfg, Q, m.state_dict())
    gm = GoldenModel(cfg, Q, qw, attn_p=2)
    r = gm.forward(x[0].numpy(), 0, keep=True)
    t = r.tensors
    # probabilities rows: each row of p sums to ~1 and equals softmax of the float scores
    p = Q.prob.dequantize(t["blocks.0.probs"])
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=2e-3)
    s = Q.score.dequantize(t["blocks.0.scores"]) / LOG2E
    np.testing.assert_allclose(p, approx.softmax_float(s), atol=1e-4)
    # MoE: the block output equals resid1 + sum_k w_k * expert_k computed independently
    i = 1
    h2, idx, w = t[f"blocks.{i}.norm2"], t[f"blocks.{i}.mlp.topk_idx"], t[f"blocks.{i}.mlp.topk_w"]
    pre = f"blocks.{i}.mlp"
    want = t[f"blocks.{i}.resid1"].copy()
    for e in sorted(set(idx.ravel().tolist())):
        toks, slot = np.nonzero(idx == e)
        a = gm.linear(h2[toks], qw[pre + ".htoh4_weight"][e], qw[pre + ".htoh4_bias"][e], None, "a")
        y = gm.linear(approx.gelu_fixed(a, Q), qw[pre + ".h4toh_weight"][e], qw[pre + ".h4toh_bias"][e], None, "y")
        prod = y * w[toks, slot][:, None]
        sh = Q.gate_prob.frac
        want[toks] += (prod + (1 << (sh - 1))) >> sh          # HALF_UP rounding, no saturation here
    np.testing.assert_array_equal(t[f"blocks.{i}.out"], want)


def test_edge_moe_cosine_and_speed():
    cfg, m, x, f, aux = _setup("edge-moe")
    gm = GoldenModel(cfg, Q, quantize_weights(cfg, Q, m.state_dict()))
    r = gm.forward(x[0].numpy(), 1)
    assert _cos(Q.act.dequantize(r.features), f[0].double().numpy()) >= 0.999


def test_saturation_is_counted(tiny):
    cfg, m, x, f, aux = tiny
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["blocks.0.attn.proj.bias"][:] = 1000.0          # beyond s16.11 bias range: saturates
    qw = quantize_weights(cfg, Q, sd)
    assert qw.sat.saturated("blocks.0.attn.proj.bias") == cfg.dim
    narrow = Q.replace(act=Fmt(32, 30), acc=Fmt(62, 44))  # act range +-2: residual stream saturates
    gm = GoldenModel(cfg, narrow, quantize_weights(cfg, narrow, m.state_dict()))
    r = gm.forward(x[0].numpy(), 0)
    assert r.sat.saturated() > 0


def test_bad_image_shape(tiny):
    cfg, m, x, f, aux = tiny
    gm = GoldenModel(cfg, Q, quantize_weights(cfg, Q, m.state_dict()))
    with pytest.raises(ValueError, match=r"image shape \(3, 16, 16\)"):
        gm.forward(np.zeros((3, 16, 16)), 0)
