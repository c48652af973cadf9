"""Full-inference RTL simulation of the accelerator top (hw/accel.py) and its report.

simulate(program, tasks, image, ...) exports the top for the program's configs, builds it with
Verilator (cached, sim/runner.py), runs sim/tb_accel.py (host driver over AXI4-Lite, DRAM model
behind the AXI4 master) and returns, per task: bit-exactness against the Python executor
(= golden model), cycles from START to DONE (the CYCLE_COUNT register), latency at the HWConfig
clock, DRAM bytes, saturations, instructions, the per-instruction cycles (from the top's
`retire` pulses) summed per layer type next to the cycle model (sim/perf_model.py, same
routing), MAC-array utilisation, and wall times. A progress bar follows the retired
instructions while it runs.
"""
from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edgemoe.sim.perf_model import CYCLE_TYPES, _linear_type


def instr_type(name: str) -> str:
    """Layer type (sim.perf_model.CYCLE_TYPES) of a compiled instruction's name."""
    leaf = name.split(".")[-1]
    if name == "store" or leaf == "tap":
        return "store"
    if name.startswith("embed."):
        return "embed"
    if leaf in ("norm1", "norm2"):
        return "layernorm"
    if leaf == "attn":
        return "attention"
    if leaf == "gate":
        return "gate"
    if leaf in ("experts", "end") or name == "end":
        return "control"
    return _linear_type(name)


def routing_of(program, golden_stats) -> dict:
    """The interpreter's routing (GATE pc -> topk_idx) as perf_model's {block: {"topk_idx"}}."""
    out = {}
    for pc, idx in golden_stats.routing.items():
        out[int(program.names[pc].split(".")[1])] = {"topk_idx": np.asarray(idx)}
    return out


def breakdown(program, task_result: dict, model: dict) -> dict:
    """Per layer type: RTL cycles (retire-to-retire, each instruction with its own fetch; the
    EXPERT_LOOP fetch goes to the first expert's fc1, END's to the total only) vs the model."""
    rows = []
    prev = task_result["start_cycle"]
    for pc, expert, cyc in task_result["trace"]:
        rows.append({"pc": pc, "name": program.names[pc], "expert": expert, "cycles": cyc - prev})
        prev = cyc
    rtl = {}
    for r in rows:
        t = instr_type(r["name"])
        t = "qk" if t == "attention" else t          # the model splits attention into qk + av
        rtl[t] = rtl.get(t, 0) + r["cycles"]
    bt = model["by_type"]
    mod = {t: d["cycles"] for t, d in bt.items()}
    macs = {t: d["macs"] for t, d in bt.items()}
    peak = {t: d["peak_macs_per_cycle"] for t, d in bt.items()}
    if "av" in mod:      # one attention row, against both lane sets (QK and AV side by side)
        mod["qk"] = mod.get("qk", 0) + mod.pop("av")
        macs["qk"] = macs.get("qk", 0) + macs.pop("av")
        peak["qk"] = peak.pop("av")
    mod["control"] = mod.get("control", 0)
    types = [t for t in CYCLE_TYPES if t in rtl or t in mod]
    table = {}
    for t in types:
        d = {"rtl": rtl.get(t, 0), "model": mod.get(t, 0), "macs": int(macs.get(t, 0)),
             "peak_macs_per_cycle": int(peak.get(t, 0))}
        # useful MACs / (lanes x measured cycles) of the unit that runs the layer type
        d["utilisation"] = d["macs"] / (d["peak_macs_per_cycle"] * d["rtl"]) if d["macs"] and d["rtl"] else 0.0
        table[t] = d
    return {"per_type": table, "per_instruction": rows}


def format_table(task: str, r: dict) -> str:
    lines = [f"{'layer type':<12}{'RTL cycles':>12}{'model':>12}{'diff':>8}{'MAC util':>10}"]
    for t, d in r["breakdown"]["per_type"].items():
        name = "attention" if t == "qk" else t
        diff = (d["model"] - d["rtl"]) / d["rtl"] if d["rtl"] else 0.0
        util = f"{d['utilisation']:>10.3f}" if d.get("macs") else ""
        lines.append(f"{name:<12}{d['rtl']:>12,}{d['model']:>12,}{diff:>8.1%}{util}")
    lines.append(f"{'total':<12}{r['cycles']:>12,}{r['model_cycles']:>12,}{r['model_error']:>8.1%}")
    return "\n".join(lines)


def _progress(path: Path, total: int, stop: threading.Event, desc: str):
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit="instr")
    seen = 0
    while not stop.is_set():
        time.sleep(0.5)
        try:
            n = sum(1 for _ in open(path))
        except FileNotFoundError:
            continue
        if n > seen:
            bar.update(n - seen)
            seen = n
    bar.close()


def simulate(program, tasks=None, image=None, out_dir=None, latency_cycles=None,
             beats_per_cycle=None, simulator="verilator", timeout_s=3600, progress=True,
             intermediates=False, verilog: str | None = None, fast: bool = False) -> dict:
    """Run the whole-inference RTL simulation (module docstring). image: float [C,H,W] (default:
    the seeded random image of sim/tb_accel.py). intermediates: run quant.compiler.debug_program
    instead (a STORE after every layer) and compare every stored intermediate tensor; its
    cycles include those STOREs. verilog: the top's Verilog for these configs when the caller
    has it already (edgemoe.Design keeps it), instead of elaborating it again. fast: run the
    Verilator C++ harness of sim/fast_sim.py instead of cocotb (same results, ~10x faster)."""
    from edgemoe.hw.accel import Accelerator
    from edgemoe.quant.interpreter import run_program
    from edgemoe.sim.perf_model import inference_cycles
    from edgemoe.sim.runner import run_cocotb

    cfg, q, hw = program.cfg, program.qcfg, program.hwcfg
    if fast:
        from edgemoe.sim.fast_sim import check_options
        check_options(simulator, hw)
    taps = []
    if intermediates:
        from edgemoe.quant.compiler import debug_program
        program, taps = debug_program(program, hw.t_in)
    tasks = [cfg.tasks[cfg.task_index(t)] for t in (tasks or cfg.tasks)]
    out = (Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="edgemoe-sim-"))).resolve()  # the simulator runs elsewhere
    out.mkdir(parents=True, exist_ok=True)
    prog_dir = program.save(out / "program")
    conf = {"program": str(prog_dir), "tasks": tasks,
            "taps": [{"name": t.name, "offset": t.offset, "rows": t.rows, "k": t.k} for t in taps]}
    if image is not None:
        np.save(out / "image.npy", np.asarray(image, np.float32))
        conf["image"] = str(out / "image.npy")
    else:
        rng = np.random.default_rng(1)
        image = rng.normal(0, 1, size=(cfg.in_chans, cfg.img_h, cfg.img_w)).astype(np.float32)
    if latency_cycles is not None:
        conf["latency_cycles"] = int(latency_cycles)
    if beats_per_cycle is not None:
        conf["beats_per_cycle"] = float(beats_per_cycle)
    gold = {t: run_program(program, image, t) for t in tasks}
    expected_retires = sum(sum(1 for e in g.stats.trace if e.op not in ("END", "EXPERT_LOOP"))
                           for g in gold.values())
    prog_file = out / "progress.txt"
    prog_file.unlink(missing_ok=True)
    conf["progress"] = str(prog_file)
    stop = threading.Event()
    th = None
    if progress:
        th = threading.Thread(target=_progress, args=(prog_file, expected_retires, stop,
                                                      f"RTL {cfg.name}/{hw.name}"), daemon=True)
        th.start()
    t0 = time.perf_counter()
    try:
        if fast:
            from edgemoe.sim.fast_sim import run_fast
            from edgemoe.sim.runner import export_verilog
            res = run_fast(verilog or export_verilog(Accelerator(cfg, q, hw), "edgemoe_accel"), program, tasks,
                           image, gold, taps, out, latency_cycles, beats_per_cycle,
                           prog_file if progress else None, timeout_s=timeout_s)
        else:
            res = run_cocotb(verilog or Accelerator(cfg, q, hw), "edgemoe_accel", "edgemoe.sim.tb_accel",
                             simulator=simulator, tb_config=conf, timeout_s=timeout_s)
    finally:
        stop.set()
        if th:
            th.join()
    wall = time.perf_counter() - t0
    report = {"model": cfg.name, "quant": q.name, "hw": hw.name, "hwcfg": hw.to_dict(),
              "clock_mhz": hw.clock_mhz, "simulator": simulator + ("-fast" if fast else ""), "build_s": res.get("build_s"),
              "sim_s": res.get("sim_s"), "cold_build_s": res.get("cold_build_s"), "wall_s": wall, "tasks": {}}
    # the cycle model sees the DRAM the simulation ran with (the beat rate as dram_gbps)
    mhw = hw
    if beats_per_cycle is not None:
        mhw = mhw.replace(dram_gbps=float(beats_per_cycle) * hw.axi_data_bits / 8 * hw.clock_mhz * 1e-3)
    if latency_cycles is not None:
        mhw = mhw.replace(dram_latency_cycles=int(latency_cycles))
    for t in tasks:
        r = res["tasks"][t]
        model = inference_cycles(cfg, q, mhw, routing_of(program, gold[t].stats), routing_source="golden")
        # the MAC array's MACs (attention runs on its own lanes, whatever their count)
        lin_macs = sum(x["macs"] for x in model["layers"] if x["type"] not in ("qk", "av"))
        bd = breakdown(program, r, model)
        rep = {k: r[k] for k in ("cycles", "dram_bytes_read", "dram_bytes_written", "sat_count",
                                 "instructions", "mismatches", "first_mismatch", "elements",
                                 "golden_sat", "golden_instructions", "golden_read", "golden_written",
                                 "wall_s")}
        rep.update(bit_exact=r["mismatches"] == 0, ms=r["cycles"] / (hw.clock_mhz * 1e3),
                   model_cycles=model["totals"]["cycles"],
                   model_error=(model["totals"]["cycles"] - r["cycles"]) / r["cycles"],
                   mac_array_utilisation=lin_macs / (hw.t_in * hw.t_out * r["cycles"]), macs=model["totals"]["macs"],
                   breakdown=bd, model_split={k: {c: d[c] for c in ("compute", "dram_wait", "overhead")}
                                              for k, d in model["by_type"].items()},
                   dram=r.get("dram", {}), intermediates=r.get("taps", []))
        rep["bit_exact"] = rep["bit_exact"] and all(x["mismatches"] == 0 for x in rep["intermediates"])
        report["tasks"][t] = rep
    (out / "simulate.json").write_text(json.dumps(report, indent=1, default=float))
    _plot(report, out / "simulate.png")
    return report


def rtl_features(program, images, tasks=None, out_dir=None, timeout_s=3600) -> dict:
    """Features (act codes [N, tokens, D]) of every image [N,C,H,W] for every task from ONE RTL
    simulation; also {"images_differing": {task: count}} against the Python executor."""
    from edgemoe.hw.accel import Accelerator
    from edgemoe.sim.runner import run_cocotb
    cfg = program.cfg
    tasks = [cfg.tasks[cfg.task_index(t)] for t in (tasks or cfg.tasks)]
    out = (Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="edgemoe-rtl-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "images.npy", np.asarray(images, np.float32))
    conf = {"program": str(program.save(out / "program")), "tasks": tasks,
            "batch": str(out / "images.npy"), "features_out": str(out / "features.npz")}
    res = run_cocotb(Accelerator(cfg, program.qcfg, program.hwcfg), "edgemoe_accel", "edgemoe.sim.tb_accel",
                     tb_config=conf, timeout_s=timeout_s)
    with np.load(out / "features.npz") as f:
        feats = {t: f[t] for t in tasks}
    return {"features": feats, "images_differing": res["images_differing"],
            "build_s": res.get("build_s"), "sim_s": res.get("sim_s")}


def _plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t0 = next(iter(report["tasks"].values()))
    table = t0["breakdown"]["per_type"]
    names = ["attention" if t == "qk" else t for t in table]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(x - 0.2, [d["rtl"] for d in table.values()], 0.4, label="RTL (measured)")
    ax.bar(x + 0.2, [d["model"] for d in table.values()], 0.4, label="cycle model")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("cycles per image")
    ax.set_title(f"{report['model']} / {report['hw']}: {t0['cycles']:,} cycles = {t0['ms']:.2f} ms "
                 f"at {report['clock_mhz']:g} MHz")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
