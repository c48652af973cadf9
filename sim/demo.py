"""`make demo`: the main job end to end on the built-in preset.

Stages (each prints what it did and where its outputs are):
  1. float M3ViT (edge-moe preset, seeded weights) on a real image, both tasks -> PNG
  2. workload profile (MACs, parameters, bytes, expert routing on this image)
  3. CPU baseline of the float backbone (measured here)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="edge-moe")
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image", default=None, help="input image (default: shared Cityscapes image, else a sample photo)")
    ap.add_argument("--bench-iters", type=int, default=20)
    args = ap.parse_args(argv)

    import torch
    from model.config import get_preset
    from model.images import load_image
    from model.m3vit import M3ViT
    from model.profile import routing_profile, summary
    from sim.cmd_bench import format_result, measure

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = get_preset(args.preset)
    report = {"preset": cfg.name, "weights": f"seeded random (seed {args.seed})"}

    _stage(f"1. float M3ViT '{cfg.name}', seeded weights, both tasks")
    model = M3ViT(cfg, seed=args.seed).eval()
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

    rep = out / "demo.json"
    rep.write_text(json.dumps(report, indent=1, default=str))
    print(f"\ndemo finished in {time.time() - t0:.0f} s; outputs in {out}/ (demo.json, float_outputs.png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
