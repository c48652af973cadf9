"""`make bench`: benchmarks that print figures (speed and quality targets live here, not in
timed tests). Each bench is a function returning a JSON-able dict; `--only NAME` runs one;
results are also written to out/bench/bench.json.

Add a bench: write a function `bench_<name>() -> dict` here (or import one) and list it in BENCHES.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def bench_golden(preset: str = "edge-moe", reps: int = 3) -> dict:
    """Golden fixed-point forward, seconds per image (target: < 5 s for edge-moe)."""
    import numpy as np
    from edgemoe.model.config import get_preset
    from edgemoe.model.m3vit import M3ViT
    from edgemoe.quant.config import QUANT_PRESETS
    from edgemoe.quant.golden import GoldenModel
    from edgemoe.quant.qweights import quantize_weights

    cfg = get_preset(preset)
    sd = M3ViT(cfg, seed=0).state_dict()
    img = np.random.default_rng(0).random((cfg.in_chans, cfg.img_h, cfg.img_w))
    out = {}
    for qname, q in QUANT_PRESETS.items():
        gm = GoldenModel(cfg, q, quantize_weights(cfg, q, sd))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            gm.forward(img, 0)
            times.append(time.perf_counter() - t0)
        out[qname] = {"seconds_per_image_median": sorted(times)[len(times) // 2]}
        print(f"golden {preset} {qname}: {out[qname]['seconds_per_image_median']:.2f} s/image (median of {reps})")
    return out


def bench_approx() -> dict:
    """Approximator errors against float64 on dense grids."""
    from edgemoe.quant.approx import approx_error_table
    from edgemoe.quant.config import QUANT_PRESETS
    out = {}
    for qname, q in QUANT_PRESETS.items():
        t = approx_error_table(q)
        out[qname] = t
        flat = {k: v for k, v in t.items() if isinstance(v, (int, float))}
        print(f"approximators ({qname}): " + ", ".join(f"{k}={v:.3g}" for k, v in flat.items()))
    return out


def bench_cpu_baseline(preset: str = "edge-moe") -> dict:
    """Float backbone on this CPU (batch 1 and 8)."""
    from edgemoe.sim.cmd_bench import format_result, measure
    out = {}
    for b in (1, 8):
        r = measure(preset, "cpu", "fp32", b, iters=20)
        print(format_result(r))
        out[f"batch{b}"] = r
    return out


def bench_rtl(preset: str = "edge-moe", reuse: str = "out/sim-full/simulate.json",
              quant: str = "edge-moe-fixed", hw_name: str | None = None, fast: bool = False) -> dict:
    """Measured in the RTL simulation of the whole accelerator (sim/rtl_sim.py): per layer type,
    cycles (RTL vs cycle model) and utilisation = useful MACs / (lanes x measured cycles) of the
    unit that runs it (MAC array T_in*T_out; attention engine P*head_dim). Reuses the JSON of
    `make sim-full` when present (it takes ~10 min to build and simulate), else runs one task."""
    from edgemoe.hw.config import get_hw_preset
    from edgemoe.quant.config import get_quant_preset
    path = Path(reuse)
    rep = json.loads(path.read_text()) if preset == "edge-moe" and path.exists() else None
    if rep is not None and (rep["quant"], rep["hw"]) != (quant, hw_name or "zcu102-16x16"):
        rep = None                         # another design's run: not these figures
    if rep is not None:
        src = f"{path} (reused)"
    else:
        from edgemoe.model.config import get_preset
        from edgemoe.quant.compiler import compile_program, synthetic_state_dict
        from edgemoe.quant.qweights import quantize_weights
        from edgemoe.sim.rtl_sim import simulate
        cfg, q = get_preset(preset), get_quant_preset(quant)
        hw = get_hw_preset(hw_name or ("zcu102-16x16" if preset != "tiny" else "small-8x8"))
        prog = compile_program(cfg, q, hw, quantize_weights(cfg, q, synthetic_state_dict(cfg)))
        rep = simulate(prog, [cfg.tasks[0]], out_dir=f"out/bench/rtl_{preset}_{hw.name}", fast=fast)
        src = "fresh simulation"
    out = {"source": src, "hw": rep["hw"], "tasks": {}}
    for task, r in rep["tasks"].items():
        print(f"RTL {rep['model']} / {rep['hw']} task {task} ({src}): {r['cycles']:,} cycles = "
              f"{r['ms']:.2f} ms at {rep['clock_mhz']:g} MHz, bit-exact {r['bit_exact']}, cycle model "
              f"{r['model_error']:+.2%}, MAC-array utilisation {r['mac_array_utilisation']:.3f}")
        for t, d in r["breakdown"]["per_type"].items():
            if d.get("macs"):
                print(f"  {('attention' if t == 'qk' else t):<12} {d['rtl']:>10,} cycles  "
                      f"{d['macs'] / 1e6:>8.1f} MMAC  utilisation {d['utilisation']:.3f} "
                      f"(of {d['peak_macs_per_cycle']} MACs/cycle)")
        print(f"  where the cycles go (cycle model split, RTL total {r['cycles']:,}):")
        for t, d in r.get("model_split", {}).items():
            tot = sum(d.values()) or 1
            print(f"  {t:<12} compute {d['compute']:>9,}  DRAM wait {d['dram_wait']:>8,}  "
                  f"overhead {d['overhead']:>7,}  ({d['dram_wait'] / tot:.0%} waiting on DRAM)")
        out["tasks"][task] = {"cycles": r["cycles"], "ms": r["ms"], "per_type": r["breakdown"]["per_type"],
                              "model_split": r.get("model_split"),
                              "mac_array_utilisation": r["mac_array_utilisation"]}
    return out


def bench_rtl_w8() -> dict:
    """The 8-bit-weight designs (issue 12): edge-moe / w8a16-channel on zcu102-w8-32x32,
    zcu102-w8-64x16 and zcu102-w8-64x16-stream in RTL (reuses `make sim-full-w8 [W8_HW=...]`'s
    JSON, else one task on the fast path), against the targets."""
    out = {}
    for hw, path in (("zcu102-w8-32x32", "out/sim-full-w8/simulate.json"),
                     ("zcu102-w8-64x16", "out/sim-full-w8-zcu102-w8-64x16/simulate.json"),
                     ("zcu102-w8-64x16-stream", "out/sim-full-w8-zcu102-w8-64x16-stream/simulate.json")):
        res = out[hw] = bench_rtl("edge-moe", path, "w8a16-channel", hw, fast=True)
        for task, r in res["tasks"].items():
            print(f"targets, {hw} task {task}: cycles {r['cycles']:,} <= 1,200,000: {r['cycles'] <= 1_200_000}; "
                  f"MAC-array utilisation {r['mac_array_utilisation']:.3f} >= 0.85: "
                  f"{r['mac_array_utilisation'] >= 0.85}")
    return out


def _speed(rep: dict) -> dict:
    """Cycles per second of a simulate() report: warm = simulated cycles over the tasks' own
    simulation seconds; cold = the same cycles over build (a cold one, when recorded) + simulation."""
    cyc = sum(r["cycles"] for r in rep["tasks"].values())
    sim = sum(r["wall_s"] for r in rep["tasks"].values())
    build = rep.get("cold_build_s") or rep.get("build_s") or 0.0
    return {"cycles": cyc, "sim_s": round(sim, 2), "build_s": round(build, 1),
            "warm_cycles_per_s": round(cyc / sim) if sim else None,
            "cold_cycles_per_s": round(cyc / (sim + build)) if sim + build else None}


def bench_fast_sim(preset: str = "edge-moe", cocotb_json: str = "out/sim-full/simulate.json",
                   out: str = "out/bench") -> dict:
    """The fast RTL path (sim/fast_sim.py) against the cocotb one: both on the tiny preset side by
    side in this run, and the fast path on `preset` (both tasks) next to the cocotb figures of
    `make sim-full`'s JSON when present (that run takes ~15 min, so it is not repeated here)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from edgemoe.hw.config import get_hw_preset
    from edgemoe.model.config import get_preset
    from edgemoe.quant.compiler import compile_program, synthetic_state_dict
    from edgemoe.quant.config import get_quant_preset
    from edgemoe.quant.qweights import quantize_weights
    from edgemoe.sim.rtl_sim import simulate
    q = get_quant_preset("edge-moe-fixed")
    res = {}
    runs = [("tiny", get_hw_preset("small-8x8").replace(act_buffer_tokens=16), (False, True)),
            (preset, get_hw_preset("zcu102-16x16"), (True,))]
    for name, hw, paths in runs:
        cfg = get_preset(name)
        prog = compile_program(cfg, q, hw, quantize_weights(cfg, q, synthetic_state_dict(cfg, 0)))
        for fast in paths:
            key = f"{name}/{'fast' if fast else 'cocotb'}"
            rep = simulate(prog, out_dir=f"{out}/fast_sim_{name}_{'fast' if fast else 'cocotb'}", fast=fast)
            res[key] = {**_speed(rep), "bit_exact": all(r["bit_exact"] for r in rep["tasks"].values())}
    ref = Path(cocotb_json)
    if ref.exists():
        rep = json.loads(ref.read_text())
        res[f"{preset}/cocotb"] = {**_speed(rep), "source": str(ref)}
    for k, v in res.items():
        print(f"{k:<22} {v['cycles']:>11,} cycles  sim {v['sim_s']:>8.1f} s  build {v['build_s']:>6.1f} s  "
              f"warm {v['warm_cycles_per_s'] or 0:>9,} cycles/s  cold {v['cold_cycles_per_s'] or 0:>9,} cycles/s")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(res)
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [res[n]["warm_cycles_per_s"] or 0 for n in names], 0.4, label="warm (built)")
    ax.bar([i + 0.2 for i in x], [res[n]["cold_cycles_per_s"] or 0 for n in names], 0.4, label="cold (with build)")
    ax.set_xticks(list(x), names, rotation=20, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("simulated cycles / s")
    ax.set_title("whole-accelerator RTL simulation speed: cocotb vs Verilator C++ harness")
    ax.legend()
    fig.tight_layout()
    Path(out).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(out) / "fast_sim.png", dpi=110)
    plt.close(fig)
    return res


def bench_fast_sim_flags(preset: str = "edge-moe", out: str = "out/bench") -> dict:
    """Verilator options on the fast path: one task of `preset` on zcu102-16x16 / edge-moe-fixed
    per option set (a build each, ~35 s, removed after unless it is the kept default)."""
    import shutil
    import numpy as np
    from edgemoe.hw.accel import Accelerator
    from edgemoe.hw.config import get_hw_preset
    from edgemoe.model.config import get_preset
    from edgemoe.quant.compiler import compile_program, synthetic_state_dict
    from edgemoe.quant.config import get_quant_preset
    from edgemoe.quant.qweights import quantize_weights
    from edgemoe.sim import fast_sim
    from edgemoe.sim.runner import export_verilog
    cfg, q, h = get_preset(preset), get_quant_preset("edge-moe-fixed"), get_hw_preset("zcu102-16x16")
    v = export_verilog(Accelerator(cfg, q, h), "edgemoe_accel")
    prog = compile_program(cfg, q, h, quantize_weights(cfg, q, synthetic_state_dict(cfg, 0)))
    img = np.random.default_rng(1).normal(0, 1, size=(cfg.in_chans, cfg.img_h, cfg.img_w)).astype(np.float32)
    task = cfg.tasks[0]
    variants = [("no options, OPT_FAST=-O2", (), "-O2"), ("no options, OPT_FAST=-Os", (), "-Os"),
                ("-O3", ("-O3",), "-O2"),
                ("--x-assign fast --x-initial fast", ("--x-assign", "fast", "--x-initial", "fast"), "-O2"),
                ("--threads 2", ("--threads", "2"), "-O2")]
    res = {}
    for name, flags, opt in variants:
        b, _, k = fast_sim.build(v, flags, opt)
        t0 = time.perf_counter()
        r = fast_sim.run(b, k, prog, [task], img, Path(out) / "fast_sim_flags")["tasks"][task]
        s = time.perf_counter() - t0
        stamp = json.loads((b.parent / fast_sim._STAMP).read_text())
        res[name] = {"build_s": round(stamp["build_s"], 1), "sim_s": round(s, 1), "cycles": r["cycles"],
                     "cycles_per_s": round(r["sim_cycles"] / s)}
        print(f"{name:<36} build {res[name]['build_s']:>6.1f} s  sim {s:>6.1f} s  "
              f"{res[name]['cycles_per_s']:>8,} cycles/s  ({r['cycles']:,} cycles)", flush=True)
        if (tuple(flags), opt) != (fast_sim.VERILATOR_FLAGS, fast_sim.OPT_FAST):
            shutil.rmtree(b.parent, ignore_errors=True)
    return res


def bench_w8a8(preset: str = "edge-moe") -> dict:
    """Issue 12's w8a8 question: 8-bit activations (quant.report.w8a8_variant, act fraction
    swept) on seeded and, where ../shared has them, trained weights; the Cityscapes image."""
    from edgemoe.model.checkpoint import default_edge_moe_dir
    from edgemoe.model.config import get_preset
    from edgemoe.model.images import load_image
    from edgemoe.quant.report import load_weights, w8a8_study
    cfg = get_preset(preset)
    x, desc = load_image(cfg)
    kinds = ["seeded"] + (["edge-moe-bin"] if preset == "edge-moe" and default_edge_moe_dir().exists() else [])
    out = {}
    for kind in kinds:
        r = w8a8_study(cfg, load_weights(cfg, kind), x[0].numpy(), desc)
        for v in r["variants"]:
            print(f"{kind:>13}  act {v['act']}: final cosine {v['final_cosine_min']:.4f}, saturated "
                  f"{v['saturated']:>6}, routing changed {v['routing_changed']:.1%}")
        print(f"{kind:>13}  best act {r['best']['act']}: cosine {r['best']['final_cosine_min']:.4f} "
              f"{'>=' if r['reaches_target'] else '<'} {r['target_cosine']}")
        out[kind] = r
    return out


def bench_fidelity(preset: str = "edge-moe", quants=("w8a16-channel", "w8a16-gptq")) -> dict:
    """Issue 12's fidelity targets for the 8-bit-weight presets (nearest against GPTQ codes), and
    each refitted to the weights (quant.calibrate.fit_channel_formats, "-fit"), on seeded and,
    where ../shared has them, trained weights; the Cityscapes image, both tasks: final cosine
    >= 0.999, tokens whose top-k set changes <= 0.5 %."""
    from edgemoe.model.checkpoint import default_edge_moe_dir
    from edgemoe.model.config import get_preset
    from edgemoe.model.images import load_image
    from edgemoe.quant.calibrate import calibration_images, fit_channel_formats
    from edgemoe.quant.channel import CALIB_SYNTHETIC
    from edgemoe.quant.config import get_quant_preset
    from edgemoe.quant.report import load_weights, quant_report
    cfg = get_preset(preset)
    x, desc = load_image(cfg)
    kinds = ["seeded"] + (["edge-moe-bin"] if preset == "edge-moe" and default_edge_moe_dir().exists() else [])
    held_out, _ = calibration_images(cfg, synthetic=CALIB_SYNTHETIC, eval_image=False)
    out = {}
    for kind in kinds:
        w = load_weights(cfg, kind)
        fitted = [fit_channel_formats(cfg, get_quant_preset(qn), w.state_dict, held_out, name=f"{qn}-fit")[0]
                  for qn in quants]
        rep = quant_report(cfg, w, [*quants, *fitted], x[0].numpy(), desc)
        out[kind] = {}
        for qn, p in rep["presets"].items():
            sm = p["summary"]
            frac = sm["routing_changed_tokens"] / max(1, sm["routing_tokens"])
            sq = [r["final"]["sqnr_db"] for r in p["runs"]]
            out[kind][qn] = {"final_cosine_min": sm["final_cosine_min"], "final_sqnr_db": sq,
                             "routing_changed": frac, "weights_saturated": p["weights_saturated_total"],
                             "router_weights_only": sm["routing_changed_router_weights_only"],
                             "router_input_only": sm["routing_changed_router_input_only"],
                             "weight_groups": sm["routing_changed_weight_groups"],
                             "formats": {k: p["formats"][k] for k in ("act", "gate_logit", "ln_gamma")}}
            print(f"{kind:>13}  {qn:<18} act {p['formats']['act']}, gate_logit {p['formats']['gate_logit']}: "
                  f"final cosine {sm['final_cosine_min']:.6f} (>= 0.999: "
                  f"{sm['final_cosine_min'] >= 0.999}), SQNR {' / '.join(f'{v:.1f}' for v in sq)} dB, "
                  f"routing changed {sm['routing_changed_tokens']}/{sm['routing_tokens']} = {frac:.2%} "
                  f"(<= 0.5 %: {frac <= 0.005}; router weights only {sm['routing_changed_router_weights_only']}, "
                  f"input only {sm['routing_changed_router_input_only']}), weight codes saturated "
                  f"{p['weights_saturated_total']}; float with one weight group quantised: "
                  + ", ".join(f"{g} {n}" for g, n in sm["routing_changed_weight_groups"].items()))
    return out


def bench_data() -> dict:
    """Synthetic scene generation speed at 128x256."""
    from edgemoe.model.data import bench_data as bd
    return {"samples_per_minute_128x256": bd()}


BENCHES = {"golden": bench_golden, "approx": bench_approx, "cpu": bench_cpu_baseline, "data": bench_data,
           "rtl": bench_rtl, "rtl_w8": bench_rtl_w8, "fast_sim": bench_fast_sim,
           "fast_sim_flags": bench_fast_sim_flags, "w8a8": bench_w8a8, "fidelity": bench_fidelity}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", choices=sorted(BENCHES))
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args(argv)
    results = {}
    for name in args.only or BENCHES:
        print(f"\n=== bench {name} ===", flush=True)
        results[name] = BENCHES[name]()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwrote {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
