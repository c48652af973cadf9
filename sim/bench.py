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


def bench_rtl(preset: str = "edge-moe", reuse: str = "out/sim-full/simulate.json") -> dict:
    """Measured in the RTL simulation of the whole accelerator (sim/rtl_sim.py): per layer type,
    cycles (RTL vs cycle model) and utilisation = useful MACs / (lanes x measured cycles) of the
    unit that runs it (MAC array T_in*T_out; attention engine P*head_dim). Reuses the JSON of
    `make sim-full` when present (it takes ~10 min to build and simulate), else runs one task."""
    from edgemoe.hw.config import get_hw_preset
    from edgemoe.quant.config import get_quant_preset
    path = Path(reuse)
    if preset == "edge-moe" and path.exists():
        rep = json.loads(path.read_text())
        src = f"{path} (make sim-full)"
    else:
        from edgemoe.model.config import get_preset
        from edgemoe.quant.compiler import compile_program, synthetic_state_dict
        from edgemoe.quant.qweights import quantize_weights
        from edgemoe.sim.rtl_sim import simulate
        cfg, q = get_preset(preset), get_quant_preset("edge-moe-fixed")
        hw = get_hw_preset("zcu102-16x16" if preset != "tiny" else "small-8x8")
        prog = compile_program(cfg, q, hw, quantize_weights(cfg, q, synthetic_state_dict(cfg)))
        rep = simulate(prog, [cfg.tasks[0]], out_dir=f"out/bench/rtl_{preset}")
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
        out["tasks"][task] = {"cycles": r["cycles"], "ms": r["ms"], "per_type": r["breakdown"]["per_type"]}
    return out


def bench_data() -> dict:
    """Synthetic scene generation speed at 128x256."""
    from edgemoe.model.data import bench_data as bd
    return {"samples_per_minute_128x256": bd()}


BENCHES = {"golden": bench_golden, "approx": bench_approx, "cpu": bench_cpu_baseline, "data": bench_data,
           "rtl": bench_rtl}


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
