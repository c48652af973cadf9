"""Fixed-point number formats and exact integer helpers.

A value is stored as an integer q meaning q * 2**-frac. Every helper works on numpy int64 arrays
(or Python ints) and is exact: formats are limited to 62 bits so that sums of two values and
products of a 62-bit accumulator-class value with nothing wider never leave int64 silently
(`mul` checks the product width). TRUNC means dropping low bits of the two's complement value,
i.e. rounding toward minus infinity, which is what a hardware bit-slice does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np

MAX_BITS = 62


class Rounding(str, Enum):
    TRUNC = "trunc"          # floor (drop bits)
    HALF_UP = "half_up"      # floor(x + 1/2): ties toward +inf
    HALF_EVEN = "half_even"  # ties to even (convergent)


class Overflow(str, Enum):
    WRAP = "wrap"
    SAT = "sat"


class FormatError(ValueError):
    """A number format cannot represent what it is asked to."""


@dataclass
class SatCounter:
    """Counts saturation events per tensor name: {name: [saturated, total]}."""
    counts: dict = field(default_factory=dict)

    def add(self, name: str, saturated: int, total: int) -> None:
        c = self.counts.setdefault(name, [0, 0])
        c[0] += int(saturated)
        c[1] += int(total)

    def saturated(self, name: str | None = None) -> int:
        if name is not None:
            return self.counts.get(name, [0, 0])[0]
        return sum(c[0] for c in self.counts.values())

    def report(self) -> dict:
        return {k: {"saturated": v[0], "total": v[1]} for k, v in sorted(self.counts.items())}


@dataclass(frozen=True)
class Fmt:
    bits: int
    frac: int
    signed: bool = True

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 1 <= self.bits <= MAX_BITS:
            raise FormatError(f"format bits={self.bits!r}: must be an integer in 1..{MAX_BITS}")
        if not isinstance(self.frac, int) or self.frac < 0:
            raise FormatError(f"format frac={self.frac!r}: must be a non-negative integer")
        if self.frac > self.bits:
            raise FormatError(f"format frac={self.frac} > bits={self.bits}: fraction bits exceed total bits")
        if self.signed and self.bits < 2:
            raise FormatError("a signed format needs at least 2 bits")

    @property
    def int_bits(self) -> int:
        """Integer bits excluding the sign bit."""
        return self.bits - self.frac - (1 if self.signed else 0)

    @property
    def min_int(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def max_int(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def lsb(self) -> float:
        return 2.0 ** -self.frac

    @property
    def max_value(self) -> float:
        return self.max_int * self.lsb

    @property
    def min_value(self) -> float:
        return self.min_int * self.lsb

    def __str__(self) -> str:
        return f"{'s' if self.signed else 'u'}{self.bits}.{self.frac}"

    def to_dict(self) -> dict:
        return {"bits": self.bits, "frac": self.frac, "signed": self.signed}

    @classmethod
    def from_dict(cls, d: dict) -> "Fmt":
        return cls(int(d["bits"]), int(d["frac"]), bool(d.get("signed", True)))

    # --- conversions -------------------------------------------------------------------------
    def fit(self, q, overflow: Overflow = Overflow.SAT, sat: SatCounter | None = None,
            name: str = "?"):
        """Bring integers into this format's range by saturation or two's complement wrap."""
        q = np.asarray(q, dtype=np.int64)
        lo, hi = self.min_int, self.max_int
        over = (q < lo) | (q > hi)
        n_over = int(np.count_nonzero(over))
        if sat is not None:
            sat.add(name, n_over, q.size)
        if n_over == 0:
            return q
        if Overflow(overflow) is Overflow.SAT:
            return np.clip(q, lo, hi)
        mask = (1 << self.bits) - 1
        w = q & mask
        if self.signed:
            w = np.where(w > hi, w - (1 << self.bits), w)
        return w.astype(np.int64)

    def quantize(self, x, rounding: Rounding = Rounding.HALF_EVEN,
                 overflow: Overflow = Overflow.SAT, sat: SatCounter | None = None, name: str = "?"):
        """Float (numpy or torch) -> integer codes. Torch in, torch.int64 out."""
        is_torch = type(x).__module__.startswith("torch")
        if is_torch:
            import torch
            xv = x.detach().to("cpu", torch.float64).numpy()
        else:
            xv = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(xv)):
            raise FormatError(f"tensor '{name}': non-finite values cannot be quantized to {self}")
        v = xv * float(2 ** self.frac)
        r = Rounding(rounding)
        if r is Rounding.TRUNC:
            v = np.floor(v)
        elif r is Rounding.HALF_UP:
            v = np.floor(v + 0.5)
        else:
            v = np.rint(v)
        # clip before the int cast so huge floats cannot wrap in the cast itself; count first
        big = float(2 ** MAX_BITS)
        q = self.fit(np.clip(v, -big, big).astype(np.int64), overflow, sat, name)
        if is_torch:
            import torch
            return torch.from_numpy(np.ascontiguousarray(q))
        return q

    def dequantize(self, q):
        if type(q).__module__.startswith("torch"):
            return q.double() * self.lsb
        return np.asarray(q, dtype=np.float64) * self.lsb


def shift_round(x, shift: int, rounding: Rounding = Rounding.HALF_UP):
    """x * 2**-shift rounded to an integer (shift < 0 is an exact left shift)."""
    x = np.asarray(x, dtype=np.int64)
    if shift <= 0:
        lim = 1 << (62 + shift)
        if x.size and (x.max() >= lim or x.min() < -lim):
            raise FormatError(f"left shift by {-shift} overflows int64 (|x| up to {max(abs(int(x.max())), abs(int(x.min())))})")
        return x << (-shift)
    r = Rounding(rounding)
    if r is Rounding.TRUNC:
        return x >> shift
    if r is Rounding.HALF_UP:
        return (x + (1 << (shift - 1))) >> shift
    q = x >> shift
    rem = x - (q << shift)
    half = 1 << (shift - 1)
    return q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).astype(np.int64)


def requantize(q, src: Fmt, dst: Fmt, rounding: Rounding = Rounding.HALF_UP,
               overflow: Overflow = Overflow.SAT, sat: SatCounter | None = None, name: str = "?"):
    """Integer codes in `src` -> integer codes in `dst`: shift-and-round, then saturate or wrap."""
    shift = src.frac - dst.frac
    if shift >= 0:
        return dst.fit(shift_round(q, shift, rounding), overflow, sat, name)
    # Left shift: clip first so int64 cannot overflow; clipped values lie outside any <= 62-bit
    # destination anyway, so the saturation count and the saturated value are unchanged.
    q = np.asarray(q, dtype=np.int64)
    lim = 1 << (62 + shift)
    clipped = np.clip(q, -lim, lim - 1) << (-shift)
    if Overflow(overflow) is Overflow.SAT:
        return dst.fit(clipped, overflow, sat, name)
    dst.fit(clipped, Overflow.SAT, sat, name)   # count only
    return dst.fit(q << (-shift), Overflow.WRAP)  # int64 shift wraps mod 2**64: low bits exact


def mul(a, b, a_fmt: Fmt, b_fmt: Fmt):
    """Exact product; its format has frac = a.frac + b.frac. Refuses widths int64 cannot hold."""
    if a_fmt.bits + b_fmt.bits > 63:
        raise FormatError(f"product of {a_fmt} and {b_fmt} needs {a_fmt.bits + b_fmt.bits} bits; "
                          "int64 golden arithmetic holds at most 63")
    return np.asarray(a, dtype=np.int64) * np.asarray(b, dtype=np.int64)


def product_fmt(a_fmt: Fmt, b_fmt: Fmt) -> Fmt:
    return Fmt(a_fmt.bits + b_fmt.bits, a_fmt.frac + b_fmt.frac, a_fmt.signed or b_fmt.signed)


def acc_bits_needed(a_fmt: Fmt, b_fmt: Fmt, terms: int) -> int:
    """Bits an accumulator needs to sum `terms` products without overflow."""
    return a_fmt.bits + b_fmt.bits + max(0, (terms - 1).bit_length())
