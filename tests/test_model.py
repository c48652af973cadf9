"""Float M3ViT reference: parity with PyTorch's own transformer layer, MoE routing/combine semantics,
state-dict contract, heads, input errors, seeded init."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgemoe.model.config import ConfigError, get_preset
from edgemoe.model.m3vit import M3ViT, MoE, count_params

TINY = get_preset("tiny")
EDGE = get_preset("edge-moe")


def make(cfg, seed=0):
    return M3ViT(cfg, seed=seed).eval()


def image(cfg, b=1, seed=0):
    return torch.rand(b, cfg.in_chans, cfg.img_h, cfg.img_w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def edge_model():
    return make(EDGE)


def randomize_(module, seed, scale=0.1):
    """Non-trivial values everywhere (LayerNorm affine too), so a mixed-up parameter shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("norm1.weight")
                                                               or name.endswith("norm2.weight") else 0.0))


# ---------------------------------------------------------------- parity with nn.TransformerEncoderLayer
@pytest.mark.parametrize("cfg", [TINY, EDGE], ids=lambda c: c.name)
def test_dense_blocks_match_torch_encoder_layer(cfg):
    model = make(cfg)
    randomize_(model.blocks, seed=1)
    dense = [i for i in range(cfg.depth) if not cfg.is_moe(i)]
    assert dense
    x = torch.randn(2, cfg.num_tokens, cfg.dim, generator=torch.Generator().manual_seed(2))
    for i in dense[:2]:
        blk = model.blocks[i]
        ref = nn.TransformerEncoderLayer(d_model=cfg.dim, nhead=cfg.heads, dim_feedforward=cfg.mlp_hidden,
                                         dropout=0.0, activation="gelu", layer_norm_eps=1e-6,
                                         batch_first=True, norm_first=True).eval()
        with torch.no_grad():
            ref.self_attn.in_proj_weight.copy_(blk.attn.qkv.weight)
            ref.self_attn.in_proj_bias.copy_(blk.attn.qkv.bias)
            ref.self_attn.out_proj.weight.copy_(blk.attn.proj.weight)
            ref.self_attn.out_proj.bias.copy_(blk.attn.proj.bias)
            for a, b in (("linear1", "fc1"), ("linear2", "fc2")):
                getattr(ref, a).weight.copy_(getattr(blk.mlp, b).weight)
                getattr(ref, a).bias.copy_(getattr(blk.mlp, b).bias)
            for n in ("norm1", "norm2"):
                getattr(ref, n).load_state_dict(getattr(blk, n).state_dict())
            ours, routing = blk(x, 0)
            theirs = ref(x)
        assert routing is None
        assert (ours - x).abs().max() > 0.1          # the block does something measurable
        assert (ours - theirs).abs().max() <= 1e-5, f"block {i}"


# ---------------------------------------------------------------- MoE routing and combine
def tiny_moe(gating="multi", seed=0, **kw):
    cfg = TINY.replace(gating=gating, **kw)
    moe = make(cfg, seed).blocks[cfg.moe_blocks[0]].mlp
    assert isinstance(moe, MoE)
    return cfg, moe


def test_sparse_equals_dense_reference_model_level():
    model = make(TINY)
    randomize_(model, seed=3, scale=0.2)   # large router logits -> varied routing
    x = image(TINY, b=2)
    with torch.no_grad():
        for t in range(TINY.num_tasks):
            a, aux = model.forward_features(x, t, return_aux=True)
            b, aux_d = model.forward_features(x, t, return_aux=True, dense_moe=True)
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
            for i in TINY.moe_blocks:
                assert torch.equal(aux["routing"][i]["topk_idx"], aux_d["routing"][i]["topk_idx"])
            # routing actually spreads over several experts, so the comparison covers the scatter
            used = torch.unique(aux["routing"][TINY.moe_blocks[0]]["topk_idx"])
            assert used.numel() >= 3


@pytest.mark.parametrize("k", [1, 2, 3])
def test_sparse_equals_dense_reference_any_k(k):
    cfg, moe = tiny_moe(top_k=k)
    randomize_(moe, seed=4, scale=0.3)
    x = torch.randn(3, 7, cfg.dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y, r = moe(x, 1)
        yd, rd = moe(x, 1, dense=True)
    assert r["topk_idx"].shape == (3, 7, k) and r["topk_idx"].dtype == torch.long
    assert torch.allclose(y, yd, atol=1e-6, rtol=1e-5)
    # top-k weights are the k largest probabilities, in descending order
    assert torch.equal(r["topk_w"], r["probs"].gather(-1, r["topk_idx"]))
    assert torch.equal(r["topk_w"], r["probs"].topk(k, dim=-1).values)


def test_hand_computed_combine_no_renormalisation():
    cfg, moe = tiny_moe()
    D = cfg.dim
    x = torch.zeros(1, 1, D)
    x[0, 0, 0] = 1.0
    logit_vals = [0.5, 2.0, -1.0, 1.0]          # task 0: expert 1 then expert 3 win
    with torch.no_grad():
        moe.routers[0].weight.zero_()
        moe.routers[0].weight[:, 0] = torch.tensor(logit_vals)
        g = torch.Generator().manual_seed(6)
        for p in (moe.htoh4_weight, moe.htoh4_bias, moe.h4toh_weight, moe.h4toh_bias):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        y, r = moe(x, 0)
    z = sum(math.exp(v) for v in logit_vals)
    p1, p3 = math.exp(2.0) / z, math.exp(1.0) / z
    assert r["topk_idx"].flatten().tolist() == [1, 3]
    assert torch.allclose(r["topk_w"].flatten(), torch.tensor([p1, p3]), atol=1e-7)

    def expert_ref(e):  # independent expert: torch Linear layers loaded with the contract's layout
        mlp = nn.Sequential(nn.Linear(D, cfg.expert_hidden), nn.GELU(), nn.Linear(cfg.expert_hidden, D))
        with torch.no_grad():
            mlp[0].weight.copy_(moe.htoh4_weight[e]); mlp[0].bias.copy_(moe.htoh4_bias[e])
            mlp[2].weight.copy_(moe.h4toh_weight[e]); mlp[2].bias.copy_(moe.h4toh_bias[e])
            return mlp(x[0, 0])

    want = p1 * expert_ref(1) + p3 * expert_ref(3)
    renorm = (p1 * expert_ref(1) + p3 * expert_ref(3)) / (p1 + p3)
    assert torch.allclose(y[0, 0], want, atol=1e-6)
    assert (y[0, 0] - renorm).abs().max() > 1e-2    # a renormalising combine would fail the check above


def test_tie_breaking_lower_expert_wins():
    cfg, moe = tiny_moe()
    D = cfg.dim
    cases = [([0.0, 3.0, 3.0, 3.0], [1, 2]), ([3.0, 0.0, 3.0, 3.0], [0, 2]),
             ([1.0, 2.0, 1.0, 1.0], [1, 0]), ([0.0, 0.0, 0.0, 0.0], [0, 1]),
             ([-1.0, 5.0, 5.0, -1.0], [1, 2]), ([0.0, 1.0, 0.0, 1.0], [1, 3])]
    x = torch.zeros(1, len(cases), D)
    with torch.no_grad():
        moe.routers[0].weight.zero_()
        for n, (logits, _) in enumerate(cases):   # token n's logits = column n of the router
            x[0, n, n] = 1.0
            moe.routers[0].weight[:, n] = torch.tensor(logits)
        y, r = moe(x, 0)
        yd, _ = moe(x, 0, dense=True)
    assert r["topk_idx"][0].tolist() == [want for _, want in cases]
    assert torch.allclose(y, yd, atol=1e-6)
    assert torch.allclose(r["topk_w"][0, 3], torch.full((2,), 0.25))  # all equal: 1/E each


def test_each_task_uses_its_own_router():
    model = make(TINY)
    x = image(TINY)
    with torch.no_grad():
        y0, y1 = model.forward_features(x, 0), model.forward_features(x, "depth")
        assert (y0 - y1).abs().max() > 1e-4           # tasks route differently
        for i in TINY.moe_blocks:
            model.blocks[i].mlp.routers[1].weight.mul_(-3.0)
        assert torch.equal(model.forward_features(x, "semseg"), y0)
        assert (model.forward_features(x, 1) - y1).abs().max() > 1e-4


def test_task_cond_gating():
    cfg = TINY.replace(gating="task_cond")
    model = make(cfg)
    moe = model.blocks[cfg.moe_blocks[0]].mlp
    assert not hasattr(moe, "routers")
    x = image(cfg, b=4)
    with torch.no_grad():
        _, a0 = model.forward_features(x, 0, return_aux=True)
        _, a1 = model.forward_features(x, 1, return_aux=True)
        r0, r1 = a0["routing"][cfg.moe_blocks[0]], a1["routing"][cfg.moe_blocks[0]]
        # logits = router([token, task_embed[t]]), checked by hand for one token
        h = a0["block_out"][cfg.moe_blocks[0] - 1]
        blk = model.blocks[cfg.moe_blocks[0]]
        h = h + blk.attn(blk.norm1(h))
        tok = blk.norm2(h)[0, 5]
        for t, r in ((0, r0), (1, r1)):
            want = moe.router.weight @ torch.cat([tok, moe.task_embed.weight[t]])
            assert torch.allclose(r["logits"][0, 5], want, atol=1e-6)
        assert (r0["logits"] - r1["logits"]).abs().max() > 1e-3
        assert not torch.equal(r0["topk_idx"], r1["topk_idx"])
        assert torch.allclose(model.forward_features(x, 0, dense_moe=True), model.forward_features(x, 0),
                              atol=1e-5)


# ---------------------------------------------------------------- state-dict contract
def contract(cfg):
    D, E, He, H, T, C, p = (cfg.dim, cfg.num_experts, cfg.expert_hidden, cfg.mlp_hidden,
                            cfg.num_tasks, cfg.in_chans, cfg.patch)
    s = {"patch_embed.proj.weight": (D, C, p, p), "patch_embed.proj.bias": (D,),
         "cls_token": (1, 1, D), "pos_embed": (1, cfg.num_tokens, D)}
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        s.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,), b + "norm2.weight": (D,),
                  b + "norm2.bias": (D,), b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
                  b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,)})
        if not cfg.is_moe(i):
            s.update({b + "mlp.fc1.weight": (H, D), b + "mlp.fc1.bias": (H,),
                      b + "mlp.fc2.weight": (D, H), b + "mlp.fc2.bias": (D,)})
            continue
        s.update({b + "mlp.htoh4_weight": (E, He, D), b + "mlp.htoh4_bias": (E, He),
                  b + "mlp.h4toh_weight": (E, D, He), b + "mlp.h4toh_bias": (E, D)})
        if cfg.gating == "multi":
            s.update({b + f"mlp.routers.{t}.weight": (E, D) for t in range(T)})
        else:
            s.update({b + "mlp.task_embed.weight": (T, cfg.task_embed_dim),
                      b + "mlp.router.weight": (E, D + cfg.task_embed_dim)})
    return s


@pytest.mark.parametrize("name", ["tiny", "edge-moe", "vit-s-nyud"])
@pytest.mark.parametrize("gating", ["multi", "task_cond"])
def test_state_dict_contract(name, gating):
    cfg = get_preset(name).replace(gating=gating)
    with torch.device("meta"):         # vit-s-nyud is large: shapes only, no memory
        model = M3ViT(cfg)
    sd = model.state_dict()
    backbone = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("heads.")}
    assert backbone == contract(cfg)
    assert {k.split(".")[1] for k in sd if k.startswith("heads.")} == set(cfg.tasks)
    for t, c in zip(cfg.tasks, cfg.task_channels):
        assert tuple(sd[f"heads.{t}.out.weight"].shape) == (c, cfg.head_channels, 1, 1)
        assert tuple(sd[f"heads.{t}.norm.weight"].shape) == (cfg.dim,)


def test_edge_moe_backbone_param_count(edge_model):
    # DESIGN.md section 5: about 17.98 M backbone parameters (both routers counted)
    assert count_params(edge_model) == 17_983_680


# ---------------------------------------------------------------- forward API, heads, errors
def test_forward_shapes_and_aux():
    model = make(TINY)
    x = image(TINY, b=2)
    with torch.no_grad():
        out = model.forward_all(x)
        tok, aux = model.forward_features(x, "depth", return_aux=True)
        assert torch.equal(model(x, 1), out["depth"])
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        t: (2, c, TINY.img_h, TINY.img_w) for t, c in zip(TINY.tasks, TINY.task_channels)}
    N1, E, k = TINY.num_tokens, TINY.num_experts, TINY.top_k
    assert tok.shape == (2, N1, TINY.dim)
    assert sorted(aux["routing"]) == list(TINY.moe_blocks)
    assert sorted(aux["block_out"]) == list(range(TINY.depth))
    assert torch.equal(aux["block_out"][TINY.depth - 1], tok)   # no final LayerNorm in the backbone
    r = aux["routing"][TINY.moe_blocks[0]]
    assert r["logits"].shape == r["probs"].shape == (2, N1, E)
    assert r["topk_idx"].shape == r["topk_w"].shape == (2, N1, k) and r["topk_idx"].dtype == torch.long
    assert torch.allclose(r["probs"].sum(-1), torch.ones(2, N1))


def test_class_token_and_pos_embed_order():
    model = make(TINY)
    with torch.no_grad():
        for blk in model.blocks:                  # identity blocks expose the embedding
            for p in blk.parameters():
                p.zero_()
        x = image(TINY)
        tok = model.forward_features(x, 0)
        patches = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=TINY.patch)
    assert torch.allclose(tok[0, 0], model.cls_token[0, 0] + model.pos_embed[0, 0])
    gh, gw = TINY.grid
    # patch (r, c) is token 1 + r*gw + c
    assert torch.allclose(tok[0, 1 + 1 * gw + 2], patches[0, :, 1, 2] + model.pos_embed[0, 1 + 1 * gw + 2],
                          atol=1e-6)


def test_bad_inputs():
    model = make(TINY)
    with pytest.raises(ValueError, match=r"expected \[B, C, H, W\] = \[B, 3, 32, 64\].*got \[1, 3, 32, 32\]"):
        model(torch.zeros(1, 3, 32, 32), 0)
    with pytest.raises(ValueError, match=r"got \[3, 32, 64\]"):
        model.forward_features(torch.zeros(3, 32, 64), 0)
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(1, 3, 32, 64, dtype=torch.long), 0)
    with pytest.raises(ConfigError, match="unknown task 'normals'"):
        model(torch.zeros(1, 3, 32, 64), "normals")
    with pytest.raises(ConfigError, match="out of range"):
        model.forward_features(torch.zeros(1, 3, 32, 64), 2)
    with pytest.raises(TypeError, match="task must be"):
        model(torch.zeros(1, 3, 32, 64), 0.5)
    with pytest.raises(ValueError, match=r"tokens expected \[B, N\+1, D\]"):
        model.heads["semseg"](torch.zeros(1, TINY.num_patches, TINY.dim))


# ---------------------------------------------------------------- init
def test_seeded_init_deterministic():
    a, b, c = (M3ViT(TINY, seed=s).state_dict() for s in (7, 7, 8))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    differ = [k for k in a if not torch.equal(a[k], c[k])]
    assert "blocks.1.mlp.htoh4_weight" in differ and "blocks.3.mlp.routers.1.weight" in differ
    assert "pos_embed" in differ and "patch_embed.proj.weight" in differ
    # init follows the documented scheme
    assert a["blocks.0.attn.qkv.bias"].abs().max() == 0 and torch.equal(a["blocks.0.norm1.weight"],
                                                                         torch.ones(TINY.dim))
    for k in ("blocks.1.mlp.htoh4_weight", "blocks.1.mlp.h4toh_weight", "blocks.3.mlp.routers.0.weight",
              "blocks.0.attn.qkv.weight", "blocks.2.mlp.fc1.weight", "pos_embed"):
        # normal(0, .02) truncated at +-2 std has std 0.0176
        assert 0.0155 < a[k].std() < 0.0195 and a[k].abs().max() <= 0.04, k
    fan_in = TINY.in_chans * TINY.patch ** 2
    assert 0.8 < a["patch_embed.proj.weight"].std() * fan_in ** 0.5 < 0.95   # lecun normal, truncated


def test_init_gives_sane_activations(edge_model):
    x = image(EDGE)
    with torch.no_grad():
        _, aux = edge_model.forward_features(x, 0, return_aux=True)
        out = edge_model(x, "semseg")
    stds = [aux["block_out"][i].std().item() for i in range(EDGE.depth)]
    assert all(torch.isfinite(v).all() for v in aux["block_out"].values())
    assert all(0.1 < s < 10 for s in stds), stds
    assert stds[-1] / stds[0] < 2          # residual stream does not blow up with depth
    assert torch.isfinite(out).all() and out.shape == (1, 19, EDGE.img_h, EDGE.img_w)
    # the routers are not degenerate: top-2 of 129 tokens spreads over several experts
    assert torch.unique(aux["routing"][1]["topk_idx"]).numel() >= 4
