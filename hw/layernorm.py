"""LayerNorm over D = model_cfg.dim, L = hwcfg.lanes elements per cycle, bit-exact to
quant.approx.layernorm_fixed (one pass Sx, Sn, Q; 1/D as a constant multiply; divider-free
rsqrt: leading-zero normalisation, seed ROM, Newton steps).

Testbench: sim/tb_layernorm.py, tests/test_layernorm_rtl.py. Widths, table contents and the
pipeline shape are derived in one place, `layernorm_plan` (from approx.layernorm_params,
approx.rsqrt_params and approx.rsqrt_table), by interval arithmetic on exact integer bounds:
every register is exactly as wide as the values it can hold, so narrowing never changes a bit.

Structure (one token = one row of D values = B = D/L beats):
  accumulate  per input beat: xn = round(x >> (act.frac - h)), xn**2 (two DSPs per lane), lane
              adder trees, running sums Sx, Sn, Q; every beat is also written into the token buffer.
  stats       free-running pipeline, one token per cycle if needed: Sx*K, Sn*K, Q*K (exact wide
              products split into 26x17-bit DSP pieces), mean_n**2, var, leading-zero count, even
              normalisation shift, seed ROM (Memory), Newton steps, final shift and fit -> (mean,
              rstd) pushed into a small stats FIFO (LUTRAM).
  normalise   back-pressured pipeline (hw/pipeline.py): once a token's stats are in the stats
              FIFO its beats are read from the token buffer; per lane d = x - mean, d*rstd (4
              DSPs), xhat = round(>> ln_rstd.frac), xhat*gamma (2 DSPs) + beta aligned,
              y = fit(round(>> ln_gamma.frac)).
The token buffer is a circular FIFO of NB beats (Memory; LUTRAM or BRAM as Yosys decides),
NB = the power of two >= max(2*B, B + STATS_LATENCY + 2): it holds the token being normalised and
the next ones while their statistics are computed, and a beat's slot is freed as soon as it is
read, so the statistics latency is hidden completely. (A ping-pong pair of D-value buffers
cannot do that: each half is busy for fill + statistics + drain = 2B + STATS_LATENCY cycles, i.e.
B + STATS_LATENCY/2 cycles per token, about 10x the B = 4 of D = 64, L = 16.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from amaranth.hdl import Const, Module, Mux, Shape, Signal, Value, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from edgemoe.quant import approx
from edgemoe.quant.config import QuantConfig
from edgemoe.quant.fixed import FormatError, Overflow, Rounding

from .config import HWConfig, HWConfigError
from .pipeline import PipelineControl

A_PIECE, B_PIECE = 26, 17   # unsigned operand pieces of one DSP48E2 multiply (27 x 18 signed)
ADD_LEVELS = 2              # adder-tree levels between two pipeline registers
NEWTON_SUBDIV = 256         # sub-intervals per seed segment for the Newton bounds


# ---------------------------------------------------------------------------------------------
# exact integer bounds (Python ints, any width)
# ---------------------------------------------------------------------------------------------
def _shape(lo: int, hi: int) -> Shape:
    """The smallest shape holding every integer of [lo, hi]."""
    lo, hi = int(lo), int(hi)
    if lo > hi:
        raise ValueError(f"empty range [{lo}, {hi}]")
    if lo >= 0:
        return unsigned(max(1, hi.bit_length()))
    return signed(max((-lo - 1).bit_length(), hi.bit_length()) + 1)


def _rs_bounds(lo: int, hi: int, s: int) -> tuple[int, int]:
    """Bounds of round(v >> s) for v in [lo, hi], whatever the rounding mode (floor .. ceil)."""
    if s <= 0:
        return lo << -s, hi << -s
    return lo >> s, -((-hi) >> s)


def _mul_bounds(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    c = [a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]]
    return min(c), max(c)


def _newton_bounds(mf: int, tbits: int, steps: int, table: np.ndarray):
    """Interval bounds of the Newton iterates over every mantissa u in [2**mf, 2**(mf+2)):
    each seed segment is split into NEWTON_SUBDIV sub-intervals; round() lies in floor..ceil.
    Returns per step (a_max, b_min, b_max, f_min, f_max, y_min, y_max) and the seed range."""
    seg = 1 << (mf + 2 - tbits)
    sub = seg // NEWTON_SUBDIV if seg >= NEWTON_SUBDIV else 1
    j = np.arange(1 << (tbits - 2), 1 << tbits, dtype=np.int64)
    starts = (j[:, None] * seg + np.arange(0, seg, sub, dtype=np.int64)[None, :]).ravel()
    ulo, uhi = starts, starts + sub - 1
    ylo = table[starts // seg].astype(np.int64)
    yhi = ylo.copy()
    seed = (int(ylo.min()), int(yhi.max()))

    def fl(v, s):
        return v >> s

    def ce(v, s):
        return -((-v) >> s)

    out = []
    for _ in range(steps):
        alo, ahi = fl(ylo * ylo, mf), ce(yhi * yhi, mf)
        blo, bhi = fl(ulo * alo, mf), ce(uhi * ahi, mf)
        flo, fhi = (3 << mf) - bhi, (3 << mf) - blo
        if flo.min() <= 0:
            raise FormatError(f"rsqrt Newton step: 3 - u*y**2 can reach {int(flo.min())} <= 0 with "
                              f"{mf} mantissa bits and a {tbits}-bit seed table")
        ylo, yhi = fl(ylo * flo, mf + 1), ce(yhi * fhi, mf + 1)
        out.append((int(ahi.max()), int(blo.min()), int(bhi.max()), int(flo.min()), int(fhi.max()),
                    int(ylo.min()), int(yhi.max())))
    return out, seed


# ---------------------------------------------------------------------------------------------
# multipliers split into DSP-sized pieces
# ---------------------------------------------------------------------------------------------
def _pieces(width: int, is_signed: bool, chunk: int):
    """[(lo, width, signed)]: unsigned `chunk`-bit pieces from the LSB; the top piece keeps the
    sign (up to chunk + 1 bits, which one DSP port holds)."""
    out, lo = [], 0
    while True:
        rem = width - lo
        if rem <= chunk + (1 if is_signed else 0):
            out.append((lo, rem, is_signed))
            return out
        out.append((lo, chunk, False))
        lo += chunk


def _tree_stages(n: int) -> int:
    levels = (n - 1).bit_length()          # ceil(log2 n)
    return -(-levels // ADD_LEVELS)


@dataclass(frozen=True)
class MulPlan:
    """a*b as partial products of DSP-sized pieces (registered), summed by a registered tree.
    const: b is this constant (its zero pieces vanish, power-of-two pieces become shifts)."""
    a_shape: Shape
    b_shape: Shape
    const: int | None
    swap: bool              # a goes to the 18-bit port
    terms: tuple            # ((a_lo, a_w, a_signed), (b_lo, b_w, b_signed)) per partial product
    dsp: int                # partial products that need a multiplier (both pieces > 1 bit, not a shift)

    @property
    def stages(self) -> int:
        return self.stages_with(0)

    def stages_with(self, extra: int) -> int:
        """Stages when `extra` more addends join the partial-product tree."""
        return 1 + _tree_stages(len(self.terms) + extra)


def mul_plan(a_shape: Shape, b_shape: Shape, const: int | None = None) -> MulPlan:
    best = None
    for swap in (False, True):
        pa = _pieces(a_shape.width, a_shape.signed, B_PIECE if swap else A_PIECE)
        pb = _pieces(b_shape.width, b_shape.signed, A_PIECE if swap else B_PIECE)
        terms, dsp = [], 0
        for x in pa:
            for y in pb:
                if const is not None:
                    cv = (const >> y[0]) & ((1 << y[1]) - 1)
                    if cv == 0:
                        continue
                    if cv & (cv - 1) == 0:
                        terms.append((x, y))
                        continue
                terms.append((x, y))
                dsp += int(x[1] > 1 and y[1] > 1)
        cand = (dsp, len(terms), swap, tuple(terms))
        if best is None or cand[:2] < best[:2]:
            best = cand
    return MulPlan(a_shape, b_shape, const, best[2], best[3], best[0])


def _piece(v, lo, w, is_signed):
    p = v[lo:lo + w]
    return p.as_signed() if is_signed else p


class _Regs:
    """Pipeline registers: reg(k, value, shape) loads at stage k's enable (None: every cycle)."""

    def __init__(self, m: Module, en=None, prefix: str = ""):
        self.m, self.en, self.prefix = m, en, prefix

    def reg(self, k: int, value, shape=None, name: str | None = None) -> Signal:
        value = Value.cast(value)
        s = Signal(shape if shape is not None else value.shape(), reset_less=True,
                   name=f"{self.prefix}{name}_s{k}" if name else None)
        if self.en is None:
            self.m.d.sync += s.eq(value)
        else:
            with self.m.If(self.en(k)):
                self.m.d.sync += s.eq(value)
        return s

    def delay(self, k0: int, k1: int, value, name: str | None = None):
        """value registered at stages k0 .. k1-1 (k1 - k0 registers)."""
        for k in range(k0, k1):
            value = self.reg(k, value, name=name)
        return value

    def mul(self, k: int, plan: MulPlan, a, b, out_shape: Shape, name: str, extra=()):
        """Registers the partial products at stage k and the tree at k+1..; the product (plus
        the `extra` addends, registered alongside the partial products) is ready, registered in
        out_shape, after plan.stages_with(len(extra)) stages."""
        terms = []
        for i, (xa, xb) in enumerate(plan.terms):     # (piece of a, piece of b)
            av = _piece(a, *xa)
            if plan.const is not None:
                cv = (plan.const >> xb[0]) & ((1 << xb[1]) - 1)
                if cv & (cv - 1) == 0:
                    prod = av << (cv.bit_length() - 1)
                else:
                    prod = av * Const(cv, unsigned(xb[1]))
            else:
                bv = _piece(b, *xb)
                if xa[1] == 1:                       # one-bit piece: a select, not a multiplier
                    prod = Mux(av[0], -bv if xa[2] else bv, 0)
                elif xb[1] == 1:
                    prod = Mux(bv[0], -av if xb[2] else av, 0)
                else:
                    prod = av * bv
            terms.append((self.reg(k, prod, name=f"{name}_pp{i}"), xa[0] + xb[0]))
        terms += [(self.reg(k, e, name=f"{name}_add"), 0) for e in extra]
        if len(terms) == 1:
            # the partial product register is the result; narrowing it is a free slice
            return self._narrow(terms[0][0] << terms[0][1], out_shape)
        return self.tree(k + 1, [v << sh for v, sh in terms], out_shape, name)

    def tree(self, k: int, vals, out_shape: Shape, name: str):
        """Sum of vals by a balanced adder tree, registered every ADD_LEVELS levels from stage
        k on (_tree_stages(len(vals)) stages); the last register has out_shape."""
        vals = list(vals)
        if len(vals) == 1:
            return self._narrow(vals[0], out_shape)
        level = 0
        while len(vals) > 1:
            vals = [vals[i] + vals[i + 1] if i + 1 < len(vals) else vals[i]
                    for i in range(0, len(vals), 2)]
            level += 1
            if level % ADD_LEVELS == 0 or len(vals) == 1:
                shape = out_shape if len(vals) == 1 else None
                vals = [self.reg(k, v, shape, name=f"{name}_t") for v in vals]
                k += 1
        return vals[0]

    @staticmethod
    def _narrow(v, shape: Shape):
        v = Value.cast(v)
        if len(v) >= shape.width:
            v = v[:shape.width]
        return v.as_signed() if shape.signed else v.as_unsigned()


def _sig(m: Module, v, name: str | None = None) -> Signal:
    """v as a comb signal: an expression used more than once is built once (not copied)."""
    v = Value.cast(v)
    if isinstance(v, Signal):
        return v
    s = Signal(v.shape(), name=name)
    m.d.comb += s.eq(v)
    return s


def round_shift(m: Module, x, s: int, rounding: Rounding):
    """round(x >> s) for a constant s (s <= 0: exact left shift), like quant.fixed.shift_round."""
    x = _sig(m, x)
    if s <= 0:
        return x << -s
    if s >= len(x):
        raise FormatError(f"round_shift: shift {s} drops every bit of a {len(x)}-bit value")
    q = x[s:].as_signed() if x.shape().signed else x[s:]
    half = x[s - 1]
    if rounding is Rounding.TRUNC:
        return q
    if rounding is Rounding.HALF_UP:
        return q + half
    sticky = x[:s - 1].any() if s >= 2 else 0
    return q + (half & (sticky | q[0]))


def shift_var(m: Module, z, amt, rounding: Rounding):
    """First half of round(z >> amt) for a non-negative z and a variable unsigned amt:
    (w, sticky) with w = floor(2z / 2**amt) (its LSB is the half bit; 0 when amt = 0) and
    sticky = any bit of z below the half bit (HALF_EVEN only, else 0)."""
    z = _sig(m, z)
    w = (z << 1) >> amt
    if rounding is not Rounding.HALF_EVEN:
        return w, Const(0, 1)
    mask = (Const(1, len(z) + 2) << amt)[:len(z) + 2] - 1
    return w, ((z << 1) & mask).any()


def round_var(m: Module, w, sticky, rounding: Rounding):
    """Second half: round(z >> amt) from shift_var's (w, sticky)."""
    w = _sig(m, w)
    q = w >> 1
    if rounding is Rounding.TRUNC:
        return q
    if rounding is Rounding.HALF_UP:
        return q + w[0]
    return q + (w[0] & (sticky | q[0]))


def lzc_levels(width: int) -> list[int]:
    """Shift amounts of the log-depth bit-length search over `width` bits: 32, 16, ..., 1."""
    out, s = [], 1 << ((width - 1).bit_length() - 1) if width > 1 else 0
    while s >= 1:
        out.append(s)
        s >>= 1
    return out


def lzc_step(m: Module, x, n, s: int):
    """One level of the bit-length search (approx.bit_length): if x >> s is nonzero, keep it
    and add s to n. After every level, bit length = n + x[0]."""
    big = _sig(m, (x >> s).any())
    return _sig(m, Mux(big, x >> s, x)), n + Mux(big, s, 0)


def fit(m: Module, v, lo: int, hi: int, fmt, overflow: Overflow):
    """(value in fmt, out-of-range flag) for v with exact bounds [lo, hi] (golden Fmt.fit)."""
    v = _sig(m, v)
    if fmt.min_int <= lo and hi <= fmt.max_int:
        return v, Const(0, 1)
    over = Const(0, 1)
    if hi > fmt.max_int:
        over = over | (v > fmt.max_int)
    if lo < fmt.min_int:
        over = over | (v < fmt.min_int)
    low = v[:fmt.bits]
    low = low.as_signed() if fmt.signed else low
    if overflow is Overflow.WRAP:
        return low, over
    res = low
    if hi > fmt.max_int:
        res = Mux(v > fmt.max_int, fmt.max_int, res)
    if lo < fmt.min_int:
        res = Mux(v < fmt.min_int, fmt.min_int, res)
    return res, over


def popcount(bits):
    vals = list(bits)
    if not vals:
        return Const(0, 1)
    while len(vals) > 1:
        vals = [vals[i] + vals[i + 1] if i + 1 < len(vals) else vals[i]
                for i in range(0, len(vals), 2)]
    return vals[0]


# ---------------------------------------------------------------------------------------------
# the plan: every width and depth, in one place
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerNormPlan:
    d: int
    lanes: int
    beats: int                 # B = D / L beats per token
    ln: approx.LnParams        # K, p, h_frac, eps_q (from approx.layernorm_params)
    rs: approx.RsqrtParams
    table: tuple               # rsqrt seed ROM (approx.rsqrt_table)
    sh_n: int                  # x -> xn shift (act.frac - h_frac)
    pn: int                    # Sn*K shift
    msq_shift: int             # mean_n**2 -> ln_stat shift
    beta_shift: int            # beta -> (act.frac + ln_gamma.frac) shift (negative: left)
    s: dict                    # name -> Shape of every datapath value
    b: dict                    # name -> (lo, hi) exact bounds
    mul: dict                  # name -> MulPlan
    newton: tuple              # per step (a_max, b_min, b_max, f_min, f_max, y_min, y_max)
    norm_pre: int              # left pre-shift of var before the right barrel shift (u)
    sh_base: int               # u shift amount = b + sh_base - parity
    out_pre: int               # left pre-shift of y before the final rounding right shift
    out_amt_max: int

    # latencies (cycles); see LayerNorm's docstring
    @property
    def acc_stages(self) -> int:        # input handshake -> beat sums registered
        return 2 + self.mul["sq"].stages + _tree_stages(self.lanes)

    @property
    def stats_stages(self) -> int:      # token sums registered -> (mean, rstd) registered
        m = self.mul
        k1 = max(m["sx"].stages, m["sn"].stages, m["q"].stages) + 1      # mean, mean_n, E2
        k2 = m["msq"].stages + 3                                          # msq, E2 - msq, var
        k3 = 5                                                      # b (2), shifts, u, seed ROM
        k4 = self.rs.newton * (m["yy"].stages + 1 + m["ua"].stages + 2 + m["yf"].stages + 1)
        return k1 + k2 + k3 + k4 + 3                      # final shift, round, fit

    @property
    def out_stages(self) -> int:        # read issue -> output register
        return 2 + self.mul["dr"].stages + 1 + self.mul["xg"].stages_with(1) + 2

    @property
    def stats_latency(self) -> int:
        """Cycles from the handshake of a token's last input beat to the first read issue of
        the token (accumulate, running sum, statistics, stats FIFO write)."""
        return self.acc_stages + 1 + self.stats_stages + 1

    @property
    def latency(self) -> int:
        """Cycles from a token's first input handshake to its first output beat being valid,
        at full rate: (B - 1) + stats_latency + out_stages."""
        return self.beats - 1 + self.stats_latency + self.out_stages

    @property
    def buffer_beats(self) -> int:
        need = max(2 * self.beats, self.beats + self.stats_latency + 2)
        return 1 << (need - 1).bit_length()

    @property
    def stats_fifo_depth(self) -> int:
        need = (self.buffer_beats - 1) // self.beats + 1
        return 1 << max(1, (need - 1).bit_length())

    @property
    def dsp_estimate(self) -> int:
        per_lane = self.mul["sq"].dsp + self.mul["dr"].dsp + self.mul["xg"].dsp
        stats = sum(self.mul[n].dsp for n in ("sx", "sn", "q", "msq")) + \
            self.rs.newton * sum(self.mul[n].dsp for n in ("yy", "ua", "yf"))
        return per_lane * self.lanes + stats


def layernorm_plan(qcfg: QuantConfig, hwcfg: HWConfig, d: int, eps: float = 1e-6) -> LayerNormPlan:
    L = hwcfg.lanes
    if not isinstance(d, int) or d < 1:
        raise HWConfigError(f"layernorm: model dim D={d!r} must be a positive integer")
    if d % L:
        raise HWConfigError(f"layernorm: model dim D={d} is not divisible by HWConfig "
                            f"'{hwcfg.name}' lanes={L}")
    ln = approx.layernorm_params(d, qcfg, eps)
    rs = approx.rsqrt_params(qcfg)
    table = approx.rsqrt_table(qcfg)
    act, st, rf = qcfg.act, qcfg.ln_stat, qcfg.ln_rstd
    fa, fs, mf = act.frac, st.frac, rs.mant_frac
    sh_n = fa - ln.h_frac
    pn = ln.p + ln.h_frac - fa
    if not 1 <= pn <= 62:
        raise FormatError(f"layernorm: Sn*K shift {pn} out of 1..62 (act {act}, ln_stat {st})")
    msq_shift = 2 * fa - fs
    fg, fb = qcfg.ln_gamma.frac, qcfg.ln_beta.frac
    beta_shift = fb - fa - fg
    B = {}
    B["x"] = (act.min_int, act.max_int)
    B["xn"] = _rs_bounds(*B["x"], sh_n)
    B["axn"] = (0, max(-B["xn"][0], B["xn"][1]))
    B["sq"] = (0, B["axn"][1] ** 2)
    for nm, src in (("bsx", "x"), ("bsn", "xn"), ("bq", "sq")):      # beat sums
        B[nm] = (L * B[src][0], L * B[src][1])
    for nm, src in (("sx", "x"), ("sn", "xn"), ("q", "sq")):         # token sums
        B[nm] = (d * B[src][0], d * B[src][1])
    K = ln.k
    B["px"], B["pn"], B["pq"] = (_mul_bounds(B[n], (K, K)) for n in ("sx", "sn", "q"))
    B["mean"] = _rs_bounds(*B["px"], ln.p)
    B["mean_n"] = _rs_bounds(*B["pn"], pn)
    B["e2"] = _rs_bounds(*B["pq"], ln.p)
    mn = max(-B["mean_n"][0], B["mean_n"][1])
    B["pmsq"] = (0, mn * mn)
    B["msq"] = _rs_bounds(*B["pmsq"], msq_shift)
    B["diff"] = (B["e2"][0] - B["msq"][1], B["e2"][1] - B["msq"][0])
    B["var"] = (ln.eps_q, B["e2"][1] + ln.eps_q)          # msq >= 0, max(E2 - msq, 0) <= E2
    if B["var"][1] > st.max_int:
        raise FormatError(f"layernorm: E[xn**2] + eps can reach {B['var'][1]} > ln_stat {st} max "
                          f"{st.max_int}: widen ln_stat (the unit relies on var never saturating)")
    # rsqrt normalisation: b = bit length of var, sh = b-1-mf - parity, u = var >> sh (exact
    # left shift when negative) computed as (var << norm_pre) >> (sh + norm_pre).
    blo, bhi = B["var"][0].bit_length(), B["var"][1].bit_length()
    sh_lo, sh_hi = blo - 2 - mf, bhi - 1 - mf
    norm_pre = max(0, -sh_lo)
    B["u"] = (1 << mf, (1 << (mf + 2)) - 1)
    newton, seed = _newton_bounds(mf, rs.table_bits, rs.newton, table)
    B["y0"] = seed
    ymax = max([seed[1]] + [n[6] for n in newton])
    amax = max([n[0] for n in newton], default=0)
    bmax = max([n[2] for n in newton], default=0)
    fmax = max([n[4] for n in newton], default=0)
    B["y"] = (0, ymax)
    B["a"] = (0, amax)
    B["bb"] = (0, bmax)
    B["f"] = (0, fmax)
    B["yy"] = (0, ymax * ymax)
    B["ua"] = (0, B["u"][1] * amax)
    B["yf"] = (0, ymax * fmax)
    # final: sh2 = mf - out_frac + e, e = (sh + mf - fs) / 2; shift clamped like rsqrt_fixed
    e_lo, e_hi = (sh_lo + mf - fs) // 2, (sh_hi + mf - fs) // 2
    s2_lo, s2_hi = mf - rs.out_frac + e_lo, mf - rs.out_frac + e_hi
    left_cap = 62 - mf - 1
    s2_lo, s2_hi = max(s2_lo, -left_cap), min(s2_hi, 62)
    out_pre = max(0, -s2_lo)
    out_amt_max = s2_hi + out_pre
    B["rstd_raw"] = (0, ymax << out_pre)
    B["rstd"] = (max(rf.min_int, 0) if qcfg.overflow is Overflow.SAT else rf.min_int,
                 min(rf.max_int, B["rstd_raw"][1]))
    # per element
    B["dx"] = (B["x"][0] - B["mean"][1], B["x"][1] - B["mean"][0])
    B["pd"] = _mul_bounds(B["dx"], B["rstd"])
    B["xhat"] = _rs_bounds(*B["pd"], rf.frac)
    B["g"] = (qcfg.ln_gamma.min_int, qcfg.ln_gamma.max_int)
    B["be"] = (qcfg.ln_beta.min_int, qcfg.ln_beta.max_int)
    B["bes"] = _rs_bounds(*B["be"], beta_shift)
    B["pg"] = _mul_bounds(B["xhat"], B["g"])
    B["yfull"] = (B["pg"][0] + B["bes"][0], B["pg"][1] + B["bes"][1])
    B["yr"] = _rs_bounds(*B["yfull"], fg)
    S = {n: _shape(*v) for n, v in B.items()}
    S["sh"] = _shape(0, max(0, sh_hi + norm_pre))
    S["b"] = _shape(0, bhi)
    S["s2"] = _shape(0, max(0, out_amt_max))
    # multipliers
    M = {
        "sq": mul_plan(S["axn"], S["axn"]),
        "sx": mul_plan(S["sx"], unsigned(K.bit_length()), K),
        "sn": mul_plan(S["sn"], unsigned(K.bit_length()), K),
        "q": mul_plan(S["q"], unsigned(K.bit_length()), K),
        "msq": mul_plan(S["mean_n"], S["mean_n"]),
        "yy": mul_plan(S["y"], S["y"]),
        "ua": mul_plan(S["u"], S["a"]),
        "yf": mul_plan(S["y"], S["f"]),
        "dr": mul_plan(S["dx"], S["rstd"]),
        "xg": mul_plan(S["xhat"], S["g"]),
    }
    return LayerNormPlan(
        d=d, lanes=L, beats=d // L, ln=ln, rs=rs, table=tuple(int(t) for t in table),
        sh_n=sh_n, pn=pn, msq_shift=msq_shift, beta_shift=beta_shift, s=S, b=B, mul=M,
        newton=tuple(newton), norm_pre=norm_pre, sh_base=norm_pre - 1 - mf, out_pre=out_pre,
        out_amt_max=out_amt_max)


# ---------------------------------------------------------------------------------------------
# the component
# ---------------------------------------------------------------------------------------------
class LayerNorm(wiring.Component):
    """LayerNorm over D = model_cfg.dim with L = hwcfg.lanes lanes, bit-exact to
    quant.approx.layernorm_fixed(x, gamma, beta, qcfg, eps=model_cfg.ln_eps).

    Exported module `edgemoe_layernorm` (hw/export.py naming rule), A = act.bits,
    G = ln_gamma.bits, E = ln_beta.bits, B = D / L, AB = bit length of (B - 1) (at least 1):
      clk, rst                in   1       sync domain, active-high synchronous reset
      i__valid / i__ready     in / out     x beats: beat j of a token holds x[j*L .. j*L+L-1]
      i__payload__data        in   L*A     lane k at bits [k*A, (k+1)*A), two's complement
      o__valid / o__ready     out / in     y beats, same order as the input beats
      o__payload__data        out  L*A     y lanes, packed like the input
      o__payload__sat_count   out  bit_length(L)  lanes of this beat whose y left the act range
      o__payload__stat_sat    out  1       this beat's token had its rstd saturated (or wrapped);
                                           var cannot: layernorm_plan refuses formats where it could
      o__payload__last        out  1       last beat of a token
      p__valid / p__ready     in / out     parameter writes; p__ready is always 1
      p__payload__addr        in   AB      beat index j (0 .. B-1); writes with addr >= B are ignored
      p__payload__gamma       in   L*G     gamma[j*L + k] in lane k
      p__payload__beta        in   L*E     beta[j*L + k] in lane k
      busy                    out  1       a token is in the unit (buffered or in the pipeline)
    Parameters ("loaded from memory"): the controller writes a layer's gamma/beta, L of each per
    p beat (B beats), into a B-word memory before that layer's first token enters, and changes
    them only while busy is low (a beat reads its gamma/beta when it is issued to the normaliser,
    so a write during a layer would reach the tokens not yet issued).

    Throughput: one beat (L elements) per cycle in and out at steady state, i.e. D/L cycles per
    token for any D/L >= 1: the per-token statistics (Sx*K, Sn*K, Q*K, mean_n**2, leading-zero
    count, seed ROM, rsqrt_newton Newton steps of three multiplies each, final shift) run in a
    free-running pipeline that accepts a token every cycle, and the NB-beat token buffer
    (plan.buffer_beats) holds the tokens that arrive meanwhile, so their latency is hidden.
    Latency (plan.latency, asserted by the testbench at full rate): from a token's first input
    handshake to its first output beat, (B - 1) + STATS_LATENCY + OUT_STAGES cycles, where
    STATS_LATENCY (last input beat -> read issue) = plan.stats_latency and OUT_STAGES =
    plan.out_stages = 9 for edge-moe-fixed. Input stalls only when the buffer is full, i.e. under
    output back-pressure. edge-moe-fixed, L = 16: D = 64 (tiny): B = 4, STATS_LATENCY = 44,
    NB = 64 beats, latency 56; D = 192 (edge-moe): B = 12, STATS_LATENCY = 45, NB = 64, latency 65.
    L = 4, D = 192: B = 48, STATS_LATENCY = 44, NB = 128, latency 100.
    Every pipeline stage does one add/compare/shift (or one DSP-sized partial product, or two
    adder-tree levels), for the 300 MHz target.
    Resources (edge-moe, L = 16; tests/baselines/synth_layernorm.json): 158 DSP48E2 (8 per lane:
    xn**2 2, d*rstd 4, xhat*gamma 2; statistics 30), about 8.2k LUT, 15.1k FF, the token buffer in
    LUTRAM, no BRAM.
    """

    def __init__(self, qcfg: QuantConfig, hwcfg: HWConfig, model_cfg=None, d: int | None = None,
                 eps: float | None = None):
        if d is None:
            if model_cfg is None:
                raise HWConfigError("layernorm: needs model_cfg (for D = model_cfg.dim) or d")
            d = model_cfg.dim
        if eps is None:
            eps = model_cfg.ln_eps if model_cfg is not None else 1e-6
        self.qcfg, self.hwcfg, self.eps = qcfg, hwcfg, eps
        self.plan = layernorm_plan(qcfg, hwcfg, d, eps)
        L, Bt = hwcfg.lanes, self.plan.beats
        self.lanes, self.d = L, d
        self.LATENCY = self.plan.latency
        self.addr_bits = max(1, (Bt - 1).bit_length())
        in_layout = data.StructLayout({"data": data.ArrayLayout(signed(qcfg.act.bits), L)})
        out_layout = data.StructLayout({
            "data": data.ArrayLayout(signed(qcfg.act.bits), L),
            "sat_count": unsigned(L.bit_length()),
            "stat_sat": unsigned(1),
            "last": unsigned(1),
        })
        gam = qcfg.ln_gamma
        bet = qcfg.ln_beta
        p_layout = data.StructLayout({
            "addr": unsigned(self.addr_bits),
            "gamma": data.ArrayLayout(signed(gam.bits) if gam.signed else unsigned(gam.bits), L),
            "beta": data.ArrayLayout(signed(bet.bits) if bet.signed else unsigned(bet.bits), L),
        })
        self._p_layout = p_layout
        super().__init__({"i": In(stream.Signature(in_layout)),
                          "o": Out(stream.Signature(out_layout)),
                          "p": In(stream.Signature(p_layout)),
                          "busy": Out(1)})

    # -----------------------------------------------------------------------------------------
    def elaborate(self, platform):
        m = Module()
        P, q = self.plan, self.qcfg
        S, Bd, M = P.s, P.b, P.mul
        L, Bt, rnd = P.lanes, P.beats, q.rounding
        NB, NT = P.buffer_beats, P.stats_fifo_depth
        A = q.act.bits
        mf = P.rs.mant_frac

        # --- memories ----------------------------------------------------------------------
        m.submodules.tokbuf = tokbuf = Memory(shape=unsigned(L * A), depth=NB, init=[])
        tb_w = tokbuf.write_port()
        tb_r = tokbuf.read_port(domain="sync")
        gb_layout = data.StructLayout({"gamma": self._p_layout["gamma"].shape,
                                       "beta": self._p_layout["beta"].shape})
        m.submodules.params = params = Memory(shape=gb_layout, depth=Bt, init=[])
        pw = params.write_port()
        pr = params.read_port(domain="sync")
        m.submodules.seed = seed = Memory(shape=unsigned(S["y"].width), depth=len(P.table),
                                          init=list(P.table))
        sr = seed.read_port(domain="sync")
        rec_layout = data.StructLayout({"mean": S["mean"], "rstd": S["rstd"], "sat": unsigned(1)})
        m.submodules.stats = stats = Memory(shape=rec_layout, depth=NT, init=[])
        sw = stats.write_port()
        srd = stats.read_port(domain="comb")

        # --- parameter writes ----------------------------------------------------------------
        m.d.comb += [
            self.p.ready.eq(1),
            pw.addr.eq(self.p.payload.addr),
            pw.data.gamma.eq(self.p.payload.gamma),
            pw.data.beta.eq(self.p.payload.beta),
            pw.en.eq(self.p.valid & (self.p.payload.addr < Bt)),
        ]

        # --- input: token buffer write, beat counter ------------------------------------------
        def incr(ptr, n):
            return ptr + 1 if n & (n - 1) == 0 else Mux(ptr == n - 1, 0, ptr + 1)

        cnt = Signal(range(NB + 1))          # beats in the token buffer
        wp = Signal(range(NB))
        in_beat = Signal(range(Bt))
        in_hs = Signal()
        issue = Signal()                     # a beat is read from the buffer this cycle
        m.d.comb += [
            self.i.ready.eq(cnt != NB),
            in_hs.eq(self.i.valid & self.i.ready),
            tb_w.addr.eq(wp),
            tb_w.data.eq(self.i.payload.data.as_value()),
            tb_w.en.eq(in_hs),
        ]
        m.d.sync += cnt.eq(cnt + in_hs - issue)
        with m.If(in_hs):
            m.d.sync += [wp.eq(incr(wp, NB)), in_beat.eq(Mux(in_beat == Bt - 1, 0, in_beat + 1))]

        # --- accumulate (free-running): beat sums of x, xn, xn**2 -----------------------------
        R = _Regs(m, None, "acc_")
        x_in = self.i.payload.data
        ctl_in = [in_hs, in_beat == 0, in_beat == Bt - 1]          # valid, first, last
        xs = [R.reg(0, x_in[j], S["x"], name=f"x{j}") for j in range(L)]
        xn = [R.reg(0, round_shift(m, x_in[j], P.sh_n, rnd), S["xn"], name=f"xn{j}")
              for j in range(L)]
        axn = [R.reg(1, Mux(xn[j] < 0, -xn[j], xn[j]), S["axn"], name=f"axn{j}") for j in range(L)]
        sq = [R.mul(2, M["sq"], axn[j], axn[j], S["sq"], name=f"sq{j}") for j in range(L)]
        k_end = P.acc_stages                 # = 2 + sq stages + lane tree stages
        k_tree = k_end - _tree_stages(L)
        sums = {"bq": R.tree(k_tree, sq, S["bq"], "bq")}
        for nm, vals in (("bsx", xs), ("bsn", xn)):
            t = R.tree(1, vals, S[nm], nm)
            sums[nm] = R.delay(1 + _tree_stages(L), k_end, t, name=nm)
        v, first, last = (R.delay(0, k_end, c) for c in ctl_in)
        # running sums; the token's totals enter the statistics pipeline after its last beat
        run = {nm: Signal(S[nm], name=f"run_{nm}") for nm in ("sx", "sn", "q")}
        tot = {}
        for nm, bs in (("sx", "bsx"), ("sn", "bsn"), ("q", "bq")):
            new = Mux(first, 0, run[nm]) + sums[bs]
            with m.If(v):
                m.d.sync += run[nm].eq(new)
            tot[nm] = R.reg(k_end, new, S[nm], name=f"tok_{nm}")
        tv = R.reg(k_end, v & last, name="tok_v")

        # --- statistics (free-running), one token per cycle at most -------------------------
        T = _Regs(m, None, "st_")
        ln = P.ln
        k = max(M[nm].stages for nm in ("sx", "sn", "q"))
        prods = {nm: T.delay(M[nm].stages, k, T.mul(0, M[nm], tot[nm], None, S[ps], name=f"k{nm}"))
                 for nm, ps in (("sx", "px"), ("sn", "pn"), ("q", "pq"))}
        tv = T.delay(0, k, tv)
        mean = T.reg(k, round_shift(m, prods["sx"], ln.p, rnd), S["mean"], name="mean")
        mean_n = T.reg(k, round_shift(m, prods["sn"], P.pn, rnd), S["mean_n"], name="mean_n")
        e2 = T.reg(k, round_shift(m, prods["q"], ln.p, rnd), S["e2"], name="e2")
        tv = T.reg(k, tv)
        k += 1
        pm = T.mul(k, M["msq"], mean_n, mean_n, S["pmsq"], name="msq")
        k1 = k + M["msq"].stages
        mean, e2, tv = (T.delay(k, k1, s) for s in (mean, e2, tv))
        k = k1
        msq = T.reg(k, round_shift(m, pm, P.msq_shift, rnd), S["msq"], name="msq")
        mean, e2, tv = (T.reg(k, s) for s in (mean, e2, tv))
        k += 1
        diff = T.reg(k, e2 - msq, S["diff"], name="diff")
        mean, tv = (T.reg(k, s) for s in (mean, tv))
        k += 1
        var = T.reg(k, Mux(diff < 0, 0, diff) + ln.eps_q, S["var"], name="var")
        mean, tv = (T.reg(k, s) for s in (mean, tv))
        k += 1
        # normalise: b = bit length of var; sh = b-1-mf - par with par = (b-1-fs) & 1 (even
        # exponent); the barrel shifter's amount sh + norm_pre >= 0; e = (b-1-fs-par) / 2.
        # The final rsqrt shift s2 = mf - out_frac + e, clamped to [-(61 - mf), 62] like
        # rsqrt_fixed, is applied as round((y << out_pre) >> (s2 + out_pre)): amt below.
        fs = q.ln_stat.frac
        levels = lzc_levels(S["var"].width)
        x, n = var, Const(0, S["b"].width)
        for sh in levels[:len(levels) // 2]:         # half the search per stage
            x, n = lzc_step(m, x, n, sh)
        x, n = T.reg(k, x, name="lz_x"), T.reg(k, n, S["b"], name="lz_n")
        var, mean, tv = (T.reg(k, s) for s in (var, mean, tv))
        k += 1
        for sh in levels[len(levels) // 2:]:
            x, n = lzc_step(m, x, n, sh)
        b = T.reg(k, n + x[0], S["b"], name="b")
        var, mean, tv = (T.reg(k, s) for s in (var, mean, tv))
        k += 1
        par = _sig(m, (b - 1 - fs)[0], "st_par")
        sh_amt = T.reg(k, b + P.sh_base - par, S["sh"], name="sh_amt")
        s2 = _sig(m, ((b - 1 - fs - par).as_signed() >> 1) + (mf - P.rs.out_frac), "st_s2")
        s2 = Mux(s2 < -(61 - mf), -(61 - mf), Mux(s2 > 62, 62, s2))
        amt = T.reg(k, s2 + P.out_pre, S["s2"], name="amt")
        var, mean, tv = (T.reg(k, s) for s in (var, mean, tv))
        k += 1
        u = T.reg(k, (var << P.norm_pre) >> sh_amt, S["u"], name="u")
        amt, mean, tv = (T.reg(k, s) for s in (amt, mean, tv))
        k += 1
        m.d.comb += sr.addr.eq(u[mf + 2 - P.rs.table_bits:])
        y = sr.data                          # the seed ROM's read register is this stage's
        u, amt, mean, tv = (T.reg(k, s) for s in (u, amt, mean, tv))
        k += 1
        for n in range(P.rs.newton):         # a = y*y; b = u*a; y = y*(3 - b) / 2
            carry = [u, amt, mean, tv]
            yy = T.mul(k, M["yy"], y, y, S["yy"], name=f"n{n}_yy")
            k1 = k + M["yy"].stages
            y, *carry = (T.delay(k, k1, s) for s in [y] + carry)
            k = k1
            a = T.reg(k, round_shift(m, yy, mf, rnd), S["a"], name=f"n{n}_a")
            y, *carry = (T.reg(k, s) for s in [y] + carry)
            k += 1
            ua = T.mul(k, M["ua"], carry[0], a, S["ua"], name=f"n{n}_ua")
            k1 = k + M["ua"].stages
            y, *carry = (T.delay(k, k1, s) for s in [y] + carry)
            k = k1
            bn = T.reg(k, round_shift(m, ua, mf, rnd), S["bb"], name=f"n{n}_b")
            y, *carry = (T.reg(k, s) for s in [y] + carry)
            k += 1
            f = T.reg(k, (3 << mf) - bn, S["f"], name=f"n{n}_f")
            y, *carry = (T.reg(k, s) for s in [y] + carry)
            k += 1
            yf = T.mul(k, M["yf"], y, f, S["yf"], name=f"n{n}_yf")
            k1 = k + M["yf"].stages
            carry = [T.delay(k, k1, s) for s in carry]
            k = k1
            y = T.reg(k, round_shift(m, yf, mf + 1, rnd), S["y"], name=f"n{n}_y")
            u, amt, mean, tv = (T.reg(k, s) for s in carry)
            k += 1
        # rstd = fit(round((y << out_pre) >> amt)): shift, round, fit
        w, sticky = shift_var(m, y << P.out_pre, amt, rnd)
        w = T.reg(k, w, unsigned(S["rstd_raw"].width + 1), name="rs_w")
        sticky, mean, tv = (T.reg(k, s) for s in (sticky, mean, tv))
        k += 1
        raw = T.reg(k, round_var(m, w, sticky, rnd), S["rstd_raw"], name="rs_raw")
        mean, tv = (T.reg(k, s) for s in (mean, tv))
        k += 1
        rstd_v, rstd_over = fit(m, raw, *Bd["rstd_raw"], q.ln_rstd, q.overflow)
        rstd = T.reg(k, rstd_v, S["rstd"], name="rstd")
        rsat = T.reg(k, rstd_over, name="rsat")
        mean, tv = (T.reg(k, s) for s in (mean, tv))
        k += 1
        assert k == P.stats_stages, (k, P.stats_stages)

        # --- stats FIFO (mean, rstd, sat) per token ------------------------------------------
        s_wp, s_rp = Signal(range(NT)), Signal(range(NT))
        s_cnt = Signal(range(NT + 1))
        pop = Signal()
        m.d.comb += [sw.addr.eq(s_wp), sw.en.eq(tv), sw.data.mean.eq(mean),
                     sw.data.rstd.eq(rstd), sw.data.sat.eq(rsat), srd.addr.eq(s_rp)]
        with m.If(tv):
            m.d.sync += s_wp.eq(s_wp + 1)
        with m.If(pop):
            m.d.sync += s_rp.eq(s_rp + 1)
        m.d.sync += s_cnt.eq(s_cnt + tv - pop)

        # --- normalise (back-pressured) -----------------------------------------------------
        n_out = P.out_stages
        loads = [Signal(name=f"ln_load{i}") for i in range(n_out)]
        O = _Regs(m, lambda i: loads[i], "out_")
        rp = Signal(range(NB))
        out_beat = Signal(range(Bt))
        has_tok = Signal()
        m.d.comb += [has_tok.eq(s_cnt != 0), issue.eq(has_tok & loads[0]),
                     pop.eq(issue & (out_beat == Bt - 1)),
                     tb_r.addr.eq(rp), tb_r.en.eq(loads[0])]
        with m.If(issue):
            m.d.sync += [rp.eq(incr(rp, NB)), out_beat.eq(Mux(out_beat == Bt - 1, 0, out_beat + 1))]
        # stage 0: the buffer's read register (x), the token's stats from the stats FIFO head
        head = srd.data
        mean_o = O.reg(0, head.mean, S["mean"], name="mean")
        rstd_o = O.reg(0, head.rstd, S["rstd"], name="rstd")
        side = [O.reg(0, head.sat, name="ssat"), O.reg(0, out_beat == Bt - 1, name="last"),
                O.reg(0, out_beat, name="beat")]
        xw = data.View(data.ArrayLayout(signed(A), L), tb_r.data)
        # stage 1: d = x - mean
        dx = [O.reg(1, xw[j] - mean_o, S["dx"], name=f"d{j}") for j in range(L)]
        rstd_o = O.reg(1, rstd_o)
        side = [O.reg(1, s) for s in side]
        # stages 2..: d * rstd, then xhat = round(d * rstd >> ln_rstd.frac)
        pd = [O.mul(2, M["dr"], dx[j], rstd_o, S["pd"], name=f"pd{j}") for j in range(L)]
        kx = 2 + M["dr"].stages
        side = [O.delay(2, kx - 1, s) for s in side]
        # gamma/beta are read at the stage that needs them: their read register is stage kx
        side = [O.reg(kx - 1, s) for s in side]
        m.d.comb += [pr.addr.eq(side[2]), pr.en.eq(loads[kx])]
        xhat = [O.reg(kx, round_shift(m, pd[j], q.ln_rstd.frac, rnd), S["xhat"], name=f"xh{j}")
                for j in range(L)]
        side = [O.reg(kx, s) for s in side]
        gam, bet = pr.data.gamma, pr.data.beta
        # stages kx+1..: xhat * gamma + beta' (beta aligned, an exact shift, is one more addend
        # of the partial-product tree)
        pg = [O.mul(kx + 1, M["xg"], xhat[j], gam[j], S["yfull"], name=f"pg{j}",
                    extra=[round_shift(m, bet[j], P.beta_shift, rnd)]) for j in range(L)]
        ky = kx + 1 + M["xg"].stages_with(1)
        side = [O.delay(kx + 1, ky, s) for s in side]
        # then y = fit(round(. >> ln_gamma.frac)): round, fit
        yr = [O.reg(ky, round_shift(m, pg[j], q.ln_gamma.frac, rnd), S["yr"], name=f"yr{j}")
              for j in range(L)]
        side = [O.reg(ky, s) for s in side]
        outs, overs = [], []
        for j in range(L):
            yv, ov = fit(m, yr[j], *Bd["yr"], q.act, q.overflow)
            outs.append(O.reg(ky + 1, yv, signed(A), name=f"y{j}"))
            overs.append(O.reg(ky + 1, ov, name=f"ov{j}"))
        ssat, olast, _ = (O.reg(ky + 1, s) for s in side)
        assert ky + 2 == n_out, (ky + 2, n_out)
        ctl = PipelineControl(m, n_out, has_tok, self.o.ready, name="ln")
        m.d.comb += [loads[i].eq(ctl.load[i]) for i in range(n_out)]
        m.d.comb += [
            self.o.valid.eq(ctl.out_valid),
            self.o.payload.sat_count.eq(popcount(overs)),
            self.o.payload.stat_sat.eq(ssat),
            self.o.payload.last.eq(olast),
            self.busy.eq((cnt != 0) | _any(ctl.valid)),
        ]
        m.d.comb += [self.o.payload.data[j].eq(outs[j]) for j in range(L)]
        return m


def _any(sigs):
    v = Const(0, 1)
    for s in sigs:
        v = v | s
    return v
