"""Registry of the generated hardware units: name -> factory building an Amaranth Component.

Add a unit with one line in UNITS. A factory takes (qcfg, hwcfg) or (qcfg, hwcfg, mcfg) -- the
model config is passed to factories that declare a third parameter (units whose sizes depend
on model shapes, e.g. LayerNorm's dim). The exported module is `edgemoe_<name>`
(hw/export.py); keep imports inside the factory so that `import hw.units` stays light.
"""
from __future__ import annotations

import inspect


def _lazy(module: str, attr: str, with_model: bool):
    """A factory that imports hw.<module> only when the unit is built."""
    import importlib

    def target():
        obj = importlib.import_module(f"edgemoe.hw.{module}")
        for part in attr.split("."):       # e.g. "SoftmaxStats.from_model"
            obj = getattr(obj, part)
        return obj

    def build2(qcfg, hwcfg):
        return target()(qcfg, hwcfg)

    def build3(qcfg, hwcfg, mcfg):
        return target()(qcfg, hwcfg, mcfg)
    return build3 if with_model else build2


UNITS = {
    "requant": _lazy("requant", "Requant", False),
    "channel_requant": _lazy("channel_requant", "ChannelRequant", False),
    "gelu": _lazy("gelu", "Gelu", False),
    "softmax_norm": _lazy("softmax_norm", "SoftmaxNorm", False),
    "softmax": _lazy("softmax", "SoftmaxStats.from_model", True),
    "layernorm": _lazy("layernorm", "LayerNorm", True),
    "gate": _lazy("gate", "Gate", True),
    "attention": _lazy("attention", "AttentionEngine.from_model", True),
    "compute": _lazy("compute", "ComputeUnit", True),
    "accel": _lazy("accel", "Accelerator.from_unit_args", True),     # the whole accelerator top
}


def build_unit(name: str, qcfg, hwcfg, mcfg=None):
    if name not in UNITS:
        raise KeyError(f"unknown hardware unit {name!r}; registered units: {sorted(UNITS)}")
    factory = UNITS[name]
    n_params = len(inspect.signature(factory).parameters)
    return factory(qcfg, hwcfg, mcfg) if n_params >= 3 else factory(qcfg, hwcfg)
