"""Per-output-channel weight scales and per-tensor activation scales (QuantConfig.granularity
"channel"): the numeric contract that lets 8-bit weights hold float fidelity.

Weights. Every linear layer W [N, K] (each expert separately, the patch embedding as [D, C*p*p])
is quantised symmetrically per output channel: codes in [-(2**(b-1)-1), 2**(b-1)-1],
s_w[n] = clip[n] / (2**(b-1)-1), clip[n] = the fraction of max|W[n]| in WEIGHT_CLIP_GRID with the
least squared error (rounding plus clipping). b = linear_w.bits (patch_w.bits for the patch
embedding); the formats' frac is 0: codes are plain integers, the scale lives in the epilogue.

Activations. The real scale s of every stored tensor (value = code * s):
  residual stream, GELU output, fc1 output (gelu_in), router logits (gate_logit)
                       the QuantConfig format's 2**-frac (the fixed-function units need them)
  LN outputs           per tensor (blocks.i.norm1 / norm2): clip / (2**(act.bits-1)-1), clip
                       chosen on calibration data to minimise MSE; folded into gamma and beta
                       (the LayerNorm unit is unchanged: its gamma/beta are data)
  V, attention output  per block, MSE-chosen for V; o = P @ V lands in attn_in codes at V's scale
  Q, K                 per block, MSE-chosen and then balanced so that s_q * s_k = 2**(-2 F),
                       F = attn_in.frac: the score unit's fixed shift stays exact
The image is quantised in act (per tensor, power of two), as in class granularity.

Epilogue of every linear layer, per output channel n (acc = exact integer dot product):
    sum = acc + bias[n]             bias[n] = round(b[n] / (s_in * s_w[n])), acc.bits wide
    p   = sum * M[n]                M unsigned, mult_bits wide, top bit set
    y   = fit(shift_round(p, S[n])) to the layer's output format; saturation counted
with M[n] * 2**-S[n] = s_in * s_w[n] / s_out rounded to mult_bits significant bits
(`multiplier`). `channel_requant` is that function; GoldenModel, the compiler and the RTL
epilogue all use these integers (ChannelEpilogue), computed once in `quantize_channel`.

Weight rounding (QuantConfig.weight_rounding). "nearest": code = round(w / s_w) per weight.
"gptq" (Frantar et al., GPTQ, ICLR 2023): the scales s_w are the same; the codes of each row are
chosen column by column, and each column's rounding error is spread onto the columns not yet
rounded through the Cholesky factor of the inverse Hessian H = X^T X of the layer's float inputs
on the calibration set (`calibration_hessians`; experts: the tokens the float router sends to
each expert), so the layer's output error X (W - Q s) is small rather than each weight's.
H is damped by GPTQ_DAMP x its mean diagonal (an expert sees ~100 calibration rows for 192 or 384
inputs: H is rank-deficient). Weights that the compensation pushes past the code range are
clipped and counted as saturated, like any weight. The result is plain integer codes: nothing in
the golden model, the compiler or the RTL changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .config import QuantConfig
from .fixed import Fmt, FormatError, Rounding, SatCounter, shift_round

WEIGHT_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
# geometric down to ~1/100 of the observed max: reaches past rare far outliers
ACT_CLIP_GRID = tuple(0.9 ** i for i in range(45))
ACT_SEARCH_SAMPLES = 1 << 18    # the clip search runs on a fixed random subsample (speed)
SHIFT_BITS = 6                      # the shift field of a weight-stream header lane
MAX_SHIFT = (1 << SHIFT_BITS) - 1
# Scales of calibrated tensors are widened by this factor after the MSE clip choice: inputs
# beyond the calibration set (other scenes) then still fit; at 16 bits one bit costs ~nothing.
ACT_HEADROOM = 2.0
CALIB_SYNTHETIC = 3                 # synthetic scenes in the default activation calibration set
GPTQ_DAMP = 0.01                    # GPTQ's standard damping, a fraction of H's mean diagonal
GPTQ_BLOCK = 64                     # columns per lazy-batch update


@dataclass
class ChannelEpilogue:
    """Integers of one layer's epilogue; arrays [..., N] (experts: [E, N])."""
    bias: np.ndarray
    mult: np.ndarray
    shift: np.ndarray
    in_scale: float
    out_scale: float

    def select(self, e: int) -> "ChannelEpilogue":
        return ChannelEpilogue(self.bias[e], self.mult[e], self.shift[e], self.in_scale, self.out_scale)


@dataclass
class ActScales:
    """Calibrated real scales of the per-tensor activations, and what calibration clipped."""
    scales: dict                                  # tensor name -> float scale
    clipping: dict = field(default_factory=dict)  # name -> {"clip", "max", "clipped", "total"}
    source: list = field(default_factory=list)    # descriptions of the calibration runs

    def to_dict(self) -> dict:
        return {"scales": self.scales, "clipping": self.clipping, "source": self.source}


def multiplier(m, bits: int, name: str = "?"):
    """Real multipliers m > 0 -> (M, S) integers with M * 2**-S ~ m, 2**(bits-1) <= M < 2**bits."""
    m = np.asarray(m, dtype=np.float64)
    if not np.all(np.isfinite(m)) or np.any(m <= 0):
        raise FormatError(f"epilogue multiplier of '{name}': scales must be finite and > 0")
    S = (bits - 1 - np.floor(np.log2(m))).astype(np.int64)
    M = np.round(m * np.exp2(S.astype(np.float64))).astype(np.int64)
    top = M >= (1 << bits)          # rounding carried into a new bit
    M, S = np.where(top, M >> 1, M), np.where(top, S - 1, S)
    bad = (S < 0) | (S > MAX_SHIFT)
    if bad.any():
        i = int(np.flatnonzero(bad.ravel())[0])
        raise FormatError(f"epilogue of '{name}': channel {i} needs a shift of {int(S.ravel()[i])} "
                          f"(multiplier {float(m.ravel()[i]):.3g}); the epilogue shifts 0..{MAX_SHIFT}")
    return M, S


def channel_epilogue(acc, bias, mult, shift, out_fmt: Fmt, qcfg: QuantConfig):
    """Elementwise (broadcasting) fit(shift_round((acc + bias) * mult, shift)): (y, overflow
    flags). The one definition that channel_requant, linear_golden and hw/channel_requant.py
    follow."""
    acc = np.asarray(acc, dtype=np.int64)
    p = (acc + np.asarray(bias, dtype=np.int64)) * np.asarray(mult, dtype=np.int64)
    S = np.broadcast_to(np.asarray(shift, dtype=np.int64), p.shape)
    r = np.empty_like(p)
    for s in np.unique(S):                   # a handful of distinct shifts per layer
        sel = S == s
        r[sel] = shift_round(p[sel], int(s), qcfg.rounding)
    over = (r < out_fmt.min_int) | (r > out_fmt.max_int)
    return out_fmt.fit(r, qcfg.overflow), over


def channel_requant(acc, ep: ChannelEpilogue, out_fmt: Fmt, qcfg: QuantConfig,
                    sat: SatCounter | None = None, name: str = "requant"):
    """The channel epilogue: fit(shift_round((acc + bias) * M, S)) per output channel (last axis)."""
    y, over = channel_epilogue(acc, ep.bias, ep.mult, ep.shift, out_fmt, qcfg)
    if sat is not None:
        sat.add(name, int(over.sum()), over.size)
    return y


def attention_qcfg(qcfg: QuantConfig) -> QuantConfig:
    """The QuantConfig as the ATTENTION unit sees it: its input and output are `act` codes in
    class granularity (requantised to / from attn_in inside), attn_in codes in channel
    granularity (the qkv epilogue writes attn_in, the output stays at V's scale)."""
    return qcfg.replace(act=qcfg.attn_in) if qcfg.granularity == "channel" else qcfg


def check_channel_datapath(qcfg: QuantConfig) -> None:
    """The compiler's and the RTL's channel datapath keeps every linear output in buffer words of
    act.bits: the qkv (attn_in), fc1 (gelu_in) and router (gate_logit) outputs are saturated to
    act.bits, so those formats must have act's width (their scales live in the multipliers)."""
    if qcfg.granularity != "channel":
        return
    for f in ("attn_in", "gelu_in", "gate_logit"):
        fm = getattr(qcfg, f)
        if fm.bits != qcfg.act.bits or not fm.signed:
            raise FormatError(f"QuantConfig '{qcfg.name}': granularity 'channel' needs {f} ({fm}) "
                              f"signed and as wide as act ({qcfg.act}): the linear epilogue writes "
                              "it into act-wide buffer words")


# ---------------------------------------------------------------------------------------------
# scales
# ---------------------------------------------------------------------------------------------
def _levels(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def weight_scales(w: np.ndarray, bits: int) -> np.ndarray:
    """Per-row scales of w [..., N, K] with the least squared error over WEIGHT_CLIP_GRID."""
    L = _levels(bits)
    w = np.asarray(w, dtype=np.float64)
    mx = np.abs(w).max(axis=-1)
    mx = np.where(mx > 0, mx, 1.0)
    best, best_err = None, None
    for f in WEIGHT_CLIP_GRID:
        s = (mx * f / L)[..., None]
        err = ((np.clip(np.round(w / s), -L, L) * s - w) ** 2).sum(axis=-1)
        if best is None:
            best, best_err = s[..., 0], err
        else:
            better = err < best_err
            best, best_err = np.where(better, s[..., 0], best), np.where(better, err, best_err)
    return best


def mse_scale(x: np.ndarray, bits: int) -> tuple[float, dict]:
    """Scale of one activation tensor (all its calibration samples) minimising the squared error
    of symmetric rounding + clipping to `bits`; and what it clips."""
    L = _levels(bits)
    x = np.asarray(x, dtype=np.float64).ravel()
    mx = float(np.abs(x).max()) or 1.0
    xs = x
    if x.size > ACT_SEARCH_SAMPLES:
        xs = np.random.default_rng(0).choice(x, ACT_SEARCH_SAMPLES, replace=False)
        xs[0] = x[np.argmax(np.abs(x))]             # the max stays in the sample
    errs = []
    for f in ACT_CLIP_GRID:
        s = mx * f / L
        errs.append(float(((np.clip(np.round(xs / s), -L, L) * s - xs) ** 2).sum()))
    f = ACT_CLIP_GRID[int(np.argmin(errs))]
    s = mx * f / L
    clipped = int(np.count_nonzero(np.abs(x) > s * (L + 0.5)))
    return s, {"clip": mx * f, "max": mx, "clip_fraction_of_max": f, "clipped": clipped, "total": int(x.size)}


def calibrate_act_scales(cfg, qcfg: QuantConfig, folded: dict, images, descs=None, tasks=None,
                         headroom: float = ACT_HEADROOM) -> ActScales:
    """Per-tensor scales from float forwards (quant.calibrate.float_forward) of every image and
    task: LN outputs, V by MSE (times `headroom`); Q and K by MSE and then balanced to
    s_q * s_k = 2**(-2 F)."""
    from .calibrate import float_forward

    tasks = list(range(cfg.num_tasks)) if tasks is None else [cfg.task_index(t) for t in tasks]
    D = cfg.dim
    samples: dict[str, list] = {}
    for im in images:
        for t in tasks:
            tr = float_forward(cfg, folded, im, t)
            for i in range(cfg.depth):
                b = f"blocks.{i}"
                for nm in (".norm1", ".norm2"):
                    samples.setdefault(b + nm, []).append(tr.tensors[b + nm])
                qkv = tr.tensors[b + ".qkv"]
                for j, part in enumerate(("q", "k", "v")):
                    samples.setdefault(f"{b}.{part}", []).append(qkv[:, j * D:(j + 1) * D])
    scales, clip = {}, {}
    for name, xs in samples.items():
        bits = qcfg.act.bits if name.endswith(("norm1", "norm2")) else qcfg.attn_in.bits
        s, clip[name] = mse_scale(np.concatenate([x.ravel() for x in xs]), bits)
        scales[name] = s * headroom
        clip[name]["headroom"] = headroom
    target = 2.0 ** (-2 * qcfg.attn_in.frac)
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        r = math.sqrt(target / (scales[b + ".q"] * scales[b + ".k"]))
        # r >= 1: both coarser by r (no new clipping); r < 1: both finer (clips more; counted
        # in the golden run's saturation of the qkv epilogue)
        scales[b + ".q"] *= r
        scales[b + ".k"] *= r
        clip[b + ".q"]["balance"] = clip[b + ".k"]["balance"] = r
    src = [f"{d}, task {cfg.tasks[t]}" for d in (descs or [f"image {k}" for k in range(len(images))])
           for t in tasks]
    return ActScales(scales, clip, src)


def default_act_scales(cfg, qcfg: QuantConfig, folded: dict) -> ActScales:
    """A calibration set held out from the evaluation image (quant.calibrate.calibration_images
    without the Cityscapes image, which quant-report, eval and simulate run by default):
    matplotlib's sample photo and CALIB_SYNTHETIC synthetic scenes, all tasks."""
    from .calibrate import calibration_images
    imgs, descs = calibration_images(cfg, synthetic=CALIB_SYNTHETIC, eval_image=False)
    return calibrate_act_scales(cfg, qcfg, folded, imgs, descs)


# ---------------------------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------------------------
def gptq_codes(w: np.ndarray, s_w: np.ndarray, H: np.ndarray, bits: int,
               damp: float = GPTQ_DAMP) -> tuple[np.ndarray, int]:
    """GPTQ codes of w [N, K] at per-row scales s_w [N] for inputs with Hessian H [K, K]:
    (codes in [-L, L] (int64), how many were clipped to the range). With a diagonal H no error
    is carried to other columns and the codes are round(w / s_w) exactly."""
    w = np.array(w, dtype=np.float64)
    N, K = w.shape
    if np.asarray(H).shape != (K, K):
        raise ValueError(f"gptq_codes: Hessian shape {np.asarray(H).shape} for a weight of {K} inputs")
    L = _levels(bits)
    H = np.array(H, dtype=np.float64)
    dead = np.diag(H) <= 0                    # inputs never seen: their weights just round
    H[dead, dead] = 1.0
    H[np.diag_indices(K)] += damp * float(np.mean(np.diag(H)))
    U = np.linalg.cholesky(np.linalg.inv(H)).T    # upper: row i carries column i's error forward
    s = np.asarray(s_w, dtype=np.float64)
    q = np.empty((N, K))
    clipped = 0
    # GPTQ's lazy batches: a column's error updates the rest of its block at once and the
    # columns after the block in one product per block (the same updates, fewer passes)
    for b0 in range(0, K, GPTQ_BLOCK):
        b1 = min(K, b0 + GPTQ_BLOCK)
        errs = np.empty((N, b1 - b0))
        for i in range(b0, b1):
            r = np.round(w[:, i] / s)
            clipped += int(np.count_nonzero(np.abs(r) > L))
            q[:, i] = np.clip(r, -L, L)
            e = errs[:, i - b0] = (w[:, i] - q[:, i] * s) / U[i, i]
            w[:, i + 1:b1] -= e[:, None] * U[i, i + 1:b1]
        w[:, b1:] -= errs @ U[b0:b1, b1:]
    return q.astype(np.int64), clipped


def calibration_hessians(cfg, qcfg: QuantConfig, folded: dict, act: ActScales, images, tasks=None) -> dict:
    """H = X^T X of every linear layer's float input over the calibration images and tasks, keyed
    by weight key (experts: [E, K, K], each expert over the tokens the float router gives it).
    The router of gating "task_cond" sees its task-embedding columns at the LN output's scale
    (as quantize_channel rescales those weight columns). quantize_channel passes the default
    calibration images, also when the caller gave its own activation scales."""
    import torch
    import torch.nn.functional as F

    from .calibrate import float_forward

    tasks = list(range(cfg.num_tasks)) if tasks is None else [cfg.task_index(t) for t in tasks]
    H: dict = {}
    E = cfg.num_experts

    def add(key, x, e=None):
        x = np.asarray(x, dtype=np.float64)
        g = x.T @ x
        if e is None:
            H[key] = H.get(key, 0.0) + g
        else:
            H.setdefault(key, np.zeros((E,) + g.shape))[e] += g

    p, (gh, gw) = cfg.patch, cfg.grid
    for im in images:
        im = np.asarray(im, dtype=np.float64)
        patches = im.reshape(cfg.in_chans, gh, p, gw, p).transpose(1, 3, 0, 2, 4).reshape(gh * gw, -1)
        for t in tasks:
            add("patch_embed.proj.weight", patches)
            T = float_forward(cfg, folded, im, t)
            for i in range(cfg.depth):
                b = f"blocks.{i}"
                m = b + ".mlp"
                add(b + ".attn.qkv.weight", T.tensors[b + ".norm1"])
                add(b + ".attn.proj.weight", T.tensors[b + ".attn_out"])
                h2 = T.tensors[b + ".norm2"]
                if not cfg.is_moe(i):
                    add(m + ".fc1.weight", h2)
                    add(m + ".fc2.weight", T.tensors[m + ".gelu"])
                    continue
                if cfg.gating == "multi":
                    add(f"{m}.routers.{t}.weight", h2)
                else:
                    emb = folded[f"{m}.task_embed.weight"][t] * (act.scales[b + ".norm2"] / qcfg.act.lsb)
                    add(m + ".router.weight", np.concatenate([h2, np.broadcast_to(emb, (h2.shape[0], emb.size))], 1))
                idx = T.routing[i]["topk_idx"]
                for e in range(E):
                    toks = np.flatnonzero((idx == e).any(axis=1))
                    if not toks.size:
                        continue
                    x = h2[toks]
                    a = x @ folded[m + ".htoh4_weight"][e].T + folded[m + ".htoh4_bias"][e]
                    add(m + ".htoh4_weight", x, e)
                    add(m + ".h4toh_weight", F.gelu(torch.from_numpy(a)).numpy(), e)
    return H


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------
def _layer(codes, epi, sat, key, w, bits, s_in, s_out, bias, qcfg, mult_name, hess=None):
    """Quantise one weight tensor w [..., N, K] (+ bias [..., N] or None) into codes + epilogue;
    hess: {key: H} of calibration_hessians for GPTQ rounding (None: round to nearest)."""
    L = _levels(bits)
    s_w = weight_scales(w, bits)
    if hess is None:
        q = np.round(w / s_w[..., None])
        sat.add(key, int(np.count_nonzero(np.abs(q) > L)), int(q.size))
        codes[key] = np.clip(q, -L, L).astype(np.int64)
    else:
        if key not in hess:
            raise FormatError(f"GPTQ rounding of '{key}': no calibration Hessian (no calibration "
                              "input reached this layer)")
        H = hess[key]
        if w.ndim == 3:         # experts: one Hessian each (zero for an expert no token reached)
            res = [gptq_codes(w[e], s_w[e], H[e], bits) for e in range(w.shape[0])]
            codes[key] = np.stack([c for c, _ in res])
            clipped = sum(n for _, n in res)
        else:
            codes[key], clipped = gptq_codes(w, s_w, H, bits)
        sat.add(key, clipped, int(w.size))
    acc_scale = s_in * s_w
    if bias is None:
        bq = np.zeros(s_w.shape, dtype=np.int64)
    else:
        bq = qcfg.acc.fit(np.round(np.asarray(bias, np.float64) / acc_scale).astype(np.int64),
                          qcfg.overflow, sat, mult_name + ".bias")
    s_out = np.broadcast_to(np.asarray(s_out, dtype=np.float64), s_w.shape)
    M, S = multiplier(acc_scale / s_out, qcfg.mult_bits, mult_name)
    epi[key] = ChannelEpilogue(bq, M, S, float(s_in), s_out)


def quantize_channel(cfg, qcfg: QuantConfig, sd: dict, act: ActScales | None = None):
    """QWeights of granularity "channel": int codes per channel, ChannelEpilogue per layer, the
    LN outputs' scales folded into gamma/beta. act: calibrated scales (default_act_scales)."""
    from .qweights import QWeights, fold_scales, tensor_class

    folded = fold_scales(cfg, sd)
    act = act or default_act_scales(cfg, qcfg, folded)
    sc = act.scales
    hess = None
    if qcfg.weight_rounding == "gptq":
        from .calibrate import calibration_images
        imgs, _ = calibration_images(cfg, synthetic=CALIB_SYNTHETIC, eval_image=False)
        hess = calibration_hessians(cfg, qcfg, folded, act, imgs)
    a_lsb = qcfg.act.lsb
    sat = SatCounter()
    codes, fmts, epi = {}, {}, {}
    D = cfg.dim

    def plain(k, fmt_name):
        f = getattr(qcfg, fmt_name)
        from .fixed import Rounding as R
        codes[k] = f.quantize(folded[k], R.HALF_EVEN, qcfg.overflow, sat, k)
        fmts[k] = f

    pe = folded["patch_embed.proj.weight"]
    _layer(codes, epi, sat, "patch_embed.proj.weight", pe.reshape(pe.shape[0], -1), qcfg.patch_w.bits,
           a_lsb, a_lsb, folded["patch_embed.proj.bias"], qcfg, "patch_embed", hess=hess)
    codes["patch_embed.proj.weight"] = codes["patch_embed.proj.weight"].reshape(pe.shape)
    fmts["patch_embed.proj.weight"] = qcfg.patch_w
    for k in ("cls_token", "pos_embed"):
        plain(k, "act")
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        for nm in ("norm1", "norm2"):
            # LN output code = h / s: gamma and beta scaled by act.lsb / s
            c = a_lsb / sc[f"{b}.{nm}"]
            for par, cls in (("weight", "ln_gamma"), ("bias", "ln_beta")):
                k = f"{b}.{nm}.{par}"
                f = getattr(qcfg, cls)
                codes[k] = f.quantize(folded[k] * c, Rounding.HALF_EVEN, qcfg.overflow, sat, k)
                fmts[k] = f
        s_out = np.concatenate([np.full(D, sc[f"{b}.{p}"]) for p in ("q", "k", "v")])
        _layer(codes, epi, sat, f"{b}.attn.qkv.weight", folded[f"{b}.attn.qkv.weight"], qcfg.linear_w.bits,
               sc[f"{b}.norm1"], s_out, folded[f"{b}.attn.qkv.bias"], qcfg, f"{b}.qkv", hess=hess)
        _layer(codes, epi, sat, f"{b}.attn.proj.weight", folded[f"{b}.attn.proj.weight"], qcfg.linear_w.bits,
               sc[f"{b}.v"], a_lsb, folded[f"{b}.attn.proj.bias"], qcfg, f"{b}.proj", hess=hess)
        m = f"{b}.mlp"
        s2 = sc[f"{b}.norm2"]
        if cfg.is_moe(i):
            for k in [k for k in folded if k.startswith(m + ".router") and k.endswith("weight")]:
                w = folded[k].copy()
                if cfg.gating != "multi":
                    # the task-embedding columns see act codes: rescale them to the LN's scale
                    w[:, D:] *= a_lsb / s2
                _layer(codes, epi, sat, k, w, qcfg.linear_w.bits, s2, qcfg.gate_logit.lsb, None, qcfg,
                       m + ".gate_logits", hess=hess)
            if cfg.gating != "multi":
                plain(m + ".task_embed.weight", "act")
            _layer(codes, epi, sat, m + ".htoh4_weight", folded[m + ".htoh4_weight"], qcfg.linear_w.bits,
                   s2, qcfg.gelu_in.lsb, folded[m + ".htoh4_bias"], qcfg, m + ".expert_fc1", hess=hess)
            _layer(codes, epi, sat, m + ".h4toh_weight", folded[m + ".h4toh_weight"], qcfg.linear_w.bits,
                   a_lsb, a_lsb, folded[m + ".h4toh_bias"], qcfg, m + ".expert_fc2", hess=hess)
        else:
            _layer(codes, epi, sat, m + ".fc1.weight", folded[m + ".fc1.weight"], qcfg.linear_w.bits,
                   s2, qcfg.gelu_in.lsb, folded[m + ".fc1.bias"], qcfg, m + ".fc1", hess=hess)
            _layer(codes, epi, sat, m + ".fc2.weight", folded[m + ".fc2.weight"], qcfg.linear_w.bits,
                   a_lsb, a_lsb, folded[m + ".fc2.bias"], qcfg, m + ".fc2", hess=hess)
        for k in codes:
            if k.startswith(b + ".") and k not in fmts:
                fmts[k] = qcfg.linear_w
    missing = [k for k in folded if k not in codes and tensor_class(k) != "bias"]
    if missing:
        raise FormatError(f"channel quantisation of '{cfg.name}': no rule for tensors {missing[:5]}")
    # scales of the stored tensors that are not at their format's 2**-frac (reports dequantise with them)
    scales = {}
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        scales[b + ".norm1"], scales[b + ".norm2"] = sc[b + ".norm1"], sc[b + ".norm2"]
        scales[b + ".qkv"] = np.concatenate([np.full(D, sc[f"{b}.{p}"]) for p in ("q", "k", "v")])
        scales[b + ".attn_out"] = sc[b + ".v"]
    return QWeights(codes, fmts, sat, epi=epi, scales=scales, act=act)
