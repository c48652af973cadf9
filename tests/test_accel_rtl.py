"""The whole accelerator (hw/accel.py) under cocotb + Verilator: a tiny-preset inference driven
through AXI4-Lite by sim/driver.py, DRAM modelled by sim/dram.py, features compared as integers
with the Python executor (= golden model); error codes of corrupted programs."""
import numpy as np
import pytest

from hw.config import get_hw_preset
from model.config import get_preset
from quant.config import get_quant_preset

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def tiny_program(tmp_path, hw="small-8x8", quant="edge-moe-fixed", tokens=16, seed=0):
    from quant.compiler import compile_program, synthetic_state_dict
    from quant.qweights import quantize_weights
    cfg = get_preset("tiny")
    q = get_quant_preset(quant)
    h = get_hw_preset(hw).replace(act_buffer_tokens=tokens)
    prog = compile_program(cfg, q, h, quantize_weights(cfg, q, synthetic_state_dict(cfg, seed)))
    path = prog.save(tmp_path / "prog")
    return cfg, q, h, prog, path


def test_accel_tiny_bit_exact(tmp_path):
    from hw.accel import Accelerator
    from sim.runner import run_cocotb
    cfg, q, h, prog, path = tiny_program(tmp_path)
    res = run_cocotb(Accelerator(cfg, q, h), "edgemoe_accel", "sim.tb_accel",
                     tb_config={"program": str(path), "tasks": list(cfg.tasks)}, timeout_s=1200)
    for task, r in res["tasks"].items():
        assert r["mismatches"] == 0, f"{task}: {r['first_mismatch']}"
        assert r["instructions"] == r["golden_instructions"]
        assert r["dram_bytes_read"] == r["golden_read"]
        assert r["dram_bytes_written"] == r["golden_written"]
        assert r["sat_count"] == r["golden_sat"]
        print(task, r["cycles"], "cycles", r["wall_s"], "s")
