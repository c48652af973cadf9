"""Analytic workload profile of the M3ViT backbone, from ModelConfig alone.

MACs count the multiply-accumulates of the convolution and the matrix products (what the MAC
array does): patch embedding, QKV, QK^T, A.V, projection, dense MLP, router, experts.
Element-wise units (LayerNorm, softmax, GELU, residual adds, the gate-weight combine) appear as
rows with 0 MACs and their activation sizes.

MoE blocks: every token (class token included) goes through its top-k experts, so
experts fc1 + fc2 = tokens * k * (D*He + He*D) MACs; router = tokens * D * E for the one task
that runs (task_cond gating: tokens * (D + task_embed_dim) * E, the task embedding being
concatenated to each token). Parameters count the full model: all experts, every task's router.

Parameter names match model/m3vit.py; tests cross-check the counts against the network.
"""
from __future__ import annotations

from .config import ModelConfig

# Row types, in network order; summary() totals per type.
LAYER_TYPES = ("patch_embed", "embed", "layernorm", "qkv", "qk", "softmax", "av", "proj",
               "add", "mlp_fc1", "gelu", "mlp_fc2", "router", "expert_fc1", "expert_fc2",
               "combine")


def _nbytes(elems: int, bits: int) -> int:
    return (elems * bits + 7) // 8


def layer_table(cfg: ModelConfig, task: int | str = 0, weight_bits: int = 16,
                act_bits: int = 32) -> list[dict]:
    """One row per layer instance of one image through the backbone for one task.

    Row keys: name, type, block (None outside blocks), macs, params (parameters held by the
    layer, full model), params_read (those one task's inference reads: its own router only;
    experts: all of them, an upper bound, the routing decides), weight_bytes (params at
    weight_bits), act_in / act_out (elements), act_in_bytes / act_out_bytes (at act_bits)."""
    for name, v in (("weight_bits", weight_bits), ("act_bits", act_bits)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"layer_table: {name} = {v!r} must be a positive integer")
    cfg.task_index(task)  # validates the task
    N, D, Hh = cfg.num_tokens, cfg.dim, cfg.heads
    E, k, He, Hm = cfg.num_experts, cfg.top_k, cfg.expert_hidden, cfg.mlp_hidden
    rows: list[dict] = []

    def add(name, type_, block, macs, params, act_in, act_out, params_read=None):
        rows.append({
            "name": name, "type": type_, "block": block, "macs": int(macs), "params": int(params),
            "params_read": int(params if params_read is None else params_read),
            "weight_bytes": _nbytes(params, weight_bits),
            "act_in": int(act_in), "act_out": int(act_out),
            "act_in_bytes": _nbytes(act_in, act_bits), "act_out_bytes": _nbytes(act_out, act_bits),
        })

    C, p, P = cfg.in_chans, cfg.patch, cfg.num_patches
    add("patch_embed", "patch_embed", None, P * D * C * p * p, D * C * p * p + D,
        C * cfg.img_h * cfg.img_w, P * D)
    # class token prepended, positional embedding added: parameters, no MACs
    add("embed", "embed", None, 0, D + N * D, P * D, N * D)

    for b in range(cfg.depth):
        pre = f"block{b}."
        add(pre + "norm1", "layernorm", b, 0, 2 * D, N * D, N * D)
        add(pre + "attn.qkv", "qkv", b, N * D * 3 * D, 3 * D * D + 3 * D, N * D, 3 * N * D)
        # per head: [N, hd] x [hd, N]; summed over heads: N*N*D
        add(pre + "attn.qk", "qk", b, N * N * D, 0, 2 * N * D, Hh * N * N)
        add(pre + "attn.softmax", "softmax", b, 0, 0, Hh * N * N, Hh * N * N)
        add(pre + "attn.av", "av", b, N * N * D, 0, Hh * N * N + N * D, N * D)
        add(pre + "attn.proj", "proj", b, N * D * D, D * D + D, N * D, N * D)
        add(pre + "add1", "add", b, 0, 0, 2 * N * D, N * D)
        add(pre + "norm2", "layernorm", b, 0, 2 * D, N * D, N * D)
        if cfg.is_moe(b):
            if cfg.gating == "multi":
                r_in, r_params, r_read = D, cfg.num_tasks * E * D, E * D
            else:
                r_in = D + cfg.task_embed_dim
                r_params = cfg.num_tasks * cfg.task_embed_dim + E * r_in
                r_read = cfg.task_embed_dim + E * r_in
            add(pre + "mlp.router", "router", b, N * r_in * E, r_params, N * D, N * E, r_read)
            add(pre + "mlp.experts.fc1", "expert_fc1", b, N * k * D * He, E * (He * D + He),
                N * k * D, N * k * He)
            add(pre + "mlp.experts.gelu", "gelu", b, 0, 0, N * k * He, N * k * He)
            add(pre + "mlp.experts.fc2", "expert_fc2", b, N * k * He * D, E * (D * He + D),
                N * k * He, N * k * D)
            # gate-weight multiply and scatter-accumulate into the residual (epilogue, no MACs)
            add(pre + "mlp.combine", "combine", b, 0, 0, N * k * D + N * D, N * D)
        else:
            add(pre + "mlp.fc1", "mlp_fc1", b, N * D * Hm, Hm * D + Hm, N * D, N * Hm)
            add(pre + "mlp.gelu", "gelu", b, 0, 0, N * Hm, N * Hm)
            add(pre + "mlp.fc2", "mlp_fc2", b, N * Hm * D, D * Hm + D, N * Hm, N * D)
            add(pre + "add2", "add", b, 0, 0, 2 * N * D, N * D)
    return rows


def summary(cfg: ModelConfig) -> dict:
    """Totals: backbone parameters (no heads; the backbone has no final norm), MACs per image per
    task, full-model weight bytes at 16 and 8 bit, and per-type totals (task 0)."""
    per_task = {t: sum(r["macs"] for r in layer_table(cfg, i)) for i, t in enumerate(cfg.tasks)}
    rows = layer_table(cfg, 0, weight_bits=16)
    params = sum(r["params"] for r in rows)
    by_type: dict[str, dict] = {}
    for r in rows:
        d = by_type.setdefault(r["type"], {"count": 0, "macs": 0, "params": 0, "weight_bytes_16": 0})
        d["count"] += 1
        d["macs"] += r["macs"]
        d["params"] += r["params"]
        d["weight_bytes_16"] += r["weight_bytes"]
    return {
        "model": cfg.name,
        "tokens": cfg.num_tokens,
        "backbone_params": params,
        "macs_per_image": per_task[cfg.tasks[0]],
        "macs_per_image_per_task": per_task,
        "weight_bytes_16": _nbytes(params, 16),
        "weight_bytes_8": _nbytes(params, 8),
        "params_read_per_task": sum(r["params_read"] for r in rows),
        "by_type": {t: by_type[t] for t in LAYER_TYPES if t in by_type},
    }


def routing_profile(aux: dict, num_experts: int | None = None) -> dict:
    """Expert load per MoE block from M3ViT.forward_features(..., return_aux=True)'s aux.

    aux["routing"] = {block: {"topk_idx": [B, N+1, k] ints, ...}}. Counts token slots over the
    whole batch. num_experts: taken from the block's "probs" / "logits" last dimension when
    present, else required. Returns {block: {"tokens_per_expert": list[int] (length E),
    "active_experts": int, "max_load": int, "token_slots": int, "images": B,
    "imbalance": max_load / mean load}} with blocks in increasing order."""
    import numpy as np

    if not isinstance(aux, dict) or "routing" not in aux:
        raise ValueError("routing_profile: aux must be the dict returned by "
                         "M3ViT.forward_features(x, task, return_aux=True), with a 'routing' key")
    out = {}
    for b in sorted(aux["routing"]):
        r = aux["routing"][b]
        if "topk_idx" not in r:
            raise ValueError(f"routing_profile: aux['routing'][{b}] has no 'topk_idx' (keys {sorted(r)})")
        idx = np.asarray(_to_numpy(r["topk_idx"]))
        if idx.ndim != 3 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"routing_profile: aux['routing'][{b}]['topk_idx'] must be an integer "
                             f"[B, N+1, k] tensor, got shape {list(idx.shape)} dtype {idx.dtype}")
        E = num_experts
        if E is None:
            for key in ("probs", "logits"):
                if key in r:
                    E = int(np.shape(_to_numpy(r[key]))[-1])
                    break
        if E is None:
            raise ValueError(f"routing_profile: block {b} has no 'probs'/'logits' to size the "
                             f"histogram; pass num_experts")
        if idx.size and (idx.min() < 0 or idx.max() >= E):
            bad = idx.min() if idx.min() < 0 else idx.max()
            raise ValueError(f"routing_profile: aux['routing'][{b}]['topk_idx'] holds expert {int(bad)}, "
                             f"out of range 0..{E - 1}")
        hist = np.bincount(idx.reshape(-1), minlength=E)
        slots = int(idx.size)
        out[b] = {
            "tokens_per_expert": [int(c) for c in hist],
            "active_experts": int((hist > 0).sum()),
            "max_load": int(hist.max()) if E else 0,
            "token_slots": slots,
            "images": int(idx.shape[0]),
            "imbalance": float(hist.max() / (slots / E)) if slots else 0.0,
        }
    return out


def _to_numpy(t):
    # torch tensors (CPU or not, with grad or not) without importing torch here
    if hasattr(t, "detach"):
        t = t.detach().cpu().numpy()
    return t
