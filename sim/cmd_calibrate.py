"""`edgemoe calibrate`: choose per-tensor-class fixed-point formats from observed float ranges;
--fit: refit a channel-granularity preset's fixed formats to one model (a QuantConfig JSON that
every command takes as --quant PATH)."""
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
    p.add_argument("--fit", action="store_true",
                   help="refit --base (a channel-granularity preset, e.g. w8a16-gptq) to these weights: "
                        "act = gelu_in, gate_logit, ln_gamma, ln_beta; calibrated on images held out from "
                        "the evaluation image (--bits, --synthetic and --param-margin do not apply)")
    p.add_argument("--out-quant", metavar="PATH",
                   help="write the resulting QuantConfig as JSON (use it as --quant PATH)")
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
    if args.fit:
        return _run_fit(args, cfg, base, weights, tasks)
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
    _write_outputs(args, q, rep, weights, descs)
    return 0


def _write_outputs(args, q, rep, weights, descs) -> None:
    """--json: the report (with the weights and images used); --out-quant: the QuantConfig."""
    if args.json:
        rep["weights"] = [{"kind": w.kind, "banner": w.banner, "random_tensors": w.random} for w in weights]
        rep["images"] = descs
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rep, indent=1))
        print(f"wrote {args.json}")
    if args.out_quant:
        Path(args.out_quant).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_quant).write_text(json.dumps(q.to_dict(), indent=1))
        print(f"wrote {args.out_quant} (QuantConfig '{q.name}': pass it as --quant {args.out_quant})")


def _run_fit(args, cfg, base, weights, tasks) -> int:
    from edgemoe.quant.calibrate import calibration_images, fit_channel_formats
    from edgemoe.quant.channel import CALIB_SYNTHETIC
    from edgemoe.quant.fixed import FormatError

    images, descs = calibration_images(cfg, synthetic=CALIB_SYNTHETIC, eval_image=False)
    name = args.name or f"{base.name}-fit-{'-'.join(w.kind for w in weights)}"
    try:
        q, rep = fit_channel_formats(cfg, base, [w.state_dict for w in weights], images, args.margin,
                                     tasks=tasks, name=name)
    except FormatError as e:
        raise SystemExit(f"edgemoe calibrate --fit: {e}")
    for w in weights:
        print(("WARNING: " if w.random else "") + w.banner)
    print(f"'{q.name}': '{base.name}' refitted to {cfg.name} ({rep['runs']} float runs on: "
          + "; ".join(descs) + f"), {args.margin} spare integer bit(s) on data classes")
    for c, v in rep["classes"].items():
        print(f"  {c:10s} {rep['base_formats'][c]:>7s} -> {v['fmt']:<7s} max |x| {v['observed_max_abs']:.4g}"
              + (f" ({v['max_tensor']})" if v["max_tensor"] else "") + (f"; {v['note']}" if v["note"] else ""))
    _write_outputs(args, q, rep, weights, descs)
    return 0
