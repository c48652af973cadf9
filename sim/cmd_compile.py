"""`edgemoe compile`: compile a model to the accelerator's program + memory image (quant/compiler.py)."""
from __future__ import annotations


def add_arguments(p):
    p.add_argument("--preset", default="edge-moe", help="model preset (model/config.py PRESETS)")
    p.add_argument("--quant", default="edge-moe-fixed", help="quant preset (quant/config.py)")
    p.add_argument("--hw", default="zcu102-16x16", help="hardware preset (hw/config.py)")
    p.add_argument("--weights", nargs="+", default=["seeded"], metavar="KIND",
                   help="seeded (M3ViT init) | synthetic (fast numpy init, non-zero biases) | "
                        "edge-moe-bin [DIR] | ckpt PATH (an edgemoe checkpoint)")
    p.add_argument("--seed", type=int, default=0, help="seed of seeded / synthetic weights")
    p.add_argument("--out", metavar="DIR", help="write DIR/program.json + DIR/image.bin")
    p.add_argument("--listing", action="store_true", help="print every instruction")


def _weights(cfg, args):
    kind, rest = args.weights[0], args.weights[1:]
    if kind == "synthetic" and not rest:
        from edgemoe.quant.compiler import synthetic_state_dict
        return synthetic_state_dict(cfg, args.seed), f"synthetic (seed {args.seed})"
    if kind in ("seeded", "edge-moe-bin") and len(rest) <= (kind == "edge-moe-bin"):
        from edgemoe.quant.report import load_weights
        w = load_weights(cfg, kind, args.seed, rest[0] if rest else None)
        # the banner reads "weights: ..." on its own; callers print "weights: {desc}"
        return w.state_dict, w.banner.removeprefix("weights: ")
    if kind == "ckpt" and len(rest) == 1:
        from edgemoe.model.checkpoint import load_backbone
        return load_backbone(cfg, rest[0], "edgemoe-ckpt").state_dict, f"checkpoint {rest[0]}"
    raise SystemExit(f"edgemoe compile: --weights {' '.join(args.weights)!r}: use seeded | synthetic | "
                     "edge-moe-bin [DIR] | ckpt PATH")


def run(args) -> int:
    from edgemoe.hw.config import get_hw_preset
    from edgemoe.model.config import get_preset
    from edgemoe.quant.compiler import FitError, check_fit, compile_program
    from edgemoe.quant.config import get_quant_preset

    cfg, qcfg, hwcfg = get_preset(args.preset), get_quant_preset(args.quant), get_hw_preset(args.hw)
    rep = check_fit(cfg, qcfg, hwcfg, raise_error=False)
    print(rep)
    print(rep.plan.table())
    if not rep.ok:
        return 1
    try:
        sd, desc = _weights(cfg, args)
    except FileNotFoundError as e:
        raise SystemExit(f"edgemoe compile: {e}")
    try:
        prog = compile_program(cfg, qcfg, hwcfg, sd)
    except FitError as e:     # cannot happen after the check above, kept for clarity
        print(e)
        return 1
    print(f"weights: {desc}")
    print(prog.address_map())
    print(f"instructions: {len(prog.instrs)} ({len(prog.instrs) * 32} B); memory image: "
          f"{prog.image_bytes:,} B; config hash {prog.config_hash:#010x}")
    if args.listing:
        print(prog.listing())
    if args.out:
        out = prog.save(args.out)
        print(f"wrote {out / 'program.json'} and {out / 'image.bin'}")
    return 0
