"""Quantise a float M3ViT backbone state dict into the integer weights the golden model and the
accelerator use, with the compile-time folds that remove multipliers from the datapath:

- log2(e)/sqrt(d_head) is folded into the Q rows of W_qkv and b_qkv, so Q.K^T lands directly in
  the base-2 exponent domain of the softmax (`score` format);
- log2(e) is folded into every router weight, so the gate's softmax over experts is base 2 too.
  Top-k of the logits is unchanged by a positive scale; only quantisation differs;
- the K bias is dropped: q.(k + b_k) = q.k + q.b_k adds the same constant to every score of a
  query row, which softmax ignores exactly. Trained K biases reach |50| (Edge-MoE blocks 10-11),
  far outside the bias format, so keeping them would only saturate for nothing.
Saturation of any weight is counted per tensor in the returned SatCounter (weights normally fit).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .config import QuantConfig
from .fixed import Fmt, Rounding, SatCounter

LOG2E = math.log2(math.e)


@dataclass
class QWeights:
    """Integer codes of every backbone tensor (numpy int64), keyed like the float state dict.
    `fmt[name]` is the format of each code array."""
    codes: dict[str, np.ndarray]
    fmt: dict[str, Fmt]
    sat: SatCounter = field(default_factory=SatCounter)
    # granularity "channel" only (quant/channel.py): epilogue integers per weight key, the real
    # scale of stored tensors that are not at their format's 2**-frac, the calibration used
    epi: dict = field(default_factory=dict)
    scales: dict = field(default_factory=dict)
    act: object = None

    def scale(self, name: str, fmt: Fmt):
        """Real value of one code of tensor `name` (a scalar, or per last-axis element)."""
        return self.scales.get(name, fmt.lsb)

    def __getitem__(self, k):
        return self.codes[k]


def _np(t) -> np.ndarray:
    # Always a copy: fold_scales edits in place, and .double()/asarray alias float64 input.
    if hasattr(t, "detach"):
        return t.detach().to("cpu").double().numpy().copy()
    return np.array(t, dtype=np.float64, copy=True)


def tensor_class(name: str) -> str:
    """Which QuantConfig tensor class a backbone state-dict key belongs to."""
    if name.startswith("patch_embed.proj.weight"):
        return "patch_w"
    if name in ("cls_token", "pos_embed"):
        return "act"
    if ".norm" in name:
        return "ln_gamma" if name.endswith("weight") else "ln_beta"
    if name.endswith("bias"):
        return "bias"
    if ".task_embed." in name:
        return "act"
    return "linear_w"


def fold_scales(cfg, sd: dict) -> dict[str, np.ndarray]:
    """Float64 copies of the backbone tensors with the compile-time scale folds applied."""
    out = {k: _np(v) for k, v in sd.items() if not k.startswith("heads.")}
    c = LOG2E / math.sqrt(cfg.head_dim)
    D = cfg.dim
    for i in range(cfg.depth):
        w, b = out[f"blocks.{i}.attn.qkv.weight"], out[f"blocks.{i}.attn.qkv.bias"]
        w[:D] *= c
        b[:D] *= c
        b[D:2 * D] = 0.0   # K bias: softmax-invariant, see the module docstring
        for k in list(out):
            if k.startswith(f"blocks.{i}.mlp.router") and k.endswith("weight"):
                out[k] = out[k] * LOG2E
    return out


def quantize_weights(cfg, qcfg: QuantConfig, sd: dict, act_scales=None) -> QWeights:
    """Integer weights for qcfg. Granularity "channel": per-channel scales and calibrated
    activation scales (quant/channel.py; act_scales default: the standard calibration set)."""
    if qcfg.granularity == "channel":
        from .channel import quantize_channel
        return quantize_channel(cfg, qcfg, sd, act_scales)
    folded = fold_scales(cfg, sd)
    sat = SatCounter()
    codes, fmts = {}, {}
    for k, v in folded.items():
        f = getattr(qcfg, tensor_class(k))
        codes[k] = f.quantize(v, Rounding.HALF_EVEN, qcfg.overflow, sat, k)
        fmts[k] = f
    return QWeights(codes, fmts, sat)
