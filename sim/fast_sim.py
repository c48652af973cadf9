"""Fast whole-inference RTL simulation: the accelerator top under a Verilator C++ harness.

The cocotb path (sim/rtl_sim.py + sim/tb_accel.py) stays the reference. It moves every 256-bit
DRAM beat through VPI and Python and reaches about 10 k cycles/s. Here sim/hdl/fast_harness.cpp
does the same work in C++: the AXI4 DRAM model of sim/dram.py (AxiDram: same latency, token
bucket, outstanding limit, write response delay, SLVERR, strict protocol checks) and the
register sequence of sim/driver.py through the AXI4-Lite master of sim/dram.py, with the same
edge timing. Outputs, CYCLE_COUNT, the retire trace and the DRAM statistics are the same as on
the cocotb path (tests/test_fast_sim.py checks this).

    rep = rtl_sim.simulate(program, tasks, image, out_dir, fast=True)   # same report, JSON, PNG

Build: the Verilog of the top plus the harness, compiled by Verilator without VPI. It is cached
under <cache root>/fast/edgemoe_accel-<hash>, the hash covering the Verilog text, the harness
source, the Verilator flags and the Verilator version. The program, its weights and the image
are data read at run time, so one build serves every task and every set of weights of a design.
Errors: StaleBuildError (the binary in a cache entry, or the one given, was built for other
Verilog), ConfigMismatchError (the memory image was compiled for another QuantConfig/HWConfig:
the CONFIG_HASH register differs), FastSimOptionError (an option only the cocotb path has).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

HARNESS = Path(__file__).resolve().parent / "hdl" / "fast_harness.cpp"
TOPLEVEL = "edgemoe_accel"
MEM_BASE = 0x1000_0000          # as sim/tb_accel.py
POLL_CYCLES = 2000              # tb_accel's default STATUS poll interval
_STAMP = ".edgemoe_fast_built"

# Verilator options, each measured on the full edge-moe preset (zcu102-16x16, edge-moe-fixed, one
# task, 3.33 M cycles; sim/bench.py bench_fast_sim_flags): OPT_FAST -O2 30.4 s vs
# Verilator's default -Os 55.5 s; -O3 30.3 s and --x-assign/--x-initial fast 30.3 s (no gain,
# not kept); --threads 2 26.4 s (kept: 126 k cycles/s vs 110 k).
VERILATOR_FLAGS: tuple[str, ...] = ("--threads", "2")
# C++ optimisation of the generated model (Verilator's default OPT_FAST is -Os)
OPT_FAST = "-O2"


class FastSimError(RuntimeError):
    """The fast path could not build or run."""


class StaleBuildError(FastSimError):
    """A build does not belong to the Verilog / harness / flags it is used for."""


class ConfigMismatchError(FastSimError):
    """The program (memory image) was compiled for other hardware than the build."""


class FastSimOptionError(FastSimError, ValueError):
    """An option the fast path does not support (only the cocotb path has it)."""


def check_options(simulator: str = "verilator", hwcfg=None, **cocotb_only) -> None:
    """FastSimOptionError for a combination the fast path cannot run: a simulator other than
    Verilator, an AXI4 port other than 128 or 256 bits (hwcfg; the harness's wide-port type), or
    any of the cocotb-only options given (name=value, None / False = not given)."""
    if simulator != "verilator":
        raise FastSimOptionError(f"fast simulation runs on Verilator only, not simulator={simulator!r} "
                                 "(drop --fast to use the cocotb path)")
    if hwcfg is not None and hwcfg.axi_data_bits not in (128, 256):
        raise FastSimOptionError(f"HWConfig '{hwcfg.name}': the fast harness takes a 128- or 256-bit "
                                 f"AXI4 port, not axi_data_bits = {hwcfg.axi_data_bits} (drop --fast to "
                                 "use the cocotb path)")
    bad = [k for k, v in cocotb_only.items() if v not in (None, False, (), [])]
    if bad:
        raise FastSimOptionError(f"option(s) {', '.join(bad)} exist only on the cocotb path "
                                 "(drop --fast, or the option)")


def _verilator_version() -> str:
    from edgemoe.sim.verilator_env import verilator_version
    return verilator_version()


def design_hash(verilog: str, flags=None, opt_fast: str | None = None) -> str:
    flags = VERILATOR_FLAGS if flags is None else tuple(flags)
    opt_fast = OPT_FAST if opt_fast is None else opt_fast
    h = hashlib.sha256()
    for part in (verilog, HARNESS.read_text(), json.dumps([list(flags), opt_fast]), _verilator_version()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def binary_hash(binary: Path) -> str:
    p = subprocess.run([str(binary), "--hash"], capture_output=True, text=True, timeout=30)
    return p.stdout.strip()


def build(verilog: str, flags=None, opt_fast: str | None = None, timeout_s: float = 1800,
          jobs: int = 2) -> tuple[Path, float, str]:
    """The harness binary for this Verilog: (path, build seconds (0 when cached), design hash)."""
    from edgemoe.sim.runner import _locked, cache_root
    from edgemoe.sim.verilator_env import setup_verilator_env
    setup_verilator_env()
    flags = VERILATOR_FLAGS if flags is None else tuple(flags)
    opt_fast = OPT_FAST if opt_fast is None else opt_fast
    key = design_hash(verilog, flags, opt_fast)
    bdir = cache_root() / "fast" / f"{TOPLEVEL}-{key}"
    binary = bdir / "fast_sim"
    with _locked(bdir.with_name(bdir.name + ".lock")):
        if (bdir / _STAMP).exists():
            if not binary.exists():
                raise StaleBuildError(f"{bdir}: stamp present but no binary; remove the folder to rebuild")
            got = binary_hash(binary)
            if got != key:
                raise StaleBuildError(f"{binary} was built for design hash {got!r}, not {key!r} (this "
                                      f"Verilog + harness + flags); remove {bdir} to rebuild")
            return binary, 0.0, key
        if bdir.exists():
            shutil.rmtree(bdir)                 # a half-finished earlier build
        bdir.mkdir(parents=True)
        (bdir / f"{TOPLEVEL}.v").write_text(verilog)
        # the hash is compiled in (the binary answers --hash): a stale binary cannot pass unseen
        (bdir / "harness.cpp").write_text(f'#define EDGEMOE_DESIGN_HASH "{key}"\n' + HARNESS.read_text())
        cmd = ["verilator", "--cc", "--exe", "--build", "-j", str(jobs), "--top-module", TOPLEVEL,
               "--prefix", "Vtop", "-Mdir", "obj", "-o", "fast_sim", "-Wno-fatal", "-Wno-WIDTH",
               "-Wno-lint", "-Wno-style", *flags, "-CFLAGS", "-std=c++17",
               "-MAKEFLAGS", f"OPT_FAST={opt_fast}",
               f"{TOPLEVEL}.v", "harness.cpp"]
        (bdir / "build_cmd.json").write_text(json.dumps(cmd))
        t0 = time.perf_counter()
        with open(bdir / "build.log", "w") as log:
            try:
                p = subprocess.run(cmd, cwd=bdir, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise FastSimError(f"Verilator build timed out after {timeout_s} s; log {bdir / 'build.log'}") from None
        if (bdir / "obj" / "fast_sim").exists():
            (bdir / "obj" / "fast_sim").replace(binary)
        if p.returncode != 0 or not binary.exists():
            tail = "\n".join((bdir / "build.log").read_text(errors="replace").splitlines()[-30:])
            raise FastSimError(f"Verilator build failed (exit {p.returncode}); log {bdir / 'build.log'}:\n{tail}")
        build_s = time.perf_counter() - t0
        shutil.rmtree(bdir / "obj", ignore_errors=True)    # ~100 MB of objects; the binary is all we run
        (bdir / _STAMP).write_text(json.dumps({"hash": key, "flags": list(flags), "opt_fast": opt_fast,
                                               "build_s": build_s, "date": time.strftime("%Y-%m-%d %H:%M:%S")}))
        return binary, build_s, key


def _dram_params(hw, latency_cycles=None, beats_per_cycle=None) -> dict:
    """AxiDram.from_hwconfig's parameters as the integer token bucket the model runs."""
    import inspect
    from fractions import Fraction
    from edgemoe.sim.dram import AxiDram, dram_beats_per_cycle
    # the cocotb model's own defaults, read not copied: both paths run one DRAM model
    dflt = {k: v.default for k, v in inspect.signature(AxiDram.__init__).parameters.items()}
    lat = int(hw.dram_latency_cycles) if latency_cycles is None else latency_cycles
    bpc = dram_beats_per_cycle(hw) if beats_per_cycle is None else beats_per_cycle
    if not isinstance(lat, int) or lat < 1:
        raise ValueError(f"AxiDram: latency_cycles {lat!r} must be an integer >= 1")
    if not 0 < bpc <= 1:
        raise ValueError(f"AxiDram: beats_per_cycle {bpc} must be in (0, 1]")
    frac = Fraction(bpc).limit_denominator(1 << 12)
    return {"latency": lat, "bpc_num": frac.numerator, "bpc_den": frac.denominator,
            "max_outstanding": dflt["max_outstanding"], "write_resp_cycles": dflt["write_resp_cycles"],
            "strict": int(dflt["strict"])}


def _poll_cycles(hw) -> int:
    """The cycles CocotbAccelBackend.sleep waits for tb_accel's poll interval (same float maths)."""
    seconds = POLL_CYCLES / (hw.clock_mhz * 1e6)
    return max(1, math.ceil(seconds * hw.clock_mhz * 1e6))


def run(binary: Path, key: str, program, tasks, image, out_dir: Path, latency_cycles=None,
        beats_per_cycle=None, progress_file: Path | None = None, max_cycles: int = 1 << 40,
        timeout_s: float = 3600) -> dict:
    """Run the harness on `program` for `tasks` (names) with one float [C,H,W] image; returns the
    harness's raw result (per task: counters, trace, DRAM statistics) plus output_path per task."""
    from edgemoe.quant.program import REGION_ALIGN, align
    from edgemoe.sim import regs
    from edgemoe.sim.driver import host_image_bytes
    cfg, hw = program.cfg, program.hwcfg
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    load_base = align(MEM_BASE, REGION_ALIGN)
    addr = {n: load_base + r.offset for n, r in program.regions.items()}
    mem_path = out_dir / "memory.bin"
    mem_path.write_bytes(np.ascontiguousarray(program.image, np.uint8).tobytes())
    img_bytes, _ = host_image_bytes(program, image)
    img_path = out_dir / "image_codes.bin"
    img_path.write_bytes(np.asarray(img_bytes, np.uint8).tobytes())
    from edgemoe.quant.program import container_bytes
    out_bytes = max(program.regions["output"].size, cfg.num_tokens * cfg.dim * container_bytes(program.qcfg.act))
    result_path = out_dir / "fast_result.json"
    result_path.unlink(missing_ok=True)
    conf = {"design_hash": key, "result": str(result_path), "memory": str(mem_path), "outdir": str(out_dir),
            "progress": str(progress_file) if progress_file else "",
            "max_cycles": max_cycles, "mem_base": MEM_BASE, "mem_size": program.image_bytes + (1 << 16),
            "load_base": load_base, "poll_cycles": _poll_cycles(hw), "output_bytes": out_bytes,
            "accel_id": regs.ACCEL_ID, "isa_version": _isa_version(), "config_hash": program.config_hash,
            **{f"addr_{n}": addr[n] for n in ("program", "weights", "image", "output")},
            **_dram_params(hw, latency_cycles, beats_per_cycle),
            "ctrl_start": regs.CTRL_START, "status_busy": regs.STATUS_BUSY, "status_done": regs.STATUS_DONE,
            "status_error": regs.STATUS_ERROR}
    for name in ("ID", "VERSION", "CONFIG_HASH", "STATUS", "CTRL", "TASK_ID", "ERROR_CODE", "ERROR_PC",
                 "PROGRAM_BASE", "WEIGHTS_BASE", "IMAGE_BASE", "OUTPUT_BASE", "CYCLE_COUNT",
                 "DRAM_BYTES_READ", "DRAM_BYTES_WRITTEN", "SAT_COUNT", "INSTR_COUNT"):
        conf[f"reg_{name.lower()}"] = getattr(regs, name)
    lines = [f"{k} {'' if v == '' else v}".rstrip() for k, v in conf.items() if v != ""]
    for t in tasks:
        lines.append(f"task {t} {cfg.task_index(t)} {img_path}")
    cfg_path = out_dir / "fast_config.txt"
    cfg_path.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    try:
        p = subprocess.run([str(binary), str(cfg_path)], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise FastSimError(f"fast simulation timed out after {timeout_s} s ({cfg_path})") from None
    sim_s = time.perf_counter() - t0
    if not result_path.exists():
        raise FastSimError(f"{binary} exited {p.returncode} without a result:\n{p.stderr[-3000:]}")
    res = json.loads(result_path.read_text())
    if "error" in res:
        kind, msg = res["error"], res["message"]
        where = f" (cycle {res.get('cycle')}, config {cfg_path})"
        if kind == "StaleBuild":
            raise StaleBuildError(msg + where)
        if kind == "ConfigMismatch":
            raise ConfigMismatchError(msg + f" (quant '{program.qcfg.name}', hw '{hw.name}')" + where)
        if kind == "AxiProtocolError":
            from edgemoe.sim.dram import AxiProtocolError
            raise AxiProtocolError(msg + where)
        if kind in ("DriverError", "AcceleratorError"):
            from edgemoe.sim.driver import DriverError
            raise DriverError(msg + where)
        raise FastSimError(f"{kind}: {msg}{where}")
    res["sim_s"] = sim_s
    for t in tasks:
        res["tasks"][t]["output_path"] = str(out_dir / f"output_{t}.bin")
    return res


def _isa_version() -> int:
    from edgemoe.quant.program import ISA_VERSION
    return ISA_VERSION


def task_result(program, gold, r: dict, taps) -> dict:
    """tb_accel's per-task result from the harness's raw one: the features and a debug program's
    taps compared as integers with the executor, the golden counters beside the RTL's."""
    from edgemoe.quant.program import container_bytes, decode_values
    q = program.qcfg
    raw = np.fromfile(r["output_path"], np.uint8)
    n = program.cfg.num_tokens * program.cfg.dim
    feats = decode_values(raw[:n * container_bytes(q.act)], n, q.act).reshape(program.cfg.num_tokens, program.cfg.dim)
    exp = gold.features
    out_taps = []
    for tp in taps:
        nb = tp.rows * tp.k * container_bytes(q.act)
        got_t = decode_values(raw[tp.offset:tp.offset + nb], tp.rows * tp.k, q.act).reshape(tp.rows, tp.k)
        exp_t = decode_values(gold.output[tp.offset:tp.offset + nb], tp.rows * tp.k, q.act).reshape(tp.rows, tp.k)
        bad = np.argwhere(got_t != exp_t)
        out_taps.append({"name": tp.name, "rows": tp.rows, "k": tp.k, "mismatches": int(len(bad)),
                         "first": None if not len(bad) else {
                             "row": int(bad[0][0]), "col": int(bad[0][1]),
                             "expected": int(exp_t[tuple(bad[0])]), "got": int(got_t[tuple(bad[0])])}})
    diff = np.argwhere(exp != feats)
    first = None
    if diff.size:
        t, c = diff[0]
        first = {"token": int(t), "channel": int(c), "expected": int(exp[t, c]), "got": int(feats[t, c])}
    return {**{k: r[k] for k in ("cycles", "dram_bytes_read", "dram_bytes_written", "sat_count", "instructions",
                                 "wall_s", "trace", "start_cycle", "dram", "sim_cycles")},
            "mismatches": int(len(diff)), "first_mismatch": first, "elements": int(exp.size),
            "golden_sat": int(gold.stats.sat.saturated()), "golden_instructions": gold.stats.retired,
            "golden_read": gold.stats.dram_read, "golden_written": gold.stats.write_bytes,
            "taps": out_taps, "features": feats}


def run_fast(verilog: str, program, tasks, image, gold: dict, taps, out_dir: Path, latency_cycles=None,
             beats_per_cycle=None, progress_file: Path | None = None, timeout_s: float = 3600) -> dict:
    """rtl_sim.simulate's backend for fast=True: the dict run_cocotb returns for tb_accel
    ({"tasks": {name: ...}, "build_s", "sim_s"})."""
    binary, build_s, key = build(verilog, timeout_s=timeout_s)
    with tempfile.TemporaryDirectory(prefix="edgemoe-fast-") as d:
        res = run(binary, key, program, tasks, image, Path(d), latency_cycles, beats_per_cycle,
                  progress_file, timeout_s=timeout_s)
        out = {t: task_result(program, gold[t], res["tasks"][t], taps) for t in tasks}
    for r in out.values():
        r.pop("features")
    stamp = json.loads((binary.parent / _STAMP).read_text())
    return {"tasks": out, "build_s": round(build_s, 3), "sim_s": round(res["sim_s"], 3),
            "cold_build_s": round(stamp.get("build_s", build_s), 3),
            "binary": str(binary), "design_hash": key, "total_cycles": res["total_cycles"]}
