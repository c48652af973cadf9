import pytest

from edgemoe.hw.config import HWConfig, HWConfigError, get_hw_preset
from edgemoe.model.config import ConfigError, get_preset
from edgemoe.quant.config import QuantConfig, get_quant_preset
from edgemoe.quant.fixed import Fmt, FormatError


def test_presets_shapes():
    em = get_preset("edge-moe")
    assert (em.num_tokens, em.dim, em.depth, em.heads, em.head_dim) == (129, 192, 12, 3, 64)
    assert em.moe_blocks == (1, 3, 5, 7, 9, 11) and em.num_experts == 16 and em.top_k == 2
    assert get_preset("tiny").num_tokens == 9
    assert get_preset("vit-s-nyud").num_tokens == 1201


@pytest.mark.parametrize("kw,field", [
    (dict(img_h=100), "img_h"), (dict(img_w=250), "img_w"), (dict(dim=65), "dim"),
    (dict(moe_blocks=(1, 4)), "moe_blocks"), (dict(top_k=5), "top_k"),
    (dict(task_channels=(19,)), "task_channels"), (dict(gating="x"), "gating"),
])
def test_model_config_errors_name_field(kw, field):
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        get_preset("tiny").replace(**kw)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown model preset"):
        get_preset("nope")


def test_quant_config_round_trip_and_errors():
    q = get_quant_preset("edge-moe-fixed")
    assert q.act == Fmt(32, 22) and q.linear_w == Fmt(16, 14) and q.bias.bits == 16
    assert QuantConfig.from_dict(q.to_dict()) == q
    d = q.to_dict()
    del d["score"]
    with pytest.raises(FormatError, match="tensor class 'score' has no format"):
        QuantConfig.from_dict(d)
    with pytest.raises(FormatError, match="accumulator .* too narrow"):
        q.replace(acc=Fmt(50, 36)).check_model(get_preset("edge-moe"))
    q.check_model(get_preset("edge-moe"))


def test_hw_config_errors():
    assert get_hw_preset("zcu102-16x16").part_budget.dsp == 2520
    with pytest.raises(HWConfigError, match="'t_in'"):
        HWConfig(t_in=0)
    with pytest.raises(HWConfigError, match="unknown part"):
        HWConfig(part="xc7z020x")


def test_accel_plan_separates_array_shape_and_lanes():
    """The top takes t_out and lanes as t_in / 2^j (results and LayerNorm beats are slices of a
    t_in-lane buffer word, one write-mask bit per min(t_out, lanes) lanes); any other shape is
    refused naming the field and both values."""
    from edgemoe.hw.accel_plan import accel_plan
    cfg, q = get_preset("tiny"), get_quant_preset("w8a16-channel")
    p = accel_plan(cfg, q, get_hw_preset("small-8x4"))
    assert (p.G, p.To, p.L, p.wg, p.mask_bits) == (8, 4, 4, 4, 2)
    p = accel_plan(cfg, q, get_hw_preset("small-8x8").replace(t_out=2, lanes=4))
    assert (p.To, p.L, p.wg, p.mask_bits) == (2, 4, 2, 4)
    assert accel_plan(cfg, q, get_hw_preset("small-8x8")).mask_bits == 1
    p = accel_plan(get_preset("edge-moe"), q, get_hw_preset("zcu102-w8-64x16"))
    assert (p.G, p.To, p.L, p.mask_bits) == (64, 16, 32, 4)
    for kw, msg in [({"t_out": 16}, "t_out = 16, t_in = 8"), ({"t_out": 3}, "t_out = 3, t_in = 8"),
                    ({"lanes": 6}, "lanes = 6, t_in = 8"), ({"lanes": 16}, "lanes = 16, t_in = 8")]:
        with pytest.raises(HWConfigError, match=msg):
            accel_plan(cfg, q, get_hw_preset("small-8x8").replace(**kw))
