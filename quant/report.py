"""Fidelity report: the golden (bit-exact integer) model against float, per layer and tensor.

For one model, one set of weights, one image and some tasks, for each quant preset:
- per block and per major tensor (norm1, qkv, scores, probs, attn_out, proj, resid1, norm2,
  fc1/gelu/fc2 or gate logits and the MoE sum, block output): SQNR (dB) and cosine of the
  golden tensor, dequantised, against the float64 mirror of the same datapath
  (quant.calibrate.float_forward: the same compile-time folds, so Q/K/V, scores and router
  logits are compared in the domain the hardware stores them);
- final features: MSE, MAE, cosine, SQNR against the float PyTorch model (M3ViT.forward_features);
- max |qkv| per block (trained weights have outliers that random ones lack) against attn_in's range;
- saturation counts per tensor (GoldenResult.sat) and of the weights (QWeights.sat);
- routing agreement: tokens whose top-k expert set differs from float's, per MoE block;
- approx_error_table of the preset; golden seconds per image.
Weights that are seeded random stand-ins (the experts of the published Edge-MoE weights) are
named in the JSON and in the plot title, always.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .calibrate import float_forward, one_torch_thread
from .config import QuantConfig, get_quant_preset

RANDOM_EXPERTS = "experts: RANDOM (not in the published weights)"
WEIGHT_KINDS = ("seeded", "edge-moe-bin", "auto")


@dataclass
class Weights:
    kind: str                        # seeded | edge-moe-bin
    state_dict: dict                 # backbone tensors (torch), our keys
    model: object                    # M3ViT holding them (float reference)
    banner: str                      # one line for every output that uses these weights
    random: list = field(default_factory=list)   # keys that are seeded random fill
    source: str = ""
    seed: int = 0


def load_weights(cfg, kind: str, seed: int = 0, folder=None) -> Weights:
    """seeded: M3ViT(cfg, seed) (every weight random). auto: edge-moe-bin for the edge-moe preset
    when its folder exists, else seeded. edge-moe-bin: the trained Edge-MoE weights
    (folder, default ../shared/edge-moe-cityscapes), the missing experts filled with seeded random
    values. Fails clearly if the folder is absent."""
    import torch

    from edgemoe.model.checkpoint import default_edge_moe_dir, load_backbone
    from edgemoe.model.m3vit import M3ViT

    if kind == "auto":
        # trained weights by default: the real Edge-MoE weights for the edge-moe preset when the
        # shared folder is there, else seeded random ones (the banner says which)
        have = folder is not None or default_edge_moe_dir().is_dir()
        kind = "edge-moe-bin" if cfg.name == "edge-moe" and have else "seeded"
    if kind == "seeded":
        with one_torch_thread():
            m = M3ViT(cfg, seed=seed).eval()
        sd = {k: v for k, v in m.state_dict().items() if not k.startswith("heads.")}
        return Weights(kind, sd, m, f"weights: seeded random init (seed {seed}), not trained",
                       [], f"M3ViT(seed={seed})", seed)
    if kind != "edge-moe-bin":
        raise ValueError(f"unknown weights {kind!r}; choose one of {WEIGHT_KINDS}")
    folder = Path(folder) if folder is not None else default_edge_moe_dir()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--weights edge-moe-bin needs the trained Edge-MoE weight folder {folder}, which does not "
            "exist (set EDGEMOE_SHARED to the folder that holds edge-moe-cityscapes/, or use --weights seeded)")
    with one_torch_thread():
        ck = load_backbone(cfg, folder, "edge-moe-bin", fill_missing="random", seed=seed)
        m = M3ViT(cfg, seed=None).eval()
    res = m.load_state_dict(ck.state_dict, strict=False)
    stray = [k for k in res.missing_keys if not k.startswith("heads.")]
    if stray or res.unexpected_keys:
        raise RuntimeError(f"{folder}: backbone keys do not fit M3ViT: missing {stray}, "
                           f"unexpected {res.unexpected_keys}")
    experts = [k for k in ck.filled if "htoh4" in k or "h4toh" in k]
    other = [k for k in ck.filled if k not in experts]
    parts = ["weights: trained Edge-MoE (" + folder.name + ")"]
    if experts:
        parts.append(f"{RANDOM_EXPERTS}, {len(experts)} tensors, seed {seed}")
    if other:
        parts.append(f"also RANDOM: {', '.join(other)}")
    return Weights(kind, dict(ck.state_dict), m, "; ".join(parts), list(ck.filled), str(folder), seed)


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
def metrics(ref, test) -> dict:
    """SQNR (dB, None when exact), cosine, MSE, MAE, max abs error of test against ref."""
    r = np.asarray(ref, dtype=np.float64).ravel()
    t = np.asarray(test, dtype=np.float64).ravel()
    e = t - r
    se, sr = float(e @ e), float(r @ r)
    nr, nt = math.sqrt(sr), float(np.linalg.norm(t))
    return {"sqnr_db": 10 * math.log10(sr / se) if se > 0 and sr > 0 else None,
            "cosine": float(r @ t) / (nr * nt) if nr > 0 and nt > 0 else None,
            "mse": se / r.size, "mae": float(np.abs(e).mean()), "max_abs": float(np.abs(e).max())}


def _pairs(cfg, q: QuantConfig, tensors: dict):
    """(name, golden codes, format) of the compared tensors, in datapath order."""
    yield "embed", tensors["embed"], q.act
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        yield b + ".norm1", tensors[b + ".norm1"], q.act
        yield b + ".qkv", tensors[b + ".qkv"], q.act
        yield b + ".scores", tensors[b + ".scores"], q.score
        yield b + ".probs", tensors[b + ".probs"], q.prob
        for s in (".attn_out", ".proj", ".resid1", ".norm2"):
            yield b + s, tensors[b + s], q.act
        if cfg.is_moe(i):
            yield b + ".mlp.gate_logits", tensors[b + ".mlp.gate_logits"], q.gate_logit
            # the hardware never materialises the expert sum: it is out - resid1 (exact, no saturation)
            yield b + ".mlp.moe_out", tensors[b + ".out"] - tensors[b + ".resid1"], q.act
        else:
            for s in (".mlp.fc1", ".mlp.gelu", ".mlp.fc2"):
                yield b + s, tensors[b + s], q.act
        yield b + ".out", tensors[b + ".out"], q.act


def _routing_changes(cfg, q: QuantConfig, golden_routing: dict, float_routing: dict) -> dict:
    """Per MoE block: tokens whose top-k expert SET differs from float's; of them `material`:
    an expert in one set but not the other has a float probability of at least one gate_prob
    LSB (a swap between experts whose weights quantise to 0 changes nothing downstream)."""
    out = {}
    for b in cfg.moe_blocks:
        g = np.sort(np.asarray(golden_routing[b]["topk_idx"]), axis=1)
        f = np.sort(np.asarray(float_routing[b]["topk_idx"]), axis=1)
        pf = np.asarray(float_routing[b]["probs"])
        changed = np.flatnonzero(np.any(g != f, axis=1))
        material = 0
        for t in changed:
            diff = list(set(g[t].tolist()) ^ set(f[t].tolist()))
            material += bool(pf[t, diff].max() >= q.gate_prob.lsb)
        out[str(b)] = {"changed_tokens": int(changed.size), "material": material,
                       "tokens": int(g.shape[0]), "fraction": changed.size / g.shape[0]}
    return out


def _weights_real(q: QuantConfig, qw, key: str) -> np.ndarray:
    """The weights the datapath really applies, as reals in the folded (base-2) domain: codes
    times the per-output-channel scale M * 2**-S * s_out / s_in (channel), or the format's LSB.
    Any rank: a scale per leading index (expert, output channel) broadcasts over the rest."""
    codes = np.asarray(qw.codes[key], np.float64)
    if q.granularity == "channel":
        ep = qw.epi[key]
        s_w = np.asarray(ep.mult * np.exp2(-np.asarray(ep.shift, np.float64)) * ep.out_scale / ep.in_scale)
        return codes * s_w.reshape(s_w.shape + (1,) * (codes.ndim - s_w.ndim))
    return codes * qw.fmt[key].lsb


# the weight groups whose quantisation the routing attribution separates
WEIGHT_GROUPS = ("patch_embed", "qkv", "proj", "mlp", "experts", "router")


def weight_group(key: str) -> str | None:
    """Which WEIGHT_GROUPS entry a folded weight key belongs to (None: not a matmul weight)."""
    if key == "patch_embed.proj.weight":
        return "patch_embed"
    if not key.startswith("blocks.") or not key.endswith("weight") or ".norm" in key:
        return None
    for tag, g in ((".attn.qkv.", "qkv"), (".attn.proj.", "proj"), (".mlp.fc", "mlp"),
                   (".mlp.htoh4_", "experts"), (".mlp.h4toh_", "experts"), (".mlp.router", "router")):
        if tag in key:
            return g
    return None


def _routing_weight_groups(cfg, q: QuantConfig, qw, folded: dict, image, trace, task: int) -> dict:
    """Float forwards with one weight group replaced by the weights the datapath applies (and one
    with all of them): tokens, summed over the MoE blocks, whose top-k set differs from the float
    model's. Says which layers' 8-bit weights move the routing (biases, LayerNorm and the
    activations stay float)."""
    from .calibrate import float_forward

    keys = {k: weight_group(k) for k in folded if weight_group(k) and k in qw.codes}

    def flips(groups) -> int:
        f2 = dict(folded)
        for k, g in keys.items():
            if g in groups:
                f2[k] = _weights_real(q, qw, k).reshape(np.shape(folded[k]))
        r = float_forward(cfg, f2, image, task).routing
        return sum(int(np.any(np.sort(r[b]["topk_idx"], 1) != np.sort(trace.routing[b]["topk_idx"], 1),
                              axis=1).sum()) for b in cfg.moe_blocks)

    present = [g for g in WEIGHT_GROUPS if g in keys.values()]
    return {"all": flips(set(present)), **{g: flips({g}) for g in present}}


def _routing_attribution(cfg, q: QuantConfig, qw, folded: dict, trace, tensors: dict, task: int) -> dict:
    """Per MoE block, where a changed top-k set comes from: tokens whose float top-k changes when
    only the router weights are quantised (float router input), and when only the router input
    is (the golden model's LayerNorm output, float weights). Float matmuls, no gate rounding."""
    def topk(lg):
        return np.sort(np.argsort(-lg, axis=1, kind="stable")[:, :cfg.top_k], axis=1)

    out = {}
    for b in cfg.moe_blocks:
        pre = f"blocks.{b}"
        key = (f"{pre}.mlp.routers.{task}.weight" if cfg.gating == "multi" else f"{pre}.mlp.router.weight")
        h_f = np.asarray(trace.tensors[pre + ".norm2"], np.float64)
        h_g = np.asarray(tensors[pre + ".norm2"], np.float64) * qw.scale(pre + ".norm2", q.act)
        if cfg.gating != "multi":
            emb = np.asarray(folded[f"{pre}.mlp.task_embed.weight"], np.float64)[task]
            h_f, h_g = (np.concatenate([h, np.broadcast_to(emb, (h.shape[0], emb.size))], 1) for h in (h_f, h_g))
        w_f = np.asarray(folded[key], np.float64)
        w_q = _weights_real(q, qw, key)
        ref = topk(h_f @ w_f.T)
        out[str(b)] = {"router_weights_only": int(np.any(topk(h_f @ w_q.T) != ref, axis=1).sum()),
                       "router_input_only": int(np.any(topk(h_g @ w_f.T) != ref, axis=1).sum())}
    return out


def fidelity_run(cfg, q: QuantConfig, qw, ref: dict, image: np.ndarray, task: int,
                 attn_p: int = 4) -> dict:
    """One golden forward against the float references ref = {"trace": FloatTrace,
    "features": M3ViT features [N+1, D], "routing": M3ViT routing}."""
    from .golden import GoldenModel

    gm = GoldenModel(cfg, q, qw, attn_p)
    t0 = time.perf_counter()
    res = gm.forward(image, task, keep=True)
    secs = time.perf_counter() - t0
    tr = ref["trace"]
    layers = {}
    for name, codes, fmt in _pairs(cfg, q, res.tensors):
        m = metrics(tr.tensors[name], np.asarray(codes, np.float64) * qw.scale(name, fmt))
        layers[name] = {"sqnr_db": m["sqnr_db"], "cosine": m["cosine"], "max_abs": m["max_abs"]}
    sat = res.sat.report()
    blocks = []
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        mlp = b + (".mlp.moe_out" if cfg.is_moe(i) else ".mlp.fc2")
        blocks.append({
            "block": i, "moe": cfg.is_moe(i),
            "out_sqnr_db": layers[b + ".out"]["sqnr_db"], "out_cosine": layers[b + ".out"]["cosine"],
            "qkv_sqnr_db": layers[b + ".qkv"]["sqnr_db"],
            "attn_out_sqnr_db": layers[b + ".attn_out"]["sqnr_db"],
            "proj_sqnr_db": layers[b + ".proj"]["sqnr_db"],
            "mlp_sqnr_db": layers[mlp]["sqnr_db"],
            "qkv_absmax_float": float(np.abs(tr.tensors[b + ".qkv"]).max()),
            "qkv_absmax_golden": float(np.abs(res.tensors[b + ".qkv"] * qw.scale(b + ".qkv", q.act)).max()),
            "attn_in_saturated": sat.get(b + ".attn_in", {}).get("saturated", 0),
        })
    final = metrics(ref["features"], q.act.dequantize(res.features))
    return {"task": cfg.tasks[task], "golden_seconds": secs, "final": final,
            "final_vs_mirror": metrics(tr.features, q.act.dequantize(res.features)),
            "blocks": blocks, "layers": layers,
            "saturated_total": res.sat.saturated(),
            "saturated_tensors": {k: v for k, v in sat.items() if v["saturated"]},
            "saturation": sat,
            "routing": _routing_changes(cfg, q, res.routing, ref["routing"]),
            "routing_attribution": _routing_attribution(cfg, q, qw, ref["folded"], tr, res.tensors, task),
            "routing_weight_groups": _routing_weight_groups(cfg, q, qw, ref["folded"], image, tr, task)}


def float_reference(cfg, weights: Weights, folded: dict, image: np.ndarray, task: int) -> dict:
    import torch
    with torch.no_grad(), one_torch_thread():
        f, aux = weights.model.forward_features(torch.from_numpy(np.asarray(image, np.float32))[None],
                                                task, return_aux=True)
    tr = float_forward(cfg, folded, image, task)
    routing = {b: {"topk_idx": r["topk_idx"][0].numpy(), "probs": r["probs"][0].double().numpy()}
               for b, r in aux["routing"].items()}
    return {"trace": tr, "features": f[0].double().numpy(), "routing": routing, "folded": folded,
            "mirror_vs_m3vit_max_abs": float(np.abs(tr.features - f[0].double().numpy()).max())}


def quant_report(cfg, weights: Weights, quants, image, image_desc: str, tasks=None,
                 attn_p: int = 4) -> dict:
    """The JSON-ready report for every quant preset (names or QuantConfigs) in `quants`."""
    from .approx import approx_error_table
    from .qweights import fold_scales, quantize_weights

    tasks = list(range(cfg.num_tasks)) if tasks is None else [cfg.task_index(t) for t in tasks]
    qcfgs = [get_quant_preset(x) if isinstance(x, str) else x for x in quants]
    image = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image,
                       dtype=np.float64)
    if image.ndim == 4:
        image = image[0]
    folded = fold_scales(cfg, weights.state_dict)
    refs = {t: float_reference(cfg, weights, folded, image, t) for t in tasks}
    rep = {"model": cfg.name, "weights": {"kind": weights.kind, "source": weights.source,
                                          "seed": weights.seed, "banner": weights.banner,
                                          "random_tensors": weights.random},
           "warning": weights.banner if weights.random else None,
           "image": image_desc, "tasks": [cfg.tasks[t] for t in tasks], "attn_p": attn_p,
           "mirror_vs_m3vit_max_abs": max(r["mirror_vs_m3vit_max_abs"] for r in refs.values()),
           "presets": {}}
    for q in qcfgs:
        qw = quantize_weights(cfg, q, weights.state_dict)
        runs = [fidelity_run(cfg, q, qw, refs[t], image, t, attn_p) for t in tasks]
        wsat = qw.sat.report()
        rep["presets"][q.name] = {
            "formats": {k: str(v) for k, v in q.formats().items()},
            "granularity": q.granularity,
            "weight_rounding": q.weight_rounding,      # "gptq": codes from calibration Hessians
            # channel granularity: per-tensor scales, what calibration clipped and on what data
            "activation_calibration": qw.act.to_dict() if qw.act is not None else None,
            "attn_in_range": q.attn_in.max_value,
            "approx_errors": approx_error_table(q),
            "weights_saturated_total": qw.sat.saturated(),
            "weights_saturated": {k: v for k, v in wsat.items() if v["saturated"]},
            "runs": runs,
            "summary": {
                "final_cosine_min": min(r["final"]["cosine"] for r in runs),
                "final_mse_max": max(r["final"]["mse"] for r in runs),
                "final_mae_max": max(r["final"]["mae"] for r in runs),
                "saturated_total": sum(r["saturated_total"] for r in runs),
                "routing_changed_tokens": sum(v["changed_tokens"] for r in runs for v in r["routing"].values()),
                "routing_changed_material": sum(v["material"] for r in runs for v in r["routing"].values()),
                "routing_tokens": sum(v["tokens"] for r in runs for v in r["routing"].values()),
                "routing_changed_router_weights_only": sum(
                    v["router_weights_only"] for r in runs for v in r["routing_attribution"].values()),
                "routing_changed_router_input_only": sum(
                    v["router_input_only"] for r in runs for v in r["routing_attribution"].values()),
                # float forwards with only one weight group quantised (quant-report's attribution)
                "routing_changed_weight_groups": {
                    g: sum(r["routing_weight_groups"][g] for r in runs)
                    for g in runs[0]["routing_weight_groups"]},
                "golden_seconds_mean": sum(r["golden_seconds"] for r in runs) / len(runs),
                "qkv_absmax_float": max(b["qkv_absmax_float"] for r in runs for b in r["blocks"]),
            }}
    return rep


# ---------------------------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------------------------
def plot_report(rep: dict, qcfgs, path) -> Path:
    """PNG: SQNR of every block output and of the major tensors per block (each preset and
    task), and the error curves of exp2 / GELU / rsqrt of each preset."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .approx import approx_error_curves

    qcfgs = [get_quant_preset(x) if isinstance(x, str) else x for x in qcfgs]
    fig, ax = plt.subplots(2, 3, figsize=(16, 9))
    styles = {"qkv_sqnr_db": "--", "attn_out_sqnr_db": ":", "proj_sqnr_db": "-.", "mlp_sqnr_db": (0, (1, 3))}
    for qn, p in rep["presets"].items():
        for r in p["runs"]:
            xs = [b["block"] for b in r["blocks"]]
            val = [b["out_sqnr_db"] if b["out_sqnr_db"] is not None else np.nan for b in r["blocks"]]
            line, = ax[0, 0].plot(xs, val, "o-", label=f"{qn} / {r['task']} "
                                  f"(final cos {r['final']['cosine']:.5f})")
            for key, ls in styles.items():
                ax[0, 1].plot(xs, [b[key] if b[key] is not None else np.nan for b in r["blocks"]],
                              linestyle=ls, color=line.get_color(),
                              label=f"{qn}/{r['task']} {key.replace('_sqnr_db', '')}")
    ax[0, 0].set(title="SQNR of block outputs (golden vs float)", xlabel="block", ylabel="SQNR [dB]")
    ax[0, 1].set(title="SQNR per tensor (qkv --, attn_out :, proj -., mlp/moe ..)", xlabel="block",
                 ylabel="SQNR [dB]")
    ax[0, 0].legend(fontsize=7, loc="best")
    ax[0, 1].legend(fontsize=5, ncol=2)
    r0 = next(iter(rep["presets"].values()))["runs"][0]
    ax[0, 2].bar([b["block"] for b in r0["blocks"]], [b["qkv_absmax_float"] for b in r0["blocks"]],
                 color="tab:gray", label=f"max |qkv| float ({r0['task']})")
    for qn, p in rep["presets"].items():
        ax[0, 2].axhline(p["attn_in_range"], linestyle="--", label=f"{qn} attn_in range")
    ax[0, 2].set(title="max |qkv| per block vs attn_in range", xlabel="block")
    ax[0, 2].legend(fontsize=7)
    for q in qcfgs:
        c = approx_error_curves(q)
        for a, key, ttl in ((ax[1, 0], "exp2", "exp2 abs error"), (ax[1, 1], "gelu", "GELU abs error"),
                            (ax[1, 2], "rsqrt", "rsqrt rel error")):
            x, e = c[key]
            a.plot(x, e, lw=0.6, label=q.name)
            a.set(title=ttl)
    ax[1, 1].set_xlim(-9, 9)              # the table covers |x| < gelu_range; the grid runs further
    ax[1, 2].set_xscale("log")
    for a in ax[1]:
        a.legend(fontsize=7)
    title = f"{rep['model']}: golden vs float, image: {rep['image']}\n{rep['weights']['banner']}"
    fig.suptitle(title, color="red" if rep["weights"]["random_tensors"] else "black", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _most_saturated(sat: dict, n: int = 4) -> str:
    """' (tensor count/total, ... +k more)' for the tensors with the most saturated codes."""
    if not sat:
        return ""
    top = sorted(sat.items(), key=lambda kv: -kv[1]["saturated"])
    txt = ", ".join(f"{k} {v['saturated']}/{v['total']}" for k, v in top[:n])
    return f" ({txt}{f', +{len(top) - n} more tensors' if len(top) > n else ''})"


def format_summary(rep: dict) -> str:
    """Console text of a report."""
    lines = [f"model {rep['model']}, image: {rep['image']}", rep["weights"]["banner"]]
    if rep["warning"]:
        lines.append("WARNING: " + rep["warning"])
    for qn, p in rep["presets"].items():
        s = p["summary"]
        lines.append(f"\n== {qn}: act {p['formats']['act']}, linear_w {p['formats']['linear_w']}, "
                     f"attn_in {p['formats']['attn_in']}, score {p['formats']['score']}; weights "
                     f"rounded {p.get('weight_rounding', 'nearest')}, saturated: {p['weights_saturated_total']}"
                     + _most_saturated(p["weights_saturated"]))
        ae = p["approx_errors"]
        lines.append(f"approx max err: exp2 {ae['exp2_abs_max']:.2e}, softmax {ae['softmax_abs_max']:.2e}, "
                     f"gelu {ae['gelu_abs_max']:.2e}, rsqrt rel {ae['rsqrt_rel_max']:.2e}, "
                     f"layernorm {ae['layernorm_abs_max']:.2e}, gate top-2 mismatches "
                     f"{ae['gate_topk_mismatch']} ({ae['gate_topk_mismatch_beyond_lsb']} beyond 1 LSB)")
        for r in p["runs"]:
            f = r["final"]
            routing = ", ".join(f"b{b}:{v['changed_tokens']}/{v['material']}" for b, v in r["routing"].items())
            lines.append(f"task {r['task']}: final cos {f['cosine']:.6f}, MSE {f['mse']:.3e}, MAE "
                         f"{f['mae']:.3e}, SQNR {f['sqnr_db']:.1f} dB; saturated {r['saturated_total']}; "
                         f"routing changed {sum(v['changed_tokens'] for v in r['routing'].values())} tokens "
                         f"(block:changed/material "
                         f"{routing}); "
                         f"golden {r['golden_seconds']:.2f} s")
            lines.append("  block out SQNR dB: " + " ".join(
                f"{b['out_sqnr_db']:.1f}" if b["out_sqnr_db"] is not None else "exact" for b in r["blocks"]))
            lines.append("  max |qkv| float:   " + " ".join(f"{b['qkv_absmax_float']:.1f}" for b in r["blocks"]))
            if r["saturated_tensors"]:
                lines.append("  saturated: " + ", ".join(f"{k} {v['saturated']}/{v['total']}"
                                                         for k, v in r["saturated_tensors"].items()))
        lines.append(f"routing over all tasks: {s['routing_changed_tokens']}/{s['routing_tokens']} tokens "
                     f"changed their top-k set ({100 * s['routing_changed_tokens'] / max(1, s['routing_tokens']):.2f} %), "
                     f"{s['routing_changed_material']} materially "
                     f"({100 * s['routing_changed_material'] / max(1, s['routing_tokens']):.2f} %); "
                     f"attribution (float top-k, one side quantised): router weights only "
                     f"{s['routing_changed_router_weights_only']}, router input (upstream error) only "
                     f"{s['routing_changed_router_input_only']}")
        wg = s["routing_changed_weight_groups"]
        lines.append("routing changes in float with only these weights quantised: "
                     + ", ".join(f"{g} {n}" for g, n in wg.items() if g != "all")
                     + f"; all of them {wg['all']}")
        cal = p.get("activation_calibration")
        if cal:
            clip = cal["clipping"]
            n = sum(v["clipped"] for v in clip.values())
            tot = sum(v["total"] for v in clip.values())
            worst = sorted(clip.items(), key=lambda kv: -kv[1]["clipped"] / max(1, kv[1]["total"]))[:3]
            lines.append(f"activation calibration ({len(cal['source'])} runs: {'; '.join(cal['source'][:4])}"
                         f"{' ...' if len(cal['source']) > 4 else ''}): {len(clip)} tensors, "
                         f"{n}/{tot} calibration values clipped ({100 * n / max(1, tot):.3f} %); most: "
                         + ", ".join(f"{k} {v['clipped']}/{v['total']} at {v['clip_fraction_of_max']:.3f} of max"
                                     for k, v in worst))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# w8a8: is there an 8-bit-activation preset? (issue 12: add it if cosine >= 0.99, report either way)
# ---------------------------------------------------------------------------------------------
W8A8_ACT_FRACS = (2, 3, 4, 5, 6)
W8A8_MIN_COSINE = 0.99


def w8a8_variant(act_frac: int) -> QuantConfig:
    """w8a16-channel with every stored activation at 8 bits: act = gelu_in = s8.act_frac (the
    residual stream keeps one power-of-two format: the fixed-function units need it), attn_in
    s8.5 (Q, K, V, attention output: per-tensor calibrated scales), gate_logit s8.6 (the gate's
    exp2 table index needs exp_table_bits = 6 fraction bits), the GELU table step no finer than
    the input grid."""
    from .fixed import Fmt
    base = get_quant_preset("w8a16-channel")
    a = Fmt(8, act_frac)
    return base.replace(name=f"w8a8-channel-act{act_frac}", act=a, gelu_in=a, attn_in=Fmt(8, 5),
                        gate_logit=Fmt(8, 6), gelu_step_log2=min(act_frac, base.gelu_step_log2))


def w8a8_study(cfg, weights: Weights, image, image_desc: str, fracs=W8A8_ACT_FRACS, tasks=None) -> dict:
    """Final-feature cosine, saturation and routing changes of w8a8_variant(f) for every act
    fraction f: the best one, and whether it reaches W8A8_MIN_COSINE."""
    rep = quant_report(cfg, weights, [w8a8_variant(f) for f in fracs], image, image_desc, tasks)
    rows = []
    for f in fracs:
        s = rep["presets"][w8a8_variant(f).name]["summary"]
        rows.append({"act": f"s8.{f}", "final_cosine_min": s["final_cosine_min"],
                     "saturated": s["saturated_total"],
                     "routing_changed": s["routing_changed_tokens"] / max(1, s["routing_tokens"])})
    best = max(rows, key=lambda r: r["final_cosine_min"])
    return {"model": cfg.name, "weights": weights.banner, "image": image_desc, "variants": rows,
            "best": best, "reaches_target": best["final_cosine_min"] >= W8A8_MIN_COSINE,
            "target_cosine": W8A8_MIN_COSINE}
