"""Float PyTorch reference of M3ViT: ViT backbone with task-routed mixture-of-experts MLPs.

The state-dict names and shapes below are a contract shared with the checkpoint importers and
the fixed-point golden model (D=dim, E=num_experts, He=expert_hidden, H=mlp_hidden, T=num_tasks):

  patch_embed.proj.weight [D, C, p, p], patch_embed.proj.bias [D]
  cls_token [1, 1, D], pos_embed [1, N+1, D]      (pos_embed is added after the class token)
  blocks.{i}.norm1.* [D], blocks.{i}.norm2.* [D]
  blocks.{i}.attn.qkv.weight [3D, D]   rows q, k, v; heads contiguous within each
  blocks.{i}.attn.qkv.bias [3D], blocks.{i}.attn.proj.weight [D, D], .bias [D]
  dense block: blocks.{i}.mlp.fc1.weight [H, D], .fc1.bias [H], .fc2.weight [D, H], .fc2.bias [D]
  MoE block:   blocks.{i}.mlp.htoh4_weight [E, He, D], htoh4_bias [E, He],
               blocks.{i}.mlp.h4toh_weight [E, D, He], h4toh_bias [E, D]
     gating "multi":     blocks.{i}.mlp.routers.{t}.weight [E, D]          (bias-free, one per task)
     gating "task_cond": blocks.{i}.mlp.task_embed.weight [T, task_embed_dim],
                         blocks.{i}.mlp.router.weight [E, D + task_embed_dim]
  heads.{task_name}.*  (model/heads.py)

There is no final LayerNorm in the backbone: each task head starts with its own.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .heads import PUPHead


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch, stride=cfg.patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, D, gh, gw] -> [B, N, D], row-major patches


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                       # [B, heads, N, head_dim]
        attn = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact erf GELU


class MoE(nn.Module):
    """Task-routed mixture of expert MLPs.

    Routing, per token: logits = router(x); probs = float32 softmax over ALL experts; the k
    highest probabilities pick the experts and are used as combine weights as they are (no
    renormalisation); output = sum_k w_k * expert_k(x), expert = fc1 -> GELU -> fc2 with biases.
    Every token goes through all of its k experts (no capacity limit, no dropping).
    Ties: among equal probabilities the lower expert index ranks first (stable descending sort),
    so routing is deterministic and the hardware can copy it.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, He, D = cfg.num_experts, cfg.expert_hidden, cfg.dim
        self.num_experts, self.top_k, self.gating = E, cfg.top_k, cfg.gating
        self.htoh4_weight = nn.Parameter(torch.empty(E, He, D))
        self.htoh4_bias = nn.Parameter(torch.empty(E, He))
        self.h4toh_weight = nn.Parameter(torch.empty(E, D, He))
        self.h4toh_bias = nn.Parameter(torch.empty(E, D))
        if cfg.gating == "multi":
            self.routers = nn.ModuleList(nn.Linear(D, E, bias=False) for _ in cfg.tasks)
        else:  # "task_cond": the task embedding is concatenated to every token before one router
            self.task_embed = nn.Embedding(cfg.num_tasks, cfg.task_embed_dim)
            self.router = nn.Linear(D + cfg.task_embed_dim, E, bias=False)

    def logits(self, x, task: int):
        if self.gating == "multi":
            return self.routers[task](x)
        emb = self.task_embed.weight[task].expand(*x.shape[:-1], -1)
        return self.router(torch.cat([x, emb], dim=-1))

    def route(self, x, task: int) -> dict:
        logits = self.logits(x, task)
        probs = logits.float().softmax(dim=-1)
        w, idx = torch.sort(probs, dim=-1, descending=True, stable=True)  # stable: lower index wins ties
        return {"logits": logits, "probs": probs,
                "topk_idx": idx[..., :self.top_k], "topk_w": w[..., :self.top_k]}

    def expert(self, e: int, x):
        h = F.gelu(F.linear(x, self.htoh4_weight[e], self.htoh4_bias[e]))
        return F.linear(h, self.h4toh_weight[e], self.h4toh_bias[e])

    def forward(self, x, task: int, dense: bool = False):
        """Returns (output like x, routing dict). dense=True uses dense_reference for the combine."""
        r = self.route(x, task)
        if dense:
            return self.dense_reference(x, r["topk_idx"], r["topk_w"]), r
        D = x.shape[-1]
        flat = x.reshape(-1, D)
        idx = r["topk_idx"].reshape(-1, self.top_k)
        w = r["topk_w"].reshape(-1, self.top_k).to(x.dtype)
        out = torch.zeros_like(flat)
        for e in range(self.num_experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)   # the queue of tokens routed to expert e
            if tok.numel():
                out.index_add_(0, tok, self.expert(e, flat[tok]) * w[tok, slot, None])
        return out.reshape(x.shape), r

    def dense_reference(self, x, topk_idx, topk_w):
        """Every expert on every token, then a masked weighted sum: the slow check of forward()."""
        h = F.gelu(torch.einsum("...d,ehd->...eh", x, self.htoh4_weight) + self.htoh4_bias)
        y = torch.einsum("...eh,edh->...ed", h, self.h4toh_weight) + self.h4toh_bias
        gate = torch.zeros(*x.shape[:-1], self.num_experts, dtype=x.dtype, device=x.device)
        gate.scatter_(-1, topk_idx, topk_w.to(x.dtype))
        return (gate.unsqueeze(-1) * y).sum(dim=-2)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.mlp = MoE(cfg) if moe else Mlp(cfg)

    def forward(self, x, task: int, dense_moe: bool = False):
        """Returns (tokens, routing dict or None for a dense block)."""
        x = x + self.attn(self.norm1(x))
        if isinstance(self.mlp, MoE):
            y, routing = self.mlp(self.norm2(x), task, dense=dense_moe)
            return x + y, routing
        return x + self.mlp(self.norm2(x)), None


class M3ViT(nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int | None = 0):
        """seed: passed to init_weights; None leaves the parameters uninitialised (e.g. for loading)."""
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg, cfg.is_moe(i)) for i in range(cfg.depth))
        self.heads = nn.ModuleDict({t: PUPHead(cfg, c) for t, c in zip(cfg.tasks, cfg.task_channels)})
        if seed is not None:
            init_weights(self, seed)

    def _task(self, task) -> int:
        if not isinstance(task, str):
            try:
                task = operator.index(task)
            except TypeError:
                raise TypeError(f"task must be an int index or a task name of {self.cfg.tasks}, "
                                f"got {type(task).__name__} {task!r}") from None
        return self.cfg.task_index(task)

    def _check_input(self, x):
        c = self.cfg
        want = (c.in_chans, c.img_h, c.img_w)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"M3ViT '{c.name}': input x expected [B, C, H, W] = [B, {want[0]}, "
                             f"{want[1]}, {want[2]}] (in_chans, img_h, img_w), got {got}")
        if not x.is_floating_point():
            raise ValueError(f"M3ViT '{c.name}': input x must be a float tensor, got {x.dtype}")

    def forward_features(self, x, task, return_aux: bool = False, dense_moe: bool = False):
        """x [B, C, H, W] -> tokens [B, N+1, D] (class token first).

        return_aux=True also returns {"routing": {i: {logits, probs, topk_idx, topk_w}} for MoE
        blocks i, "block_out": {i: tokens after block i} for all blocks}.
        dense_moe=True runs every MoE block through its dense reference combine.
        """
        self._check_input(x)
        t = self._task(task)
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        routing, block_out = {}, {}
        for i, blk in enumerate(self.blocks):
            x, r = blk(x, t, dense_moe=dense_moe)
            if r is not None:
                routing[i] = r
            block_out[i] = x
        if return_aux:
            return x, {"routing": routing, "block_out": block_out}
        return x

    def forward(self, x, task):
        """-> [B, task_channels[t], img_h, img_w] from the head of task t."""
        t = self._task(task)
        return self.heads[self.cfg.tasks[t]](self.forward_features(x, t))

    def forward_all(self, x) -> dict:
        """-> {task name: head output}; the backbone runs once per task (routing depends on it)."""
        return {name: self.forward(x, t) for t, name in enumerate(self.cfg.tasks)}


def count_params(model: M3ViT, heads: bool = False) -> int:
    """Parameter count of the backbone (all routers included); heads=True adds the task heads."""
    return sum(p.numel() for n, p in model.named_parameters() if heads or not n.startswith("heads."))


def init_weights(model: M3ViT, seed: int) -> M3ViT:
    """Seeded timm-ViT-like init (does not touch the global RNG).

    Linear, experts, routers, pos_embed, cls_token: normal(0, .02) truncated at +-2 std; biases 0.
    LayerNorm / BatchNorm: weight 1, bias 0. Patch-embedding conv: lecun normal (std 1/sqrt(fan_in),
    truncated), as timm's jax-style ViT init. Head convs: kaiming normal (fan_out, ReLU).
    Task embedding (task_cond gating): truncated normal std 1, the scale of the LayerNorm'd tokens
    it is concatenated to, so the task visibly shifts the router logits.
    """
    g = torch.Generator().manual_seed(seed)

    def tn(t, std):
        nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std, generator=g)

    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                tn(m.weight, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
                if isinstance(m, nn.BatchNorm2d):
                    m.reset_running_stats()
            elif isinstance(m, nn.Conv2d):
                if name == "patch_embed.proj":
                    fan_in = m.weight[0].numel()
                    tn(m.weight, fan_in ** -0.5)
                else:
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=g)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                tn(m.weight, 1.0)
            elif isinstance(m, MoE):
                tn(m.htoh4_weight, 0.02)
                tn(m.h4toh_weight, 0.02)
                nn.init.zeros_(m.htoh4_bias)
                nn.init.zeros_(m.h4toh_bias)
        tn(model.pos_embed, 0.02)
        tn(model.cls_token, 0.02)
    return model
