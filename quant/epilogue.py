"""Golden model of the compute unit's output epilogue (bias, requantize, saturate).

The epilogue takes one MAC accumulator per output lane (format qcfg.acc) and the bias of that
output channel (format qcfg.bias) and produces one activation (format qcfg.act):

    sum = acc + (bias << (acc.frac - bias.frac))            exact, no rounding
    r   = shift_round(sum, acc.frac - act.frac, qcfg.rounding)
    out = act.fit(r, qcfg.overflow)                          saturate (or wrap); counted

`requant_plan` is the one place that derives the widths and shifts; hw/requant.py builds its
datapath from the same plan, so the RTL and this function cannot disagree on a width.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import QuantConfig
from .fixed import Fmt, FormatError, SatCounter, requantize, shift_round


@dataclass(frozen=True)
class RequantPlan:
    bias_shift: int    # bias is shifted left by this to align with the accumulator's fraction
    sum_fmt: Fmt       # format of acc + aligned bias (one bit wider than the wider operand)
    round_shift: int   # sum is shifted right by this (left if negative) to reach act.frac


def requant_plan(qcfg: QuantConfig) -> RequantPlan:
    acc, bias, act = qcfg.acc, qcfg.bias, qcfg.act
    if not (acc.signed and bias.signed and act.signed):
        raise FormatError(f"QuantConfig '{qcfg.name}': requant needs signed acc, bias and act "
                          f"(got acc {acc}, bias {bias}, act {act})")
    bias_shift = acc.frac - bias.frac
    if bias_shift < 0:
        raise FormatError(f"QuantConfig '{qcfg.name}': bias.frac {bias.frac} > acc.frac {acc.frac}; "
                          "the bias cannot be aligned to the accumulator without rounding")
    sum_bits = max(acc.bits, bias.bits + bias_shift) + 1
    if sum_bits > 62:
        raise FormatError(f"QuantConfig '{qcfg.name}': acc {acc} + bias {bias} << {bias_shift} needs "
                          f"{sum_bits} bits; the int64 golden model holds at most 62")
    return RequantPlan(bias_shift, Fmt(sum_bits, acc.frac), acc.frac - act.frac)


def _check_range(name: str, q: np.ndarray, fmt: Fmt, qcfg: QuantConfig) -> None:
    bad = (q < fmt.min_int) | (q > fmt.max_int)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise FormatError(f"requant input '{name}' (QuantConfig '{qcfg.name}' format {fmt}): "
                          f"value {int(q.flat[i])} at flat index {i} is out of range "
                          f"[{fmt.min_int}, {fmt.max_int}]")


def requant_golden(acc, bias, qcfg: QuantConfig, sat: SatCounter | None = None,
                   name: str = "requant"):
    """acc, bias: integer arrays of the same shape (..., lanes). Returns (out, sat_count) where
    out has acc's shape in qcfg.act codes and sat_count[...] is the number of lanes of that
    vector (last axis) that left act's range (saturated, or wrapped under Overflow.WRAP)."""
    acc = np.asarray(acc, dtype=np.int64)
    bias = np.asarray(bias, dtype=np.int64)
    if acc.shape != bias.shape:
        raise FormatError(f"requant: acc shape {acc.shape} != bias shape {bias.shape}")
    if acc.ndim == 0:
        raise FormatError("requant: acc must have a lane axis (shape (..., lanes))")
    _check_range("acc", acc, qcfg.acc, qcfg)
    _check_range("bias", bias, qcfg.bias, qcfg)
    plan = requant_plan(qcfg)
    total = acc + (bias << plan.bias_shift)
    r = shift_round(total, plan.round_shift, qcfg.rounding)
    over = (r < qcfg.act.min_int) | (r > qcfg.act.max_int)
    out = requantize(total, plan.sum_fmt, qcfg.act, qcfg.rounding, qcfg.overflow, sat, name)
    return out, np.count_nonzero(over, axis=-1).astype(np.int64)
