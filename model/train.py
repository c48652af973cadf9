"""Multi-task M3ViT training on the synthetic scenes (model/data.py): backbone + both task heads.

Recipe (what `edgemoe train` does; `RECIPES` holds the defaults per preset):
- Model: the preset's backbone unchanged, with `task_channels=(NUM_CLASSES, 1)` so the semseg
  head predicts the 7 synthetic classes and the depth head one channel (`training_config`). The
  config is stored in the checkpoint, so eval and the golden model rebuild exactly this network.
- Data: `train_n` scenes of the "train" split at the preset's resolution, generated once before
  the first step and cached in memory (images as float16: a spacing of at most 2**-11 is far
  below the generator's own pixel noise; labels uint8; depth float32). Random horizontal flips.
- Each step trains both tasks on the same batch: the backbone runs once per task (the routing
  depends on the task: one router per task, the preset's gating) and the losses are summed:
      loss = CE(semseg) + L1(depth) + 0.01 * sum over tasks and MoE blocks of balance_loss.
- Depth targets: normalised log-depth, t = log(d / DEPTH_MIN) / log(DEPTH_MAX / DEPTH_MIN) in
  [0, 1]; the head predicts t and `depth_from_output` maps it back to metres (clamped to the
  data's range). Log-depth gives near and far pixels comparable weight.
- Load balancing (M3ViT / FastMoE NoisyGate): cv^2(importance) + cv^2(load) per MoE block and
  task, over every token of the batch (class token included). importance_e = sum over tokens of
  the gate weight of e (the top-k probabilities used as combine weights, 0 for unselected experts,
  as NoisyGate's `gates`). load_e = sum over tokens of P(e is in the top-k), the smooth estimate of
  Shazeer et al. 2017 (NoisyGate's `_prob_in_top_k`): the probability that e stays in the top-k if
  its logit gets Gaussian noise of std `noise_std` with the other logits fixed. Our router has no
  noise network (no w_noise in the hardware / state dict), so the estimate is taken at the clean
  logits with a fixed noise_std = 1; the forward routing is the deterministic one the hardware
  runs. cv^2(x) = var(x) / mean(x)^2 (unbiased var, as FastMoE's cv_squared).
- AdamW (betas 0.9/0.999, weight decay 0.05 on matrices only, not on biases, norms, pos_embed,
  cls_token), linear warmup then cosine decay to lr/100, gradient clipping at norm 1.

Shipped checkpoint (checkpoints/tiny.pt, 1.7 MB), trained with:
    edgemoe train --preset tiny --steps 3500 --batch 32 --lr 2e-3 --seed 0 --threads 1 \
        --out checkpoints/tiny.pt
(python -m edgemoe.sim.cli train ... is the same without the installed entry point.) Measured on the
2-core workplace machine: data 16384 scenes in ~35 s, one step ~100 ms with 1 thread, ~75 ms with
2 threads on idle cores, so an estimated 5-6.5 min in all. The shipped run shared the cores with other jobs (load
average ~7) and took 23 min wall. With 2 threads on busy cores a step was up to 10x slower (OpenMP
spin-waiting), hence --threads 1 there. Final losses (mean of the last 100 steps): CE 0.324,
L1 (log-depth) 0.045, balance 0.028. Test split, 256 scenes: mIoU 0.404, pixel acc 0.875,
RMSE 12.2 m, abs-rel 0.290 (constant baselines: mIoU 0.069, RMSE 32.9 m).

edge-moe (128x256, recipe RECIPES["edge-moe"]): one step at batch 16 costs ~4.5 CPU-seconds with
1 thread here (forward + backward of both tasks), i.e. ~25 h for 20000 steps: not trained on
this machine. That recipe needs a GPU, and train() runs on the CPU only as written.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import ModelConfig, get_preset
from .data import DEPTH_MAX, DEPTH_MIN, NUM_CLASSES, make_scene, split_seeds
from .m3vit import M3ViT

BALANCE_WEIGHT = 0.01
LOG_DEPTH_RANGE = math.log(DEPTH_MAX / DEPTH_MIN)


@dataclass(frozen=True)
class Recipe:
    steps: int
    batch: int
    lr: float
    warmup: int          # linear warmup steps
    train_n: int         # cached training scenes
    weight_decay: float = 0.05
    noise_std: float = 1.0   # of the smooth load estimate
    balance_weight: float = BALANCE_WEIGHT


RECIPES: dict[str, Recipe] = {
    "tiny": Recipe(steps=3500, batch=32, lr=2e-3, warmup=150, train_n=16384),
    # 128x256; ~4.5 s per step on one CPU core here (see the docstring): a GPU recipe.
    "edge-moe": Recipe(steps=20000, batch=16, lr=5e-4, warmup=1000, train_n=16384),
}


def training_config(preset: str | ModelConfig) -> ModelConfig:
    """The preset with a semseg head of NUM_CLASSES channels and a 1-channel depth head."""
    cfg = get_preset(preset) if isinstance(preset, str) else preset
    if cfg.tasks != ("semseg", "depth"):
        raise ValueError(f"training needs tasks ('semseg', 'depth'), model '{cfg.name}' has {cfg.tasks}")
    return cfg.replace(task_channels=(NUM_CLASSES, 1))


# ---------------------------------------------------------------------------------------------
# Targets

def depth_to_target(depth: torch.Tensor) -> torch.Tensor:
    """Metres -> normalised log-depth in [0, 1]."""
    return torch.log(depth.clamp(DEPTH_MIN, DEPTH_MAX) / DEPTH_MIN) / LOG_DEPTH_RANGE


def depth_from_output(out: torch.Tensor) -> torch.Tensor:
    """Depth head output (normalised log-depth, [B, 1, H, W] or [B, H, W]) -> metres [B, H, W]."""
    if out.dim() == 4:
        if out.shape[1] != 1:
            raise ValueError(f"depth head output must have 1 channel, got shape {list(out.shape)}")
        out = out[:, 0]
    return DEPTH_MIN * torch.exp(out.clamp(0.0, 1.0) * LOG_DEPTH_RANGE)


# ---------------------------------------------------------------------------------------------
# Load balancing

def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation var/mean^2 of a 1-D tensor (0 when all entries are equal)."""
    x = x.float()
    if x.dim() != 1 or x.numel() < 2:
        raise ValueError(f"cv_squared needs a 1-D tensor of >= 2 entries, got shape {list(x.shape)}")
    return x.var() / (x.mean() ** 2 + eps)


def importance(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per-expert sum of the gate weights (top-k probabilities, 0 elsewhere) over all tokens."""
    probs = probs.reshape(-1, probs.shape[-1])
    w, idx = torch.topk(probs, top_k, dim=-1)
    gates = torch.zeros_like(probs).scatter(-1, idx, w)
    return gates.sum(0)


def smooth_load(logits: torch.Tensor, top_k: int, noise_std: float = 1.0) -> torch.Tensor:
    """Per-expert sum over tokens of P(expert in top-k) if its logit had N(0, noise_std^2) noise.

    For expert e the threshold is the k-th largest of the OTHER logits: the (k+1)-th largest
    logit overall if e is in the top-k, else the k-th. P = Phi((logit_e - threshold) / std)."""
    E = logits.shape[-1]
    if not 0 < top_k < E:
        raise ValueError(f"smooth_load: top_k={top_k} must be in 1..{E - 1} (num_experts {E})")
    if noise_std <= 0:
        raise ValueError(f"smooth_load: noise_std={noise_std} must be > 0")
    x = logits.reshape(-1, E).float()
    top = torch.topk(x, top_k + 1, dim=-1).values
    thr_in, thr_out = top[:, top_k:top_k + 1], top[:, top_k - 1:top_k]
    is_in = x >= thr_out                          # in the top-k (ties counted in)
    thr = torch.where(is_in, thr_in, thr_out)
    normal = torch.distributions.Normal(0.0, 1.0)
    return normal.cdf((x - thr) / noise_std).sum(0)


def balance_loss(logits: torch.Tensor, top_k: int, noise_std: float = 1.0) -> torch.Tensor:
    """cv^2(importance) + cv^2(load) of one router over a batch of tokens (logits [..., E])."""
    probs = logits.float().softmax(-1)
    return cv_squared(importance(probs, top_k)) + cv_squared(smooth_load(logits, top_k, noise_std))


# ---------------------------------------------------------------------------------------------
# Data

@dataclass
class SceneCache:
    images: torch.Tensor   # [n, 3, h, w] float16
    labels: torch.Tensor   # [n, h, w] uint8
    depths: torch.Tensor   # [n, h, w] float32

    def __len__(self):
        return self.images.shape[0]

    def batch(self, idx: torch.Tensor, flip: torch.Tensor | None = None):
        """float32 images, int64 labels, float32 depths; rows where flip is True mirrored in width."""
        img = self.images[idx].float()
        lab = self.labels[idx].long()
        dep = self.depths[idx]
        if flip is not None and bool(flip.any()):
            f = flip.nonzero(as_tuple=True)[0]
            img[f], lab[f], dep[f] = img[f].flip(-1), lab[f].flip(-1), dep[f].flip(-1)
        return img, lab, dep


def make_cache(n: int, h: int, w: int, split: str = "train", base_seed: int = 0,
               progress: bool = False) -> SceneCache:
    seeds = split_seeds(split, n, base_seed)
    imgs = torch.empty(n, 3, h, w, dtype=torch.float16)
    labs = torch.empty(n, h, w, dtype=torch.uint8)
    deps = torch.empty(n, h, w, dtype=torch.float32)
    it = range(n)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"scenes {h}x{w}", unit="scene", leave=False)
    for i in it:
        im, la, de = make_scene(seeds[i], h, w)
        imgs[i] = torch.from_numpy(im)
        labs[i] = torch.from_numpy(la.astype(np.uint8))
        deps[i] = torch.from_numpy(de)
    return SceneCache(imgs, labs, deps)


# ---------------------------------------------------------------------------------------------
# Training

def lr_at(step: int, steps: int, lr: float, warmup: int, final_frac: float = 0.01) -> float:
    """Linear warmup over `warmup` steps, then cosine from lr down to lr * final_frac."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim >= 2 and not name.endswith("bias") and name not in ("pos_embed", "cls_token"):
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def step_losses(model: M3ViT, img, lab, dep, recipe: Recipe) -> dict[str, torch.Tensor]:
    """Both tasks on one batch: {"semseg", "depth", "balance", "total"} (scalars with grad)."""
    cfg = model.cfg
    losses, bal = {}, torch.zeros(())
    for t, name in enumerate(cfg.tasks):
        feats, aux = model.forward_features(img, t, return_aux=True)
        out = model.heads[name](feats)
        if name == "semseg":
            losses[name] = F.cross_entropy(out, lab)
        else:
            losses[name] = F.l1_loss(out[:, 0], depth_to_target(dep))
        for r in aux["routing"].values():
            bal = bal + balance_loss(r["logits"], cfg.top_k, recipe.noise_std)
    losses["balance"] = bal
    losses["total"] = losses["semseg"] + losses["depth"] + recipe.balance_weight * bal
    return losses


def train(cfg: ModelConfig, recipe: Recipe, seed: int = 0, cache: SceneCache | None = None,
          progress: bool = True, data_seed: int = 0) -> tuple[M3ViT, dict]:
    """Train M3ViT(cfg) from a seeded init; returns (model in eval mode, history).

    history: {"semseg", "depth", "balance", "total", "lr"}: one float per step, plus
    "data_time_s" and "train_time_s"."""
    if cfg.task_channels != (NUM_CLASSES, 1):
        raise ValueError(f"cfg.task_channels = {cfg.task_channels}: expected ({NUM_CLASSES}, 1); "
                         f"use training_config()")
    for f in ("steps", "batch", "train_n", "warmup"):
        v = getattr(recipe, f)
        if not isinstance(v, int) or v < (0 if f == "warmup" else 1):
            raise ValueError(f"Recipe.{f} = {v!r} must be a positive integer")
    t0 = time.perf_counter()
    if cache is None:
        cache = make_cache(recipe.train_n, cfg.img_h, cfg.img_w, "train", data_seed, progress)
    if tuple(cache.images.shape[1:]) != (cfg.in_chans, cfg.img_h, cfg.img_w):
        raise ValueError(f"cache images {list(cache.images.shape)} do not fit model '{cfg.name}' "
                         f"({cfg.in_chans}x{cfg.img_h}x{cfg.img_w})")
    data_time = time.perf_counter() - t0

    model = M3ViT(cfg, seed=seed).train()
    opt = torch.optim.AdamW(param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.999))
    g = torch.Generator().manual_seed(seed + 1)
    hist = {k: [] for k in ("semseg", "depth", "balance", "total", "lr")}
    steps = range(recipe.steps)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(steps, desc=f"train {cfg.name}", unit="step", dynamic_ncols=True)
        steps = bar
    t1 = time.perf_counter()
    for step in steps:
        lr = lr_at(step, recipe.steps, recipe.lr, recipe.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(cache), (recipe.batch,), generator=g)
        flip = torch.rand(recipe.batch, generator=g) < 0.5
        img, lab, dep = cache.batch(idx, flip)
        losses = step_losses(model, img, lab, dep, recipe)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for k in ("semseg", "depth", "balance", "total"):
            hist[k].append(float(losses[k].detach()))
        hist["lr"].append(lr)
        if bar is not None and (step % 10 == 0 or step == recipe.steps - 1):
            n = min(50, len(hist["total"]))
            bar.set_postfix(ce=f"{np.mean(hist['semseg'][-n:]):.3f}",
                            l1=f"{np.mean(hist['depth'][-n:]):.4f}",
                            bal=f"{np.mean(hist['balance'][-n:]):.3f}", lr=f"{lr:.1e}")
    hist["data_time_s"] = data_time
    hist["train_time_s"] = time.perf_counter() - t1
    return model.eval(), hist


def summarise(hist: dict, last: int = 100) -> dict:
    """Mean of each loss over the last `last` steps, and per-100-step means (for the checkpoint)."""
    out = {"final": {k: float(np.mean(hist[k][-last:])) for k in ("semseg", "depth", "balance", "total")}}
    n = len(hist["total"])
    out["curve_every_100"] = {k: [float(np.mean(hist[k][i:i + 100])) for i in range(0, n, 100)]
                              for k in ("semseg", "depth", "balance")}
    return out


def train_and_save(preset: str, out, recipe: Recipe, seed: int = 0, threads: int | None = 2,
                   export_bin=None, progress: bool = True, command: str | None = None) -> dict:
    from .checkpoint import export_edge_moe_bins, save_checkpoint

    if threads:
        torch.set_num_threads(threads)
    cfg = training_config(preset)
    model, hist = train(cfg, recipe, seed=seed, progress=progress)
    summ = summarise(hist)
    meta = {
        "trainer": "edgemoe.model.train", "preset": preset, "seed": seed, "recipe": asdict(recipe),
        "steps": recipe.steps, "losses": summ["final"], "loss_curve_every_100": summ["curve_every_100"],
        "data_time_s": round(hist["data_time_s"], 2), "train_time_s": round(hist["train_time_s"], 2),
        "threads": torch.get_num_threads(), "torch": str(torch.__version__),
        "depth_target": "log(d/DEPTH_MIN)/log(DEPTH_MAX/DEPTH_MIN)",
        "command": command if command is not None else " ".join(sys.argv),
    }
    path = save_checkpoint(out, cfg, model.state_dict(), meta)
    if export_bin:
        export_edge_moe_bins(cfg, model.state_dict(), export_bin)
    return {"path": str(path), "meta": meta}
