"""Checkpoint import/export for the M3ViT backbone: our key contract, three foreign formats, our own file.

Our backbone state-dict keys (`expected_backbone_shapes` is the single source of truth):
patch_embed.proj.*, cls_token, pos_embed, blocks.{i}.norm1/attn.qkv/attn.proj/norm2.*, then per block
either a dense MLP (mlp.fc1/fc2.*) or an MoE MLP (mlp.htoh4_weight [E,He,D], mlp.htoh4_bias [E,He],
mlp.h4toh_weight [E,D,He], mlp.h4toh_bias [E,D], and mlp.routers.{t}.weight [E,D] for gating "multi" or
mlp.task_embed.weight [T,te] + mlp.router.weight [E,D+te] for "task_cond"). Task heads live under
`heads.{task}.` and are not part of any foreign format. No final norm.

Foreign formats
---------------
(a) timm `VisionTransformer` (`import_timm` / `export_timm`): a single .pth/.pt/.bin (torch.load with
    weights_only=True) or .safetensors (only if the optional `safetensors` package is installed). The
    dense names are identical to ours. timm's final `norm.*` and classifier (`head.*`, `fc_norm.*`,
    `pre_logits.*`) have no place in our backbone: they are always dropped and listed in
    `LoadedCheckpoint.ignored`. Any other key we do not know is an error unless allow_extra=True.
    MoE blocks: timm has a dense MLP there (dropped, listed in `ignored`); the experts and routers are
    missing, so the import fails and lists them unless fill_missing="random".
    Export: timm cannot represent MoE blocks, so `export_timm` refuses an MoE config unless
    include_moe=True, in which case the MoE tensors are written under OUR key names (a timm model
    loaded with strict=False reports them as unexpected; `import_timm` takes them back). The exported
    file has no `norm.*` / `head.*` (we have none).

(b) M3ViT training checkpoint (`import_m3vit`), from the public VITA-Group/M3ViT code:
    - utils/moe_utils.py `save_moe_model_to_dir`: a FOLDER with one `{rank}.pth` per rank, each a dict
      {"epoch", "backbone", "state_dict", "best_result", "optimizer"}; ranks != 0 keep only the expert
      tensors (`filter_state` keeps keys containing "mlp.experts.htoh4" / "mlp.experts.h4toh");
      rank 0 holds everything. train_fastmoe.py merges ranks by torch.cat along dim 0 in rank order,
      and `read_specific_group_experts` slices [rank*E_local, (rank+1)*E_local): rank r holds the
      global experts [r*E/R, (r+1)*E/R).
    - The model is wrapped by fmoe.DistributedGroupedDataParallel (prefix `module.`) around
      models/models.py MultiTaskModel (`backbone.`, `decoders.{task}.`, optional `tam_model*`).
    - models/vision_transformer_moe.py: VisionTransformerMoE has patch_embed.proj, cls_token,
      pos_embed, blocks.{i} with norm1, attn.qkv (bias), attn.proj, norm2, dense `mlp.fc1/fc2`, and no
      final norm. MoE blocks use models/custom_moe_layer.py FMoETransformerMLP: `mlp.experts` is an
      `_Expert` with two fmoe FMoELinear, `htoh4` and `h4toh`, whose `weight` is
      [num_expert_local, out_feat, in_feat] and `bias` [num_expert_local, out_feat] (fmoe/linear.py),
      i.e. htoh4.weight [E_local, He, D], h4toh.weight [E_local, D, He].
    - With multi_gate, `mlp.gate` is an nn.ModuleList with one gate per task; NoisyGate_VMoE /
      NoisyGate (models/gate_funs/) hold `w_gate` [d_model, tot_expert] (all experts, every rank), used
      as logits = x @ w_gate, so our router weight is w_gate.T. NoisyGate also has `w_noise`, and
      `w_gate_aux`/`w_noise_aux` exist with return_decoupled_activation: training-only, ignored.
    Assumptions (not confirmed by a real checkpoint file, which we do not have): rank files are the
    *.pth / *.pt files of the folder, ordered by the last integer in their name, ranks exactly 0..R-1;
    a checkpoint without the `backbone.` prefix is a bare backbone; non-expert tensors are taken from
    the lowest rank holding them (rank 0 in FastMoE's layout) and any copy in another rank file must
    be bit-identical, else the import fails. Only gating "multi" is importable: M3ViT's
    task-conditioned gate (`backbone.gate_task_represent` MLP + one wider gate) differs from our
    "task_cond" router. Decoder tensors are listed in `ignored` (our heads keep their init).
    Unknown backbone keys are an error unless allow_extra=True.

(c) Edge-MoE weight folder (`import_edge_moe_bins` / `export_edge_moe_bins`, sharc-lab/Edge-MoE
    `weights/`, see testbench/e2e.cpp and weights/scripts/prepare_for_onboard.py): one raw
    little-endian float32 file per tensor, no header, C order, `{name}.float32.bin`, names listed in
    `edge_moe_names`. `pos_embed` is [N+1, D] with the class token folded into row 0, so the import
    sets cls_token = 0 and pos_embed = file; the export writes pos_embed[0] + cls_token into row 0
    (`fold_cls_token` gives the equivalent state with cls_token = 0). `l{i}_w_gate_T_task{t}` [E, D]
    is our routers.{t}.weight. Every file's size must match its expected shape exactly.

Missing tensors: every importer fails with a `CheckpointError` listing every missing tensor (in the
format's own names; `err.missing` holds the list) unless fill_missing="random", which fills them with
seeded random weights (trunc normal std 0.02 cut at +-2 std, biases 0, LayerNorm weights 1; each
tensor's stream depends only on (seed, key)) and lists them in `LoadedCheckpoint.filled`: every output
built from such a model must say so.

Our own format (`save_checkpoint` / `load_checkpoint`): a torch.save'd dict
{"format": "edgemoe-ckpt-v1", "config": dataclasses.asdict(cfg), "state_dict": ..., "meta": {...}}.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig

FORMAT = "edgemoe-ckpt-v1"
KINDS = ("timm", "m3vit", "edge-moe-bin", "edgemoe-ckpt")


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: missing / mis-shaped / unknown tensors, or a bad file."""

    def __init__(self, msg: str, missing: list[str] | None = None):
        super().__init__(msg)
        self.missing = list(missing or [])


@dataclass
class LoadedCheckpoint:
    state_dict: dict[str, torch.Tensor]   # our backbone keys, float32 (edgemoe-ckpt: heads too)
    filled: list[str] = field(default_factory=list)    # our keys filled with seeded random weights
    source: str = ""
    ignored: list[str] = field(default_factory=list)   # "key: reason" for every tensor not imported


# ----------------------------------------------------------------------------------------------
# The contract

def expected_backbone_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    D, H, E, He = cfg.dim, cfg.mlp_hidden, cfg.num_experts, cfg.expert_hidden
    s: dict[str, tuple[int, ...]] = {
        "patch_embed.proj.weight": (D, cfg.in_chans, cfg.patch, cfg.patch),
        "patch_embed.proj.bias": (D,),
        "cls_token": (1, 1, D),
        "pos_embed": (1, cfg.num_tokens, D),
    }
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        s[b + "norm1.weight"] = s[b + "norm1.bias"] = (D,)
        s[b + "attn.qkv.weight"] = (3 * D, D)
        s[b + "attn.qkv.bias"] = (3 * D,)
        s[b + "attn.proj.weight"] = (D, D)
        s[b + "attn.proj.bias"] = (D,)
        s[b + "norm2.weight"] = s[b + "norm2.bias"] = (D,)
        if cfg.is_moe(i):
            s[b + "mlp.htoh4_weight"] = (E, He, D)
            s[b + "mlp.htoh4_bias"] = (E, He)
            s[b + "mlp.h4toh_weight"] = (E, D, He)
            s[b + "mlp.h4toh_bias"] = (E, D)
            if cfg.gating == "multi":
                for t in range(cfg.num_tasks):
                    s[b + f"mlp.routers.{t}.weight"] = (E, D)
            else:
                s[b + "mlp.task_embed.weight"] = (cfg.num_tasks, cfg.task_embed_dim)
                s[b + "mlp.router.weight"] = (E, D + cfg.task_embed_dim)
        else:
            s[b + "mlp.fc1.weight"] = (H, D)
            s[b + "mlp.fc1.bias"] = (H,)
            s[b + "mlp.fc2.weight"] = (D, H)
            s[b + "mlp.fc2.bias"] = (D,)
    return s


def validate_state(cfg: ModelConfig, sd: dict, source: str = "", names: dict[str, str] | None = None):
    """Every backbone key present with its shape, no unknown non-head key; one error lists all faults.
    `names` maps our keys to a foreign format's names, used when listing missing tensors."""
    exp = expected_backbone_shapes(cfg)
    names = names or {}
    missing = [k for k in exp if k not in sd]
    wrong = [(k, exp[k], tuple(getattr(sd[k], "shape", ()))) for k in exp
             if k in sd and tuple(getattr(sd[k], "shape", ())) != exp[k]]
    unexpected = [k for k in sd if k not in exp and not k.startswith("heads.")]
    if not (missing or wrong or unexpected):
        return
    where = f"checkpoint {source}" if source else "state dict"
    lines = [f"{where} does not fit model '{cfg.name}':"]
    if missing:
        lines.append(f"{len(missing)} missing tensor(s) (importers fill them only with "
                     f"fill_missing='random'):")
        lines += [f"  {names.get(k, k)}" + (f" (-> {k})" if k in names and names[k] != k else "")
                  + f" expected shape {exp[k]}" for k in missing]
    if wrong:
        lines.append(f"{len(wrong)} tensor(s) with the wrong shape:")
        lines += [f"  {k}: expected shape {e}, got shape {g}" for k, e, g in wrong]
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected backbone key(s): " + ", ".join(unexpected))
    raise CheckpointError("\n".join(lines), missing=[names.get(k, k) for k in missing])


def _key_seed(seed: int, key: str) -> int:
    # Each filled tensor depends on (seed, key) only, not on which other tensors were missing.
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1


def random_tensor(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    t = torch.zeros(shape)
    if key.endswith("bias"):
        return t
    if re.search(r"\.norm\d\.weight$", key):
        return t.fill_(1.0)
    g = torch.Generator().manual_seed(_key_seed(seed, key))
    return torch.nn.init.trunc_normal_(t, std=0.02, a=-0.04, b=0.04, generator=g)


def _finish(cfg, sd, source, ignored, fill_missing, seed, names=None) -> LoadedCheckpoint:
    filled = []
    if fill_missing is not None:
        if fill_missing != "random":
            raise ValueError(f"fill_missing={fill_missing!r}: only None or 'random' are supported")
        for k, shape in expected_backbone_shapes(cfg).items():
            if k not in sd:
                sd[k] = random_tensor(k, shape, seed)
                filled.append(k)
    validate_state(cfg, sd, source, names)
    return LoadedCheckpoint(sd, filled, source, ignored)


def _f32(v) -> torch.Tensor:
    return v.detach().to("cpu", torch.float32).contiguous().clone()


# ----------------------------------------------------------------------------------------------
# File helpers

def _load_tensor_file(path, trusted: bool = False) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise CheckpointError(f"{path}: reading .safetensors needs the optional package "
                                  f"'safetensors' (pip install safetensors)") from e
        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as e:  # the unpickler raises several types; all mean the same to the user
        hint = "" if trusted else (" (it may hold Python objects that weights_only=True refuses; "
                                   "pass trusted=True only for a file you trust)")
        raise CheckpointError(f"{path}: cannot be read by torch.load{hint}: {e}") from e


def _unwrap(obj, path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensor dict inside a checkpoint ({'state_dict': ...} / {'model': ...} / bare)."""
    if isinstance(obj, dict):
        for k in ("state_dict", "model"):
            if isinstance(obj.get(k), dict):
                obj = obj[k]
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    sd = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    ignored = [f"{k}: not a tensor" for k in obj if k not in sd]
    return sd, ignored


# ----------------------------------------------------------------------------------------------
# (a) timm VisionTransformer

_TIMM_DROPPED = ("norm.", "fc_norm.", "head.", "head_dist.", "pre_logits.")


def import_timm(cfg: ModelConfig, path, fill_missing: str | None = None, seed: int = 0,
                allow_extra: bool = False, trusted: bool = False) -> LoadedCheckpoint:
    raw, ignored = _unwrap(_load_tensor_file(path, trusted), path)
    if raw and all(k.startswith("module.") for k in raw):
        raw = {k[len("module."):]: v for k, v in raw.items()}
    exp = expected_backbone_shapes(cfg)
    sd, unknown = {}, []
    for k, v in raw.items():
        m = re.fullmatch(r"blocks\.(\d+)\.mlp\.fc[12]\.(weight|bias)", k)
        if k in exp:
            sd[k] = _f32(v)
        elif k.startswith(_TIMM_DROPPED):
            ignored.append(f"{k}: timm's final norm / classifier, no place in the edgemoe backbone")
        elif m and cfg.is_moe(int(m.group(1))):
            ignored.append(f"{k}: dense MLP of block {m.group(1)}, an MoE block in '{cfg.name}' "
                           f"(timm checkpoints have no experts or routers)")
        else:
            unknown.append(k)
    if unknown and not allow_extra:
        raise CheckpointError(f"{path}: {len(unknown)} key(s) with no place in model '{cfg.name}' "
                              f"(pass allow_extra=True to ignore them): "
                              + ", ".join(f"{k} {tuple(raw[k].shape)}" for k in unknown))
    ignored += [f"{k}: unknown key, ignored (allow_extra)" for k in unknown]
    return _finish(cfg, sd, str(path), ignored, fill_missing, seed)


def export_timm(cfg: ModelConfig, sd: dict, path, include_moe: bool = False) -> Path:
    """Write the backbone in timm's layout (no final norm, no head). See the module docstring for MoE."""
    validate_state(cfg, sd)
    if cfg.moe_blocks and not include_moe:
        raise CheckpointError(f"model '{cfg.name}' has MoE blocks {cfg.moe_blocks}, which timm's "
                              f"VisionTransformer cannot represent; pass include_moe=True to write "
                              f"them under edgemoe's own key names")
    out = {k: _f32(sd[k]) for k in expected_backbone_shapes(cfg)}
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError as e:
            raise CheckpointError(f"{path}: writing .safetensors needs the optional package "
                                  f"'safetensors'") from e
        save_file(out, str(path))
    else:
        torch.save(out, path)
    return path


# ----------------------------------------------------------------------------------------------
# (b) M3ViT per-rank training checkpoint folder

def _rank_files(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"M3ViT checkpoint folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix in (".pth", ".pt") and p.is_file())
    if not files:
        raise CheckpointError(f"{folder}: no per-rank .pth/.pt files")
    ranks = {}
    for p in files:
        nums = re.findall(r"\d+", p.stem)
        if not nums:
            raise CheckpointError(f"{p}: cannot tell its rank (no number in the file name)")
        r = int(nums[-1])
        if r in ranks:
            raise CheckpointError(f"{folder}: rank {r} appears twice ({ranks[r].name}, {p.name})")
        ranks[r] = p
    if sorted(ranks) != list(range(len(ranks))):
        raise CheckpointError(f"{folder}: rank files must be numbered 0..{len(ranks) - 1}, "
                              f"found ranks {sorted(ranks)}")
    return [ranks[r] for r in range(len(ranks))]


def import_m3vit(cfg: ModelConfig, folder, fill_missing: str | None = None, seed: int = 0,
                 allow_extra: bool = False, trusted: bool = False) -> LoadedCheckpoint:
    if cfg.gating != "multi":
        raise CheckpointError(f"model '{cfg.name}': gating={cfg.gating!r}; only gating='multi' "
                              f"(one gate per task) can be imported from an M3ViT checkpoint")
    exp = expected_backbone_shapes(cfg)
    files = _rank_files(folder)
    sd, origin, ignored, unknown = {}, {}, [], []
    experts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for rank, path in enumerate(files):
        raw, ign = _unwrap(_load_tensor_file(path, trusted), path)
        ignored += [f"{path.name}: {s}" for s in ign]
        keys = [k[len("module."):] if k.startswith("module.") else k for k in raw]
        has_backbone = any(k.startswith("backbone.") for k in keys)
        for k, v in zip(keys, raw.values()):
            if has_backbone and not k.startswith("backbone."):
                ignored.append(f"{k}: not part of the backbone (M3ViT decoder); heads keep their init")
                continue
            k = k[len("backbone."):] if has_backbone else k
            m_exp = re.fullmatch(r"blocks\.(\d+)\.mlp\.experts\.(htoh4|h4toh)\.(weight|bias)", k)
            m_gate = re.fullmatch(r"blocks\.(\d+)\.mlp\.gate\.(\d+)\.w_gate", k)
            if m_exp:
                ours = f"blocks.{m_exp.group(1)}.mlp.{m_exp.group(2)}_{m_exp.group(3)}"
                experts.setdefault(ours, []).append((rank, _f32(v)))
                continue
            if m_gate:
                ours, v = f"blocks.{m_gate.group(1)}.mlp.routers.{m_gate.group(2)}.weight", v.t()
            elif re.fullmatch(r"blocks\.\d+\.mlp\.gate\.(\d+\.)?(w_noise|w_gate_aux|w_noise_aux)", k):
                ignored.append(f"{k}: training-time gate noise / auxiliary gate, unused at inference")
                continue
            elif re.fullmatch(r"blocks\.\d+\.mlp\.gate\.w_gate", k):
                ignored.append(f"{k}: single shared gate (trained without multi_gate); "
                               f"gating='multi' needs one router per task")
                continue
            elif k in exp:
                ours = k
            else:
                unknown.append(f"{path.name}: {k} {tuple(v.shape)}")
                continue
            if ours in sd:  # a copy in a later rank file: must agree with the first one
                if sd[ours].shape != v.shape or not torch.equal(sd[ours], _f32(v)):
                    raise CheckpointError(f"{path}: tensor {k} differs from its copy in "
                                          f"{origin[ours]} (non-expert tensors must agree across ranks)")
            else:
                sd[ours], origin[ours] = _f32(v), path.name
    if unknown and not allow_extra:
        raise CheckpointError(f"{folder}: {len(unknown)} backbone key(s) with no place in model "
                              f"'{cfg.name}' (pass allow_extra=True to ignore them): " + ", ".join(unknown))
    ignored += [f"{k}: unknown key, ignored (allow_extra)" for k in unknown]
    for ours, parts in experts.items():
        ranks = [r for r, _ in parts]
        if ranks != list(range(len(files))):
            raise CheckpointError(f"{folder}: expert tensor {ours} found in rank files {ranks}, "
                                  f"expected one slice in each of ranks 0..{len(files) - 1}")
        sizes = {t.shape[0] for _, t in parts}
        if len(sizes) != 1:
            raise CheckpointError(f"{folder}: expert tensor {ours}: ranks hold unequal expert "
                                  f"counts {[t.shape[0] for _, t in parts]}")
        sd[ours] = torch.cat([t for _, t in parts], dim=0)  # rank r -> experts [r*E/R, (r+1)*E/R)
    return _finish(cfg, sd, str(folder), ignored, fill_missing, seed)


# ----------------------------------------------------------------------------------------------
# (c) Edge-MoE folder of raw float32 .bin files

BIN_SUFFIX = ".float32.bin"


def edge_moe_names(cfg: ModelConfig) -> dict[str, str]:
    """Our key -> Edge-MoE file stem (file = stem + '.float32.bin'). cls_token has no file."""
    if cfg.gating != "multi":
        raise CheckpointError(f"model '{cfg.name}': gating={cfg.gating!r}; the Edge-MoE weight "
                              f"format only has per-task routers (gating='multi')")
    n = {"patch_embed.proj.weight": "patch_embed_weight", "patch_embed.proj.bias": "patch_embed_bias",
         "pos_embed": "pos_embed"}
    for i in range(cfg.depth):
        b, l = f"blocks.{i}.", f"l{i}_"
        for wb in ("weight", "bias"):
            n[b + f"norm1.{wb}"] = l + f"norm1_{wb}"
            n[b + f"attn.qkv.{wb}"] = l + f"qkv_{wb}"
            n[b + f"attn.proj.{wb}"] = l + f"attn_proj_{wb}"
            n[b + f"norm2.{wb}"] = l + f"norm2_{wb}"
            if cfg.is_moe(i):
                n[b + f"mlp.htoh4_{wb}"] = l + f"htoh4_{wb}"
                n[b + f"mlp.h4toh_{wb}"] = l + f"h4toh_{wb}"
            else:
                n[b + f"mlp.fc1.{wb}"] = l + f"fc1_{wb}"
                n[b + f"mlp.fc2.{wb}"] = l + f"fc2_{wb}"
        if cfg.is_moe(i):
            for t in range(cfg.num_tasks):
                n[b + f"mlp.routers.{t}.weight"] = l + f"w_gate_T_task{t}"
    return n


def read_f32_bin(path, shape: tuple[int, ...]) -> np.ndarray:
    path = Path(path)
    count = int(np.prod(shape))
    size = path.stat().st_size
    if size != 4 * count:
        raise CheckpointError(f"{path}: expected {count} float32 elements (shape {tuple(shape)}, "
                              f"{4 * count} bytes), got {size} bytes ({size / 4:g} elements)")
    return np.fromfile(path, dtype="<f4").reshape(shape)


def import_edge_moe_bins(cfg: ModelConfig, folder, fill_missing: str | None = None,
                         seed: int = 0) -> LoadedCheckpoint:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Edge-MoE weight folder not found: {folder}")
    exp, names = expected_backbone_shapes(cfg), edge_moe_names(cfg)
    sd = {"cls_token": torch.zeros(exp["cls_token"])}  # folded into pos_embed row 0 by Edge-MoE
    for key, stem in names.items():
        path = folder / (stem + BIN_SUFFIX)
        if path.is_file():
            shape = exp[key][1:] if key == "pos_embed" else exp[key]
            sd[key] = torch.from_numpy(read_f32_bin(path, shape).astype(np.float32)).reshape(exp[key])
    known = {s + BIN_SUFFIX for s in names.values()} | {"image" + BIN_SUFFIX}
    ignored = [f"{p.name}: not a backbone tensor of model '{cfg.name}'"
               for p in sorted(folder.glob("*" + BIN_SUFFIX)) if p.name not in known]
    return _finish(cfg, sd, str(folder), ignored, fill_missing, seed, names)


def fold_cls_token(sd: dict) -> dict:
    """The equivalent state with cls_token folded into pos_embed row 0 (what Edge-MoE stores)."""
    out = dict(sd)
    pos = _f32(sd["pos_embed"])
    pos[:, 0] += _f32(sd["cls_token"])[:, 0]
    out["pos_embed"], out["cls_token"] = pos, torch.zeros_like(_f32(sd["cls_token"]))
    return out


def export_edge_moe_bins(cfg: ModelConfig, sd: dict, folder) -> list[Path]:
    """Write every backbone tensor (experts included) as raw little-endian float32 files."""
    validate_state(cfg, sd)
    names = edge_moe_names(cfg)
    folded = fold_cls_token(sd)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for key, stem in names.items():
        t = folded[key][0] if key == "pos_embed" else folded[key]
        path = folder / (stem + BIN_SUFFIX)
        np.ascontiguousarray(_f32(t).numpy(), dtype="<f4").tofile(path)
        written.append(path)
    return written


def default_edge_moe_dir() -> Path:
    """The shared Edge-MoE weights: $EDGEMOE_SHARED/edge-moe-cityscapes if EDGEMOE_SHARED (the shared
    folder) is set, else ../shared/edge-moe-cityscapes next to the repository. Never copied in."""
    shared = os.environ.get("EDGEMOE_SHARED")
    base = Path(shared) if shared else Path(__file__).resolve().parents[1].parent / "shared"
    return base / "edge-moe-cityscapes"


def load_edge_moe_image(folder=None) -> np.ndarray:
    """Edge-MoE's real Cityscapes input, [3, 128, 256] float32 in [0, 1)."""
    path = Path(folder if folder is not None else default_edge_moe_dir()) / ("image" + BIN_SUFFIX)
    if not path.is_file():
        raise CheckpointError(f"Edge-MoE input image not found: {path}")
    return read_f32_bin(path, (3, 128, 256)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Our own checkpoint format

def _config_from_dict(d: dict, path) -> ModelConfig:
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise CheckpointError(f"{path}: config has unknown field(s) {unknown}")
    kw = {k: tuple(v) if str(fields[k].type).startswith("tuple") else v for k, v in d.items()}
    return ModelConfig(**kw)


def save_checkpoint(path, cfg: ModelConfig, state_dict: dict, meta: dict | None = None) -> Path:
    validate_state(cfg, state_dict)
    path = Path(path)
    torch.save({"format": FORMAT, "config": dataclasses.asdict(cfg),
                "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
                "meta": dict(meta or {})}, path)
    return path


def load_checkpoint(path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    obj = _load_tensor_file(path)
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if fmt != FORMAT:
        raise CheckpointError(f"{path}: not an edgemoe checkpoint (format {fmt!r}, expected "
                              f"{FORMAT!r}); foreign formats load with import_timm / import_m3vit / "
                              f"import_edge_moe_bins")
    cfg = _config_from_dict(obj["config"], path)
    validate_state(cfg, obj["state_dict"], str(path))
    return cfg, obj["state_dict"], obj.get("meta", {})


# ----------------------------------------------------------------------------------------------
# One entry point for all sources, and a ready model

HEAD_FIELDS = ("task_channels", "head_channels")     # ModelConfig fields only the task heads use


def load_backbone(cfg: ModelConfig, source, kind: str, fill_missing: str | None = None,
                  seed: int = 0, **kw) -> LoadedCheckpoint:
    if kind == "timm":
        return import_timm(cfg, source, fill_missing, seed, **kw)
    if kind == "m3vit":
        return import_m3vit(cfg, source, fill_missing, seed, **kw)
    if kind == "edge-moe-bin":
        return import_edge_moe_bins(cfg, source, fill_missing, seed, **kw)
    if kind == "edgemoe-ckpt":
        ck_cfg, sd, meta = load_checkpoint(source)
        # a backbone load: the heads' fields may differ (e.g. a tiny model trained on 7 classes)
        diff = [f.name for f in dataclasses.fields(cfg) if f.name not in HEAD_FIELDS
                and getattr(cfg, f.name) != getattr(ck_cfg, f.name)]
        if diff:
            raise CheckpointError(f"{source}: saved for a different model config "
                                  f"(backbone fields differ: {diff})")
        return LoadedCheckpoint(dict(sd), list(meta.get("filled", [])), str(source), [])
    raise ValueError(f"unknown checkpoint kind {kind!r}; choose one of {KINDS}")


def load_model(cfg: ModelConfig, source, kind: str, fill_missing: str | None = None, seed: int = 0,
               **kw):
    """M3ViT(cfg) with weights from `source`. Tensors the source lacks (heads of a backbone-only
    format, filled experts) keep a seeded init and are listed in model.filled_random (heads also in
    model.random_heads); model.checkpoint is the LoadedCheckpoint."""
    import inspect

    from .m3vit import M3ViT  # lazy: the network is optional for checkpoint work

    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        seeded = "seed" in inspect.signature(M3ViT).parameters
        model = M3ViT(cfg, seed=seed) if seeded else M3ViT(cfg)
    ck = load_backbone(cfg, source, kind, fill_missing, seed, **kw)
    full = model.state_dict()
    validate_state(cfg, full, f"M3ViT('{cfg.name}').state_dict()")  # network vs. key contract
    extra = [k for k in ck.state_dict if k not in full]
    if extra:
        raise CheckpointError(f"{source}: tensors with no place in M3ViT('{cfg.name}'): {extra}")
    params = dict(model.named_parameters())  # buffers (BatchNorm statistics) are not random
    kept = [k for k in full if k not in ck.state_dict and k in params]
    full.update(ck.state_dict)
    model.load_state_dict(full, strict=True)
    model.random_heads = [k for k in kept if k.startswith("heads.")]
    model.filled_random = list(ck.filled) + kept
    model.checkpoint = ck
    return model
