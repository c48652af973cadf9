"""The PYNQ driver (sim/pynq_driver.py) over the same driver code as every other backend: with a
stand-in `pynq` (sim/fake_pynq.py) forwarding to the Python model, and to the RTL simulation of
the top (which also checks every register of the map against sim/regmap.rdl)."""
import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _program(tiny_design):
    from edgemoe.quant.compiler import compile_program
    return compile_program(*tiny_design)


def test_pynq_absent_is_a_named_error():
    from edgemoe.sim.driver import BackendUnavailable
    from edgemoe.sim.pynq_driver import PynqAccelerator
    import importlib.util
    import types
    if importlib.util.find_spec("pynq"):
        pytest.skip("a real pynq is installed")
    with pytest.raises(BackendUnavailable, match="pynq"):
        PynqAccelerator("x.bit", types.SimpleNamespace(instrs=[], image_bytes=0))


def test_pynq_driver_on_python_model(tiny_design):
    from edgemoe.quant.interpreter import run_program
    from edgemoe.sim import fake_pynq
    from edgemoe.sim.driver import DriverError, PythonBackend
    from edgemoe.sim.pynq_driver import PynqAccelerator
    prog = _program(tiny_design)
    be = PythonBackend.for_program(prog)
    bitfiles = []
    fake_pynq.install(be.mmio.read32, be.mmio.write32, be.mem.data, be.mem.base, bitfiles=bitfiles)
    try:
        acc = PynqAccelerator("edgemoe.bit", prog)
        img = np.random.default_rng(0).normal(0, 1, (3, prog.cfg.img_h, prog.cfg.img_w)).astype(np.float32)
        for task in prog.cfg.tasks:
            r = acc.run(img, task)
            np.testing.assert_array_equal(r.features, run_program(prog, img, task).features)
            c = acc.counters()
            assert c["cycle_count"] == r.cycles and c["instr_count"] == r.instructions > 0
            assert c["dram_bytes_read"] == r.dram_bytes_read > 0 and c["status"] == 2
        assert bitfiles == ["edgemoe.bit"] and fake_pynq.FakeBuffer.flushes > 0
        # a bitstream of other hardware is refused by the shared driver code
        be.mmio.regs[0x1C] ^= 1
        with pytest.raises(DriverError, match="CONFIG_HASH"):
            PynqAccelerator("edgemoe.bit", prog)
    finally:
        fake_pynq.uninstall()


def test_pynq_driver_and_register_map_on_rtl(tiny_design, tiny_verilog, tmp_path):
    from edgemoe.sim.runner import run_cocotb
    cfg = tiny_design[0]
    prog = _program(tiny_design)
    res = run_cocotb(tiny_verilog, "edgemoe_accel", "edgemoe.sim.tb_board",
                     tb_config={"program": str(prog.save(tmp_path / "prog")), "tasks": list(cfg.tasks)},
                     timeout_s=1200)
    assert res["register_mismatches"] == [] and res["register_steps"] > 60
    assert res["bitfiles"] == ["edgemoe.bit"]
    for task in cfg.tasks:
        t = res["tasks"][task]
        assert t["mismatches"] == 0 and t["elements"] == cfg.num_tokens * cfg.dim
        assert t["instructions"] == t["golden_instructions"] and t["dram_bytes_read"] == t["golden_read"]
        assert t["counters"]["cycle_count"] == t["cycles"] > 1000
