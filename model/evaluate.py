"""Task-level evaluation of a trained M3ViT checkpoint: float model vs. fixed-point backends.

Metrics, on the held-out "test" split of the synthetic scenes (model/data.py):
- semseg: confusion matrix over NUM_CLASSES; IoU_c = TP / (TP + FP + FN); mIoU = mean IoU over
  the classes that occur in the ground truth or the prediction (union > 0); pixel accuracy.
- depth (metres): RMSE = sqrt(mean (pred - gt)^2), abs-rel = mean |pred - gt| / gt, over all
  pixels of all images (gt >= DEPTH_MIN > 0 everywhere).
- trivial baselines on the same images, for scale: every pixel the test set's own majority class,
  and every pixel the test set's own mean depth (both oracle, i.e. at least as strong as any
  constant predictor fitted on training data).

Backends: anything that maps a batch of images to backbone features, the hook for every
implementation of the backbone (float PyTorch, the golden integer model, later the RTL):

    backend(images: float32 [B, C, H, W], task: int) -> BackendOutput(
        features: float [B, N+1, D]  (dequantised for integer backends),
        routing:  {moe block: int topk_idx [B, N+1, k]},
        sat:      activation saturation events (int) or None)

The task heads always run in float on those features (`predict_from_features`). `float_backend`
and `golden_backend` are provided; `codes_backend` wraps a per-image function returning integer
act codes [N+1, D] (what the RTL testbench reads back), which must equal the golden model's codes.
Routing under quantisation: per MoE block and task, the expert-load histogram, the number of
active experts per image, and how many tokens select a different SET of top-k experts.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .config import ModelConfig
from .data import NUM_CLASSES, make_batch, split_seeds
from .train import depth_from_output


# ---------------------------------------------------------------------------------------------
# Metrics

def confusion_matrix(pred, gt, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """[C, C] int64 counts, rows = ground truth class, columns = predicted class."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"confusion_matrix: pred shape {pred.shape} != gt shape {gt.shape}")
    for name, a in (("pred", pred), ("gt", gt)):
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"confusion_matrix: {name} must hold integer labels, got {a.dtype}")
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"confusion_matrix: {name} has label {int(a.min() if a.min() < 0 else a.max())} "
                             f"outside 0..{num_classes - 1}")
    flat = gt.reshape(-1).astype(np.int64) * num_classes + pred.reshape(-1)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def seg_metrics(conf: np.ndarray) -> dict:
    """mIoU (over classes with union > 0), pixel accuracy, per-class IoU (None where union = 0)."""
    conf = np.asarray(conf, dtype=np.int64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    total = conf.sum()
    if total == 0:
        raise ValueError("seg_metrics: empty confusion matrix")
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    return {"miou": float(np.nanmean(iou)), "pixel_acc": float(tp.sum() / total),
            "iou": [None if np.isnan(v) else float(v) for v in iou]}


@dataclass
class DepthSums:
    sq_err: float = 0.0
    abs_rel: float = 0.0
    count: int = 0

    def update(self, pred, gt):
        pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
        if pred.shape != gt.shape:
            raise ValueError(f"depth: pred shape {pred.shape} != gt shape {gt.shape}")
        if gt.size and gt.min() <= 0:
            raise ValueError(f"depth: ground truth must be > 0 m (abs-rel divides by it), min {gt.min()}")
        self.sq_err += float(((pred - gt) ** 2).sum())
        self.abs_rel += float((np.abs(pred - gt) / gt).sum())
        self.count += gt.size
        return self

    def result(self) -> dict:
        if self.count == 0:
            raise ValueError("depth metrics: no pixels")
        return {"rmse": math.sqrt(self.sq_err / self.count), "abs_rel": self.abs_rel / self.count}


def depth_metrics(pred, gt) -> dict:
    return DepthSums().update(pred, gt).result()


def baselines(labels: np.ndarray, depths: np.ndarray) -> dict:
    """Constant predictors with the test set's own statistics (oracle majority class / mean depth)."""
    counts = np.bincount(labels.reshape(-1), minlength=NUM_CLASSES)
    major = int(counts.argmax())
    seg = seg_metrics(confusion_matrix(np.full_like(labels, major), labels))
    mean_d = float(depths.mean())
    dep = depth_metrics(np.full_like(depths, mean_d), depths)
    return {"majority_class": major, "majority_miou": seg["miou"], "majority_pixel_acc": seg["pixel_acc"],
            "mean_depth_m": mean_d, "mean_depth_rmse": dep["rmse"], "mean_depth_abs_rel": dep["abs_rel"]}


# ---------------------------------------------------------------------------------------------
# Backends

@dataclass
class BackendOutput:
    features: np.ndarray              # [B, N+1, D] float
    routing: dict                     # block -> topk_idx int [B, N+1, k]
    sat: int | None = None            # saturation events in this call (integer backends)


Backend = Callable[[np.ndarray, int], BackendOutput]


def float_backend(model) -> Backend:
    """The float PyTorch backbone (model in eval mode)."""
    def run(images, task):
        with torch.no_grad():
            feats, aux = model.forward_features(torch.as_tensor(images, dtype=torch.float32), task,
                                                return_aux=True)
        return BackendOutput(feats.numpy().astype(np.float64),
                             {b: r["topk_idx"].numpy() for b, r in aux["routing"].items()})
    return run


def codes_backend(per_image: Callable, act_fmt) -> Backend:
    """Hook for integer backends (golden, RTL): per_image(image [C,H,W], task) -> (codes [N+1, D]
    int in act_fmt, routing {block: topk_idx [N+1, k]}, saturation count or None). Codes are
    dequantised with act_fmt for the float heads."""
    def run(images, task):
        feats, routes, sat = [], {}, 0
        for img in images:
            codes, routing, s = per_image(img, task)
            codes = np.asarray(codes)
            if not np.issubdtype(codes.dtype, np.integer):
                raise ValueError(f"codes_backend: features must be integer codes, got {codes.dtype}")
            feats.append(act_fmt.dequantize(codes))
            for b, idx in routing.items():
                routes.setdefault(b, []).append(np.asarray(idx))
            sat = None if s is None or sat is None else sat + int(s)
        return BackendOutput(np.stack(feats), {b: np.stack(v) for b, v in routes.items()}, sat)
    return run


def golden_backend(cfg: ModelConfig, state_dict: dict, qcfg, attn_p: int = 4) -> Backend:
    """The bit-exact golden model (quant/golden.py): integer backbone, features dequantised."""
    from edgemoe.quant.golden import GoldenModel
    from edgemoe.quant.qweights import quantize_weights

    backbone = {k: v for k, v in state_dict.items() if not k.startswith("heads.")}
    qw = quantize_weights(cfg, qcfg, backbone)
    gm = GoldenModel(cfg, qcfg, qw, attn_p=attn_p)

    def per_image(img, task):
        res = gm.forward(np.asarray(img, dtype=np.float32), task)
        return res.features, {b: r["topk_idx"] for b, r in res.routing.items()}, res.sat.saturated()
    run = codes_backend(per_image, qcfg.act)
    run.weight_saturated = qw.sat.saturated()   # weights clipped by quantisation (reported)
    return run


# ---------------------------------------------------------------------------------------------
# Evaluation

def predict_from_features(model, task: int, features) -> np.ndarray:
    """Float task head on backbone features [B, N+1, D]: semseg -> labels int64 [B, H, W],
    depth -> metres float [B, H, W]."""
    name = model.cfg.tasks[task]
    with torch.no_grad():
        out = model.heads[name](torch.as_tensor(np.asarray(features), dtype=torch.float32))
    if name == "semseg":
        return out.argmax(1).numpy()
    if name == "depth":
        return depth_from_output(out).numpy()
    raise ValueError(f"no metric for task {name!r}")


def load_split(cfg: ModelConfig, n: int, split: str = "test", base_seed: int = 0):
    """(images float32 [n,3,H,W], labels int64 [n,H,W], depths float32 [n,H,W]) at cfg's size."""
    return make_batch(split_seeds(split, n, base_seed), cfg.img_h, cfg.img_w)


def evaluate_backend(model, backend: Backend, data, batch: int = 16, progress=None) -> dict:
    """Metrics of (backend backbone + float heads) on data = (images, labels, depths).
    Returns {"semseg": seg_metrics, "depth": {rmse, abs_rel}, "routing": {task: {block: topk_idx
    [n, N+1, k]}}, "saturated": int or None, "time_s"}."""
    images, labels, depths = data
    cfg = model.cfg
    conf = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    dsum = DepthSums()
    routing = {t: {} for t in cfg.tasks}
    sat = 0
    t0 = time.perf_counter()
    for s in range(0, len(images), batch):
        for t, name in enumerate(cfg.tasks):
            out = backend(images[s:s + batch], t)
            want = (len(images[s:s + batch]), cfg.num_tokens, cfg.dim)
            if tuple(out.features.shape) != want:
                raise ValueError(f"backend features shape {list(out.features.shape)} != {list(want)}")
            pred = predict_from_features(model, t, out.features)
            if name == "semseg":
                conf += confusion_matrix(pred, labels[s:s + batch])
            else:
                dsum.update(pred, depths[s:s + batch])
            for b, idx in out.routing.items():
                routing[name].setdefault(b, []).append(np.asarray(idx))
            sat = None if out.sat is None or sat is None else sat + out.sat
        if progress is not None:
            progress.update(len(images[s:s + batch]))
    return {"semseg": seg_metrics(conf), "depth": dsum.result(), "saturated": sat,
            "routing": {n_: {b: np.concatenate(v) for b, v in r.items()} for n_, r in routing.items()},
            "time_s": time.perf_counter() - t0}


def routing_stats(topk_idx: np.ndarray, num_experts: int) -> dict:
    """topk_idx [n_images, N+1, k]: token slots per expert (all images), active experts per image."""
    idx = np.asarray(topk_idx)
    if idx.ndim != 3:
        raise ValueError(f"routing_stats: topk_idx must be [images, tokens, k], got shape {list(idx.shape)}")
    hist = np.bincount(idx.reshape(-1), minlength=num_experts)
    active = [int(np.unique(im).size) for im in idx]
    return {"tokens_per_expert": [int(c) for c in hist], "active_experts_mean": float(np.mean(active)),
            "active_experts_min": int(min(active)), "active_experts_max": int(max(active))}


def routing_changes(ref_idx: np.ndarray, idx: np.ndarray) -> dict:
    """Tokens whose SET of selected experts differs (order within the top-k ignored)."""
    a, b = np.sort(np.asarray(ref_idx), -1), np.sort(np.asarray(idx), -1)
    if a.shape != b.shape:
        raise ValueError(f"routing_changes: shapes differ {list(a.shape)} vs {list(b.shape)}")
    changed = int((a != b).any(-1).sum())
    tokens = int(np.prod(a.shape[:-1]))
    return {"tokens_changed": changed, "tokens": tokens, "fraction": changed / tokens if tokens else 0.0}


def load_trained(path):
    """(model in eval mode, cfg, state_dict, meta) from an edgemoe-ckpt-v1 file."""
    from .checkpoint import load_checkpoint
    from .m3vit import M3ViT

    cfg, sd, meta = load_checkpoint(path)
    model = M3ViT(cfg, seed=None)
    model.load_state_dict(sd, strict=True)
    return model.eval(), cfg, sd, meta


def rtl_backend(cfg: ModelConfig, state_dict: dict, quant: str, hw: str, images):
    """(c) the RTL accelerator (hw/accel.py under cocotb + Verilator): all `images` through every
    task in one simulation first (sim.rtl_sim.rtl_features), then a backend that hands out those
    features in order. The RTL exposes no routing (the queues are on chip): no routing stats."""
    from edgemoe.hw.config import get_hw_preset
    from edgemoe.quant.compiler import compile_program
    from edgemoe.quant.config import get_quant_preset
    from edgemoe.quant.qweights import quantize_weights
    from edgemoe.sim.rtl_sim import rtl_features
    q = get_quant_preset(quant)
    h = get_hw_preset(hw)
    if h.act_buffer_tokens > cfg.num_tokens:     # smaller buffers: a faster build, same results
        h = h.replace(act_buffer_tokens=max(16, 1 << (cfg.num_tokens - 1).bit_length()))
    prog = compile_program(cfg, q, h, quantize_weights(cfg, q, state_dict))   # heads dropped there
    res = rtl_features(prog, images)
    nxt = {t: 0 for t in range(len(cfg.tasks))}

    def per_image(img, task):
        codes = res["features"][cfg.tasks[task]][nxt[task]]
        nxt[task] += 1
        return codes, {}, None
    info = {"hw": h.name, "act_buffer_tokens": h.act_buffer_tokens, "images_differing_from_executor":
            res["images_differing"], "build_s": res["build_s"], "sim_s": res["sim_s"]}
    return codes_backend(per_image, q.act), info


def evaluate_checkpoint(path, quant: tuple[str, ...] = ("edge-moe-fixed",), n: int = 64,
                        base_seed: int = 0, attn_p: int = 4, batch: int = 16,
                        progress: bool = False, rtl: bool = False, rtl_quant: str = "edge-moe-fixed",
                        rtl_hw: str = "small-8x8") -> dict:
    """Float and every quant preset in `quant` on the first n test scenes; JSON-ready dict.
    rtl: also (c) the RTL simulation of the accelerator with rtl_quant on rtl_hw; attn_p is then
    the hardware's (the golden model's softmax key order follows it), so (c) must equal (b)."""
    model, cfg, sd, meta = load_trained(path)
    if cfg.task_channels[cfg.tasks.index("semseg")] != NUM_CLASSES:
        raise ValueError(f"{path}: semseg head has {cfg.task_channels} channels, the data has "
                         f"{NUM_CLASSES} classes; train with model.train.training_config")
    if rtl:
        from edgemoe.hw.config import get_hw_preset
        attn_p = get_hw_preset(rtl_hw).attn_p       # (b) must use the hardware's key order
    data = load_split(cfg, n, "test", base_seed)
    backends = {"float": float_backend(model)}
    qcfgs = {}
    if quant:
        from edgemoe.quant.config import get_quant_preset
        for q in quant:
            qcfgs[q] = get_quant_preset(q)
            backends[q] = golden_backend(cfg, sd, qcfgs[q], attn_p)
    rtl_info = None
    if rtl:
        backends["rtl-" + rtl_quant], rtl_info = rtl_backend(cfg, sd, rtl_quant, rtl_hw, data[0])
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n * len(backends), desc="eval", unit="img", leave=False)
    results = {k: evaluate_backend(model, be, data, batch, bar) for k, be in backends.items()}
    if bar is not None:
        bar.close()
    ref = results["float"]
    if rtl:
        ref_q = results.get(rtl_quant)
        rtl_info["metrics_equal_golden"] = ref_q is not None and all(
            results["rtl-" + rtl_quant][k] == ref_q[k] for k in ("semseg", "depth"))
    report = {"checkpoint": str(path), "model": cfg.name, "n": n, "split": "test", "base_seed": base_seed,
              "attn_p": attn_p, "train_meta": {k: meta.get(k) for k in ("steps", "losses", "seed", "command")},
              "baselines": baselines(data[1], data[2]), "backends": {}, "rtl": rtl_info}
    for k, r in results.items():
        entry = {"semseg": r["semseg"], "depth": r["depth"], "saturated": r["saturated"],
                 "weight_saturated": getattr(backends[k], "weight_saturated", None),
                 "time_s": round(r["time_s"], 2), "routing": {}}
        if k != "float":
            entry["delta"] = {"miou": r["semseg"]["miou"] - ref["semseg"]["miou"],
                              "pixel_acc": r["semseg"]["pixel_acc"] - ref["semseg"]["pixel_acc"],
                              "rmse": r["depth"]["rmse"] - ref["depth"]["rmse"],
                              "abs_rel": r["depth"]["abs_rel"] - ref["depth"]["abs_rel"]}
        for task, blocks in r["routing"].items():
            for b, idx in blocks.items():
                e = routing_stats(idx, cfg.num_experts)
                if k != "float":
                    e["changed_vs_float"] = routing_changes(ref["routing"][task][b], idx)
                entry["routing"].setdefault(task, {})[str(b)] = e
        report["backends"][k] = entry
    return report


def format_report(rep: dict) -> str:
    b = rep["baselines"]
    lines = [f"{rep['checkpoint']} ({rep['model']}), {rep['n']} test scenes",
             f"baselines: majority class {b['majority_class']} mIoU {b['majority_miou']:.4f} "
             f"pixel acc {b['majority_pixel_acc']:.4f}; mean depth {b['mean_depth_m']:.2f} m "
             f"RMSE {b['mean_depth_rmse']:.3f} m abs-rel {b['mean_depth_abs_rel']:.4f}",
             f"{'backend':<16}{'mIoU':>8}{'pix acc':>9}{'RMSE m':>9}{'abs-rel':>9}"
             f"{'dmIoU':>9}{'dRMSE':>9}{'sat':>6}{'time s':>8}"]
    for k, e in rep["backends"].items():
        d = e.get("delta")
        lines.append(f"{k:<16}{e['semseg']['miou']:>8.4f}{e['semseg']['pixel_acc']:>9.4f}"
                     f"{e['depth']['rmse']:>9.4f}{e['depth']['abs_rel']:>9.4f}"
                     + (f"{d['miou']:>+9.4f}{d['rmse']:>+9.4f}" if d else f"{'':>18}")
                     + f"{'' if e['saturated'] is None else e['saturated']:>6}{e['time_s']:>8.1f}")
    if rep.get("rtl"):
        r = rep["rtl"]
        lines.append(f"RTL ({r['hw']}, {r['act_buffer_tokens']}-row buffers): metrics equal the golden "
                     f"model's: {r['metrics_equal_golden']}; images whose features differ from the "
                     f"executor: {r['images_differing_from_executor']}; build {r['build_s']:.0f} s, "
                     f"simulation {r['sim_s']:.0f} s")
    lines.append("routing per task / MoE block: tokens per expert | active experts per image (mean)"
                 " | tokens whose top-k set changed vs float")
    for k, e in rep["backends"].items():
        for task, blocks in e["routing"].items():
            for blk, s in blocks.items():
                ch = s.get("changed_vs_float")
                lines.append(f"  {k:<14} {task:<7} block {blk:>2}: {s['tokens_per_expert']} | "
                             f"{s['active_experts_mean']:.2f}"
                             + (f" | {ch['tokens_changed']}/{ch['tokens']} ({100 * ch['fraction']:.2f}%)"
                                if ch else ""))
    return "\n".join(lines)
