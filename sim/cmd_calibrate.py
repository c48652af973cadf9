"""`edgemoe calibrate`: choose per-tensor-class fixed-point formats from observed float ranges."""
from __future__ import annotations

import json
from pathlib import Path


def add_arguments(p):
    p.add_argument("--preset", default="edge-moe", help="model preset (model/config.py PRESETS)")
    p.add_argument("--bits", default="w8a16", help="bit-width preset (quant/calibrate.py BITS_PRESETS)")
    p.add_argument("--base", default="edge-moe-fixed",
                   help="quant preset whose internal formats and approximation parameters are kept")
    p.add_argument("--weights", default="seeded",
                   help="seeded | edge-moe-bin (trained Edge-MoE weights, random experts) | a comma list: "
                        "ranges are merged over all of them")
    p.add_argument("--weights-dir", help="Edge-MoE weight folder (default ../shared/edge-moe-cityscapes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights / random experts")
    p.add_argument("--margin", type=int, default=1, help="spare integer bits on activation classes")
    p.add_argument("--param-margin", type=int, default=0, help="spare integer bits on parameter classes")
    p.add_argument("--synthetic", type=int, default=2, help="synthetic scenes added to the calibration images")
    p.add_argument("--task", default="all", help="task name or index, or 'all' (default)")
    p.add_argument("--name", help="name of the resulting QuantConfig (default: the bits preset's)")
    p.add_argument("--json", metavar="PATH", help="write the report (and the QuantConfig) as JSON")
    p.add_argument("--python", action="store_true", help="print the preset as quant/config.py writes it")


def run(args) -> int:
    from edgemoe.model.config import get_preset
    from edgemoe.quant.calibrate import calibrate, calibration_images, format_report, preset_literal
    from edgemoe.quant.config import QUANT_PRESETS, get_quant_preset
    from edgemoe.quant.report import WEIGHT_KINDS, load_weights

    cfg = get_preset(args.preset)
    base = get_quant_preset(args.base)
    kinds = [k.strip() for k in args.weights.split(",") if k.strip()]
    bad = [k for k in kinds if k not in WEIGHT_KINDS]
    if not kinds or bad:
        raise SystemExit(f"edgemoe calibrate: --weights {args.weights!r}: choose from {WEIGHT_KINDS}")
    try:
        weights = [load_weights(cfg, k, args.seed, args.weights_dir) for k in kinds]
    except FileNotFoundError as e:
        raise SystemExit(f"edgemoe calibrate: {e}")
    tasks = None if args.task == "all" else [int(args.task) if args.task.isdigit() else args.task]
    images, descs = calibration_images(cfg, args.synthetic)
    q, rep = calibrate(cfg, [w.state_dict for w in weights], images, base, args.bits, args.margin,
                       tasks=tasks, param_margin_bits=args.param_margin, name=args.name)
    for w in weights:
        print(("WARNING: " if w.random else "") + w.banner)
    print("calibration images: " + "; ".join(descs))
    print(format_report(rep))
    stored = QUANT_PRESETS.get(q.name)
    if stored is not None:
        same = stored.to_dict() == q.to_dict()
        diff = [k for k, v in q.to_dict().items() if stored.to_dict()[k] != v]
        print(f"stored preset '{q.name}' (quant/config.py): "
              + ("identical" if same else f"DIFFERS in {diff}"))
        rep["matches_stored_preset"] = same
    if args.python:
        print(preset_literal(q, base))
    if args.json:
        rep["weights"] = [{"kind": w.kind, "banner": w.banner, "random_tensors": w.random} for w in weights]
        rep["images"] = descs
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rep, indent=1))
        print(f"wrote {args.json}")
    return 0
