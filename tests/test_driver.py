"""Host driver on the Python backend: register protocol, bit-exact runs, counters, errors, CLI."""
import asyncio
import importlib.util

import numpy as np
import pytest

from edgemoe.hw.config import get_hw_preset
from edgemoe.model import get_preset
from edgemoe.quant.compiler import compile_program, dram_traffic, synthetic_state_dict
from edgemoe.quant.config import get_quant_preset
from edgemoe.quant.golden import GoldenModel
from edgemoe.quant.program import ERR_ILLEGAL, INSTR_BYTES, load_program
from edgemoe.quant.qweights import quantize_weights
from edgemoe.sim import driver as drv
from edgemoe.sim.driver import (AsyncAcceleratorDriver, BackendUnavailable, DriverError,
                        PynqBackend, PythonBackend)

Q = get_quant_preset("edge-moe-fixed")
HW = get_hw_preset("zcu102-16x16")


@pytest.fixture(scope="module")
def setup():
    cfg = get_preset("tiny")
    qw = quantize_weights(cfg, Q, synthetic_state_dict(cfg, 2))
    prog = compile_program(cfg, Q, HW, qw)
    img = np.random.default_rng(7).random((cfg.in_chans, cfg.img_h, cfg.img_w))
    return cfg, prog, GoldenModel(cfg, Q, qw, attn_p=HW.attn_p), img


def test_python_backend_run_equals_golden_with_counters(setup):
    cfg, prog, gm, img = setup
    be = PythonBackend.for_program(prog, busy_polls=3)
    d = be.driver(poll_interval_s=1e-6)
    d.load(prog)
    assert d.addr["program"] % 4096 == 0 and d.addr["program"] >= be.mem.base
    for task in (0, "depth"):
        g = gm.forward(img, task)
        r = d.run(img, task)
        np.testing.assert_array_equal(r.features, g.features)
        tr = dram_traffic(prog, g.routing)
        assert r.task == cfg.task_index(task)
        assert r.dram_bytes_read == tr.total_read and r.dram_bytes_written == tr.write
        assert r.instructions == sum(t.executions for t in tr.per_instr) == r.cycles
        assert r.sat_count == g.sat.saturated() == 0
        assert be.mmio.regs[drv.TASK_ID] == cfg.task_index(task)
    # integer codes are taken as they are
    codes = Q.act.quantize(img)
    np.testing.assert_array_equal(d.run(codes, 1).features, gm.forward(img, 1).features)


def test_saturating_run_is_bit_exact_and_counted(setup):
    """A loud image saturates the input, the patch embedding and the residuals: still bit-exact,
    and host + accelerator saturation counts add up to the golden model's."""
    cfg, prog, gm, _ = setup
    img = 1e3 * np.random.default_rng(3).standard_normal((cfg.in_chans, cfg.img_h, cfg.img_w))
    g = gm.forward(img, 0)
    d = PythonBackend.for_program(prog).driver(poll_interval_s=1e-6)
    d.load(prog)
    r = d.run(img, 0)
    np.testing.assert_array_equal(r.features, g.features)
    assert r.sat_count > 0 and r.input_saturated > 0
    assert r.sat_count + r.input_saturated == g.sat.saturated()


def test_async_driver_with_awaitable_bus(setup):
    cfg, prog, gm, img = setup
    be = PythonBackend.for_program(prog)

    class AsyncMMIO:       # what a cocotb AXI4-Lite master looks like
        def __init__(self, m):
            self.m, self.calls = m, 0

        async def read32(self, off):
            self.calls += 1
            return self.m.read32(off)

        async def write32(self, off, v):
            self.calls += 1
            self.m.write32(off, v)

    slept = []

    async def sleep(s):
        slept.append(s)

    mm = AsyncMMIO(be.mmio)
    d = AsyncAcceleratorDriver(mm, be.mem, sleep=sleep, poll_interval_s=1e-3)

    async def go():
        await d.load(prog)
        return await d.run(img, 1)

    r = asyncio.run(go())
    np.testing.assert_array_equal(r.features, gm.forward(img, 1).features)
    assert slept == [1e-3] and mm.calls > 10


def test_registers_and_64bit_counters(setup):
    _, prog, _, _ = setup
    be = PythonBackend.for_program(prog)
    m = be.mmio
    assert m.read32(drv.ID) == drv.ACCEL_ID and m.read32(drv.VERSION) >> 16 == 1
    assert m.read32(drv.CONFIG_HASH) == prog.config_hash
    m.regs[drv.DRAM_BYTES_READ] = 0x1_2345_6789
    assert m.read32(drv.DRAM_BYTES_READ) == 0x2345_6789 and m.read32(drv.DRAM_BYTES_READ + 4) == 1
    with pytest.raises(ValueError, match="unmapped register offset 0x100"):
        m.read32(0x100)
    with pytest.raises(ValueError, match="read-only"):
        m.write32(drv.STATUS, 1)


def test_driver_errors(setup):
    cfg, prog, _, img = setup
    be = PythonBackend.for_program(prog)
    d = be.driver(poll_interval_s=1e-6)
    with pytest.raises(DriverError, match="no program loaded"):
        d.run(img, 0)
    other = PythonBackend(cfg, Q, get_hw_preset("small-8x8"))
    with pytest.raises(DriverError, match="CONFIG_HASH .* compiled for other hardware"):
        other.driver().load(prog)
    with pytest.raises(DriverError, match="does not fit the memory"):
        PythonBackend.for_program(prog, mem_bytes=1 << 16).driver().load(prog)
    # timeout: the accelerator stays busy
    slow = PythonBackend.for_program(prog, busy_polls=10**6)
    sd = slow.driver(poll_interval_s=1e-6, timeout_s=1e-4)
    sd.load(prog)
    with pytest.raises(DriverError, match="not done after"):
        sd.run(img, 0)
    # a corrupted instruction stops the accelerator with ERROR, code and pc
    d.load(prog)
    pc = 5
    be.mem.write(d.addr["program"] + pc * INSTR_BYTES + 3, bytes([0x40]))   # reserved bit in w0
    with pytest.raises(DriverError) as e:
        d.run(img, 0)
    assert (e.value.code, e.value.pc) == (ERR_ILLEGAL, pc) and prog.names[pc] in str(e.value)
    assert be.mmio.read32(drv.STATUS) == drv.STATUS_DONE | drv.STATUS_ERROR


@pytest.mark.skipif(importlib.util.find_spec("pynq") is not None, reason="pynq installed")
def test_pynq_backend_says_clearly_that_pynq_is_missing():
    with pytest.raises(BackendUnavailable, match="needs the 'pynq' package"):
        PynqBackend("edgemoe.bit")


def test_cli_compile(tmp_path, capsys):
    from edgemoe.sim.cli import main
    assert main(["compile", "--preset", "tiny", "--weights", "synthetic", "--seed", "2",
                 "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "instructions: 40" in out and "weights" in out and "fits hardware" in out
    p = load_program(tmp_path / "p")
    assert len(p.instrs) == 40 and p.cfg.name == "tiny"
    assert main(["compile", "--preset", "vit-s-nyud", "--weights", "synthetic"]) == 1
    assert "activation buffer: 1201 tokens > act_buffer_tokens 256 (by 945)" in capsys.readouterr().out
