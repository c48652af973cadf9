"""The accelerator on a PYNQ board (pynq 4.x on a ZCU102 / ZCU104 image), over sim/driver.py's
code path: PynqBackend (pynq.Overlay's IP MMIO + one pynq.allocate'd DRAM buffer) under the same
AcceleratorDriver that drives the Python model and, in the tests, the RTL simulation.

    from edgemoe.sim.pynq_driver import PynqAccelerator
    acc = PynqAccelerator("edgemoe.bit", "export/program")    # the folder `edgemoe export` wrote
    r = acc.run(image, "depth")          # RunResult: features, cycles, DRAM bytes, saturations
    acc.counters()                       # the register file's counters of the last run

Only the pynq import differs from the tests here: tests/test_pynq_driver.py puts a stand-in
`pynq` module (sim/fake_pynq.py) into sys.modules whose MMIO and buffer forward to the Python
model or to the RTL simulation's AXI4-Lite master and DRAM model.
"""
from __future__ import annotations

from edgemoe.quant.program import REGION_ALIGN, align, load_program

from . import regs
from .driver import AcceleratorDriver, PynqBackend, RunResult


class PynqAccelerator:
    def __init__(self, bitfile: str, program, ip_name: str = "edgemoe_0", mem_bytes: int | None = None,
                 poll_interval_s: float = 1e-4, timeout_s: float = 60.0):
        """program: a quant.program.Program or a folder written by Program.save (export's
        program/). Loads the overlay, allocates DRAM for the memory image (BackendUnavailable
        without the pynq package) and writes the image (DriverError if ID / VERSION / CONFIG_HASH
        say the bitstream is not this program's hardware)."""
        self.program = program if hasattr(program, "instrs") else load_program(program)
        need = align(self.program.image_bytes + REGION_ALIGN, 1 << 20)
        self.backend = PynqBackend(bitfile, ip_name, mem_bytes or need)
        self.driver = AcceleratorDriver(self.backend.mmio, self.backend.mem,
                                        poll_interval_s=poll_interval_s, timeout_s=timeout_s)
        self.driver.load(self.program)

    def run(self, image, task) -> RunResult:
        return self.driver.run(image, task)

    def counters(self) -> dict:
        """STATUS, errors and the counters of the last run, read through the register map."""
        m = self.backend.mmio
        out = {name.lower(): m.read32(getattr(regs, name)) for name in
               ("STATUS", "ERROR_CODE", "ERROR_PC", "TASK_ID", "SAT_COUNT", "INSTR_COUNT")}
        for name in ("CYCLE_COUNT", "DRAM_BYTES_READ", "DRAM_BYTES_WRITTEN"):
            lo = m.read32(getattr(regs, name + "_LO"))       # LO first: it latches HI
            out[name.lower()] = m.read32(getattr(regs, name + "_HI")) << 32 | lo
        return out

    def close(self) -> None:
        """Free the DRAM buffer (PynqBuffer.freebuffer)."""
        free = getattr(self.backend.mem.buf, "freebuffer", None)
        if free:
            free()
