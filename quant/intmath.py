"""Exact integer matrix products that run at BLAS speed.

numpy's int64 matmul has no BLAS path and is ~100x slower than float64. float64 is exact for
integers below 2**53, so each operand is split into limbs small enough that every partial dot
product stays below 2**53; the limbs are recombined with exact int64 shifts. The result equals
the int64 matmul bit for bit (checked by tests), provided the true result fits in int64.
"""
from __future__ import annotations

import numpy as np

_MANT = 53


def _limbs(x: np.ndarray, bits: int, limb: int):
    """Split signed ints of `bits` bits into limbs: x = sum_i l_i * 2**(i*limb); low limbs unsigned."""
    out, shift = [], 0
    while shift < bits:
        if shift + limb >= bits:
            out.append((x >> shift).astype(np.float64))          # top limb keeps the sign
        else:
            out.append(((x >> shift) & ((1 << limb) - 1)).astype(np.float64))
        shift += limb
    return out


def _bits(x: np.ndarray) -> int:
    if x.size == 0:
        return 1
    m = max(int(x.max()), -int(x.min()) - 1, 0)
    return m.bit_length() + 1  # signed bits


def exact_matmul(a, b) -> np.ndarray:
    """a @ b for int64 arrays (last two axes), exact. Operand widths are measured, not assumed."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    k = a.shape[-1]
    if b.shape[-2] != k:
        raise ValueError(f"exact_matmul: inner dimensions differ: a {a.shape} vs b {b.shape}")
    ab, bb = _bits(a), _bits(b)
    kbits = max(k - 1, 1).bit_length()
    budget = _MANT - kbits - 1            # bits available for one limb product
    if budget < 2:
        raise ValueError(f"exact_matmul: reduction length {k} too long for exact float64 limbs")
    if ab + bb <= budget:                  # no split needed
        return np.rint(a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)
    lb = min(bb, max(1, budget // 2))      # limb width of b
    la = max(1, budget - lb)               # limb width of a
    if ab <= la:
        la = ab
    elif bb <= budget - 1:
        lb, la = bb, max(1, budget - bb)
    a_l = _limbs(a, ab, la)
    b_l = _limbs(b, bb, lb)
    acc = np.zeros(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]),
                   dtype=np.int64)
    for i, ai in enumerate(a_l):
        for j, bj in enumerate(b_l):
            part = np.rint(ai @ bj).astype(np.int64)
            acc += part << (i * la + j * lb)
    return acc
