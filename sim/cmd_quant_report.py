"""`edgemoe quant-report`: fidelity of the golden fixed-point model against float, per layer."""
from __future__ import annotations

import json
from pathlib import Path


def add_arguments(p):
    p.add_argument("--preset", default="edge-moe", help="model preset (model/config.py PRESETS)")
    p.add_argument("--quant", default="edge-moe-fixed",
                   help="quant preset, or a comma list (e.g. edge-moe-fixed,w8a16)")
    p.add_argument("--weights", default="auto", choices=("auto", "seeded", "edge-moe-bin"),
                   help="seeded random weights, or the trained Edge-MoE weights (experts: seeded random); "
                        "auto (default): the trained ones for edge-moe when ../shared has them")
    p.add_argument("--weights-dir", help="Edge-MoE weight folder (default ../shared/edge-moe-cityscapes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights / random experts")
    p.add_argument("--task", default="all", help="task name or index, or 'all' (default)")
    p.add_argument("--image", metavar="PATH",
                   help="raw float32 [3,H,W] .bin or a picture (default: the Cityscapes sample, else a photo)")
    p.add_argument("--attn-p", type=int, default=4, help="attention parallelism P (changes softmax bits)")
    p.add_argument("--out", required=True, metavar="DIR", help="writes DIR/quant_report.json and .png")


def run(args) -> int:
    from edgemoe.model.config import get_preset
    from edgemoe.model.images import load_image
    from edgemoe.quant.config import get_quant_preset
    from edgemoe.quant.report import format_summary, load_weights, plot_report, quant_report

    cfg = get_preset(args.preset)
    qcfgs = [get_quant_preset(n.strip()) for n in args.quant.split(",") if n.strip()]
    if not qcfgs:
        raise SystemExit("edgemoe quant-report: --quant names no preset")
    try:
        weights = load_weights(cfg, args.weights, args.seed, args.weights_dir)
    except FileNotFoundError as e:
        raise SystemExit(f"edgemoe quant-report: {e}")
    tasks = None if args.task == "all" else [int(args.task) if args.task.isdigit() else args.task]
    x, desc = load_image(cfg, args.image)
    rep = quant_report(cfg, weights, qcfgs, x[0].numpy(), desc, tasks, args.attn_p)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_report.json").write_text(json.dumps(rep, indent=1))
    plot_report(rep, qcfgs, out / "quant_report.png")
    print(format_summary(rep))
    print(f"wrote {out / 'quant_report.json'} and {out / 'quant_report.png'}")
    return 0
