"""cocotb testbench of the whole accelerator (hw/accel.py): a full inference driven exactly as a
host would (sim/driver.py's AsyncAcceleratorDriver over AXI4-Lite), the memory behind the AXI4
master modelled by sim/dram.py's AxiDram (latency / bandwidth of the HWConfig unless the config
overrides them), output features compared as integers with the Python executor
(quant/interpreter.py, itself bit-exact with the golden model).

tb_config keys: program (directory of quant.program.save_program), tasks (names), image (.npy
path of a float [C,H,W] image, or absent: a seeded random image), latency_cycles /
beats_per_cycle (DRAM model overrides), progress (a file path: one line per retired instruction
is appended, for the CLI's progress bar), batch / features_out (an .npy of images [N,C,H,W]: run
each through every task, write the features to the .npz features_out), errors (list of {"pc": i, "words": [8 ints]}: patch the
program and expect that error instead of a result; "at_end": true also moves PROGRAM_BASE so
that instruction pc is the last 32 bytes of the memory, mem_bytes = image_bytes + 64 KiB), taps (quant.compiler.debug_program's: compare
every stored intermediate tensor with the executor's).
Result: per task cycles, DRAM bytes, saturations, instructions, mismatches, and the per-
instruction trace (pc, expert, cycles) from the top's `retire` pulses.
"""
from __future__ import annotations

import time

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, RisingEdge

from edgemoe.sim.tb_common import read_uint, tb_config, write_result

MEM_BASE = 0x1000_0000


def _image(cfg, conf):
    if conf.get("image"):
        return np.load(conf["image"])
    rng = np.random.default_rng(conf.get("seed", 1))
    return rng.normal(0, 1, size=(cfg.in_chans, cfg.img_h, cfg.img_w)).astype(np.float32)


async def _busy(dut, clk_cycles, starts):
    while True:
        await RisingEdge(dut.busy)
        starts.append(clk_cycles())


async def _trace(dut, clk_cycles, out, progress):
    """Record (pc, expert, cycle) of every retired instruction (the top's `retire` pulse)."""
    f = open(progress, "a") if progress else None
    try:
        while True:
            await RisingEdge(dut.retire)
            rec = (read_uint(dut.retire_pc), read_uint(dut.retire_expert), clk_cycles())
            out.append(rec)
            if f:
                f.write(f"{rec[0]} {rec[1]} {rec[2]}\n")
                f.flush()
    finally:
        if f:
            f.close()


@cocotb.test()
async def accel_inference(dut):
    from edgemoe.quant.interpreter import run_program
    from edgemoe.quant.program import container_bytes, decode_values, load_program
    from edgemoe.sim.dram import CocotbAccelBackend
    from edgemoe.sim.driver import DriverError

    conf = tb_config()
    program = load_program(conf["program"])
    cfg, hw = program.cfg, program.hwcfg
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value = 1
    for name in ("s_axil__awvalid", "s_axil__wvalid", "s_axil__arvalid", "s_axil__bready", "s_axil__rready"):
        getattr(dut, name).value = 0
    await ClockCycles(dut.clk, 3)
    dut.rst.value = 0
    dram_kw = {}
    if "latency_cycles" in conf:
        dram_kw["latency_cycles"] = conf["latency_cycles"]
    if "beats_per_cycle" in conf:
        dram_kw["beats_per_cycle"] = conf["beats_per_cycle"]
    mem_bytes = program.image_bytes + (1 << 16)
    be = CocotbAccelBackend.from_hwconfig(dut, hw, mem_base=MEM_BASE, mem_bytes=mem_bytes, **dram_kw)
    drv = be.driver(poll_interval_s=conf.get("poll_cycles", 2000) / (hw.clock_mhz * 1e6), timeout_s=1e9)
    await drv.load(program)

    t_start = [0]
    def now_cycles():
        return int(cocotb.utils.get_sim_time(unit="ns") // 10) - t_start[0]

    image = _image(cfg, conf)
    results = {"tasks": {}, "errors": []}
    trace: list = []
    starts: list = []
    cocotb.start_soon(_trace(dut, now_cycles, trace, conf.get("progress")))
    cocotb.start_soon(_busy(dut, now_cycles, starts))

    for patch in conf.get("errors", []):
        # a corrupted program: the run must stop with the interpreter's error code and pc
        prog_base = drv.addr["program"]
        if patch.get("at_end"):         # PROGRAM_BASE moved so that instruction pc ends the memory
            drv.addr["program"] = MEM_BASE + mem_bytes - 32 * (patch["pc"] + 1)
        addr = drv.addr["program"] + 32 * patch["pc"]
        saved = be.mem.read(addr, 32)
        be.mem.write(addr, np.asarray(patch["words"], dtype="<u4").tobytes())
        try:
            await drv.run(image, cfg.tasks[0])
            results["errors"].append({"pc": patch["pc"], "code": 0, "error_pc": None})
        except DriverError as e:
            results["errors"].append({"pc": patch["pc"], "code": e.code, "error_pc": e.pc, "msg": str(e)})
        be.mem.write(addr, saved)
        drv.addr["program"] = prog_base

    if conf.get("batch"):
        # many images per task (evaluation): features of each to an npz, mismatches counted
        imgs = np.load(conf["batch"])
        feats, mism = {}, {}
        for task in conf.get("tasks", list(cfg.tasks)):
            fs, bad = [], 0
            for im in imgs:
                res = await drv.run(im, task)
                fs.append(res.features)
                bad += int((res.features != run_program(program, im, task).features).any())
            feats[task] = np.stack(fs)
            mism[task] = bad
        np.savez(conf["features_out"], **feats)
        write_result({"batch": True, "images": int(len(imgs)), "images_differing": mism})
        return

    for task in conf.get("tasks", list(cfg.tasks)):
        trace.clear()
        starts.clear()
        t_start[0] = int(cocotb.utils.get_sim_time(unit="ns") // 10)
        wall = time.perf_counter()
        res = await drv.run(image, task)
        wall = time.perf_counter() - wall
        gold = run_program(program, image, task)
        exp = gold.features
        taps = []
        for tp in conf.get("taps", []):
            # a debug program's intermediate tensors (quant.compiler.debug_program)
            nb = tp["rows"] * tp["k"] * container_bytes(program.qcfg.act)
            got_t = decode_values(be.mem.read(drv.addr["output"] + tp["offset"], nb), tp["rows"] * tp["k"],
                                  program.qcfg.act).reshape(tp["rows"], tp["k"])
            exp_t = decode_values(gold.output[tp["offset"]:tp["offset"] + nb], tp["rows"] * tp["k"],
                                  program.qcfg.act).reshape(tp["rows"], tp["k"])
            bad = np.argwhere(got_t != exp_t)
            taps.append({"name": tp["name"], "rows": tp["rows"], "k": tp["k"], "mismatches": int(len(bad)),
                         "first": None if not len(bad) else {
                             "row": int(bad[0][0]), "col": int(bad[0][1]),
                             "expected": int(exp_t[tuple(bad[0])]), "got": int(got_t[tuple(bad[0])])}})
        diff = np.argwhere(exp != res.features)
        first = None
        if diff.size:
            t, c = diff[0]
            first = {"token": int(t), "channel": int(c), "expected": int(exp[t, c]), "got": int(res.features[t, c])}
        results["tasks"][task] = {
            "cycles": res.cycles, "dram_bytes_read": res.dram_bytes_read,
            "dram_bytes_written": res.dram_bytes_written, "sat_count": res.sat_count,
            "instructions": res.instructions, "mismatches": int(len(diff)), "first_mismatch": first,
            "elements": int(exp.size), "golden_sat": int(gold.stats.sat.saturated()),
            "golden_instructions": gold.stats.retired,
            "golden_read": gold.stats.dram_read, "golden_written": gold.stats.write_bytes,
            "wall_s": wall, "trace": list(trace), "taps": taps, "start_cycle": starts[0] if starts else 0,
            "dram": be.mem.stats() if hasattr(be.mem, "stats") else {},
        }
    write_result(results)
