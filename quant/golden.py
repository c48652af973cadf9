"""The bit-exact golden model: the whole M3ViT backbone in integers.

This is the specification of the accelerator. Every operation uses the formats of QuantConfig,
the integer approximations of quant/approx.py and, where the order of operations changes bits,
the order of the schedules in quant/schedule.py (attention key order within a row, expert
execution order of the scatter-accumulate). Arithmetic is numpy int64, exact (products are
formed with quant.intmath.exact_matmul; accumulators are sized by QuantConfig.check_model).

Datapath, per block (all tensors are integer codes; fmt in brackets):
  h   = LN(x; g1, b1)                                        [act]
  qkv = requant(h @ Wqkv^T + b)   (Q rows pre-scaled)         [act]
  q,k,v -> requant                                            [attn_in]
  s   = requant(q @ k^T)          (base-2 exponent domain)    [score]
  m, 1/S = online softmax stats over keys in row_key_order    [score], [recip]
  p   = 2**(s - m) * (1/S)                                    [prob]
  o   = requant(p @ v)                                        [act]
  x   = sat(x + requant(o @ Wp^T + bp))                       [act]
  h2  = LN(x; g2, b2)
  dense: x = sat(x + fc2(GELU(fc1(h2))))
  MoE:   logits = requant(h2 @ Wr^T) (log2 e folded)          [gate_logit]
         (idx, w) = top-k of base-2 softmax                   [gate_prob]
         for e in metaqueue, tokens in queue order:
             x[t] = sat(x[t] + requant(expert_e(h2[t]) * w))  [act]
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import approx
from .channel import channel_requant
from .config import QuantConfig
from .fixed import Fmt, SatCounter, requantize, shift_round
from .intmath import exact_matmul
from .qweights import QWeights
from .schedule import active_experts, build_expert_queues, row_key_order


@dataclass
class GoldenResult:
    features: np.ndarray                       # [N+1, D] act codes after the last block
    tensors: dict = field(default_factory=dict)  # every intermediate by name (keep=True)
    routing: dict = field(default_factory=dict)  # block -> {"topk_idx", "topk_w", "probs"}
    sat: SatCounter = field(default_factory=SatCounter)


class GoldenModel:
    """Integer forward of the backbone for one (ModelConfig, QuantConfig, attention P)."""

    def __init__(self, cfg, qcfg: QuantConfig, qw: QWeights, attn_p: int = 4):
        qcfg.check_model(cfg)
        self.cfg, self.q, self.w, self.attn_p = cfg, qcfg, qw, attn_p
        self.order = row_key_order(cfg.num_tokens, attn_p)

    # --- primitives ------------------------------------------------------------------------
    def linear(self, x, wkey, bkey, sat, name, out_fmt: Fmt | None = None, w_fmt: Fmt | None = None,
               e: int | None = None, w=None):
        """Linear layer of weight key `wkey` (expert `e` of a stacked key; `w` overrides the codes,
        e.g. the patch embedding's reshape). Class granularity: requant(x @ w^T + b) with the bias
        aligned to the accumulator, one rounding, saturation. Channel granularity: the per-channel
        epilogue of quant/channel.py."""
        q = self.q
        keyed = isinstance(wkey, str)        # or arrays (weights, bias) given directly
        if w is None:
            w = self.w[wkey] if keyed else np.asarray(wkey)
        w = w if e is None else w[e]
        acc = exact_matmul(x, w.T)
        if q.granularity == "channel":
            if not keyed:
                raise ValueError(f"linear '{name}': channel granularity needs the weight key (its epilogue)")
            ep = self.w.epi[wkey]
            return channel_requant(acc, ep if e is None else ep.select(e), out_fmt or q.act, q, sat, name)
        src = Fmt(q.acc.bits, q.act.frac + (w_fmt or q.linear_w).frac)
        if bkey is not None:
            b = (self.w[bkey] if keyed else np.asarray(bkey))
            b = b if e is None else b[e]
            acc = acc + shift_round(b, q.bias.frac - src.frac)
        return requantize(acc, src, out_fmt or q.act, q.rounding, q.overflow, sat, name)

    def add(self, a, b, sat, name):
        return self.q.act.fit(a + b, self.q.overflow, sat, name)

    def layernorm(self, x, prefix, sat, name):
        return approx.layernorm_fixed(x, self.w[prefix + ".weight"], self.w[prefix + ".bias"],
                                      self.q, eps=self.cfg.ln_eps, sat=sat, name=name)

    # --- layers ----------------------------------------------------------------------------
    def patch_embed(self, image, sat):
        cfg, q = self.cfg, self.q
        img = np.asarray(image, dtype=np.float64)
        if img.shape != (cfg.in_chans, cfg.img_h, cfg.img_w):
            raise ValueError(f"image shape {img.shape} != expected {(cfg.in_chans, cfg.img_h, cfg.img_w)} "
                             f"for model '{cfg.name}'")
        x = q.act.quantize(img, overflow=q.overflow, sat=sat, name="input")
        p, (gh, gw) = cfg.patch, cfg.grid
        # patches flattened in (c, ky, kx) order = conv weight reshape [D, C*p*p]
        patches = x.reshape(cfg.in_chans, gh, p, gw, p).transpose(1, 3, 0, 2, 4).reshape(gh * gw, -1)
        w = self.w["patch_embed.proj.weight"].reshape(cfg.dim, -1)
        tok = self.linear(patches, "patch_embed.proj.weight", "patch_embed.proj.bias", sat, "patch_embed",
                          w_fmt=q.patch_w, w=w)
        x = np.concatenate([self.w["cls_token"].reshape(1, cfg.dim), tok], axis=0)
        return self.add(x, self.w["pos_embed"].reshape(cfg.num_tokens, cfg.dim), sat, "pos_embed")

    def attention(self, h, i, sat, t):
        cfg, q = self.cfg, self.q
        n, H, dh = cfg.num_tokens, cfg.heads, cfg.head_dim
        pre = f"blocks.{i}"
        # channel granularity: the epilogue writes Q, K, V straight in attn_in codes at their
        # calibrated scales, and the attention output stays in attn_in codes at V's scale
        chan = q.granularity == "channel"
        qkv = self.linear(h, pre + ".attn.qkv.weight", pre + ".attn.qkv.bias", sat, pre + ".qkv",
                          out_fmt=q.attn_in if chan else None)
        qkv_in = qkv if chan else requantize(qkv, q.act, q.attn_in, q.rounding, q.overflow, sat,
                                             pre + ".attn_in")
        qh, kh, vh = (qkv_in[:, j * cfg.dim:(j + 1) * cfg.dim].reshape(n, H, dh).transpose(1, 0, 2)
                      for j in range(3))
        s_acc = exact_matmul(qh, kh.transpose(0, 2, 1))
        s = requantize(s_acc, Fmt(62, 2 * q.attn_in.frac), q.score, q.rounding, q.overflow, sat, pre + ".score")
        recip, m = approx.softmax_stats(s, self.order, q, sat, pre + ".softmax")
        p = approx.softmax_normalise(s, m, recip, q, sat, pre + ".softmax")
        o_acc = exact_matmul(p, vh)
        o = requantize(o_acc, Fmt(62, q.prob.frac + q.attn_in.frac), q.attn_in if chan else q.act,
                       q.rounding, q.overflow, sat, pre + ".attn_out")
        o = o.transpose(1, 0, 2).reshape(n, cfg.dim)
        proj = self.linear(o, pre + ".attn.proj.weight", pre + ".attn.proj.bias", sat, pre + ".proj")
        if t is not None:
            t.update({pre + ".qkv": qkv, pre + ".scores": s, pre + ".softmax_max": m,
                      pre + ".softmax_recip": recip, pre + ".probs": p, pre + ".attn_out": o,
                      pre + ".proj": proj})
        return proj

    def mlp(self, h, i, sat, t):
        pre = f"blocks.{i}.mlp"
        a = self.linear(h, pre + ".fc1.weight", pre + ".fc1.bias", sat, pre + ".fc1",
                        out_fmt=self.q.gelu_in if self.q.granularity == "channel" else None)
        g = approx.gelu_fixed(a, self.q, sat, pre + ".gelu")
        out = self.linear(g, pre + ".fc2.weight", pre + ".fc2.bias", sat, pre + ".fc2")
        if t is not None:
            t.update({pre + ".fc1": a, pre + ".gelu": g, pre + ".fc2": out})
        return out

    def router_logits(self, h, i, task):
        cfg, q = self.cfg, self.q
        pre = f"blocks.{i}.mlp"
        if cfg.gating == "multi":
            return h, f"{pre}.routers.{task}.weight"
        emb = np.broadcast_to(self.w[f"{pre}.task_embed.weight"][task], (h.shape[0], cfg.task_embed_dim))
        return np.concatenate([h, emb], axis=1), f"{pre}.router.weight"

    def moe(self, x, h, i, task, sat, t, routing):
        cfg, q = self.cfg, self.q
        pre = f"blocks.{i}.mlp"
        rin, rw = self.router_logits(h, i, task)
        logits = self.linear(rin, rw, None, sat, pre + ".gate_logits", out_fmt=q.gate_logit)
        idx, w, probs = approx.gate_fixed(logits, q, cfg.top_k, sat, pre + ".gate")
        routing[i] = {"topk_idx": idx, "topk_w": w, "probs": probs}
        queues = build_expert_queues(idx, w, cfg.num_experts)
        prod_fmt = Fmt(62, q.act.frac + q.gate_prob.frac)
        for e in active_experts(queues):
            toks, ws = queues[e]
            a = self.linear(h[toks], pre + ".htoh4_weight", pre + ".htoh4_bias", sat, pre + ".expert_fc1",
                            out_fmt=q.gelu_in if q.granularity == "channel" else None, e=e)
            g = approx.gelu_fixed(a, q, sat, pre + ".expert_gelu")
            y = self.linear(g, pre + ".h4toh_weight", pre + ".h4toh_bias", sat, pre + ".expert_fc2", e=e)
            yw = requantize(y * np.asarray(ws, dtype=np.int64)[:, None], prod_fmt, q.act, q.rounding,
                            q.overflow, sat, pre + ".expert_weighted")
            # tokens within one queue are distinct, so one vector add per expert keeps the order
            x[toks] = self.add(x[toks], yw, sat, f"blocks.{i}.resid2")
        if t is not None:
            t.update({pre + ".gate_logits": logits, pre + ".topk_idx": idx, pre + ".topk_w": w})
        return x

    def forward(self, image, task, keep: bool = False) -> GoldenResult:
        cfg = self.cfg
        task = cfg.task_index(task)
        sat = SatCounter()
        t = {} if keep else None
        routing = {}
        x = self.patch_embed(image, sat)
        if keep:
            t["embed"] = x.copy()
        for i in range(cfg.depth):
            h = self.layernorm(x, f"blocks.{i}.norm1", sat, f"blocks.{i}.norm1")
            x = self.add(x, self.attention(h, i, sat, t), sat, f"blocks.{i}.resid1")
            h2 = self.layernorm(x, f"blocks.{i}.norm2", sat, f"blocks.{i}.norm2")
            if keep:
                t.update({f"blocks.{i}.norm1": h, f"blocks.{i}.resid1": x.copy(), f"blocks.{i}.norm2": h2})
            if cfg.is_moe(i):
                x = self.moe(x.copy(), h2, i, task, sat, t, routing)
            else:
                x = self.add(x, self.mlp(h2, i, sat, t), sat, f"blocks.{i}.resid2")
            if keep:
                t[f"blocks.{i}.out"] = x.copy()
        return GoldenResult(x, t or {}, routing, sat)
