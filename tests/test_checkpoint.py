"""Checkpoint import/export: our key contract, timm / M3ViT per-rank / Edge-MoE .bin formats, our file."""
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from edgemoe.model.checkpoint import (
    CheckpointError, LoadedCheckpoint, _rank_files, edge_moe_names, expected_backbone_shapes,
    export_edge_moe_bins, export_timm, fold_cls_token, import_edge_moe_bins, import_m3vit,
    import_timm, load_checkpoint, load_edge_moe_image, save_checkpoint, validate_state,
)
from edgemoe.model.config import get_preset

TINY = get_preset("tiny")                      # MoE blocks 1, 3; 4 experts; 2 tasks
DENSE = TINY.replace(moe_blocks=())


def shared_dir() -> Path:
    base = os.environ.get("EDGEMOE_SHARED")
    base = Path(base) if base else Path(__file__).resolve().parents[1].parent / "shared"
    return base / "edge-moe-cityscapes"


def rand_state(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in expected_backbone_shapes(cfg).items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == torch.float32 and torch.equal(a[k], b[k]), k


def test_expected_shapes_edge_moe_param_count():
    shapes = expected_backbone_shapes(get_preset("edge-moe"))
    # DESIGN.md: about 17.98 M backbone parameters.
    assert sum(int(np.prod(s)) for s in shapes.values()) == 17_983_680
    assert shapes["blocks.1.mlp.htoh4_weight"] == (16, 384, 192)
    assert shapes["blocks.11.mlp.routers.1.weight"] == (16, 192)
    assert shapes["pos_embed"] == (1, 129, 192) and "blocks.1.mlp.fc1.weight" not in shapes
    tc = expected_backbone_shapes(TINY.replace(gating="task_cond", task_embed_dim=8))
    assert tc["blocks.1.mlp.router.weight"] == (4, 72) and tc["blocks.1.mlp.task_embed.weight"] == (2, 8)
    assert not any(".routers." in k for k in tc)


def test_validate_state_reports_all_faults():
    sd = rand_state(TINY)
    sd["heads.semseg.x"] = torch.zeros(1)      # heads are not backbone keys: allowed
    validate_state(TINY, sd)
    del sd["cls_token"], sd["blocks.3.mlp.h4toh_bias"]
    sd["blocks.0.attn.proj.weight"] = torch.zeros(64, 65)
    sd["norm.weight"] = torch.zeros(64)
    with pytest.raises(CheckpointError) as e:
        validate_state(TINY, sd, "x.pth")
    msg = str(e.value)
    assert e.value.missing == ["cls_token", "blocks.3.mlp.h4toh_bias"]
    assert "x.pth" in msg and "blocks.0.attn.proj.weight: expected shape (64, 64), got shape (64, 65)" in msg
    assert "unexpected backbone key(s): norm.weight" in msg


# ---------------------------------------------------------------------------------------------- timm

def write_timm(tmp_path, sd, name="vit.pth"):
    d = dict(sd)
    d["norm.weight"], d["norm.bias"] = torch.ones(64), torch.zeros(64)    # timm's final norm
    d["head.weight"], d["head.bias"] = torch.zeros(10, 64), torch.zeros(10)
    torch.save(d, tmp_path / name)
    return tmp_path / name


def test_timm_dense_loads_identical(tmp_path):
    sd = rand_state(DENSE)
    ck = import_timm(DENSE, write_timm(tmp_path, sd))
    assert isinstance(ck, LoadedCheckpoint) and ck.filled == []
    assert_same(ck.state_dict, sd)
    ignored = {s.split(":")[0] for s in ck.ignored}
    assert ignored == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    # Wrapped in {"model": ...} with DDP's module. prefix: same result.
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, tmp_path / "w.pth")
    assert_same(import_timm(DENSE, tmp_path / "w.pth").state_dict, sd)


def test_timm_wrong_shape_names_key_and_shapes(tmp_path):
    sd = rand_state(DENSE)
    sd["blocks.2.attn.qkv.weight"] = torch.zeros(192, 65)
    with pytest.raises(CheckpointError,
                       match=r"blocks\.2\.attn\.qkv\.weight: expected shape \(192, 64\), got shape \(192, 65\)"):
        import_timm(DENSE, write_timm(tmp_path, sd))


def test_timm_missing_keys_all_listed(tmp_path):
    sd = rand_state(DENSE)
    del sd["blocks.1.mlp.fc2.bias"], sd["pos_embed"]
    with pytest.raises(CheckpointError) as e:
        import_timm(DENSE, write_timm(tmp_path, sd))
    assert e.value.missing == ["pos_embed", "blocks.1.mlp.fc2.bias"]
    assert "blocks.1.mlp.fc2.bias" in str(e.value) and "pos_embed" in str(e.value)


def test_timm_unknown_key_needs_allow_extra(tmp_path):
    sd = rand_state(DENSE)
    sd["blocks.9.attn.qkv.weight"] = torch.zeros(3)  # block beyond depth 4
    path = write_timm(tmp_path, sd)
    with pytest.raises(CheckpointError, match=r"allow_extra=True to ignore them\): blocks\.9\.attn\.qkv\.weight \(3,\)"):
        import_timm(DENSE, path)
    ck = import_timm(DENSE, path, allow_extra=True)
    assert any(s.startswith("blocks.9.attn.qkv.weight") for s in ck.ignored)


def test_timm_into_moe_config_lists_experts_and_routers(tmp_path):
    dense = rand_state(DENSE)                   # a plain ViT: dense MLP in every block
    path = write_timm(tmp_path, dense)
    with pytest.raises(CheckpointError) as e:
        import_timm(TINY, path)
    moe_keys = [k for k in expected_backbone_shapes(TINY) if k not in dense]
    assert e.value.missing == moe_keys and len(moe_keys) == 2 * (4 + 2)
    ck = import_timm(TINY, path, fill_missing="random", seed=3)
    assert ck.filled == moe_keys
    assert "blocks.1.mlp.fc1.weight" in {s.split(":")[0] for s in ck.ignored}
    assert torch.equal(ck.state_dict["blocks.1.attn.qkv.weight"], dense["blocks.1.attn.qkv.weight"])


def test_export_timm_round_trip(tmp_path):
    sd = rand_state(DENSE, 1)
    assert_same(import_timm(DENSE, export_timm(DENSE, sd, tmp_path / "d.pth")).state_dict, sd)
    moe = rand_state(TINY, 2)
    with pytest.raises(CheckpointError, match="MoE blocks"):
        export_timm(TINY, moe, tmp_path / "m.pth")
    back = import_timm(TINY, export_timm(TINY, moe, tmp_path / "m.pth", include_moe=True))
    assert_same(back.state_dict, moe) and back.filled == [] and back.ignored == []


def test_missing_file_and_foreign_object(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        import_timm(DENSE, tmp_path / "nope.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a dict of tensors"):
        import_timm(DENSE, tmp_path / "list.pth")


# ---------------------------------------------------------------------------------------------- M3ViT

def write_m3vit_ranks(folder, sd, cfg, ranks=2):
    """FastMoE layout: rank 0 has everything, other ranks only their expert slices."""
    folder.mkdir()
    E = cfg.num_experts
    el = E // ranks
    files = [dict() for _ in range(ranks)]
    for k, v in sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.mlp\.(htoh4|h4toh)_(weight|bias)", k)
        r = re.fullmatch(r"blocks\.(\d+)\.mlp\.routers\.(\d+)\.weight", k)
        if m:
            name = f"module.backbone.blocks.{m[1]}.mlp.experts.{m[2]}.{m[3]}"
            for rank in range(ranks):
                files[rank][name] = v[rank * el:(rank + 1) * el].clone()
        elif r:
            files[0][f"module.backbone.blocks.{r[1]}.mlp.gate.{r[2]}.w_gate"] = v.t().contiguous()
            files[0][f"module.backbone.blocks.{r[1]}.mlp.gate.{r[2]}.w_noise"] = torch.zeros(64, E)
        else:
            files[0]["module.backbone." + k] = v
    files[0]["module.decoders.semseg.conv.weight"] = torch.zeros(19, 64, 1, 1)
    for rank, st in enumerate(files):
        torch.save({"epoch": 7, "backbone": "VisionTransformer_moe", "state_dict": st}, folder / f"{rank}.pth")
    return files


def test_m3vit_rank_folder_stacks_experts(tmp_path):
    sd = rand_state(TINY, 4)
    files = write_m3vit_ranks(tmp_path / "ckpt", sd, TINY)
    ck = import_m3vit(TINY, tmp_path / "ckpt")
    assert_same(ck.state_dict, sd)
    assert ck.filled == []
    E2 = TINY.num_experts // 2
    # Expert j of rank 1 is global expert E/2 + j.
    for j in range(E2):
        got = ck.state_dict["blocks.3.mlp.h4toh_weight"][E2 + j]
        assert torch.equal(got, files[1]["module.backbone.blocks.3.mlp.experts.h4toh.weight"][j])
    for t in range(TINY.num_tasks):
        w_gate = files[0][f"module.backbone.blocks.1.mlp.gate.{t}.w_gate"]
        assert torch.equal(ck.state_dict[f"blocks.1.mlp.routers.{t}.weight"], w_gate.t())
    assert not torch.equal(ck.state_dict["blocks.1.mlp.routers.0.weight"],
                           ck.state_dict["blocks.1.mlp.routers.1.weight"])
    ignored = " ".join(ck.ignored)
    assert "decoders.semseg.conv.weight" in ignored and "blocks.1.mlp.gate.0.w_noise" in ignored


def test_m3vit_rank_disagreement_and_missing_slice(tmp_path):
    sd = rand_state(TINY, 5)
    write_m3vit_ranks(tmp_path / "a", sd, TINY)
    st = torch.load(tmp_path / "a" / "1.pth")
    st["state_dict"]["module.backbone.blocks.0.norm1.weight"] = sd["blocks.0.norm1.weight"] + 1
    torch.save(st, tmp_path / "a" / "1.pth")
    with pytest.raises(CheckpointError, match=r"1\.pth: tensor blocks\.0\.norm1\.weight differs"):
        import_m3vit(TINY, tmp_path / "a")
    write_m3vit_ranks(tmp_path / "b", sd, TINY)
    st = torch.load(tmp_path / "b" / "1.pth")
    del st["state_dict"]["module.backbone.blocks.1.mlp.experts.htoh4.weight"]
    torch.save(st, tmp_path / "b" / "1.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mlp\.htoh4_weight found in rank files \[0\]"):
        import_m3vit(TINY, tmp_path / "b")


def test_rank_files_sorted_numerically(tmp_path):
    for r in range(12):
        (tmp_path / f"{r}.pth").write_bytes(b"")
    assert [p.name for p in _rank_files(tmp_path)] == [f"{r}.pth" for r in range(12)]
    (tmp_path / "3.pth").unlink()
    with pytest.raises(CheckpointError, match="numbered 0..10"):
        _rank_files(tmp_path)


# ---------------------------------------------------------------------------------------------- Edge-MoE bins

def test_edge_moe_bin_round_trip(tmp_path):
    sd = rand_state(TINY, 6)
    sd["cls_token"].zero_()                    # the format folds the class token into pos_embed
    export_edge_moe_bins(TINY, sd, tmp_path / "w")
    back = import_edge_moe_bins(TINY, tmp_path / "w")
    assert_same(back.state_dict, sd) and back.filled == [] and back.ignored == []
    raw = np.fromfile(tmp_path / "w" / "l3_htoh4_weight.float32.bin", dtype="<f4")
    assert np.array_equal(raw, sd["blocks.3.mlp.htoh4_weight"].numpy().ravel())
    # A non-zero class token: written folded into row 0, read back as the equivalent folded state.
    sd2 = rand_state(TINY, 7)
    export_edge_moe_bins(TINY, sd2, tmp_path / "w2")
    pos = np.fromfile(tmp_path / "w2" / "pos_embed.float32.bin", dtype="<f4").reshape(9, 64)
    assert np.array_equal(pos[0], (sd2["pos_embed"][0, 0] + sd2["cls_token"][0, 0]).numpy())
    assert_same(import_edge_moe_bins(TINY, tmp_path / "w2").state_dict, fold_cls_token(sd2))


def test_edge_moe_bin_wrong_size(tmp_path):
    export_edge_moe_bins(TINY, rand_state(TINY), tmp_path)
    p = tmp_path / "l2_fc1_weight.float32.bin"
    p.write_bytes(p.read_bytes()[:-4])
    with pytest.raises(CheckpointError,
                       match=r"l2_fc1_weight\.float32\.bin: expected 16384 float32 elements .* got 65532 bytes \(16383 elements\)"):
        import_edge_moe_bins(TINY, tmp_path)


def test_edge_moe_missing_experts_error_and_seeded_fill(tmp_path):
    sd = rand_state(TINY, 8)
    sd["cls_token"].zero_()
    export_edge_moe_bins(TINY, sd, tmp_path)
    gone = [f"l{i}_{w}_weight" for i in (1, 3) for w in ("htoh4", "h4toh")]
    for stem in gone:
        (tmp_path / f"{stem}.float32.bin").unlink()
    (tmp_path / "l3_x_post_moe.float32.bin").write_bytes(b"\0" * 8)   # a reference activation
    with pytest.raises(CheckpointError) as e:
        import_edge_moe_bins(TINY, tmp_path)
    assert sorted(e.value.missing) == sorted(gone)
    assert "l1_htoh4_weight (-> blocks.1.mlp.htoh4_weight) expected shape (4, 128, 64)" in str(e.value)
    a = import_edge_moe_bins(TINY, tmp_path, fill_missing="random", seed=1)
    b = import_edge_moe_bins(TINY, tmp_path, fill_missing="random", seed=1)
    c = import_edge_moe_bins(TINY, tmp_path, fill_missing="random", seed=2)
    names = {v: k for k, v in edge_moe_names(TINY).items()}
    assert sorted(a.filled) == sorted(names[s] for s in gone)
    assert_same(a.state_dict, b.state_dict)
    for k in a.filled:
        t = a.state_dict[k]
        assert not torch.equal(t, c.state_dict[k])
        assert t.abs().max() <= 0.04 and 0.01 < t.std() < 0.03   # trunc normal std .02
    for k in sd:
        if k not in a.filled:
            assert torch.equal(a.state_dict[k], sd[k]), k
    assert [s.split(":")[0] for s in a.ignored] == ["l3_x_post_moe.float32.bin"]


def test_real_edge_moe_weights():
    folder = shared_dir()
    if not folder.is_dir():
        pytest.skip(f"shared Edge-MoE weights not found at {folder} (set EDGEMOE_SHARED)")
    cfg = get_preset("edge-moe")
    with pytest.raises(CheckpointError) as e:
        import_edge_moe_bins(cfg, folder)
    expect = sorted(f"l{i}_{w}_weight" for i in (1, 3, 5, 7, 9, 11) for w in ("htoh4", "h4toh"))
    assert sorted(e.value.missing) == expect
    ck = import_edge_moe_bins(cfg, folder, fill_missing="random", seed=0)
    validate_state(cfg, ck.state_dict)
    assert len(ck.filled) == 12 and all(re.fullmatch(r"blocks\.\d+\.mlp\.h(toh4|4toh)_weight", k)
                                        for k in ck.filled)
    raw = np.fromfile(folder / "l0_qkv_weight.float32.bin", dtype="<f4").reshape(576, 192)
    assert np.array_equal(ck.state_dict["blocks.0.attn.qkv.weight"].numpy(), raw)
    assert not ck.state_dict["cls_token"].any()
    img = load_edge_moe_image(folder)
    assert img.shape == (3, 128, 256) and img.dtype == np.float32
    assert 0 <= img.min() and img.max() < 1


def test_edge_moe_image_missing(tmp_path):
    with pytest.raises(CheckpointError, match="image.float32.bin"):
        load_edge_moe_image(tmp_path)


# ---------------------------------------------------------------------------------------------- our format

def test_project_checkpoint_round_trip_and_foreign_file(tmp_path):
    cfg = TINY.replace(gating="task_cond", task_embed_dim=8)
    sd = rand_state(cfg, 9)
    sd["heads.depth.out.weight"] = torch.randn(1, 32, 1, 1)
    meta = {"filled": ["blocks.1.mlp.htoh4_weight"], "epochs": 3}
    save_checkpoint(tmp_path / "m.pt", cfg, sd, meta)
    cfg2, sd2, meta2 = load_checkpoint(tmp_path / "m.pt")
    assert cfg2 == cfg and isinstance(cfg2.moe_blocks, tuple) and isinstance(cfg2.tasks, tuple)
    assert_same(sd2, sd) and meta2 == meta
    torch.save(rand_state(DENSE), tmp_path / "timm.pth")
    with pytest.raises(CheckpointError, match=r"not an edgemoe checkpoint \(format None"):
        load_checkpoint(tmp_path / "timm.pth")
    torch.save({"format": "edgemoe-ckpt-v0"}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="format 'edgemoe-ckpt-v0'"):
        load_checkpoint(tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="missing"):
        save_checkpoint(tmp_path / "bad.pt", TINY, rand_state(DENSE))


# ---------------------------------------------------------------------------------------------- with the network

def test_load_model_integration(tmp_path):
    if not (Path(__file__).resolve().parents[1] / "model" / "m3vit.py").is_file():
        pytest.skip("model/m3vit.py (M3ViT network) does not exist yet")
    from edgemoe.model.checkpoint import load_model

    sd = rand_state(TINY, 10)
    sd["cls_token"].zero_()
    export_edge_moe_bins(TINY, sd, tmp_path)
    (tmp_path / "l1_htoh4_weight.float32.bin").unlink()
    model = load_model(TINY, tmp_path, "edge-moe-bin", fill_missing="random", seed=0)
    got = model.state_dict()
    validate_state(TINY, got)   # the network follows the key contract
    for k in sd:
        if k != "blocks.1.mlp.htoh4_weight":
            assert torch.equal(got[k], sd[k]), k
    assert "blocks.1.mlp.htoh4_weight" in model.filled_random
    assert model.random_heads and all(k.startswith("heads.") for k in model.random_heads)
    assert set(model.filled_random) == {"blocks.1.mlp.htoh4_weight", *model.random_heads}
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, TINY.img_h, TINY.img_w), 0)
    assert out.shape == (1, 19, TINY.img_h, TINY.img_w) and torch.isfinite(out).all()
    # Heads keep a seeded init: the same seed gives the same heads.
    again = load_model(TINY, tmp_path, "edge-moe-bin", fill_missing="random", seed=0).state_dict()
    for k in model.random_heads:
        assert torch.equal(again[k], got[k]), k


def test_project_checkpoint_backbone_ignores_head_fields():
    """The shipped tiny checkpoint (heads trained on 7 classes) loads as a tiny backbone; a
    checkpoint whose backbone differs is refused naming the field."""
    import dataclasses
    from edgemoe.model.checkpoint import CheckpointError, load_backbone
    ck = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny.pt"
    cfg = get_preset("tiny")
    assert cfg.task_channels != (7, 1)
    got = load_backbone(cfg, ck, "edgemoe-ckpt")
    assert "blocks.0.attn.qkv.weight" in got.state_dict
    with pytest.raises(CheckpointError, match=r"backbone fields differ: \['mlp_hidden'\]"):
        load_backbone(dataclasses.replace(cfg, mlp_hidden=128), ck, "edgemoe-ckpt")
