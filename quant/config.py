"""QuantConfig: the fixed-point format of every tensor class, rounding/overflow modes, and the
parameters of the hardware approximations. Presets live here; calibration fills w8a16's choices.

Tensor classes (one Fmt each; all integers mean q * 2**-frac):
  patch_w, linear_w, bias, ln_gamma, ln_beta      parameters
  act                                             residual stream and every layer output/input
  acc                                             MAC accumulators (products of act x weight)
  attn_in                                         Q, K, V as fed to the attention matmuls
                                                  (Q already carries log2(e)/sqrt(d_head): the
                                                  compiler folds it into the Q rows of W_qkv)
  score                                           Q.K^T in the base-2 exponent domain
  exp                                             2**(s - max) values (unsigned)
  sum                                             running softmax sums (unsigned)
  recip                                           1/sum statistic (unsigned)
  prob                                            normalised attention probability (unsigned)
  gelu_in, gelu_table                             GELU input grid and table entries d(t)
  ln_stat, ln_rstd                                LayerNorm mean/variance and 1/sqrt(var+eps)
  gate_logit, gate_prob                           router logits and gate (combine) weights
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .fixed import Fmt, FormatError, Overflow, Rounding

FORMAT_FIELDS = ("patch_w", "linear_w", "bias", "ln_gamma", "ln_beta", "act", "acc", "attn_in",
                 "score", "exp", "sum", "recip", "prob", "gelu_in", "gelu_table", "ln_stat",
                 "ln_rstd", "gate_logit", "gate_prob")


@dataclass(frozen=True)
class QuantConfig:
    name: str
    patch_w: Fmt
    linear_w: Fmt
    bias: Fmt
    ln_gamma: Fmt
    ln_beta: Fmt
    act: Fmt
    acc: Fmt
    attn_in: Fmt
    score: Fmt
    exp: Fmt
    sum: Fmt
    recip: Fmt
    prob: Fmt
    gelu_in: Fmt
    gelu_table: Fmt
    ln_stat: Fmt
    ln_rstd: Fmt
    gate_logit: Fmt
    gate_prob: Fmt
    rounding: Rounding = Rounding.HALF_UP     # every requantize in the datapath
    overflow: Overflow = Overflow.SAT         # every narrowing in the datapath
    gelu_step_log2: int = 5                   # GELU table step 2**-5 = 1/32
    gelu_range: float = 8.0                   # d(t) table covers t in [0, gelu_range); d = 0 beyond
    exp_table_bits: int = 6                   # 2**frac table: 2**6 segments + linear interpolation
    rsqrt_table_bits: int = 6                 # rsqrt seed table index bits (mantissa)
    rsqrt_newton: int = 2                     # Newton steps after the table seed (2: ~1e-7 rel.)
    # "class": one power-of-two format per tensor class (weights at linear_w's 2**-frac, bias
    # aligned to acc). "channel": per-output-channel weight scales and calibrated per-tensor
    # activation scales, an integer multiplier (mult_bits) + shift per channel in the epilogue
    # (quant/channel.py); linear_w/patch_w frac is then 0 and bias is at the accumulator's scale.
    granularity: str = "class"
    mult_bits: int = 16
    # how channel-granularity weights are rounded to their codes: "nearest" (each weight on its
    # own), or "gptq": column by column, each rounding error compensated on the columns not yet
    # rounded through the inverse Hessian of the layer's calibration inputs (quant/channel.py).
    # The codes stay plain integers of linear_w / patch_w: the datapath is the same.
    weight_rounding: str = "nearest"

    def __post_init__(self):
        for f in FORMAT_FIELDS:
            v = getattr(self, f)
            if not isinstance(v, Fmt):
                raise FormatError(f"QuantConfig '{self.name}': tensor class '{f}' has no format (got {v!r})")
        for f in ("exp", "sum", "recip", "prob"):
            if getattr(self, f).signed:
                raise FormatError(f"QuantConfig '{self.name}': '{f}' must be unsigned")
        object.__setattr__(self, "rounding", Rounding(self.rounding))
        object.__setattr__(self, "overflow", Overflow(self.overflow))
        self._check_approx()

    def _check_approx(self) -> None:
        # approximation parameters: quant/approx.py documents what each one controls
        def need(cond, f, msg):
            if not cond:
                raise FormatError(f"QuantConfig '{self.name}': {f}={getattr(self, f)!r}: {msg}")
        for f, lo, hi in (("gelu_step_log2", 0, 16), ("exp_table_bits", 1, 12),
                          ("rsqrt_table_bits", 3, 12), ("rsqrt_newton", 0, 4)):
            v = getattr(self, f)
            need(isinstance(v, int) and lo <= v <= hi, f, f"must be an integer in {lo}..{hi}")
        segs = self.gelu_range * 2 ** self.gelu_step_log2
        need(self.granularity in ("class", "channel"), "granularity", "must be 'class' or 'channel'")
        need(self.weight_rounding in ("nearest", "gptq"), "weight_rounding", "must be 'nearest' or 'gptq'")
        need(self.weight_rounding == "nearest" or self.granularity == "channel", "weight_rounding",
             "'gptq' needs granularity 'channel' (per-channel scales; class formats round each weight alone)")
        need(isinstance(self.mult_bits, int) and 2 <= self.mult_bits <= 24, "mult_bits",
             "must be an integer in 2..24")
        need(self.gelu_range > 0 and float(segs).is_integer() and segs <= 1 << 16, "gelu_range",
             f"must be a positive multiple of the table step 2**-{self.gelu_step_log2} "
             "(at most 65536 segments)")

    def check_model(self, model_cfg) -> None:
        """Fail naming the tensor class whose format cannot hold what the model computes."""
        fan_in = max(model_cfg.dim, model_cfg.mlp_hidden, model_cfg.expert_hidden,
                     model_cfg.patch * model_cfg.patch * model_cfg.in_chans)
        for w in ("linear_w", "patch_w"):
            need = self.act.bits + getattr(self, w).bits + (fan_in - 1).bit_length()
            if self.acc.bits < need:
                raise FormatError(
                    f"QuantConfig '{self.name}': accumulator {self.acc} too narrow for act {self.act} "
                    f"x {w} {getattr(self, w)} over fan-in {fan_in}: needs {need} bits, has {self.acc.bits}")
            if self.granularity == "class" and self.acc.frac != self.act.frac + getattr(self, w).frac:
                raise FormatError(f"QuantConfig '{self.name}': acc.frac {self.acc.frac} must equal "
                                  f"act.frac + {w}.frac = {self.act.frac + getattr(self, w).frac}")

    def formats(self) -> dict[str, Fmt]:
        return {f: getattr(self, f) for f in FORMAT_FIELDS}

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for f in FORMAT_FIELDS:
            d[f] = d[f].to_dict()
        d["rounding"] = self.rounding.value
        d["overflow"] = self.overflow.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        d = dict(d)
        for f in FORMAT_FIELDS:
            if f not in d:
                raise FormatError(f"QuantConfig '{d.get('name', '?')}': tensor class '{f}' has no format")
            d[f] = Fmt.from_dict(d[f])
        return cls(**d)

    def replace(self, **kw) -> "QuantConfig":
        return replace(self, **kw)


def _s(bits, frac):
    return Fmt(bits, frac, True)


def _u(bits, frac):
    return Fmt(bits, frac, False)


# Edge-MoE's choice: activations s32.22, weights s16.14, biases 16-bit. The internal formats are ours:
# sum u32.20 (exps accumulate with 20 fraction bits: the sum of n roundings stays < n * 2**-21),
# recip u24.22 (1/sum in (1/n, 2]; 24 x 17 bits so prob = exp * recip is one DSP48E2 27x18 multiply),
# ln_stat s52.32 (holds E[x^2] up to 2**18 = the whole act range squared, so var never saturates),
# ln_rstd u32.22 (1/sqrt(var + 1e-6) <= 1000 < 1024 never saturates). See quant/approx.py.
EDGE_MOE_FIXED = QuantConfig(
    name="edge-moe-fixed",
    patch_w=_s(16, 14), linear_w=_s(16, 14), bias=_s(16, 11), ln_gamma=_s(16, 11), ln_beta=_s(16, 11),
    act=_s(32, 22), acc=_s(60, 36),
    attn_in=_s(24, 16), score=_s(32, 22),
    exp=_u(17, 16), sum=_u(32, 20), recip=_u(24, 22), prob=_u(17, 16),
    gelu_in=_s(32, 22), gelu_table=_u(18, 18),
    ln_stat=_s(52, 32), ln_rstd=_u(32, 22),
    gate_logit=_s(32, 22), gate_prob=_u(17, 16),
)

# w8a16: 8-bit weights, 16-bit activations, fraction bits chosen by quant/calibrate.py (one format
# per tensor class, no saturation on the calibration set, 1 spare integer bit on activations, none
# on the exactly known parameters; internal formats kept from edge-moe-fixed). Calibrated on the
# edge-moe preset with seeded weights (seed 0) + the real Edge-MoE weights (experts seeded random),
# the Cityscapes image, matplotlib's sample photo and 2 synthetic scenes, both tasks. Regenerate:
#   edgemoe calibrate --preset edge-moe --bits w8a16 --weights seeded,edge-moe-bin --python
# tests/test_calibrate.py checks that a fresh calibration reproduces these literals.
W8A16 = EDGE_MOE_FIXED.replace(
    name="w8a16", patch_w=_s(8, 6), linear_w=_s(8, 6), bias=_s(16, 11), ln_gamma=_s(16, 11),
    ln_beta=_s(16, 11), act=_s(16, 7), acc=_s(34, 13), attn_in=_s(16, 10), score=_s(16, 9),
    gelu_in=_s(16, 7), gate_logit=_s(16, 7),
)

# w8a16 with per-channel weights (quant/channel.py): int8 weight codes (frac 0: the scale is in
# the epilogue's multiplier), bias at the accumulator's scale, calibrated per-tensor activation
# scales. attn_in.frac fixes s_q * s_k; ln_gamma / ln_beta hold gamma, beta times the LN outputs'
# calibrated gains.
W8A16_CHANNEL = W8A16.replace(
    name="w8a16-channel", granularity="channel", mult_bits=16,
    patch_w=_s(8, 0), linear_w=_s(8, 0), bias=_s(32, 0), acc=_s(36, 0),
    act=_s(16, 9), gelu_in=_s(16, 9), attn_in=_s(16, 13), ln_gamma=_s(16, 8), ln_beta=_s(16, 7),
)

# The same datapath and formats; the 8-bit codes are chosen by GPTQ on the calibration set.
W8A16_GPTQ = W8A16_CHANNEL.replace(name="w8a16-gptq", weight_rounding="gptq")

QUANT_PRESETS: dict[str, QuantConfig] = {"edge-moe-fixed": EDGE_MOE_FIXED, "w8a16": W8A16,
                                         "w8a16-channel": W8A16_CHANNEL, "w8a16-gptq": W8A16_GPTQ}


def get_quant_preset(name: str) -> QuantConfig:
    """A preset by name, or a QuantConfig JSON file (a path ending in .json: the plain
    QuantConfig.to_dict, or a calibration report holding it under "quant_config")."""
    if str(name).endswith(".json"):
        return load_quant_json(name)
    if name not in QUANT_PRESETS:
        raise FormatError(f"unknown quant preset {name!r}; choose one of {sorted(QUANT_PRESETS)} "
                          "or a QuantConfig .json file")
    return QUANT_PRESETS[name]


def load_quant_json(path) -> QuantConfig:
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise FormatError(f"quant config file {str(p)!r} does not exist")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"quant config file {str(p)!r} is not JSON: {e}") from None
    if isinstance(d, dict) and isinstance(d.get("quant_config"), dict):
        d = d["quant_config"]
    if not isinstance(d, dict) or "name" not in d:
        raise FormatError(f"quant config file {str(p)!r} holds no QuantConfig (no 'name' field)")
    try:
        return QuantConfig.from_dict(d)
    except (TypeError, ValueError, KeyError) as e:     # unknown field, bad format or mode
        raise FormatError(f"quant config file {str(p)!r}: {e}") from None
