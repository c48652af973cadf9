"""cocotb testbench: the accelerator top as a board's host sees it.

1. Register map: fresh from reset, every register of sim/regmap.rdl (through the generated
   sim/regs.py offsets) over AXI4-Lite: reset values, read-write masks, read-only registers
   ignoring writes (sim.regmap.register_checks).
2. PYNQ driver: sim/pynq_driver.PynqAccelerator, blocking code as on the board, runs in a
   cocotb bridge thread against a stand-in `pynq` (sim/fake_pynq.py) whose MMIO is the AXI4-Lite
   master (cocotb.task.resume) and whose allocate'd buffer is the DRAM model's array: it loads
   the memory image, runs each task and reads the counters; features compared as integers with
   the Python executor.
tb_config: program (a Program.save folder), tasks.
"""
from __future__ import annotations

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.task import bridge, resume
from cocotb.triggers import ClockCycles

from edgemoe.sim.tb_common import tb_config, write_result

MEM_BASE = 0x1000_0000


@cocotb.test()
async def board_host(dut):
    from edgemoe.quant.interpreter import run_program
    from edgemoe.quant.program import REGION_ALIGN, align, load_program
    from edgemoe.sim import fake_pynq
    from edgemoe.sim.dram import CocotbAccelBackend
    from edgemoe.sim.pynq_driver import PynqAccelerator
    from edgemoe.sim.regmap import register_checks

    conf = tb_config()
    program = load_program(conf["program"])
    cfg, hw = program.cfg, program.hwcfg
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value = 1
    await ClockCycles(dut.clk, 3)
    dut.rst.value = 0
    be = CocotbAccelBackend.from_hwconfig(dut, hw, mem_base=MEM_BASE,
                                          mem_bytes=align(program.image_bytes + REGION_ALIGN, 1 << 20))
    result = {"register_mismatches": [], "register_steps": 0, "tasks": {}}

    for step in register_checks(program.config_hash):
        result["register_steps"] += 1
        if step[0] == "w32":
            await be.mmio.write32(step[1], step[2])
        else:
            got = await be.mmio.read32(step[1])
            if got != step[2]:
                result["register_mismatches"].append(f"{step[3]}: read {got:#010x}, expected {step[2]:#010x}")

    bitfiles = []
    fake_pynq.install(resume(be.mmio.read32), resume(be.mmio.write32), be.mem.mem, be.mem.base,
                      bitfiles=bitfiles)
    rng = np.random.default_rng(3)
    image = rng.normal(0, 1, size=(cfg.in_chans, cfg.img_h, cfg.img_w)).astype(np.float32)

    def host():
        # the board's code, unchanged: blocking MMIO reads / writes, time.sleep between polls
        acc = PynqAccelerator("edgemoe.bit", program, poll_interval_s=1e-6)
        out = {}
        for task in conf["tasks"]:
            r = acc.run(image, task)
            out[task] = (r, acc.counters())
        acc.close()
        return out

    try:
        runs = await bridge(host)()
    finally:
        fake_pynq.uninstall()
    for task, (r, counters) in runs.items():
        exp = run_program(program, image, task)
        result["tasks"][task] = {
            "mismatches": int((r.features != exp.features).sum()), "elements": int(exp.features.size),
            "cycles": r.cycles, "instructions": r.instructions, "golden_instructions": exp.stats.retired,
            "dram_bytes_read": r.dram_bytes_read, "golden_read": exp.stats.dram_read,
            "counters": counters}
    result["bitfiles"] = bitfiles
    write_result(result)
