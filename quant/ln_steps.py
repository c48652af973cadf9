"""Intermediates of quant.approx.layernorm_fixed, for the LayerNorm RTL testbench.

`layernorm_steps` recomputes layernorm_fixed step by step with approx.py's own primitives
(layernorm_params, mul_shift_wide, rsqrt_fixed, shift_round) and returns the per-row
statistics (mean, var, rstd, their saturation flags) and the per-element results with their
saturation flags, which the testbench compares with the unit's sat outputs and prints on a
mismatch. It checks its `y` against layernorm_fixed itself, so it cannot drift from the golden
function: if approx.py changes, this raises instead of silently disagreeing.
"""
from __future__ import annotations

import numpy as np

from . import approx
from .config import QuantConfig
from .fixed import SatCounter, shift_round


def layernorm_steps(x, gamma, beta, qcfg: QuantConfig, eps: float = 1e-6) -> dict:
    """x [rows, D] act codes, gamma/beta [D] -> dict of int64 arrays:
    mean, mean_n, e2, msq, var, rstd [rows]; var_over, rstd_over [rows] (bool, the value left its
    format: saturated or wrapped); xhat, y_raw (before the act fit), y [rows, D]; y_over [rows, D]
    (bool)."""
    x = np.asarray(x, dtype=np.int64)
    if x.ndim != 2:
        raise ValueError(f"layernorm_steps: x must be [rows, D], got shape {x.shape}")
    lp = approx.layernorm_params(x.shape[-1], qcfg, eps)
    gamma, beta = np.asarray(gamma, dtype=np.int64), np.asarray(beta, dtype=np.int64)
    rnd, fa, fs = qcfg.rounding, qcfg.act.frac, qcfg.ln_stat.frac
    xn = shift_round(x, fa - lp.h_frac, rnd)
    sx, sn, q = x.sum(axis=-1), xn.sum(axis=-1), (xn * xn).sum(axis=-1)
    mean = approx.mul_shift_wide(sx, lp.k, lp.p, rnd)
    mean_n = approx.mul_shift_wide(sn, lp.k, lp.p + lp.h_frac - fa, rnd)
    e2 = approx.mul_shift_wide(q, lp.k, lp.p, rnd)
    msq = shift_round(mean_n * mean_n, 2 * fa - fs, rnd)
    var_raw = np.maximum(e2 - msq, 0) + lp.eps_q
    var_over = (var_raw < qcfg.ln_stat.min_int) | (var_raw > qcfg.ln_stat.max_int)
    var = qcfg.ln_stat.fit(var_raw, qcfg.overflow)
    # rstd saturation: the unsaturated value is rsqrt_fixed's, before its final fit
    sat = SatCounter()
    rstd = np.array([approx.rsqrt_fixed(np.array([v]), qcfg, sat, f"r{i}")[0]
                     for i, v in enumerate(var)], dtype=np.int64)
    rstd_over = np.array([sat.saturated(f"r{i}") > 0 for i in range(len(var))], dtype=bool)
    xhat = shift_round((x - mean[:, None]) * rstd[:, None], qcfg.ln_rstd.frac, rnd)
    fg, fb = qcfg.ln_gamma.frac, qcfg.ln_beta.frac
    y_raw = shift_round(xhat * gamma + shift_round(beta, fb - fa - fg, rnd), fg, rnd)
    y_over = (y_raw < qcfg.act.min_int) | (y_raw > qcfg.act.max_int)
    y = qcfg.act.fit(y_raw, qcfg.overflow)
    ref = approx.layernorm_fixed(x, gamma, beta, qcfg, eps)
    if not np.array_equal(y, ref):
        raise AssertionError("layernorm_steps disagrees with quant.approx.layernorm_fixed: "
                             "update it to follow approx.py")
    return {"mean": mean, "mean_n": mean_n, "e2": e2, "msq": msq, "var": var, "rstd": rstd,
            "var_over": var_over, "rstd_over": rstd_over, "xhat": xhat, "y_raw": y_raw, "y": y,
            "y_over": y_over}
