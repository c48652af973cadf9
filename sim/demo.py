"""`make demo`: the main job end to end on the built-in preset.

Stages (each prints what it did and where its outputs are):
  1. float M3ViT (edge-moe preset; the trained Edge-MoE weights from ../shared when present,
     experts seeded random, else seeded weights) on a real image, both tasks -> PNG
  2. workload profile (MACs, parameters, bytes, expert routing on this image)
  3. CPU baseline of the float backbone (measured here)
  4. golden fixed-point model (edge-moe-fixed) vs float on the same image, both tasks
  5. compiled accelerator program run by the host driver on the Python machine model:
     bit-exact against the golden model; DRAM bytes; cycle-model latency and energy (estimates)
  6. the tiny preset (shipped trained checkpoint) through the RTL accelerator top under cocotb +
     Verilator, both tasks: bit-exact against the golden model, cycles vs the cycle model
  7. the shipped trained tiny checkpoint: task metrics float vs golden (edge-moe-fixed, w8a16)
  8. the report folder (JSON + PNGs + report.md)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _stage(title):
    print(f"\n=== {title} ===", flush=True)


def float_outputs(cfg, model, x, out: Path, desc: str) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    with torch.no_grad():
        outs = model.forward_all(x)
    seg = outs["semseg"][0].argmax(0).numpy() if "semseg" in outs else None
    depth = outs["depth"][0, 0].numpy() if "depth" in outs else None
    fig, ax = plt.subplots(1, 3, figsize=(12, 2.6))
    ax[0].imshow(x[0].permute(1, 2, 0).clamp(0, 1).numpy())
    ax[0].set_title("input")
    if seg is not None:
        ax[1].imshow(seg, cmap="tab20", interpolation="nearest")
        ax[1].set_title("semseg (argmax)")
    if depth is not None:
        im = ax[2].imshow(depth, cmap="magma")
        ax[2].set_title("depth")
        fig.colorbar(im, ax=ax[2], fraction=0.025)
    for a in ax:
        a.axis("off")
    flag = getattr(model, "filled_random", None)
    fig.suptitle(f"{cfg.name}: {desc}" + ("  [RANDOM WEIGHTS IN PART]" if flag else ""), fontsize=9)
    fig.tight_layout()
    png = out / "float_outputs.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"input: {desc}")
    for k, v in outs.items():
        print(f"task {k}: output {tuple(v.shape)}, range [{v.min():.3f}, {v.max():.3f}]")
    print(f"wrote {png}")
    return {"png": str(png), "tasks": {k: list(v.shape) for k, v in outs.items()}}


def golden_stage(cfg, model, x) -> dict:
    import numpy as np
    import torch
    from edgemoe.quant.config import get_quant_preset
    from edgemoe.quant.golden import GoldenModel
    from edgemoe.quant.qweights import quantize_weights

    q = get_quant_preset("edge-moe-fixed")
    gm = GoldenModel(cfg, q, quantize_weights(cfg, q, model.state_dict()))
    out = {}
    for t, name in enumerate(cfg.tasks):
        t0 = time.perf_counter()
        r = gm.forward(x[0].numpy(), t)
        dt = time.perf_counter() - t0
        with torch.no_grad():
            f = model.forward_features(x, t)[0].double().numpy()
        g = q.act.dequantize(r.features)
        cos = float((g * f).sum() / np.linalg.norm(g) / np.linalg.norm(f))
        sqnr = float(10 * np.log10((f ** 2).sum() / ((g - f) ** 2).sum()))
        out[name] = {"cosine": cos, "sqnr_db": sqnr, "max_abs_err": float(np.abs(g - f).max()),
                     "saturated": r.sat.saturated(), "seconds": dt}
        print(f"task {name}: golden vs float cosine {cos:.7f}, SQNR {sqnr:.1f} dB, "
              f"max |err| {out[name]['max_abs_err']:.2e}, saturations {r.sat.saturated()}, {dt:.2f} s")
    return out


def accelerator_stage(cfg, model, x) -> dict:
    import numpy as np
    from edgemoe.hw.config import get_hw_preset
    from edgemoe.quant.compiler import compile_program
    from edgemoe.quant.config import get_quant_preset
    from edgemoe.quant.golden import GoldenModel
    from edgemoe.quant.qweights import quantize_weights
    from edgemoe.sim.driver import PythonBackend
    from edgemoe.sim.energy import energy_estimate
    from edgemoe.sim.perf_model import inference_cycles

    q, hw = get_quant_preset("edge-moe-fixed"), get_hw_preset("zcu102-16x16")
    qw = quantize_weights(cfg, q, model.state_dict())
    prog = compile_program(cfg, q, hw, qw)
    drv = PythonBackend.for_program(prog).driver()
    drv.load(prog)
    gm = GoldenModel(cfg, q, qw, hw.attn_p)
    out = {"program_instructions": len(prog.instrs), "image_bytes": prog.image_bytes}
    print(f"program: {len(prog.instrs)} instructions, memory image {prog.image_bytes / 1e6:.1f} MB")
    for t, name in enumerate(cfg.tasks):
        r = drv.run(x[0].numpy(), t)
        g = gm.forward(x[0].numpy(), t)
        exact = bool(np.array_equal(r.features, g.features))
        if not exact:
            raise SystemExit(f"demo: task {name}: driver output differs from the golden model")
        perf = inference_cycles(cfg, q, hw, g.routing, routing_source=f"golden routing, task {name}")
        en = energy_estimate(cfg, q, hw, perf=perf)
        out[name] = {"bit_exact_vs_golden": exact, "dram_bytes_read": r.dram_bytes_read,
                     "cycles_estimate": perf["totals"]["cycles"], "ms_estimate": perf["totals"]["ms"],
                     "mac_utilisation_estimate": perf["totals"]["mac_utilisation"],
                     "energy_estimate": {k: en[k] for k in ("label", "watts", "j_per_image", "j_per_image_band")}}
        print(f"task {name}: bit-exact vs golden: {exact}; DRAM read {r.dram_bytes_read / 1e6:.2f} MB")
        print(f"  ESTIMATE (cycle model, golden routing): {perf['totals']['cycles']:,} cycles = "
              f"{perf['totals']['ms']:.2f} ms at {hw.clock_mhz:.0f} MHz, MAC utilisation "
              f"{perf['totals']['mac_utilisation']:.2f}; {en['watts']:.1f} W, {en['j_per_image']:.3f} J/image "
              f"(+-{en['uncertainty']:.0%})")
    return out


def rtl_stage(ckpt: str, out: Path) -> dict:
    """The tiny preset (trained checkpoint when present) through the RTL accelerator top under
    cocotb + Verilator, both tasks, bit-exact against the golden model."""
    from edgemoe.hw.config import get_hw_preset
    from edgemoe.model.checkpoint import load_checkpoint
    from edgemoe.model.config import get_preset
    from edgemoe.quant.compiler import compile_program, synthetic_state_dict
    from edgemoe.quant.config import get_quant_preset
    from edgemoe.quant.qweights import quantize_weights
    from edgemoe.sim.rtl_sim import format_table, simulate
    q = get_quant_preset("edge-moe-fixed")
    hw = get_hw_preset("small-8x8").replace(act_buffer_tokens=16)   # tiny: 9 tokens
    if Path(ckpt).exists():
        cfg, sd, _ = load_checkpoint(ckpt)
        desc = f"trained checkpoint {ckpt}"
    else:
        cfg = get_preset("tiny")
        sd, desc = synthetic_state_dict(cfg), "synthetic weights"
    from edgemoe.model.data import make_batch, split_seeds
    img = make_batch(split_seeds("test", 1), cfg.img_h, cfg.img_w)[0][0]     # a test-split scene
    prog = compile_program(cfg, q, hw, quantize_weights(cfg, q, sd))
    print(f"tiny / {q.name} / {hw.name} ({desc}): {len(prog.instrs)} instructions")
    rep = simulate(prog, list(cfg.tasks), img, out / "rtl_tiny")
    res = {"weights": desc, "hw": hw.name, "build_s": rep["build_s"], "wall_s": rep["wall_s"]}
    for t, r in rep["tasks"].items():
        print(f"task {t}: RTL {'BIT-EXACT' if r['bit_exact'] else 'MISMATCH'} vs golden; {r['cycles']:,} cycles "
              f"({r['ms']:.3f} ms at {hw.clock_mhz:g} MHz), cycle model {r['model_error']:+.2%}, DRAM read "
              f"{r['dram_bytes_read']:,} B, simulated in {r['wall_s']:.1f} s")
        print(format_table(t, r))
        if not r["bit_exact"]:
            raise SystemExit(f"demo: RTL task {t} differs from the golden model: {r['first_mismatch']}")
        res[t] = {k: r[k] for k in ("bit_exact", "cycles", "ms", "model_cycles", "model_error",
                                    "dram_bytes_read", "dram_bytes_written", "sat_count", "wall_s")}
    return res


def trained_stage(ckpt: str, n: int) -> dict:
    from edgemoe.model.evaluate import evaluate_checkpoint, format_report
    if not Path(ckpt).exists():
        print(f"no checkpoint at {ckpt}: skipped")
        return {"skipped": f"no checkpoint at {ckpt}"}
    rep = evaluate_checkpoint(ckpt, quant=("edge-moe-fixed", "w8a16"), n=n)
    print(format_report(rep))
    return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="edge-moe")
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", default="auto", choices=("auto", "seeded", "edge-moe-bin"),
                    help="auto: the trained Edge-MoE weights (experts seeded random) for edge-moe when "
                         "../shared has them, else seeded random weights")
    ap.add_argument("--image", default=None, help="input image (default: shared Cityscapes image, else a sample photo)")
    ap.add_argument("--bench-iters", type=int, default=20)
    ap.add_argument("--ckpt", default=str(Path(__file__).resolve().parent.parent / "checkpoints" / "tiny.pt"))
    ap.add_argument("--eval-n", type=int, default=16, help="test scenes for the trained-checkpoint metrics")
    ap.add_argument("--quick", action="store_true", help="skip the trained-checkpoint and report stages")
    args = ap.parse_args(argv)

    import torch
    from edgemoe.model.config import get_preset
    from edgemoe.model.images import load_image
    from edgemoe.model.profile import routing_profile, summary
    from edgemoe.sim.cmd_bench import format_result, measure

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = get_preset(args.preset)
    report = {"preset": cfg.name}

    from edgemoe.quant.report import load_weights
    w = load_weights(cfg, args.weights, args.seed)
    report["weights"] = w.banner
    _stage(f"1. float M3ViT '{cfg.name}' ({w.banner}), both tasks")
    model = w.model
    x, desc = load_image(cfg, args.image)
    report["float"] = float_outputs(cfg, model, x, out, desc)

    _stage("2. workload profile")
    s = summary(cfg)
    print(f"backbone parameters: {s['backbone_params']:,} ({s['backbone_params'] / 1e6:.2f} M)")
    print(f"MACs per image per task: {s['macs_per_image']:,} ({s['macs_per_image'] / 1e9:.3f} G)")
    with torch.no_grad():
        _, aux = model.forward_features(x, 0, return_aux=True)
    rp = routing_profile(aux, cfg.num_experts)
    for b, r in rp.items():
        print(f"block {b}: {r['active_experts']}/{cfg.num_experts} experts active, max load {r['max_load']} token slots")
    report["profile"] = {"summary": s, "routing_task0": rp}

    _stage("3. CPU baseline (measured on this machine)")
    r = measure(cfg.name, "cpu", "fp32", 1, iters=args.bench_iters, threads=torch.get_num_threads())
    print(format_result(r))
    report["cpu_baseline"] = r

    _stage("4. golden fixed-point model vs float (edge-moe-fixed)")
    report["golden"] = golden_stage(cfg, model, x)

    _stage("5. compiled program on the host driver (Python machine model) + estimates")
    report["accelerator"] = accelerator_stage(cfg, model, x)

    _stage("6. tiny preset through the RTL accelerator (cocotb + Verilator), bit-exact check")
    report["rtl_tiny"] = rtl_stage(args.ckpt, out)

    if not args.quick:
        _stage("7. trained tiny checkpoint: float vs golden task metrics")
        report["trained_tiny"] = trained_stage(args.ckpt, args.eval_n)

        _stage("8. report folder")
        from edgemoe.sim.report import build_report
        build_report(cfg.name, out / "report", quants=("edge-moe-fixed", "w8a16"), cpu_iters=5)
        print(f"wrote {out / 'report'}/report.md")

    rep = out / "demo.json"
    rep.write_text(json.dumps(report, indent=1, default=str))
    print(f"\ndemo finished in {time.time() - t0:.0f} s; outputs in {out}/ (demo.json, float_outputs.png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
