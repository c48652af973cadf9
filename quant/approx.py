"""Integer hardware approximations of exp2, softmax, GELU, rsqrt/LayerNorm and the MoE gate.

These functions ARE the specification the RTL units are verified against bit for bit. Every step
is an integer add/sub, compare, shift, a multiply of the stated widths, a small ROM read or a
leading-zero count. "round(v >> k)" below is the shift rounded per `qcfg.rounding` (HALF_UP in
edge-moe-fixed: add 2**(k-1), then arithmetic shift right by k); a negative k is an exact left
shift; "sat" saturates (or wraps, per qcfg.overflow) to the named format and is counted in the
SatCounter passed as `sat`. Floats appear only where a ROM is generated (`*_table(qcfg)`, which
the RTL generator calls to fill its ROMs). All golden arithmetic is numpy int64, vectorised over
any leading shape; products that could pass 63 bits are narrowed first, except the 1/D constant
multiplies of LayerNorm, whose wide product the golden model forms exactly from 31-bit halves.
Widths are for edge-moe-fixed (score/act/gate_logit s32.22, exp u17.16, sum u32.20, recip
u24.22, prob/gate_prob u17.16, gelu_table u18.18, ln_stat s52.32, ln_rstd u32.22, ln_gamma /
ln_beta s16.11); the `*_params` functions derive them for any QuantConfig, in one place.

exp2_fixed: 2**x for x <= 0 (33 bits, 22 fraction bits), out_fmt exp (u17.16) or, for sums,
  exp_sum_fmt (u21.20).  k = x >> 22 (floor), f = x & (2**22-1); i = f >> 16 (exp_table_bits 6),
  r = f & 0xffff.  ROM T (exp2_frac_table): 65 entries round(2**(i/64) * 2**24), u26.24, T[0] = 1.
  v = (T[i] << 16) + (T[i+1] - T[i]) * r   (19 x 16-bit multiply; v = 2**f with 40 fraction bits)
  e = round(v >> (min(-k, Fo+2) + 40 - Fo))  (Fo = out frac; a saturated shift: result 0 below
  -(Fo+1)).  exp2(0) = 1 exactly.  Max abs error 2.2e-5 (bound 2**-15).
reciprocal_fixed (once per softmax row / per token): recip = round(2**42 / S), S in u32.20, to
  u24.22: the exact quotient of a restoring divider, 25 iterations (one quotient bit each, the
  last for rounding) of a 33-bit compare-subtract, dividend a constant power of two.
softmax_stats (online, in the hardware's key order), per row: m (integer exponent), S (u32.20).
  c = ceil(s) = (s + 2**22-1) >> 22.  First step: m = c, S = 0.  Every step:
  d = max(c - m, 0); S = round(S >> min(d, 33)); m = max(m, c);
  S = sat_sum(S + exp2(s - (m << 22)) in u21.20).  Returns recip(S), m.  Order-dependent only
  through the rounding of S at each rescale; m = ceil(row max) whatever the order.
softmax_normalise: p = sat_prob(round(exp2(s - (m << 22)) [u17.16] * recip [u24.22] >> 22))
  (one 17 x 24-bit multiply = one DSP48E2).  Max abs error vs float64 2.1e-5 (target 1e-3).
gelu_fixed: y = relu(x) - d(|x|), d(t) = t * Phi(-t).  t = |x| (32 bits unsigned); t >= 8.0 ->
  d = 0; else i = t >> 17 (8 bits: step 1/32), r = t & 0x1ffff (17 bits).  ROM T (gelu_table):
  257 entries u18.18, T[256] = 0.  d = (T[i] << 17) + (T[i+1] - T[i]) * r (signed 14 x 17 bits,
  35 fraction bits); y = sat_act(relu(x) - round(d >> 13)).  Max abs error 9.7e-5 (target 2e-4).
rsqrt_fixed: v > 0 in ln_stat (52 bits).  b = bit length of v (leading-zero count); shift sh =
  b-27 or b-28, whichever is even, so u = v >> sh (or << -sh) lies in [2**26, 2**28): M = u/2**26
  in [1, 4) and v/2**32 = M * 4**E, E = (sh - 6)/2.  Seed y = R[u >> 22] (rsqrt_table: 64
  entries u27.26, minimax relative error per segment, 48 used); rsqrt_newton = 2 steps of
  a = round(y*y >> 26); b = round(u*a >> 26); y = round(y*(3*2**26 - b) >> 27)  (27-28 bit mults);
  rstd = sat(round(y >> (4 + E))) in ln_rstd u32.22.  Mantissa rel. error 1.9e-7; output rel.
  error 8.5e-5 over [eps, ln_stat max] (u32.22 quantisation at large var; target 1e-3).
layernorm_fixed over D, any D < 4096 (L = bit length of D-1, K = round(2**(30+L) / D), 31 bits):
  one pass, three accumulators: xn = round(x >> 6) (s27.16); Sx = sum x (32+L bits), Sn = sum xn
  (27+L bits), Q = sum xn*xn (51+L bits).  Per row: mean = round(Sx*K >> (30+L)) (act);
  mean_n = round(Sn*K >> (24+L)) (act frac); E2 = round(Q*K >> (30+L)) (s52.32; 82+L-bit product);
  msq = round(mean_n**2 >> 12); var = sat(max(E2 - msq, 0) + eps_q) with eps_q = max(1,
  round(eps * 2**32)) = 4295 for 1e-6; rstd = rsqrt_fixed(var).  var is that of xn (consistent
  pair), the centring uses the exact-sum mean.  Per element: xhat = round((x - mean) * rstd
  >> 22) (33 x 32 bits, |xhat| <= sqrt(D) so < 2**51); y = sat_act(round((xhat*gamma
  + (beta << 22)) >> 11)).  Max abs error 2.1e-5 on realistic rows (bound 1e-4).
gate_fixed, per token over E logits (gate_logit, base 2): mx = max (compare tree, exact);
  e = exp2(l - mx) in exp (top expert exactly 1) and in u21.20 for S = sum e (exact, no
  rescale); recip as above; p = sat(round(e * recip >> 22)) in gate_prob; top-k by logit code
  (the exact order of the probabilities, without the ties of p codes that round alike, e.g. two
  experts far below the top one both at p = 0), equal logits -> lower expert index first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from .config import QuantConfig
from .fixed import Fmt, FormatError, Rounding, SatCounter, shift_round

GUARD_BITS = 4        # extra fraction bits of the exp2 table and of the rsqrt Newton datapath
INTERP_MAX_BITS = 17  # interpolation fractions are at most 17 bits: unsigned into a DSP's 18-bit port
LN_K_BITS = 30        # 1/D constant K = round(2**(30+L)/D) lies in [2**30, 2**31)


# ---------------------------------------------------------------------------------------------
# integer primitives
# ---------------------------------------------------------------------------------------------
def _i64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int64)


def rshift_round(x, sh, rounding: Rounding):
    """x * 2**-sh rounded; sh is an int or an int array with 0 <= sh <= 62 (vectorised shifter)."""
    x, sh = _i64(x), _i64(sh)
    r = Rounding(rounding)
    if r is Rounding.TRUNC:
        return x >> sh
    half = (np.int64(1) << sh) >> 1
    if r is Rounding.HALF_UP:
        return (x + half) >> sh
    q = x >> sh
    rem = x - (q << sh)
    return q + ((rem > half) | ((rem == half) & (half > 0) & ((q & 1) == 1))).astype(np.int64)


def _shift(x, sh: int, rounding: Rounding):
    """Right shift with rounding for sh > 0, exact left shift for sh <= 0 (scalar sh)."""
    return shift_round(x, sh, rounding)


def mul_shift_wide(a, k: int, s: int, rounding: Rounding):
    """round(a * k * 2**-s) exactly, for |a| < 2**62, 0 <= k < 2**31, 1 <= s <= 62 (result must fit).

    The hardware forms the full (up to 93-bit) product; the golden model splits a into a signed
    high part and an unsigned 31-bit low part so every partial product fits int64.
    """
    a = _i64(a)
    k, s, c = int(k), int(s), 31
    if not (0 <= k < 1 << c and 1 <= s <= 62):
        raise ValueError(f"mul_shift_wide: constant {k} or shift {s} out of range")
    r = Rounding(rounding)
    ah, al = a >> c, a & ((1 << c) - 1)
    x, y = ah * k, al * k
    add = 0 if r is Rounding.TRUNC else 1 << (s - 1)
    if s >= c:
        q = (x + ((y + add) >> c)) >> (s - c)
        low = ((((x & ((1 << (s - c)) - 1)) << c) + y) & ((1 << s) - 1))
    else:
        q = (x << (c - s)) + ((y + add) >> s)
        low = y & ((1 << s) - 1)
    if r is Rounding.HALF_EVEN:  # exact tie (low bits == one half) rounds to even
        q = q - ((low == (1 << (s - 1))) & ((q & 1) == 1)).astype(np.int64)
    return q


def div_round(num: int, den, rounding: Rounding):
    """round(num / den) for a positive constant num < 2**62 and den > 0 (the restoring divider)."""
    den = _i64(den)
    if np.any(den <= 0):
        raise ValueError("reciprocal of a non-positive value")
    q2 = np.int64(2 * num) // den          # one extra quotient bit for rounding
    r = Rounding(rounding)
    if r is Rounding.TRUNC:
        return q2 >> 1
    q = (q2 + 1) >> 1
    if r is Rounding.HALF_EVEN:
        tie = ((q2 & 1) == 1) & (q2 * den == 2 * num)
        q = q - (tie & ((q & 1) == 1)).astype(np.int64)
    return q


def bit_length(v):
    """Bits needed by non-negative v (64 - leading-zero count): a 6-level priority encoder."""
    x = _i64(v)
    n = np.zeros(x.shape, dtype=np.int64)
    for s in (32, 16, 8, 4, 2, 1):
        big = (x >> s) > 0
        n += np.where(big, s, 0)
        x = np.where(big, x >> s, x)
    return n + (x > 0)


def _fit(q, fmt: Fmt, qcfg: QuantConfig, sat: SatCounter | None, name: str):
    return fmt.fit(q, qcfg.overflow, sat, name)


def _round_half_up_float(v: np.ndarray) -> np.ndarray:
    return np.floor(np.asarray(v, dtype=np.float64) + 0.5).astype(np.int64)


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


# ---------------------------------------------------------------------------------------------
# exp2 and reciprocal
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Exp2Params:
    in_frac: int       # fraction bits of the exponent x
    table_bits: int    # index bits (2**table_bits segments on [0, 1))
    table_frac: int    # fraction bits of the table entries 2**(i/2**table_bits), in [1, 2]
    interp_bits: int   # bits of the interpolation fraction r


def exp2_params(qcfg: QuantConfig, in_fmt: Fmt | None = None) -> Exp2Params:
    f = (in_fmt or qcfg.score).frac
    b = qcfg.exp_table_bits
    if f < b:
        raise FormatError(f"exp2: input format frac {f} < exp_table_bits {b}: no bits for the table index")
    tf = max(qcfg.exp.frac, qcfg.sum.frac) + GUARD_BITS
    return Exp2Params(f, b, tf, min(f - b, INTERP_MAX_BITS))


def exp_sum_fmt(qcfg: QuantConfig) -> Fmt:
    """The exp2 unit's output on the accumulation path: 2**x in [0, 1] with sum.frac bits."""
    return Fmt(qcfg.sum.frac + 1, qcfg.sum.frac, False)


@lru_cache(maxsize=None)
def _exp2_table(bits: int, frac: int) -> np.ndarray:
    i = np.arange((1 << bits) + 1, dtype=np.float64)
    return _readonly(_round_half_up_float(np.exp2(i / (1 << bits)) * 2.0 ** frac))


def exp2_frac_table(qcfg: QuantConfig) -> np.ndarray:
    """ROM: T[i] = round_half_up(2**(i / 2**B) * 2**TF), i = 0..2**B (B = exp_table_bits,
    TF = max(exp.frac, sum.frac) + 4); T[0] = 2**TF and T[2**B] = 2**(TF+1) exactly."""
    p = exp2_params(qcfg)
    return _exp2_table(p.table_bits, p.table_frac).copy()


def exp2_fixed(x, qcfg: QuantConfig, in_fmt: Fmt | None = None, out_fmt: Fmt | None = None,
               sat: SatCounter | None = None):
    """2**x for x <= 0 given as integer codes with `in_fmt.frac` (default the score format's)
    fraction bits, returned in `out_fmt` (default `exp`; the softmax sums use exp_sum_fmt):
    unsigned, exactly 2**Fo for x = 0.

    k = x >> F (floor), f = x - (k << F) in [0, 2**F); i = f >> (F-B), r = the next R bits of f
    (R = min(F-B, 17), lower bits dropped); v = (T[i] << R) + (T[i+1] - T[i]) * r is 2**f with
    TF+R fraction bits; e = round(v >> (n + TF + R - Fo)) with n = min(-k, Fo+2): every x below
    -(Fo+1) gives 0 (underflow is not counted: 0 is the correctly rounded result). Positive x
    raises (the softmax never produces it).
    """
    p = exp2_params(qcfg, in_fmt)
    x = _i64(x)
    if np.any(x > 0):
        raise ValueError(f"exp2_fixed: exponent must be <= 0 (max code {int(x.max())})")
    t = _exp2_table(p.table_bits, p.table_frac)
    k = x >> p.in_frac
    f = x - (k << p.in_frac)
    low = p.in_frac - p.table_bits
    i = f >> low
    r = (f & ((1 << low) - 1)) >> (low - p.interp_bits)
    v = (t[i] << p.interp_bits) + (t[i + 1] - t[i]) * r
    out = out_fmt or qcfg.exp
    if out.frac > p.table_frac:
        raise FormatError(f"exp2: output {out} finer than the table's {p.table_frac} fraction bits")
    n = np.minimum(-k, out.frac + 2)                 # a longer shift gives 0 all the same
    e = rshift_round(v, n + p.table_frac + p.interp_bits - out.frac, qcfg.rounding)
    return _fit(e, out, qcfg, sat, "exp")            # only a format without 1.0 saturates


def reciprocal_fixed(s, qcfg: QuantConfig, sat: SatCounter | None = None, name: str = "recip"):
    """recip = round(2**(sum.frac + recip.frac) / s): 1/S from `sum` codes to `recip` codes.

    Exact quotient of a restoring divider (recip.bits + 1 iterations: one quotient bit each, the
    last for rounding; the dividend is a constant power of two). Chosen over a table + Newton
    seed because it is exact (nothing to tune, trivially specified) and runs once per softmax row
    (>= 9 scores stream in per row, P rows share the n-cycle window) or once per token for the
    gate, where an unrolled (pipelined) divider of 25 x 33-bit subtractors keeps up.
    """
    kk = qcfg.sum.frac + qcfg.recip.frac
    if kk + 1 > 61:
        raise FormatError(f"reciprocal: sum.frac + recip.frac = {kk} exceeds 60 bits")
    return _fit(div_round(1 << kk, s, qcfg.rounding), qcfg.recip, qcfg, sat, name)


def _normalise(e, recip, qcfg: QuantConfig, out: Fmt, sat, name):
    """p = round(e * recip >> (exp.frac + recip.frac - out.frac)), saturated to `out`."""
    if qcfg.exp.bits + qcfg.recip.bits > 62:
        raise FormatError(f"softmax: exp {qcfg.exp} x recip {qcfg.recip} exceeds 62 bits")
    prod = _i64(e) * _i64(recip)
    return _fit(_shift(prod, qcfg.exp.frac + qcfg.recip.frac - out.frac, qcfg.rounding),
                out, qcfg, sat, name)


# ---------------------------------------------------------------------------------------------
# online softmax (attention)
# ---------------------------------------------------------------------------------------------
def _check_order(order, rows: int, n: int) -> np.ndarray:
    o = _i64(order)
    if o.shape != (rows, n):
        raise ValueError(f"softmax order has shape {o.shape}; scores need ({rows}, {n})")
    if not np.array_equal(np.sort(o, axis=-1), np.broadcast_to(np.arange(n), (rows, n))):
        raise ValueError("softmax order: every row must be a permutation of the key indices 0..n-1")
    return o


def _ceil_int(s, frac: int):
    return -((-s) >> frac)          # hardware: (s + 2**frac - 1) >> frac


class SoftmaxStats(NamedTuple):
    recip: np.ndarray    # [..., rows] 1/S in the recip format
    m: np.ndarray        # [..., rows] integer exponent: ceil of the row max


def softmax_stats(scores, order, qcfg: QuantConfig, sat: SatCounter | None = None,
                  name: str = "softmax") -> SoftmaxStats:
    """Single-pass softmax statistics in the hardware's order. scores: [..., rows, n] score codes
    (base-2 exponents); order: [rows, n], order[o, t] = key processed by row o at step t.

    Per row: m = ceil(s) of the first key, S = 0; at every step with score s, c = ceil(s):
      d = max(c - m, 0); S = round(S * 2**-min(d, sum.bits+1)); m = max(m, c);
      S = sat_sum(S + exp2(s - m*2**score.frac) in exp_sum_fmt, i.e. with sum.frac bits).
    m is the integer ceiling of the row max, so 2**(s-m) <= 1 and the rescale is a shift.
    The result depends on the order only through the rounding of S at each rescale (m does not).
    Returns SoftmaxStats(recip [..., rows] in `recip`, m [..., rows] as plain integers);
    saturation is counted as <name>.sum and <name>.recip.
    """
    s = _i64(scores)
    if s.ndim < 2:
        raise ValueError(f"softmax_stats: scores need shape [..., rows, n], got {s.shape}")
    rows, n = s.shape[-2:]
    if n < 1:
        raise ValueError("softmax_stats: rows need at least one score")
    o = _check_order(order, rows, n)
    sp = np.take_along_axis(s, np.broadcast_to(o, s.shape), axis=-1)
    f = qcfg.score.frac
    m = _ceil_int(sp[..., 0], f)
    acc = np.zeros(m.shape, dtype=np.int64)
    dmax = qcfg.sum.bits + 1        # a shift this long already clears S
    for t in range(n):
        st = sp[..., t]
        c = _ceil_int(st, f)
        acc = rshift_round(acc, np.minimum(np.maximum(c - m, 0), dmax), qcfg.rounding)
        m = np.maximum(m, c)
        e = exp2_fixed(st - (m << f), qcfg, out_fmt=exp_sum_fmt(qcfg))
        acc = _fit(acc + e, qcfg.sum, qcfg, sat, name + ".sum")
    return SoftmaxStats(reciprocal_fixed(acc, qcfg, sat, name + ".recip"), m)


def softmax_normalise(scores, m, recip, qcfg: QuantConfig, sat: SatCounter | None = None,
                      name: str = "softmax"):
    """Probabilities in `prob`: p = round(exp2(s - m*2**score.frac) * recip >> (exp.frac +
    recip.frac - prob.frac)) (during A.V). scores [..., rows, n]; m, recip [..., rows]."""
    s = _i64(scores)
    e = exp2_fixed(s - (_i64(m)[..., None] << qcfg.score.frac), qcfg)
    return _normalise(e, _i64(recip)[..., None], qcfg, qcfg.prob, sat, name + ".prob")


def softmax_fixed(scores, qcfg: QuantConfig, order=None, sat: SatCounter | None = None,
                  name: str = "softmax"):
    """Reference composition: softmax over the last axis of score codes -> `prob` codes.
    order: [rows, n] as in softmax_stats; None = every row in natural key order."""
    s = _i64(scores)
    squeeze = s.ndim == 1
    if squeeze:
        s = s[None]
    rows, n = s.shape[-2:]
    if order is None:
        order = np.broadcast_to(np.arange(n), (rows, n))
    recip, m = softmax_stats(s, order, qcfg, sat, name)
    p = softmax_normalise(s, m, recip, qcfg, sat, name)
    return p[0] if squeeze else p


# ---------------------------------------------------------------------------------------------
# GELU
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GeluParams:
    in_frac: int        # gelu_in fraction bits
    step_log2: int      # table step 2**-step_log2
    segments: int       # table covers [0, segments * step); d = 0 beyond
    interp_bits: int    # bits of the interpolation fraction r
    table_frac: int     # gelu_table fraction bits
    out_frac: int       # act fraction bits


def gelu_params(qcfg: QuantConfig) -> GeluParams:
    f, g = qcfg.gelu_in.frac, qcfg.gelu_step_log2
    if f < g:
        raise FormatError(f"gelu: gelu_in.frac {f} < gelu_step_log2 {g}: no bits for the table index")
    return GeluParams(f, g, int(qcfg.gelu_range * 2 ** g), min(f - g, INTERP_MAX_BITS),
                      qcfg.gelu_table.frac, qcfg.act.frac)


def _gelu_d(t: np.ndarray) -> np.ndarray:
    """d(t) = t * Phi(-t) = t * erfc(t / sqrt 2) / 2, float64 (table generation only)."""
    erfc = np.frompyfunc(math.erfc, 1, 1)
    return t * erfc(t / math.sqrt(2.0)).astype(np.float64) / 2.0


@lru_cache(maxsize=None)
def _gelu_tab(p: GeluParams, fmt: Fmt) -> np.ndarray:
    t = np.arange(p.segments, dtype=np.float64) / (1 << p.step_log2)
    tab = np.append(_round_half_up_float(_gelu_d(t) * 2.0 ** p.table_frac), 0)
    if tab.max() > fmt.max_int:
        raise FormatError(f"gelu_table {fmt} cannot hold d(t) max {tab.max() * fmt.lsb:.4f}")
    return _readonly(tab)


def gelu_table(qcfg: QuantConfig) -> np.ndarray:
    """ROM: T[i] = round_half_up(d(i * 2**-G) * 2**gelu_table.frac) for i < N = gelu_range * 2**G,
    T[N] = 0 (so d falls linearly to 0 over the last segment and is 0 from gelu_range on)."""
    return _gelu_tab(gelu_params(qcfg), qcfg.gelu_table).copy()


def gelu_fixed(x, qcfg: QuantConfig, sat: SatCounter | None = None, name: str = "gelu"):
    """GELU(x) = relu(x) - d(|x|): x in gelu_in codes -> act codes.

    t = |x|; t >= N << (F-G) -> d = 0; else i = t >> (F-G), r = the next R bits of t
    (R = min(F-G, 17)); d = (T[i] << R) + (T[i+1] - T[i]) * r (TF+R fraction bits);
    y = sat_act(relu(x) requantized to act - round(d >> (TF + R - act.frac))).
    """
    p = gelu_params(qcfg)
    tab = _gelu_tab(p, qcfg.gelu_table)
    x = _i64(x)
    t = np.abs(x)
    low = p.in_frac - p.step_log2
    i = t >> low
    inside = i < p.segments
    i = np.where(inside, i, 0)
    r = (t & ((1 << low) - 1)) >> (low - p.interp_bits)
    d = np.where(inside, (tab[i] << p.interp_bits) + (tab[i + 1] - tab[i]) * r, 0)
    d = _shift(d, p.table_frac + p.interp_bits - p.out_frac, qcfg.rounding)
    relu = _shift(np.maximum(x, 0), p.in_frac - p.out_frac, qcfg.rounding)
    return _fit(relu - d, qcfg.act, qcfg, sat, name)


# ---------------------------------------------------------------------------------------------
# reciprocal square root and LayerNorm
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RsqrtParams:
    in_frac: int      # ln_stat fraction bits
    mant_frac: int    # normalised mantissa u and Newton iterate y fraction bits
    table_bits: int   # seed ROM index = top table_bits of the (mant_frac+2)-bit mantissa
    newton: int       # Newton steps
    out_frac: int     # ln_rstd fraction bits


def rsqrt_params(qcfg: QuantConfig) -> RsqrtParams:
    mf = qcfg.ln_rstd.frac + GUARD_BITS
    if 2 * mf + 4 > 62:
        raise FormatError(f"ln_rstd {qcfg.ln_rstd}: Newton datapath of {mf} fraction bits exceeds int64")
    return RsqrtParams(qcfg.ln_stat.frac, mf, qcfg.rsqrt_table_bits, qcfg.rsqrt_newton,
                       qcfg.ln_rstd.frac)


@lru_cache(maxsize=None)
def _rsqrt_tab(bits: int, frac: int) -> np.ndarray:
    # segment j covers M in [j, j+1) * 2**(2-bits); entries j < 2**(bits-2) are never addressed
    j = np.arange(1 << bits, dtype=np.float64)
    a, b = j * 2.0 ** (2 - bits), (j + 1) * 2.0 ** (2 - bits)
    seed = np.where(j >= 1 << (bits - 2), 2.0 / (np.sqrt(a) + np.sqrt(b)), 0.0)
    return _readonly(_round_half_up_float(seed * 2.0 ** frac))


def rsqrt_table(qcfg: QuantConfig) -> np.ndarray:
    """ROM: R[j] = round_half_up(2 / (sqrt(a) + sqrt(b)) * 2**MF) for the mantissa segment
    [a, b) = [j, j+1) * 2**(2-T), T = rsqrt_table_bits, MF = rsqrt_params().mant_frac: the
    constant with the smallest max relative error on the segment. R[j] = 0 for j < 2**(T-2)."""
    p = rsqrt_params(qcfg)
    return _rsqrt_tab(p.table_bits, p.mant_frac).copy()


def rsqrt_parts(v, qcfg: QuantConfig):
    """Unsaturated rsqrt: (y, e) with 1/sqrt(v * 2**-ln_stat.frac) ~= y * 2**-(mant_frac + e),
    y in (2**(MF-1), 2**MF]. v: positive ln_stat codes. See the module docstring for the steps."""
    p = rsqrt_params(qcfg)
    v = _i64(v)
    if np.any(v <= 0):
        raise ValueError("rsqrt_fixed: input must be positive (LayerNorm adds eps >= 1 LSB)")
    mf = p.mant_frac
    sh = bit_length(v) - 1 - mf
    sh -= (sh + mf - p.in_frac) & 1                                      # even exponent
    u = np.where(sh >= 0, v >> np.maximum(sh, 0), v << np.maximum(-sh, 0))
    e = (sh + mf - p.in_frac) // 2
    y = _rsqrt_tab(p.table_bits, mf)[u >> (mf + 2 - p.table_bits)]
    rnd = qcfg.rounding
    for _ in range(p.newton):
        a = _shift(y * y, mf, rnd)
        b = _shift(u * a, mf, rnd)
        y = _shift(y * ((3 << mf) - b), mf + 1, rnd)
    return y, e


def rsqrt_fixed(v, qcfg: QuantConfig, sat: SatCounter | None = None, name: str = "ln_rstd"):
    """1/sqrt(v) from ln_stat codes to ln_rstd codes: y, e = rsqrt_parts(v); rstd =
    sat(round(y >> (MF - ln_rstd.frac + e))) (an exact left shift when that amount is negative)."""
    p = rsqrt_params(qcfg)
    y, e = rsqrt_parts(v, qcfg)
    sh = p.mant_frac - p.out_frac + e
    left = np.minimum(np.maximum(-sh, 0), 62 - p.mant_frac - 1)    # saturates anyway beyond
    out = np.where(sh >= 0, rshift_round(y, np.minimum(np.maximum(sh, 0), 62), qcfg.rounding),
                   y << left)
    return _fit(out, qcfg.ln_rstd, qcfg, sat, name)


@dataclass(frozen=True)
class LnParams:
    d: int            # row length
    k: int            # 1/D constant, K = round(2**p / d)
    p: int            # its shift, 30 + bit length of (d - 1)
    h_frac: int       # fraction bits of the narrowed x used for the sums (= ln_stat.frac / 2)
    eps_q: int        # eps in ln_stat codes (>= 1)


def layernorm_params(d: int, qcfg: QuantConfig, eps: float = 1e-6) -> LnParams:
    if not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"layernorm: row length D={d!r} must be a positive integer")
    d = int(d)
    lbits = (d - 1).bit_length()
    p = LN_K_BITS + lbits
    h = qcfg.ln_stat.frac // 2
    xn_max = 1 << max(0, qcfg.act.bits - 1 - qcfg.act.frac + h)        # |xn| <= this
    if qcfg.ln_stat.frac % 2:
        raise FormatError(f"layernorm: ln_stat {qcfg.ln_stat} needs an even frac (squares of x "
                          "narrowed to ln_stat.frac/2 fraction bits land on it)")
    if d * xn_max * xn_max >= 1 << 62 or qcfg.act.bits > 32:
        raise FormatError(f"layernorm: act {qcfg.act} / ln_stat {qcfg.ln_stat} with D={d}: the sum "
                          "of squares or mean**2 would exceed int64 (needs act <= 32 bits and "
                          "D * max|xn|**2 < 2**62)")
    eps_q = max(1, int(math.floor(eps * 2.0 ** qcfg.ln_stat.frac + 0.5)))
    return LnParams(d, ((1 << (p + 1)) // d + 1) >> 1, p, h, eps_q)


def layernorm_fixed(x, gamma, beta, qcfg: QuantConfig, eps: float = 1e-6,
                    sat: SatCounter | None = None, name: str = "layernorm"):
    """LayerNorm over the last axis: x [..., D] act codes, gamma/beta [D] ln_gamma/ln_beta codes
    -> act codes. One pass (Sx, Sn, Q), then per row mean, var, rstd; then per element
    y = (x - mean) * rstd * gamma + beta. Exact steps in the module docstring; rounding per
    qcfg.rounding at every narrowing; var, rstd and y saturate (counted as <name>.var,
    <name>.rstd and <name>)."""
    x = _i64(x)
    if x.ndim < 1:
        raise ValueError("layernorm: x needs a last axis")
    lp = layernorm_params(x.shape[-1], qcfg, eps)
    gamma, beta = _i64(gamma), _i64(beta)
    for nm, a in (("gamma", gamma), ("beta", beta)):
        if a.shape != (lp.d,):
            raise ValueError(f"layernorm: {nm} has shape {a.shape}, expected ({lp.d},)")
    rnd, fa, fs = qcfg.rounding, qcfg.act.frac, qcfg.ln_stat.frac
    xn = _shift(x, fa - lp.h_frac, rnd)
    sx, sn, q = x.sum(axis=-1), xn.sum(axis=-1), (xn * xn).sum(axis=-1)     # the one pass
    mean = mul_shift_wide(sx, lp.k, lp.p, rnd)                   # exact-sum mean, act format
    mean_n = mul_shift_wide(sn, lp.k, lp.p + lp.h_frac - fa, rnd)   # mean of xn, act frac
    e2 = mul_shift_wide(q, lp.k, lp.p, rnd)                      # mean of xn**2, ln_stat
    msq = _shift(mean_n * mean_n, 2 * fa - fs, rnd)              # var is that of xn: consistent
    var = _fit(np.maximum(e2 - msq, 0) + lp.eps_q, qcfg.ln_stat, qcfg, sat, name + ".var")
    rstd = rsqrt_fixed(var, qcfg, sat, name + ".rstd")
    xhat = _shift((x - mean[..., None]) * rstd[..., None], qcfg.ln_rstd.frac, rnd)   # act frac
    fg, fb = qcfg.ln_gamma.frac, qcfg.ln_beta.frac
    y = xhat * gamma + _shift(beta, fb - fa - fg, rnd)
    return _fit(_shift(y, fg, rnd), qcfg.act, qcfg, sat, name)


# ---------------------------------------------------------------------------------------------
# MoE gate
# ---------------------------------------------------------------------------------------------
def gate_fixed(logits, qcfg: QuantConfig, top_k: int, sat: SatCounter | None = None,
               name: str = "gate"):
    """Router softmax over experts (base 2) and top-k. logits [..., E] gate_logit codes.

    mx = max_e l_e (exact); e = exp2(l - mx) (in_fmt gate_logit); S = sum e (sum format, exact
    integer sum, saturated); recip = reciprocal_fixed(S); p = round(e * recip >> (exp.frac +
    recip.frac - gate_prob.frac)) in gate_prob. Top-k: descending logit code (p is monotone in it;
    ranking by p codes would pick arbitrarily among experts whose p round to the same code, such
    as several at 0 next to a dominant expert), equal logits -> lower expert index first.
    Returns (topk_idx [..., k], topk_w [..., k] gate_prob codes, probs [..., E]); combine weights
    are the selected probabilities, not renormalised.
    """
    lg = _i64(logits)
    if lg.ndim < 1 or lg.shape[-1] < 1:
        raise ValueError(f"gate: logits need shape [..., E], got {lg.shape}")
    n_exp = lg.shape[-1]
    if not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= n_exp:
        raise ValueError(f"gate: top_k={top_k!r} must be in 1..{n_exp}")
    x = lg - lg.max(axis=-1, keepdims=True)
    e = exp2_fixed(x, qcfg, qcfg.gate_logit)
    es = exp2_fixed(x, qcfg, qcfg.gate_logit, exp_sum_fmt(qcfg))
    s = _fit(es.sum(axis=-1), qcfg.sum, qcfg, sat, name + ".sum")
    recip = reciprocal_fixed(s, qcfg, sat, name + ".recip")
    probs = _normalise(e, recip[..., None], qcfg, qcfg.gate_prob, sat, name + ".prob")
    idx = np.argsort(-lg, axis=-1, kind="stable")[..., :top_k]   # stable: ties -> lower index
    return idx, np.take_along_axis(probs, idx, axis=-1), probs


# ---------------------------------------------------------------------------------------------
# fidelity measurements against float64 (fixed seeds: deterministic)
# ---------------------------------------------------------------------------------------------
LOG2E = 1.0 / math.log(2.0)


def gelu_float(x) -> np.ndarray:
    """Exact (erf) GELU in float64."""
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + np.frompyfunc(math.erf, 1, 1)(x / math.sqrt(2.0)).astype(np.float64))


def softmax_float(z, axis: int = -1) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def layernorm_float(x, gamma, beta, eps: float = 1e-6) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


def gelu_grid(qcfg: QuantConfig, points: int = (1 << 17) + 1) -> np.ndarray:
    """gelu_in codes: a dense grid on [-8, 8], every table boundary +-1 LSB, the format extremes."""
    fi = qcfg.gelu_in
    p = gelu_params(qcfg)
    dense = fi.quantize(np.linspace(-8.0, 8.0, points))
    knots = np.arange(p.segments + 1, dtype=np.int64) << (p.in_frac - p.step_log2)
    knots = np.concatenate([knots + d for d in (-1, 0, 1)])
    knots = np.concatenate([knots, -knots])
    return np.unique(fi.fit(np.concatenate([dense, knots, [fi.min_int, fi.max_int, 0]])))


def exp2_grid(qcfg: QuantConfig, lo: float = -24.0, points: int = 1 << 17) -> np.ndarray:
    return np.unique(qcfg.score.quantize(np.linspace(lo, 0.0, points)))


def rsqrt_grid(qcfg: QuantConfig, lo_code: int = 1, points: int = 200_001) -> np.ndarray:
    hi = qcfg.ln_stat.max_int
    g = np.exp(np.linspace(math.log(lo_code), math.log(hi), points))
    return np.unique(np.clip(np.round(g), lo_code, hi).astype(np.int64))


def softmax_rows(n: int = 129, seed: int = 0) -> dict[str, np.ndarray]:
    """Float score rows in natural units, like real attention: N(0, sigma) for sigma in 1, 3, 8,
    rows with one dominant score, all-equal rows."""
    rng = np.random.default_rng(seed)
    rows = {f"sigma{s}": rng.normal(0.0, s, (48, n)) for s in (1, 3, 8)}
    dom = rng.normal(0.0, 1.0, (16, n))
    dom[np.arange(16), rng.integers(0, n, 16)] = rng.uniform(8.0, 40.0, 16)
    rows["dominant"] = dom
    rows["equal"] = np.repeat(rng.uniform(-30.0, 30.0, (8, 1)), n, axis=1)
    return rows


def layernorm_rows(d: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Realistic LayerNorm input rows: N(0,1), N(0,10), N(0,1) with one outlier of +-55."""
    rng = np.random.default_rng(seed + d)
    out = rng.normal(0.0, 1.0, (64, d))
    out[np.arange(64), rng.integers(0, d, 64)] = 55.0 * rng.choice([-1.0, 1.0], 64)
    return {"n1": rng.normal(0.0, 1.0, (64, d)), "n10": rng.normal(0.0, 10.0, (64, d)), "outlier": out}


def layernorm_params_random(d: int, qcfg: QuantConfig, seed: int = 0):
    """gamma in [0.3, 3] and beta ~ N(0, 1), as ln_gamma / ln_beta codes (trained-like ranges)."""
    rng = np.random.default_rng(seed + 7 * d)
    return (qcfg.ln_gamma.quantize(rng.uniform(0.3, 3.0, d)),
            qcfg.ln_beta.quantize(rng.normal(0.0, 1.0, d)))


def gate_logits(n_tok: int = 8192, n_exp: int = 16, seed: int = 0) -> np.ndarray:
    """Float router logits (natural units): N(0, 1.5), plus tokens whose two largest logits
    differ by 1e-7..1e-4 (near ties that quantisation may reorder)."""
    rng = np.random.default_rng(seed)
    lg = rng.normal(0.0, 1.5, (n_tok, n_exp))
    near = rng.choice(n_tok, n_tok // 8, replace=False)
    a, b = rng.integers(0, n_exp, (2, near.size))
    b = np.where(a == b, (b + 1) % n_exp, b)
    lg[near, a] = lg[near].max(axis=-1) + 1.0
    lg[near, b] = lg[near, a] + rng.choice([-1.0, 1.0], near.size) * 10.0 ** rng.uniform(-7, -4, near.size)
    return lg


def gate_topk_check(lg_float, qcfg: QuantConfig, top_k: int):
    """Fixed vs float top-k: (mismatching tokens, of them the ones whose float probabilities at
    the disagreeing ranks differ by at least one gate_prob LSB, max abs prob error). The float
    top-k ranks the unquantised logits (so logits that quantise to one code can swap); the
    probability error is against the float softmax of the quantised codes (the unit's own)."""
    lg_float = np.asarray(lg_float, dtype=np.float64)
    codes = qcfg.gate_logit.quantize(lg_float * LOG2E)
    idx, _, probs = gate_fixed(codes, qcfg, top_k)
    pf = softmax_float(codes * qcfg.gate_logit.lsb / LOG2E)
    fidx = np.argsort(-lg_float, axis=-1, kind="stable")[..., :top_k]
    mism = np.any(idx != fidx, axis=-1)
    gap = np.abs(np.take_along_axis(pf, idx, -1) - np.take_along_axis(pf, fidx, -1)).max(axis=-1)
    beyond = mism & (gap >= qcfg.gate_prob.lsb)
    err = np.abs(probs * qcfg.gate_prob.lsb - pf).max()
    return int(mism.sum()), int(beyond.sum()), float(err)


def _stats(prefix: str, err: np.ndarray) -> dict:
    a = np.abs(err)
    return {f"{prefix}_max": float(a.max()), f"{prefix}_mean": float(a.mean())}


def approx_error_table(qcfg: QuantConfig) -> dict:
    """Max / mean errors of every approximator against float64 on the dense grids above.
    Keys: gelu_abs_*, exp2_abs_*, softmax_abs_* (input quantisation included), rsqrt_rel_*
    (over [eps, ln_stat max], the values LayerNorm can produce), rsqrt_mant_rel_* (unsaturated
    mantissa, 1 LSB .. max), layernorm_abs_* (D = 64, 192, 384), gate_* (top-2 mismatches)."""
    res = {}
    x = gelu_grid(qcfg)
    xf = x * qcfg.gelu_in.lsb
    res.update(_stats("gelu_abs", gelu_fixed(x, qcfg) * qcfg.act.lsb - gelu_float(xf)))
    x = exp2_grid(qcfg)
    res.update(_stats("exp2_abs", exp2_fixed(x, qcfg) * qcfg.exp.lsb - np.exp2(x * qcfg.score.lsb)))
    errs = []
    for s in softmax_rows().values():
        codes = qcfg.score.quantize(s * LOG2E)
        errs.append((softmax_fixed(codes, qcfg) * qcfg.prob.lsb - softmax_float(s)).ravel())
    res.update(_stats("softmax_abs", np.concatenate(errs)))
    v = rsqrt_grid(qcfg, layernorm_params(1, qcfg).eps_q)
    ref = 1.0 / np.sqrt(v * qcfg.ln_stat.lsb)
    res.update(_stats("rsqrt_rel", rsqrt_fixed(v, qcfg) * qcfg.ln_rstd.lsb / ref - 1.0))
    v = rsqrt_grid(qcfg, 1)
    y, e = rsqrt_parts(v, qcfg)
    mf = rsqrt_params(qcfg).mant_frac
    res.update(_stats("rsqrt_mant_rel", y * np.exp2(-(mf + e).astype(np.float64))
                      * np.sqrt(v * qcfg.ln_stat.lsb) - 1.0))
    errs = []
    for d in (64, 192, 384):
        g, b = layernorm_params_random(d, qcfg)
        for rows in layernorm_rows(d).values():
            xc = qcfg.act.quantize(rows)
            ref = layernorm_float(xc * qcfg.act.lsb, g * qcfg.ln_gamma.lsb, b * qcfg.ln_beta.lsb)
            errs.append((layernorm_fixed(xc, g, b, qcfg) * qcfg.act.lsb - ref).ravel())
    res.update(_stats("layernorm_abs", np.concatenate(errs)))
    mism, beyond, perr = gate_topk_check(gate_logits(), qcfg, 2)
    res.update(gate_topk_mismatch=mism, gate_topk_mismatch_beyond_lsb=beyond, gate_prob_abs_max=perr)
    return res


def approx_error_curves(qcfg: QuantConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(x, error) float arrays for plots: gelu (x, abs err), exp2 (x, abs err), rsqrt (v, rel err)."""
    x = gelu_grid(qcfg, (1 << 14) + 1)
    xf = x * qcfg.gelu_in.lsb
    out = {"gelu": (xf, gelu_fixed(x, qcfg) * qcfg.act.lsb - gelu_float(xf))}
    x = exp2_grid(qcfg, -20.0, 1 << 14)
    xf = x * qcfg.score.lsb
    out["exp2"] = (xf, exp2_fixed(x, qcfg) * qcfg.exp.lsb - np.exp2(xf))
    v = rsqrt_grid(qcfg, layernorm_params(1, qcfg).eps_q, 4097)
    vf = v * qcfg.ln_stat.lsb
    out["rsqrt"] = (vf, rsqrt_fixed(v, qcfg) * qcfg.ln_rstd.lsb * np.sqrt(vf) - 1.0)
    return out
