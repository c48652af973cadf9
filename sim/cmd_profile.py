"""`edgemoe profile`: per-layer MACs, parameters, weight bytes, and (optionally) expert routing."""
from __future__ import annotations

import json
from pathlib import Path


def add_arguments(p):
    p.add_argument("--preset", default="edge-moe", help="model preset (model/config.py PRESETS)")
    p.add_argument("--weight-bits", type=int, default=16, help="weight precision for the byte counts")
    p.add_argument("--act-bits", type=int, default=32, help="activation precision for the byte counts")
    p.add_argument("--task", default=None, help="task name or index (default: the first task)")
    p.add_argument("--json", metavar="PATH", help="also write the profile as JSON")
    p.add_argument("--per-layer", action="store_true", help="print every layer instance, not only per type")
    p.add_argument("--routing", action="store_true",
                   help="run the seeded float model on one image and print the expert load per MoE block")
    p.add_argument("--image", metavar="PATH",
                   help="image for --routing (implies it): raw float32 [3,H,W] .bin or any image matplotlib reads")
    p.add_argument("--seed", type=int, default=0, help="weight seed of the model for --routing")


def _fmt(n: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f}"


def _task(cfg, task):
    if task is None:
        return 0
    return cfg.task_index(int(task) if str(task).isdigit() else task)


def _routing(cfg, task, args):
    try:
        import torch
        from edgemoe.model.m3vit import M3ViT
    except ImportError as e:
        raise SystemExit(f"edgemoe profile --routing needs the float network model.m3vit.M3ViT: {e}")
    from edgemoe.model.images import load_image
    from edgemoe.model.profile import routing_profile

    x, desc = load_image(cfg, args.image)
    model = M3ViT(cfg, seed=args.seed).eval()
    with torch.no_grad():
        _, aux = model.forward_features(x, task, return_aux=True)
    return routing_profile(aux, cfg.num_experts), desc


def run(args) -> int:
    from edgemoe.model.config import get_preset
    from edgemoe.model.profile import layer_table, summary

    cfg = get_preset(args.preset)
    task = _task(cfg, args.task)
    rows = layer_table(cfg, task, weight_bits=args.weight_bits, act_bits=args.act_bits)
    summ = summary(cfg)
    task_macs = sum(r["macs"] for r in rows)
    wbytes = sum(r["weight_bytes"] for r in rows)

    print(f"model {cfg.name}: {cfg.num_tokens} tokens x {cfg.dim}, depth {cfg.depth}, "
          f"{cfg.num_experts} experts top-{cfg.top_k} on blocks {list(cfg.moe_blocks)}, "
          f"task {cfg.tasks[task]}, weights {args.weight_bits} bit")
    hdr = f"{'layer':<28}{'count':>6}{'MACs':>14}{'params':>14}{'weight bytes':>16}"
    print(hdr)
    print("-" * len(hdr))
    if args.per_layer:
        for r in rows:
            print(f"{r['name']:<28}{1:>6}{r['macs']:>14,}{r['params']:>14,}{r['weight_bytes']:>16,}")
    else:
        agg: dict[str, list[int]] = {}
        for r in rows:
            a = agg.setdefault(r["type"], [0, 0, 0, 0])
            a[0] += 1
            a[1] += r["macs"]
            a[2] += r["params"]
            a[3] += r["weight_bytes"]
        for t, (n, m, p, w) in agg.items():
            print(f"{t:<28}{n:>6}{m:>14,}{p:>14,}{w:>16,}")
    print("-" * len(hdr))
    print(f"{'total':<28}{len(rows):>6}{task_macs:>14,}{summ['backbone_params']:>14,}{wbytes:>16,}")
    print(f"backbone: {summ['backbone_params'] / 1e6:.2f} M parameters, {task_macs / 1e9:.3f} GMAC per "
          f"image (task {cfg.tasks[task]}); weights {_fmt(wbytes)}B at {args.weight_bits} bit, "
          f"{_fmt(summ['weight_bytes_16'])}B at 16, {_fmt(summ['weight_bytes_8'])}B at 8; "
          f"one task reads at most {_fmt(summ['params_read_per_task'])} parameters")

    out = {"preset": cfg.name, "task": cfg.tasks[task], "weight_bits": args.weight_bits,
           "act_bits": args.act_bits,
           "totals": {"macs": task_macs, "params": summ["backbone_params"], "weight_bytes": wbytes},
           "summary": summ, "layers": rows}

    if args.routing or args.image:
        prof, desc = _routing(cfg, task, args)
        print(f"\nexpert routing, seeded random weights (seed {args.seed}), task {cfg.tasks[task]}, "
              f"image: {desc}")
        print(f"{'block':>5}{'active':>8}{'max load':>10}{'imbalance':>11}  tokens per expert")
        for b, p in prof.items():
            print(f"{b:>5}{p['active_experts']:>8}{p['max_load']:>10}{p['imbalance']:>11.2f}  "
                  f"{' '.join(str(c) for c in p['tokens_per_expert'])}")
        out["routing"] = {"image": desc, "seed": args.seed, "blocks": {str(b): p for b, p in prof.items()}}

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0
