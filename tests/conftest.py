"""Shared fixtures."""
import os

import pytest


def cached_accel_verilog(cfg, q, hw) -> str:
    """edgemoe_accel's Verilog, cached under the simulation cache (elaborating even the tiny
    top takes about a minute here). The key covers the configs, the Amaranth version and every
    source the generator reads (hw/, quant/, the register constants), so any change regenerates."""
    import hashlib
    import json
    from importlib.metadata import version
    from pathlib import Path

    from edgemoe.hw.accel import Accelerator
    from edgemoe.hw.export import to_verilog
    from edgemoe.sim.runner import REPO_ROOT, cache_root
    h = hashlib.sha256(json.dumps([repr(cfg), q.to_dict(), hw.to_dict(), version("amaranth")],
                                  sort_keys=True, default=str).encode())
    for f in sorted([*REPO_ROOT.glob("hw/*.py"), *REPO_ROOT.glob("quant/*.py"), REPO_ROOT / "sim" / "regs.py"]):
        h.update(f.name.encode() + f.read_bytes())
    path = Path(cache_root()) / "verilog" / f"edgemoe_accel-{h.hexdigest()[:16]}.v"
    if path.exists():
        return path.read_text()
    text = to_verilog(Accelerator(cfg, q, hw), "edgemoe_accel")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return text


@pytest.fixture(scope="session")
def tiny_design():
    """(cfg, qcfg, hwcfg, QWeights) of the tiny preset on small-8x8 with 16-token buffers (the
    configuration of tests/test_accel_rtl.py, so the Verilator build is shared). Quantised once
    here: every compile of the session then sees the same integer weights."""
    from edgemoe.hw.config import get_hw_preset
    from edgemoe.model.config import get_preset
    from edgemoe.quant.compiler import synthetic_state_dict
    from edgemoe.quant.config import get_quant_preset
    from edgemoe.quant.qweights import quantize_weights
    cfg, q = get_preset("tiny"), get_quant_preset("edge-moe-fixed")
    hw = get_hw_preset("small-8x8").replace(act_buffer_tokens=16)
    return cfg, q, hw, quantize_weights(cfg, q, synthetic_state_dict(cfg, 0))


@pytest.fixture(scope="session")
def tiny_verilog(tiny_design):
    """edgemoe_accel's Verilog for tiny_design."""
    return cached_accel_verilog(*tiny_design[:3])
