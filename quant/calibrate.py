"""Calibration: choose the fraction bits of every tensor class from ranges observed on real data.

"Per tensor" here means per tensor CLASS of QuantConfig (act, attn_in, score, gate_logit,
linear_w, ...), not per layer: every activation of the residual stream, every LayerNorm output,
QKV, attention output, projection, MLP and expert output shares the one `act` format, every
linear weight matrix (QKV, proj, MLP, experts, routers) shares `linear_w`, and so on. That is
what the datapath implements: the compute unit's epilogue has one requantize shift per class
(acc.frac - act.frac), the attention unit one per stage, so a format is a constant of the
hardware, not a per-layer register. Per-layer formats would let small tensors (LayerNorm
outputs, expert weights of std 0.02) keep more fraction bits than the class's largest member
(the residual stream, trained QKV outliers) allows: a few dB of SQNR per layer, bought with a
per-layer shift amount in every instruction, per-layer bias alignment and a per-layer check of
every derived width (acc, ln_stat). Measured on edge-moe (float model, 8-bit weights only, all
else float, Cityscapes image): one linear_w format s8.6 gives final-feature cosine 0.9953 with the
trained weights and 0.964 with seeded ones; a frac per weight tensor gives 0.9993 and 0.99993.
8-bit weights are where per-layer formats pay; 16-bit activations lose little per class.
This module chooses per-class formats only.

Procedure (`calibrate`):
1. `float_forward` runs a float64 mirror of the golden datapath (quant/golden.py) with the
   compile-time folds of quant/qweights.py applied (log2(e)/sqrt(d_head) in the Q rows,
   log2(e) in the routers), so every tensor is seen in the domain the hardware stores it:
   Q/K/V as fed to attention, scores as base-2 exponents, router logits in base 2. It records
   min/max of every tensor the golden model narrows to a class format (block inputs and outputs,
   LayerNorm outputs, qkv, attention outputs, proj, fc1/GELU/fc2, expert fc1/GELU/fc2, weighted
   expert outputs and the partial residual sums of the expert-by-expert accumulation, scores,
   router logits) plus LayerNorm's internal statistics. Its block outputs equal M3ViT's
   (tests/test_calibrate.py checks it).
2. Parameters are observed from the folded float state dict, per class (tensor_class).
3. For a class of total width `bits[cls]`, the largest frac with which every observed value
   (rounded as the datapath rounds it) fits is f_fit; the chosen frac is
   min(f_fit - margin, bits). Activation classes get `margin_bits` (new images may exceed the
   calibration set's range); parameter classes get `param_margin_bits` (default 0: weights are
   known exactly, a spare bit would only cost 6 dB of SQNR on every weight).
4. Constraints of the datapath, applied on top and reported:
   - patch_w and linear_w share one frac (the accumulator format fixes acc.frac = act.frac +
     w.frac for every weight, QuantConfig.check_model): the smaller of the two fracs wins.
   - gelu_in = act: the golden model feeds fc1's output, requantized to `act`, straight into
     the GELU unit as gelu_in codes, so the two formats must be the same.
   - acc = s(act.bits + w.bits + bitlen(fan_in - 1)).(act.frac + w.frac): the accumulator that
     check_model requires, never wider.
   - ln_stat keeps base's format unless its integer bits cannot hold the square of the largest
     act value (var = E[x^2] - mean^2 lives there): then its frac drops (stays even). Its frac
     must NOT follow act's: eps = 1e-6 is added in ln_stat codes (eps_q = round(eps * 2**frac),
     at least 1), so frac = 2 * act.frac = 14 would turn eps into 6e-5 and change LayerNorm on
     low-variance rows (seeded edge-moe block 0 has var ~5e-4).
   - exp, sum, recip, prob, gelu_table, ln_rstd, gate_prob are kept from `base`: they hold
     values whose range does not depend on act (probabilities, 2**x <= 1, 1/sqrt(var + eps)
     <= 1/sqrt(eps), d(t) < 0.17); the observed LayerNorm statistics are checked against them.
   Every approximator's parameter function (quant/approx.py *_params) and the epilogue plan are
   then evaluated on the result, so an inconsistent config fails here, naming the class.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .config import FORMAT_FIELDS, QuantConfig
from .fixed import Fmt, FormatError, Rounding
from .qweights import fold_scales, tensor_class

PARAM_CLASSES = ("patch_w", "linear_w", "bias", "ln_gamma", "ln_beta")
DATA_CLASSES = ("act", "gelu_in", "attn_in", "score", "gate_logit")
CALIBRATED = PARAM_CLASSES + DATA_CLASSES
DERIVED = ("acc",)
INTERNAL = tuple(f for f in FORMAT_FIELDS if f not in CALIBRATED + DERIVED)

# Total widths per class of the bit-width presets (`edgemoe calibrate --bits NAME`).
BITS_PRESETS: dict[str, dict[str, int]] = {
    "w8a16": {"patch_w": 8, "linear_w": 8, "bias": 16, "ln_gamma": 16, "ln_beta": 16,
              "act": 16, "gelu_in": 16, "attn_in": 16, "score": 16, "gate_logit": 16},
}

# Float-trace tensor names (suffixes, as the golden model names them) -> the classes they land in.
_ACT = ("input", "patch_embed", "embed", ".norm1", ".qkv", ".attn_out", ".proj", ".resid1",
        ".norm2", ".mlp.fc1", ".mlp.gelu", ".mlp.fc2", ".mlp.expert_fc1", ".mlp.expert_gelu",
        ".mlp.expert_fc2", ".mlp.expert_weighted", ".mlp.moe_partial", ".out")
_CLASS_SUFFIXES = {
    "act": _ACT,
    "gelu_in": (".mlp.fc1", ".mlp.expert_fc1"),
    "attn_in": (".qkv",),
    "score": (".scores",),
    "gate_logit": (".mlp.gate_logits",),
    "ln_stat": (".ex2", ".var"),
    "ln_rstd": (".rstd",),
}


def _matches(name: str, sfx) -> bool:
    """Whether a float-trace name is one of `sfx`: whole names, or ".suffix" endings."""
    return any(name == s if not s.startswith(".") else name.endswith(s) for s in sfx)


def data_classes(name: str) -> list[str]:
    """The tensor classes a float-trace tensor belongs to (QKV is both act and attn_in)."""
    return [c for c, sfx in _CLASS_SUFFIXES.items() if _matches(name, sfx)]


# ---------------------------------------------------------------------------------------------
# float mirror of the golden datapath
# ---------------------------------------------------------------------------------------------
@dataclass
class FloatTrace:
    features: np.ndarray                             # [N+1, D] after the last block
    tensors: dict = field(default_factory=dict)      # golden-comparable tensors by golden name
    ranges: dict = field(default_factory=dict)       # name -> [min, max], every observed tensor
    routing: dict = field(default_factory=dict)      # block -> {"topk_idx", "topk_w", "probs"}


def _note(ranges: dict, name: str, t) -> None:
    lo, hi = (float(v) for v in t.aminmax())
    r = ranges.get(name)
    ranges[name] = [lo, hi] if r is None else [min(r[0], lo), max(r[1], hi)]


@contextmanager
def one_torch_thread():
    """Run torch on one thread inside the block. The 129-row matmuls of this model gain nothing
    from threads, and on a busy 2-core machine the thread hand-off made a float forward 50x
    slower (3.7 s instead of 0.07 s) and the seeded edge-moe init 10x slower."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def float_forward(cfg, folded: dict, image, task) -> FloatTrace:
    """float64 forward of one image [C, H, W] in the golden model's order and domains.
    folded: fold_scales(cfg, state_dict) (numpy float64). Names follow GoldenModel's keep=True
    tensors (embed, blocks.i.norm1/qkv/scores/probs/attn_out/proj/resid1/norm2/mlp.*/out)."""
    import torch

    task = cfg.task_index(task)
    with one_torch_thread():
        return _float_forward(cfg, folded, image, task)


def _float_forward(cfg, folded: dict, image, task: int) -> FloatTrace:
    import torch
    import torch.nn.functional as F

    W = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in folded.items()}
    img = torch.as_tensor(np.asarray(image, dtype=np.float64))
    if tuple(img.shape) != (cfg.in_chans, cfg.img_h, cfg.img_w):
        raise ValueError(f"image shape {tuple(img.shape)} != expected "
                         f"{(cfg.in_chans, cfg.img_h, cfg.img_w)} for model '{cfg.name}'")
    tr = FloatTrace(None)
    t, rg = tr.tensors, tr.ranges

    def keep(name, v, store=True):
        _note(rg, name, v)
        if store:
            t[name] = v.numpy().copy()

    def ln(x, pre):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        _note(rg, pre + ".ex2", (x * x).mean(-1))
        _note(rg, pre + ".var", var)
        _note(rg, pre + ".rstd", 1.0 / torch.sqrt(var + cfg.ln_eps))
        return (x - mu) / torch.sqrt(var + cfg.ln_eps) * W[pre + ".weight"] + W[pre + ".bias"]

    def lin(x, pre, wname="weight", bname="bias"):
        b = W.get(f"{pre}.{bname}") if bname else None
        return F.linear(x, W[f"{pre}.{wname}"], b)

    keep("input", img, store=False)
    p, (gh, gw), D, n = cfg.patch, cfg.grid, cfg.dim, cfg.num_tokens
    patches = img.reshape(cfg.in_chans, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, -1)
    tok = F.linear(patches, W["patch_embed.proj.weight"].reshape(D, -1), W["patch_embed.proj.bias"])
    keep("patch_embed", tok, store=False)
    x = torch.cat([W["cls_token"].reshape(1, D), tok]) + W["pos_embed"].reshape(n, D)
    keep("embed", x)
    H, dh = cfg.heads, cfg.head_dim
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        h = ln(x, b + ".norm1")
        keep(b + ".norm1", h)
        qkv = lin(h, b + ".attn.qkv")
        keep(b + ".qkv", qkv)
        q, k, v = (qkv[:, j * D:(j + 1) * D].reshape(n, H, dh).transpose(0, 1) for j in range(3))
        s = q @ k.transpose(1, 2)                       # base-2 exponents (log2 e / sqrt(dh) folded)
        keep(b + ".scores", s)
        e = torch.exp2(s - s.amax(-1, keepdim=True))
        pr = e / e.sum(-1, keepdim=True)
        keep(b + ".probs", pr)
        o = (pr @ v).transpose(0, 1).reshape(n, D)
        keep(b + ".attn_out", o)
        pj = lin(o, b + ".attn.proj")
        keep(b + ".proj", pj)
        x = x + pj
        keep(b + ".resid1", x)
        h2 = ln(x, b + ".norm2")
        keep(b + ".norm2", h2)
        m = b + ".mlp"
        if cfg.is_moe(i):
            if cfg.gating == "multi":
                lg = F.linear(h2, W[f"{m}.routers.{task}.weight"])
            else:
                emb = W[f"{m}.task_embed.weight"][task].expand(n, -1)
                lg = F.linear(torch.cat([h2, emb], 1), W[f"{m}.router.weight"])
            keep(m + ".gate_logits", lg)
            ge = torch.exp2(lg - lg.amax(-1, keepdim=True))
            probs = ge / ge.sum(-1, keepdim=True)
            w, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
            idx, w = idx[:, :cfg.top_k], w[:, :cfg.top_k]
            tr.routing[i] = {"topk_idx": idx.numpy(), "topk_w": w.numpy(), "probs": probs.numpy()}
            moe = torch.zeros_like(x)
            x = x.clone()
            for ex in range(cfg.num_experts):             # golden order: expert by expert
                toks, slot = (idx == ex).nonzero(as_tuple=True)
                if not toks.numel():
                    continue
                a = F.linear(h2[toks], W[m + ".htoh4_weight"][ex], W[m + ".htoh4_bias"][ex])
                g = F.gelu(a)
                y = F.linear(g, W[m + ".h4toh_weight"][ex], W[m + ".h4toh_bias"][ex])
                yw = y * w[toks, slot, None]
                x[toks] = x[toks] + yw
                moe[toks] += yw
                for nm, vv in (("expert_fc1", a), ("expert_gelu", g), ("expert_fc2", y),
                               ("expert_weighted", yw), ("moe_partial", x[toks])):
                    _note(rg, f"{m}.{nm}", vv)
            keep(m + ".moe_out", moe)
        else:
            a = lin(h2, m + ".fc1")
            g = F.gelu(a)
            y = lin(g, m + ".fc2")
            for nm, vv in (("fc1", a), ("gelu", g), ("fc2", y)):
                keep(f"{m}.{nm}", vv)
            x = x + y
        keep(b + ".out", x)
    tr.features = x.numpy().copy()
    return tr


# ---------------------------------------------------------------------------------------------
# observation
# ---------------------------------------------------------------------------------------------
def _merge(dst: dict, src: dict) -> None:
    for k, (lo, hi) in src.items():
        r = dst.get(k)
        dst[k] = [lo, hi] if r is None else [min(r[0], lo), max(r[1], hi)]


def _images(images) -> list[np.ndarray]:
    out = []
    for im in (images if isinstance(images, (list, tuple)) else [images]):
        a = im.detach().cpu().double().numpy() if hasattr(im, "detach") else np.asarray(im, np.float64)
        out.extend(a if a.ndim == 4 else [a])
    if not out:
        raise ValueError("calibrate: no calibration images")
    return out


def observe(cfg, state_dicts, images, tasks=None) -> dict:
    """Ranges of every float-trace tensor and every (folded) parameter over all state dicts,
    images and tasks: {"data": {name: [min, max]}, "params": {key: [min, max]}, "runs": n}."""
    sds = state_dicts if isinstance(state_dicts, (list, tuple)) else [state_dicts]
    tasks = list(range(cfg.num_tasks)) if tasks is None else [cfg.task_index(t) for t in tasks]
    imgs = _images(images)
    data, params, runs = {}, {}, 0
    for sd in sds:
        folded = fold_scales(cfg, sd)
        _merge(params, {k: [float(v.min()), float(v.max())] for k, v in folded.items()})
        for im in imgs:
            for t in tasks:
                _merge(data, float_forward(cfg, folded, im, t).ranges)
                runs += 1
    return {"data": data, "params": params, "runs": runs}


# ---------------------------------------------------------------------------------------------
# format choice
# ---------------------------------------------------------------------------------------------
def _code(v: float, frac: int, rounding: Rounding) -> int:
    x = v * 2.0 ** frac
    r = Rounding(rounding)
    if r is Rounding.TRUNC:
        return math.floor(x)
    if r is Rounding.HALF_UP:
        return math.floor(x + 0.5)
    return int(np.rint(x))


def fits(lo: float, hi: float, bits: int, frac: int, rounding: Rounding) -> bool:
    """Whether [lo, hi], rounded to `frac` fraction bits, lies in a signed `bits`-bit code range
    (frac may exceed bits here: the search runs past Fmt's limit)."""
    return (_code(hi, frac, rounding) <= (1 << (bits - 1)) - 1
            and _code(lo, frac, rounding) >= -(1 << (bits - 1)))


def fit_frac(cls: str, lo: float, hi: float, bits: int, rounding: Rounding) -> int:
    """Largest frac (up to bits + 32) at which [lo, hi] fits `bits` signed bits; FormatError
    naming the class if even frac 0 does not."""
    for f in range(bits + 32, -1, -1):
        if fits(lo, hi, bits, f, rounding):
            return f
    need = max(abs(lo), abs(hi))
    raise FormatError(f"calibrate: tensor class '{cls}': observed range [{lo:.6g}, {hi:.6g}] does "
                      f"not fit {bits} signed bits with any fraction bits (needs "
                      f"{math.floor(math.log2(need)) + 2} bits at frac 0)")


@dataclass(frozen=True)
class ClassChoice:
    cls: str
    kind: str            # param | data | derived | internal
    lo: float
    hi: float
    where: str           # tensor that reached max |value|
    fit_frac: int | None
    fmt: Fmt
    note: str = ""

    @property
    def observed_max(self) -> float:
        return max(abs(self.lo), abs(self.hi))

    def to_dict(self) -> dict:
        m = self.observed_max
        headroom = self.fmt.max_value / m if m > 0 else None    # nothing observed: no ratio
        return {"kind": self.kind, "observed_min": self.lo, "observed_max_abs": m,
                "max_tensor": self.where, "fmt": str(self.fmt), "range": [self.fmt.min_value, self.fmt.max_value],
                "lsb": self.fmt.lsb, "headroom_x": headroom,
                "headroom_bits": math.log2(headroom) if headroom else None,
                "fit_frac": self.fit_frac, "note": self.note}


def _class_ranges(obs: dict) -> dict[str, tuple[float, float, str]]:
    """Per class: (min, max, tensor with the largest |value|)."""
    out: dict[str, list] = {}

    def add(cls, name, lo, hi):
        m = max(abs(lo), abs(hi))
        r = out.get(cls)
        if r is None:
            out[cls] = [lo, hi, name, m]
        else:
            r[0], r[1] = min(r[0], lo), max(r[1], hi)
            if m > r[3]:
                r[2], r[3] = name, m
    for name, (lo, hi) in obs["data"].items():
        for c in data_classes(name):
            add(c, name, lo, hi)
    for key, (lo, hi) in obs["params"].items():
        add(tensor_class(key), key, lo, hi)
    return {c: (r[0], r[1], r[2]) for c, r in out.items()}


def _check_bits(bits: dict) -> dict:
    if not isinstance(bits, dict):
        raise FormatError(f"calibrate: bits must be a dict class -> width or one of {sorted(BITS_PRESETS)}")
    for c in bits:
        if c in DERIVED:
            raise FormatError(f"calibrate: bits['{c}']: '{c}' is derived (act + weight + log2 fan-in), not chosen")
        if c in INTERNAL:
            raise FormatError(f"calibrate: bits['{c}']: '{c}' is an internal format, kept from the base config")
        if c not in CALIBRATED:
            raise FormatError(f"calibrate: bits['{c}']: unknown tensor class; calibrated classes are {CALIBRATED}")
    for c in CALIBRATED:
        if c not in bits:
            raise FormatError(f"calibrate: bits has no width for tensor class '{c}' "
                              f"(needs every one of {CALIBRATED})")
        if not isinstance(bits[c], int) or not 2 <= bits[c] <= 62:
            raise FormatError(f"calibrate: bits['{c}'] = {bits[c]!r}: must be an integer in 2..62")
    if bits["gelu_in"] != bits["act"]:
        raise FormatError(f"calibrate: bits['gelu_in'] = {bits['gelu_in']} != bits['act'] = {bits['act']}: "
                          "the GELU unit takes fc1's act codes as they are, so gelu_in must equal act")
    return dict(bits)


def validate_config(cfg, q: QuantConfig) -> None:
    """Every width the datapath derives from q: check_model, the approximators' parameters, the
    epilogue plan, LayerNorm's int64 bounds. Raises FormatError naming the class."""
    from . import approx
    from .epilogue import requant_plan
    q.check_model(cfg)
    # granularity "channel" requantises fc1 straight to gelu_in (its own epilogue multiplier)
    if q.granularity == "class" and q.gelu_in != q.act:
        raise FormatError(f"QuantConfig '{q.name}': gelu_in {q.gelu_in} != act {q.act}: the golden "
                          "model feeds fc1's act codes to the GELU unit as gelu_in codes")
    for cls, fn in (("score", lambda: approx.exp2_params(q)),
                    ("gate_logit", lambda: approx.exp2_params(q, q.gate_logit)),
                    ("gelu_in", lambda: approx.gelu_params(q)),
                    ("ln_rstd", lambda: approx.rsqrt_params(q)),
                    ("ln_stat", lambda: approx.layernorm_params(cfg.dim, q, cfg.ln_eps)),
                    ("acc", lambda: requant_plan(q))):
        try:
            fn()
        except FormatError as e:
            raise FormatError(f"QuantConfig '{q.name}': tensor class '{cls}': {e}") from None


def choose_formats(cfg, obs: dict, base: QuantConfig, bits, margin_bits: int = 1,
                   param_margin_bits: int = 0, name: str | None = None) -> tuple[QuantConfig, dict]:
    """QuantConfig from observed ranges (see the module docstring) and its report."""
    bits_name = bits if isinstance(bits, str) else None
    if bits_name is not None:
        if bits_name not in BITS_PRESETS:
            raise FormatError(f"calibrate: unknown bits preset {bits_name!r}; choose one of {sorted(BITS_PRESETS)}")
        bits = BITS_PRESETS[bits_name]
    bits = _check_bits(bits)
    for nm, m in (("margin_bits", margin_bits), ("param_margin_bits", param_margin_bits)):
        if not isinstance(m, int) or m < 0:
            raise FormatError(f"calibrate: {nm}={m!r} must be a non-negative integer")
    ranges = _class_ranges(obs)
    choice: dict[str, ClassChoice] = {}
    for c in CALIBRATED:
        if c not in ranges:
            raise FormatError(f"calibrate: tensor class '{c}': nothing observed (no tensor of this "
                              f"class in the model '{cfg.name}' or the state dict)")
        lo, hi, where = ranges[c]
        kind = "param" if c in PARAM_CLASSES else "data"
        rnd = Rounding.HALF_EVEN if kind == "param" else base.rounding   # as qweights / requant round
        ff = fit_frac(c, lo, hi, bits[c], rnd)
        frac = min(ff - (param_margin_bits if kind == "param" else margin_bits), bits[c])
        if frac < 0:
            raise FormatError(f"calibrate: tensor class '{c}': observed max |value| "
                              f"{max(abs(lo), abs(hi)):.6g} ({where}) plus a margin of "
                              f"{margin_bits if kind == 'data' else param_margin_bits} bit(s) needs "
                              f"more than {bits[c]} bits")
        choice[c] = ClassChoice(c, kind, lo, hi, where, ff, Fmt(bits[c], frac))
    # patch_w and linear_w share one frac: acc.frac = act.frac + w.frac for both
    wf = min(choice["patch_w"].fmt.frac, choice["linear_w"].fmt.frac)
    for c in ("patch_w", "linear_w"):
        ch = choice[c]
        if ch.fmt.frac != wf:
            choice[c] = ClassChoice(c, ch.kind, ch.lo, ch.hi, ch.where, ch.fit_frac, Fmt(bits[c], wf),
                                    f"frac {ch.fmt.frac} lowered to {wf}: patch_w and linear_w share "
                                    "acc.frac - act.frac")
    act = choice["act"].fmt
    ch = choice["gelu_in"]
    if ch.fmt.frac < act.frac:   # cannot happen: fc1 outputs are act tensors too; kept as a guard
        raise FormatError("calibrate: tensor class 'gelu_in' needs fewer fraction bits than act")
    choice["gelu_in"] = ClassChoice("gelu_in", ch.kind, ch.lo, ch.hi, ch.where, ch.fit_frac, act,
                                    "= act: the GELU unit reads fc1's act codes")
    w_bits = max(bits["patch_w"], bits["linear_w"])
    fan_in = max(cfg.dim, cfg.mlp_hidden, cfg.expert_hidden, cfg.patch * cfg.patch * cfg.in_chans)
    acc_bits = act.bits + w_bits + (fan_in - 1).bit_length()
    if acc_bits > 62:
        raise FormatError(f"calibrate: tensor class 'acc': act {act} x weights of {w_bits} bits over "
                          f"fan-in {fan_in} needs {acc_bits} bits; the golden model holds at most 62")
    acc = Fmt(acc_bits, act.frac + wf)
    choice["acc"] = ClassChoice("acc", "derived", 0.0, 0.0, "", None, acc,
                                f"act.bits + w.bits + bitlen(fan_in {fan_in} - 1); frac = act.frac + w.frac")
    # internal formats: kept, except ln_stat's range must hold act_max**2
    ln_stat = base.ln_stat
    need_int = 2 * (act.bits - 1 - act.frac) + 1
    note = "kept from base"
    if ln_stat.int_bits < need_int:
        fr = ln_stat.bits - 1 - need_int
        fr -= fr % 2
        if fr < 0:
            raise FormatError(f"calibrate: tensor class 'ln_stat': {ln_stat.bits} bits cannot hold act "
                              f"{act} squared")
        ln_stat = Fmt(ln_stat.bits, fr)
        note = f"frac lowered from {base.ln_stat.frac}: must hold (act max)**2 for the variance"
    fmts = {c: choice[c].fmt for c in CALIBRATED + DERIVED}
    fmts.update({c: getattr(base, c) for c in INTERNAL})
    fmts["ln_stat"] = ln_stat
    q = base.replace(name=name or bits_name or f"{base.name}-calibrated", **fmts)
    validate_config(cfg, q)
    ranges_int = {c: ranges.get(c) for c in ("ln_stat", "ln_rstd")}
    for c in INTERNAL:
        lo, hi, where = ranges_int.get(c) or (0.0, 0.0, "")
        f = fmts[c]
        nt = note if c == "ln_stat" else "kept from base"
        if (lo or hi) and not (f.min_value <= lo and hi <= f.max_value):
            raise FormatError(f"calibrate: tensor class '{c}' {f} (kept from '{base.name}') cannot hold "
                              f"the observed range [{lo:.6g}, {hi:.6g}] ({where})")
        choice[c] = ClassChoice(c, "internal", lo, hi, where, None, f, nt)
    report = {"name": q.name, "model": cfg.name, "base": base.name, "bits": bits_name or bits,
              "margin_bits": margin_bits, "param_margin_bits": param_margin_bits,
              "runs": obs.get("runs"),
              "classes": {c: choice[c].to_dict() for c in FORMAT_FIELDS},
              "quant_config": q.to_dict()}
    return q, report


def calibrate(cfg, state_dict, images, base: QuantConfig, bits, margin_bits: int = 1, *,
              tasks=None, param_margin_bits: int = 0, name: str | None = None
              ) -> tuple[QuantConfig, dict]:
    """Observe `images` (list of [C,H,W] arrays/tensors or a [B,C,H,W] batch) through the float
    mirror for every task (or `tasks`) and every state dict (one, or a list: ranges are merged),
    then choose the formats. bits: {class: total width} or a BITS_PRESETS name.
    Returns (QuantConfig, report) where report["classes"][cls] gives the observed range, the
    tensor at the max, the chosen format and its headroom."""
    if isinstance(bits, str) and bits not in BITS_PRESETS:
        raise FormatError(f"calibrate: unknown bits preset {bits!r}; choose one of {sorted(BITS_PRESETS)}")
    if not isinstance(bits, str):
        _check_bits(bits)                       # fail before the float runs
    obs = observe(cfg, state_dict, images, tasks)
    return choose_formats(cfg, obs, base, bits, margin_bits, param_margin_bits, name)


# granularity "channel": the tensors stored at a QuantConfig format (quant/channel.py); LN
# outputs, Q, K, V and the attention output have calibrated per-tensor scales instead. fc1's
# outputs are gelu_in, kept equal to act here (the union of both ranges) as in the presets.
CHANNEL_FIXED = {
    "act": ("input", "patch_embed", "embed", ".proj", ".resid1", ".mlp.fc1", ".mlp.gelu", ".mlp.fc2",
            ".mlp.expert_fc1", ".mlp.expert_gelu", ".mlp.expert_fc2", ".mlp.expert_weighted",
            ".mlp.moe_partial", ".out"),
    "gate_logit": (".mlp.gate_logits",),
}
CHANNEL_FIT = ("act", "gelu_in", "gate_logit", "ln_gamma", "ln_beta")


def _suffix_range(obs: dict, sfx) -> tuple[float, float, str]:
    lo, hi, where, m = 0.0, 0.0, "", -1.0
    for name, (a, b) in obs["data"].items():
        if _matches(name, sfx):
            lo, hi = min(lo, a), max(hi, b)
            if max(abs(a), abs(b)) > m:
                where, m = name, max(abs(a), abs(b))
    return lo, hi, where


def fit_channel_formats(cfg, base: QuantConfig, state_dicts, images, margin_bits: int = 1, *,
                        tasks=None, name: str | None = None) -> tuple[QuantConfig, dict]:
    """Refit a channel-granularity preset's fixed formats to one model: act (= gelu_in), gate_logit
    from the float ranges of CHANNEL_FIXED's tensors on `images` (largest frac that holds them,
    minus `margin_bits` spare integer bits), then ln_gamma / ln_beta to hold gamma and beta times
    the LN outputs' calibrated gains act.lsb / s (quantize_channel's folding). Every other field
    (internal formats, weight codes' width, approximators) is kept: the hardware is the same
    generator with other constants. A preset fitted on both weight sets at once has to cover the
    trained residual stream (|x| ~ 30): on seeded weights that costs 3 bits on every layer output."""
    from .channel import default_act_scales

    if base.granularity != "channel":
        raise FormatError(f"fit_channel_formats: QuantConfig '{base.name}' has granularity "
                          f"'{base.granularity}': only 'channel' presets store per-tensor scales "
                          "(use choose_formats for 'class')")
    if not isinstance(margin_bits, int) or margin_bits < 0:
        raise FormatError(f"fit_channel_formats: margin_bits={margin_bits!r} must be a non-negative integer")
    sds = state_dicts if isinstance(state_dicts, (list, tuple)) else [state_dicts]
    obs = observe(cfg, sds, images, tasks)
    choice = {}
    for cls, sfx in CHANNEL_FIXED.items():
        lo, hi, where = _suffix_range(obs, sfx)
        if cls == "act":
            for k in ("cls_token", "pos_embed"):            # stored as act codes
                a, b = obs["params"][k]
                lo, hi = min(lo, a), max(hi, b)
        fmt0 = getattr(base, cls)
        ff = fit_frac(cls, lo, hi, fmt0.bits, base.rounding)
        frac = min(ff - margin_bits, fmt0.bits)
        if frac < 0:
            raise FormatError(f"fit_channel_formats: tensor class '{cls}': observed max |value| "
                              f"{max(abs(lo), abs(hi)):.6g} ({where}) plus {margin_bits} spare bit(s) "
                              f"needs more than {fmt0.bits} bits")
        choice[cls] = ClassChoice(cls, "data", lo, hi, where, ff, Fmt(fmt0.bits, frac))
    act = choice["act"].fmt
    choice["gelu_in"] = ClassChoice("gelu_in", "data", choice["act"].lo, choice["act"].hi,
                                    choice["act"].where, choice["act"].fit_frac, act, "= act")
    q1 = base.replace(act=act, gelu_in=act, gate_logit=choice["gate_logit"].fmt)
    # LN parameters as quantize_channel folds them: gamma, beta times act.lsb / s(LN output),
    # s from default_act_scales (its own held-out set, whatever `images` is: the scales
    # quantize_channel will use)
    par = {"ln_gamma": [0.0, 0.0, ""], "ln_beta": [0.0, 0.0, ""]}
    for sd in sds:
        folded = fold_scales(cfg, sd)
        sc = default_act_scales(cfg, q1, folded).scales
        for i in range(cfg.depth):
            for nm in ("norm1", "norm2"):
                c = act.lsb / sc[f"blocks.{i}.{nm}"]
                for p_, cls in (("weight", "ln_gamma"), ("bias", "ln_beta")):
                    v = np.asarray(folded[f"blocks.{i}.{nm}.{p_}"], np.float64) * c
                    r = par[cls]
                    if max(abs(v.min()), abs(v.max())) > max(abs(r[0]), abs(r[1])):
                        r[2] = f"blocks.{i}.{nm}.{p_}"
                    r[0], r[1] = min(r[0], float(v.min())), max(r[1], float(v.max()))
    for cls, (lo, hi, where) in par.items():
        fmt0 = getattr(base, cls)
        if lo == hi == 0.0:                      # all zero (seeded betas): any format holds it
            choice[cls] = ClassChoice(cls, "param", 0.0, 0.0, "", None, fmt0, "all zero: kept from base")
            continue
        ff = fit_frac(cls, lo, hi, fmt0.bits, Rounding.HALF_EVEN)
        choice[cls] = ClassChoice(cls, "param", lo, hi, where, ff, Fmt(fmt0.bits, min(ff, fmt0.bits)),
                                  "times act.lsb / s of the LN output")
    q = q1.replace(name=name or f"{base.name}-fit", ln_gamma=choice["ln_gamma"].fmt,
                   ln_beta=choice["ln_beta"].fmt)
    validate_config(cfg, q)
    report = {"name": q.name, "model": cfg.name, "base": base.name, "margin_bits": margin_bits,
              "runs": obs["runs"], "fitted": list(CHANNEL_FIT),
              "classes": {c: choice[c].to_dict() for c in CHANNEL_FIT},
              "base_formats": {c: str(getattr(base, c)) for c in CHANNEL_FIT},
              "quant_config": q.to_dict()}
    return q, report


def calibration_images(cfg, synthetic: int = 2, eval_image: bool = True):
    """The fixed calibration set: the Cityscapes image of ../shared/edge-moe-cityscapes when
    present (and eval_image: it is also the default evaluation image of quant-report, eval and
    simulate, so a held-out set leaves it out), matplotlib's sample photo, and `synthetic` scenes
    of model/data.py (seeds 0..).
    -> (list of float32 [C, H, W] arrays in [0, 1], list of descriptions)."""
    from matplotlib import cbook

    from edgemoe.model.checkpoint import default_edge_moe_dir
    from edgemoe.model.data import make_scene
    from edgemoe.model.images import load_image

    imgs, desc = [], []
    if eval_image and (default_edge_moe_dir() / "image.float32.bin").exists():
        x, d = load_image(cfg)
        imgs.append(x[0].numpy())
        desc.append(d)
    x, d = load_image(cfg, str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    imgs.append(x[0].numpy())
    desc.append("matplotlib sample photo grace_hopper.jpg")
    for s in range(synthetic):
        imgs.append(make_scene(s, cfg.img_h, cfg.img_w)[0])
        desc.append(f"synthetic scene seed {s}")
    return imgs, desc


def format_report(report: dict) -> str:
    """Text table of a calibration report."""
    lines = [f"calibration '{report['name']}' for model '{report['model']}' (base '{report['base']}', "
             f"margin {report['margin_bits']} bit(s) on activations, {report['param_margin_bits']} on "
             f"parameters, {report['runs']} float runs)",
             f"{'class':<11}{'kind':<9}{'observed max':>13}{'fmt':>9}{'range':>12}{'headroom':>10}  "
             "max tensor / note"]
    for c, r in report["classes"].items():
        om = f"{r['observed_max_abs']:.4g}" if r["kind"] != "derived" else "-"
        hb = f"{r['headroom_bits']:.2f} b" if r["headroom_bits"] is not None and r["kind"] != "derived" else "-"
        extra = "; ".join(x for x in (r["max_tensor"], r["note"]) if x)
        lines.append(f"{c:<11}{r['kind']:<9}{om:>13}{r['fmt']:>9}{r['range'][1]:>12.5g}{hb:>10}  {extra}")
    return "\n".join(lines)


def preset_literal(q: QuantConfig, base: QuantConfig) -> str:
    """Python source of `q` as written in quant/config.py: base.replace(<fields that differ>)."""
    var = q.name.upper().replace("-", "_")
    parts = [f'name="{q.name}"']
    for f in FORMAT_FIELDS:
        v = getattr(q, f)
        if f in CALIBRATED + DERIVED or v != getattr(base, f):   # calibrated classes: always
            parts.append(f"{f}=_{'s' if v.signed else 'u'}({v.bits}, {v.frac})")
    for f in ("rounding", "overflow", "gelu_step_log2", "gelu_range", "exp_table_bits",
              "rsqrt_table_bits", "rsqrt_newton"):
        if getattr(q, f) != getattr(base, f):
            parts.append(f"{f}={getattr(q, f)!r}")
    lines, cur = [], "   "
    for p in parts:
        if len(cur) + len(p) + 2 > 100:
            lines.append(cur.rstrip())
            cur = "   "
        cur += f" {p},"
    lines.append(cur)
    return f"{var} = {base.name.upper().replace('-', '_')}.replace(\n" + "\n".join(lines) + "\n)"
