"""Golden function of the attention engine (hw/attention.py): everything GoldenModel.attention
computes from the qkv tensor onward, built from the same functions (quant.fixed.requantize,
quant.intmath.exact_matmul, quant.approx.softmax_stats / softmax_normalise, quant.schedule
row_key_order), so there is one definition of the arithmetic. tests/test_attention_rtl.py checks
that it reproduces GoldenModel's per-block attention tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import approx
from .config import QuantConfig
from .fixed import Fmt, FormatError, SatCounter, requantize
from .intmath import exact_matmul
from .schedule import row_key_order


@dataclass
class AttentionGolden:
    qkv_in: np.ndarray   # [n, 3*dim] attn_in codes (what the engine's write port takes)
    scores: np.ndarray   # [H, n, n] score codes
    m: np.ndarray        # [H, n] ceil of the row max
    recip: np.ndarray    # [H, n] 1/S codes
    probs: np.ndarray    # [H, n, n] prob codes
    out: np.ndarray      # [n, dim] act codes (heads concatenated, as GoldenModel.attention)


def attention_golden(qkv, qcfg: QuantConfig, cfg, P: int, sat: SatCounter | None = None,
                     name: str = "attn") -> AttentionGolden:
    """qkv: [n, 3*dim] act codes (q | k | v, head h at columns h*dh..(h+1)*dh of each third).
    cfg: ModelConfig (num_tokens, heads, head_dim, dim). P: resident query rows (HWConfig.attn_p),
    which fixes the online-softmax key order."""
    q = qcfg
    n, H, dh, D = cfg.num_tokens, cfg.heads, cfg.head_dim, cfg.dim
    qkv = np.asarray(qkv)
    if qkv.shape != (n, 3 * D):
        raise FormatError(f"attention_golden: qkv shape {list(qkv.shape)} != [{n}, {3 * D}] "
                          "(num_tokens, 3*dim)")
    sat = sat if sat is not None else SatCounter()
    qkv_in = requantize(qkv, q.act, q.attn_in, q.rounding, q.overflow, sat, name + ".attn_in")
    qh, kh, vh = (qkv_in[:, j * D:(j + 1) * D].reshape(n, H, dh).transpose(1, 0, 2) for j in range(3))
    s_acc = exact_matmul(qh, kh.transpose(0, 2, 1))
    s = requantize(s_acc, Fmt(62, 2 * q.attn_in.frac), q.score, q.rounding, q.overflow, sat,
                   name + ".score")
    recip, m = approx.softmax_stats(s, row_key_order(n, P), q, sat, name + ".softmax")
    p = approx.softmax_normalise(s, m, recip, q, sat, name + ".softmax")
    o_acc = exact_matmul(p, vh)
    o = requantize(o_acc, Fmt(62, q.prob.frac + q.attn_in.frac), q.act, q.rounding, q.overflow,
                   sat, name + ".attn_out")
    return AttentionGolden(qkv_in, s, np.asarray(m), np.asarray(recip), p,
                           o.transpose(1, 0, 2).reshape(n, D))
