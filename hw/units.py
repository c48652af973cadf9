"""Registry of the generated hardware units: name -> factory building an Amaranth Component.

Add a unit with one line in UNITS. A factory takes (qcfg, hwcfg) or (qcfg, hwcfg, mcfg) -- the
model config is passed to factories that declare a third parameter (units whose sizes depend
on model shapes, e.g. LayerNorm's dim). The exported module is `edgemoe_<name>`
(hw/export.py); keep imports inside the factory so that `import hw.units` stays light.
"""
from __future__ import annotations

import inspect


def _requant(qcfg, hwcfg):
    from .requant import Requant
    return Requant(qcfg, hwcfg)


UNITS = {
    "requant": _requant,
    "layernorm": lambda qcfg, hwcfg, mcfg: __import__("hw.layernorm", fromlist=["LayerNorm"]).LayerNorm(qcfg, hwcfg, mcfg),
    "gate": lambda qcfg, hwcfg, mcfg: __import__("hw.gate", fromlist=["Gate"]).Gate(qcfg, hwcfg, mcfg),
    "gelu": lambda qcfg, hwcfg: __import__("hw.gelu", fromlist=["Gelu"]).Gelu(qcfg, hwcfg),
    "softmax": lambda qcfg, hwcfg, mcfg: __import__("hw.softmax", fromlist=["x"]).SoftmaxStats.from_model(qcfg, hwcfg, mcfg),
    "softmax_norm": lambda qcfg, hwcfg: __import__("hw.softmax_norm", fromlist=["x"]).SoftmaxNorm(qcfg, hwcfg),
    "attention": lambda qcfg, hwcfg, mcfg: __import__("hw.attention", fromlist=["x"]).AttentionEngine.from_model(qcfg, hwcfg, mcfg),
    "compute": lambda qcfg, hwcfg, mcfg: __import__("hw.compute", fromlist=["x"]).ComputeUnit(qcfg, hwcfg, mcfg),
}


def build_unit(name: str, qcfg, hwcfg, mcfg=None):
    if name not in UNITS:
        raise KeyError(f"unknown hardware unit {name!r}; registered units: {sorted(UNITS)}")
    factory = UNITS[name]
    n_params = len(inspect.signature(factory).parameters)
    return factory(qcfg, hwcfg, mcfg) if n_params >= 3 else factory(qcfg, hwcfg)
