"""`edgemoe energy`: accelerator estimate vs. CPU (measured here), GPU (bench JSON files) and the
published Edge-MoE figures, per image: ms, images/s, J, images/J and the ratios to the accelerator.

Every row says what it is: "estimate" (from what), "measured" (where, when; energy only where a
counter was readable, else "not measured"), "reported" (DESIGN.md section 5 figures measured
earlier on this project, not by this command) or "published" (Edge-MoE's paper).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

# DESIGN.md section 5: our own earlier baseline runs (not re-measured by this command)
DESIGN_REPORTED = [
    {"name": "H100 eager fp16 batch 1", "ms": (10.0, 18.0), "j": (1.3, 2.3)},
    {"name": "H100 CUDA graph fp16 batch 1", "ms": (0.83, 0.83), "j": (0.15, 0.15)},
    {"name": "H100 eager fp16 batch 64", "ms": (1e3 / 4900, 1e3 / 4900), "j": (0.04, 0.04)},
    {"name": "2-core Xeon fp32 2 threads", "ms": (17.0, 17.0), "j": None},
]
DESIGN_SOURCE = "reported in DESIGN.md section 5 (edge-moe preset, earlier runs; not measured by this command)"


def add_arguments(p):
    p.add_argument("--preset", default="edge-moe", help="model preset")
    p.add_argument("--quant", default="edge-moe-fixed", help="quant preset")
    p.add_argument("--hw", default="zcu102-16x16", help="hardware preset")
    p.add_argument("--task", default=None, help="task name or index (default: the first)")
    p.add_argument("--routing", default="uniform", choices=("uniform", "golden"),
                   help="expert routing for the cycle model: uniform (stated default) or the golden "
                        "model's on the default image (synthetic seeded weights)")
    p.add_argument("--rtl-json", default=None, metavar="PATH",
                   help="RTL simulation result JSON with the image's cycles ('cycles'); replaces "
                        "the cycle model's cycles in the accelerator row")
    p.add_argument("--gpu-json", action="append", default=[], metavar="PATH",
                   help="`edgemoe bench --json` result measured elsewhere (repeatable)")
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU measurement on this machine")
    p.add_argument("--cpu-iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for the measurement (default 1: on a shared 2-core machine two "
                        "OpenMP threads can be far slower than one)")
    p.add_argument("--no-reference", action="store_true",
                   help="leave out the DESIGN.md reported H100/Xeon rows")
    p.add_argument("--json", default=None, metavar="PATH", help="write the table + details here")


# ---------------------------------------------------------------------------------------------
def _rng(v):
    return None if v is None else (tuple(v) if isinstance(v, (list, tuple)) else (v, v))


def make_row(name, kind, label, ms, j=None, watts=None, j_note=None, **extra) -> dict:
    """ms, j: a value or a (low, high) range; j None: energy not measured."""
    ms, j = _rng(ms), _rng(j)
    return {"name": name, "kind": kind, "label": label, "ms_per_image": ms,
            "images_per_s": (1e3 / ms[1], 1e3 / ms[0]), "j_per_image": j,
            "images_per_j": None if j is None else (1 / j[1], 1 / j[0]),
            "watts": _rng(watts), "energy_note": j_note if j is None else None, **extra}


def rtl_cycles(path, task: str | None = None) -> tuple[int, str]:
    """The image's cycles from an RTL simulation result JSON: `edgemoe simulate`'s simulate.json
    ('tasks': {task: {'cycles'}}; the given task, else the first), or 'cycles', 'total_cycles'
    or 'counters': {'cycles'}."""
    d = json.loads(Path(path).read_text())

    def from_simulate(d):
        tasks = d["tasks"]
        return tasks[task]["cycles"] if task in tasks else next(iter(tasks.values()))["cycles"]
    for get in (from_simulate, lambda d: d["cycles"], lambda d: d["total_cycles"],
                lambda d: d["counters"]["cycles"]):
        try:
            c = get(d)
        except (KeyError, TypeError):
            continue
        if not isinstance(c, int) or c <= 0:
            raise ValueError(f"--rtl-json {path}: cycles = {c!r} must be a positive integer")
        return c, f"RTL simulation {Path(path).name}"
    raise ValueError(f"--rtl-json {path}: no 'cycles' (or 'total_cycles', 'counters.cycles') key; "
                     f"keys: {sorted(d)}")


def rtl_dram_bytes(path, task: str | None = None) -> int | None:
    """Bytes read + written over the AXI port in the RTL run (simulate.json's
    dram_bytes_read / _written of the task, else the first), None when the JSON has none."""
    d = json.loads(Path(path).read_text())
    tasks = d.get("tasks") if isinstance(d, dict) else None
    if not isinstance(tasks, dict) or not tasks:
        return None
    r = tasks[task] if task in tasks else next(iter(tasks.values()))
    if not isinstance(r, dict) or "dram_bytes_read" not in r:
        return None
    return int(r["dram_bytes_read"]) + int(r.get("dram_bytes_written", 0))


def bench_row(r: dict, source: str, preset: str) -> dict:
    """A row from an `edgemoe bench` result dict (measured wherever it ran)."""
    for k in ("ms_per_image", "energy", "where", "preset"):
        if k not in r:
            raise ValueError(f"{source}: not an `edgemoe bench --json` result (no '{k}')")
    if r["preset"] != preset:
        raise ValueError(f"{source}: measured preset '{r['preset']}', this comparison is for '{preset}'")
    e = r["energy"]
    desc = (f"{r.get('dtype', '?')} batch {r.get('batch', '?')}"
            f"{' cuda-graph' if r.get('cuda_graph') else ''}")
    when = r.get("time", "unknown time")
    label = f"measured on {r['where']} ({r.get('host', '?')}, {when}), {desc}, {source}"
    if e.get("measured"):
        return make_row(f"{r['device'].upper()} {desc}", "measured", label, r["ms_per_image"],
                        e["joules_per_image"], e.get("avg_watts"),
                        energy_source=e.get("source"))
    return make_row(f"{r['device'].upper()} {desc}", "measured", label, r["ms_per_image"],
                    None, None, "not measured (" + e.get("note", "no energy counter") + ")")


def accelerator_row(cfg, q, hw, task, routing_kind="uniform", rtl_json=None) -> tuple[dict, dict, dict]:
    from .energy import energy_estimate
    from .perf_model import golden_routing, inference_cycles
    routing, rsrc = None, None
    if routing_kind == "golden":
        routing, rsrc = golden_routing(cfg, q, hw, task if task is not None else 0)
    perf = inference_cycles(cfg, q, hw, routing, routing_source=rsrc)
    tname = cfg.tasks[cfg.task_index(task)] if task is not None else None
    cycles, csrc = rtl_cycles(rtl_json, tname) if rtl_json else (None, None)
    nbytes = rtl_dram_bytes(rtl_json, tname) if rtl_json else None
    if nbytes is not None:      # the DRAM energy of the bytes the RTL moved, not the model's routing
        perf = {**perf, "totals": {**perf["totals"], "dram_bytes": nbytes}}
        csrc += " (cycles and DRAM bytes)"
    e = energy_estimate(cfg, q, hw, perf=perf, cycles=cycles, cycles_source=csrc)
    row = make_row(f"accelerator {cfg.name}/{q.name}/{hw.name}", "estimate", e["label"],
                   e["ms_per_image"], e["j_per_image"], e["watts"],
                   j_band=e["j_per_image_band"], watts_band=e["watts_band"])
    return row, e, perf


def reference_rows(include_design: bool = True) -> list[dict]:
    from .energy import EDGE_MOE_PUBLISHED as P
    rows = [make_row(P["name"], "published", f"published: {P['source']}; {P['board']} at "
                     f"{P['clock_mhz']:g} MHz", P["ms_per_image"], P["j_per_image"], P["watts"])]
    if include_design:
        for d in DESIGN_REPORTED:
            rows.append(make_row(d["name"], "reported", DESIGN_SOURCE, d["ms"], d["j"], None,
                                 "not reported"))
    return rows


def add_ratios(rows: list[dict], accel: dict) -> None:
    """ratio_ms = row ms / accelerator ms; ratio_j = row J / accelerator J (> 1: the
    accelerator is that many times more energy efficient)."""
    am, aj = accel["ms_per_image"][0], accel["j_per_image"][0]
    for r in rows:
        r["ratio_ms_vs_accel"] = (r["ms_per_image"][0] / am, r["ms_per_image"][1] / am)
        r["ratio_j_vs_accel"] = None if r["j_per_image"] is None else \
            (r["j_per_image"][0] / aj, r["j_per_image"][1] / aj)


def comparison(cfg, q, hw, task=None, routing_kind="uniform", rtl_json=None, gpu_jsons=(),
               cpu=True, cpu_iters=20, threads=1, reference=True) -> dict:
    """The whole comparison (rows + the accelerator's estimate and cycle breakdown)."""
    from . import cmd_bench
    accel, est, perf = accelerator_row(cfg, q, hw, task, routing_kind, rtl_json)
    rows = [accel]
    cpu_result = None
    if cpu:
        cpu_result = cmd_bench.measure(cfg.name, "cpu", "fp32", 1, task, False, threads,
                                       warmup=3, iters=cpu_iters, energy_seconds=1.0)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        cpu_result["loadavg_1min"] = load
        rows.append(bench_row(cpu_result, f"this machine, measured by this command, "
                              f"{cpu_result['threads']} thread(s), 1-min load average "
                              f"{'?' if load is None else f'{load:.1f}'} on {os.cpu_count()} cores "
                              f"(other work on the machine slows it)", cfg.name))
    for path in gpu_jsons:
        rows.append(bench_row(json.loads(Path(path).read_text()), str(path), cfg.name))
    # Edge-MoE's published row always; DESIGN.md's rows only for the model they were measured on
    rows += reference_rows(include_design=reference and cfg.name == "edge-moe")
    if cfg.name != "edge-moe":
        for r in rows:
            if r["kind"] in ("published", "reported"):
                r["label"] += f" [edge-moe model, not '{cfg.name}']"
    add_ratios(rows, accel)
    return {"model": cfg.name, "quant": q.name, "hw": hw.name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "rows": rows, "accelerator": est, "perf_totals": perf["totals"],
            "perf_by_type": perf["by_type"], "routing": perf["routing"], "cpu_bench": cpu_result}


def _fmt(v, f="{:.3g}"):
    if v is None:
        return "-"
    lo, hi = v
    return f.format(lo) if abs(hi - lo) <= 1e-12 * max(1.0, abs(hi)) else f"{f.format(lo)}-{f.format(hi)}"


def format_table(comp: dict) -> str:
    lines = [f"{'row':<44}{'ms/image':>12}{'images/s':>13}{'J/image':>14}{'images/J':>13}"
             f"{'ms ratio':>11}{'J ratio':>11}  kind"]
    for r in comp["rows"]:
        j = _fmt(r["j_per_image"]) if r["j_per_image"] else "not measured"
        lines.append(f"{r['name'][:43]:<44}{_fmt(r['ms_per_image']):>12}{_fmt(r['images_per_s']):>13}"
                     f"{j:>14}{_fmt(r['images_per_j']):>13}{_fmt(r['ratio_ms_vs_accel']):>11}"
                     f"{_fmt(r['ratio_j_vs_accel']):>11}  {r['kind']}")
    lines.append("")
    for i, r in enumerate(comp["rows"]):
        lines.append(f"[{i}] {r['name']}: {r['label']}"
                     + (f"; energy {r['energy_note']}" if r.get("energy_note") else ""))
    a = comp["accelerator"]
    lines.append(f"accelerator: {a['watts']:.2f} W (band {a['watts_band'][0]:.1f}-{a['watts_band'][1]:.1f}), "
                 f"{a['ms_per_image']:.3f} ms, {a['j_per_image']:.4f} J/image (band "
                 f"{a['j_per_image_band'][0]:.3f}-{a['j_per_image_band'][1]:.3f}); static {a['static_w']:.2f} W "
                 f"(fitted on Edge-MoE), dynamic {a['dynamic_w']:.2f} W, DRAM {a['dram_w']:.2f} W "
                 f"({a['dram_bytes'] / 1e6:.2f} MB/image); routing: {comp['routing']}")
    return "\n".join(lines)


def run(args) -> int:
    from edgemoe.hw.config import get_hw_preset
    from edgemoe.model.config import get_preset
    from edgemoe.quant.config import get_quant_preset
    try:
        cfg, q, hw = get_preset(args.preset), get_quant_preset(args.quant), get_hw_preset(args.hw)
        comp = comparison(cfg, q, hw, args.task, args.routing, args.rtl_json, args.gpu_json,
                          not args.no_cpu, args.cpu_iters, args.threads, not args.no_reference)
    except (ValueError, FileNotFoundError) as e:
        print(f"edgemoe energy: error: {e}")
        return 2
    print(format_table(comp))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(comp, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0
