"""`edgemoe export`: the accelerator, its program and the vendor-flow files for a board
(hw/vendor.py lists them). Every check (board, fit, folder) runs before anything is written."""
from __future__ import annotations


def add_arguments(p):
    from edgemoe.hw.boards import BOARDS
    p.add_argument("--board", required=True, help=f"target board: {', '.join(sorted(BOARDS))}")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (new or empty)")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")
    p.add_argument("--preset", default="tiny", help="model preset (model/config.py PRESETS)")
    p.add_argument("--quant", default="edge-moe-fixed", help="quant preset (quant/config.py)")
    p.add_argument("--hw", default="small-8x8", help="hardware preset (hw/config.py); the board sets the part")
    p.add_argument("--ckpt", metavar="PATH", help="an edgemoe checkpoint: its model config and weights "
                                                  "(instead of --preset / --weights)")
    p.add_argument("--weights", nargs="+", default=["seeded"], metavar="KIND",
                   help="as `edgemoe compile`: seeded | synthetic | edge-moe-bin [DIR] | ckpt PATH")
    p.add_argument("--seed", type=int, default=0, help="seed of seeded / synthetic weights")


def run(args) -> int:
    from edgemoe.hw.boards import get_board
    from edgemoe.hw.vendor import ExportError, check_design, check_out_dir, export_design

    from .cmd_compile import _weights
    try:
        from edgemoe.hw.config import get_hw_preset
        from edgemoe.quant.config import get_quant_preset
        qcfg, hwcfg = get_quant_preset(args.quant), get_hw_preset(args.hw)
        board = get_board(args.board)
        check_out_dir(args.out, args.force)
        if args.ckpt:
            from edgemoe.model.checkpoint import load_checkpoint
            cfg, sd, _ = load_checkpoint(args.ckpt)
            sd, desc = {k: v for k, v in sd.items() if not k.startswith("heads.")}, f"checkpoint {args.ckpt}"
        else:
            from edgemoe.model.config import get_preset
            cfg = get_preset(args.preset)
        check_design(cfg, qcfg, hwcfg, board)
        if not args.ckpt:
            sd, desc = _weights(cfg, args)
        m = export_design(cfg, qcfg, hwcfg, sd, args.board, args.out, args.force)
    except (ExportError, ValueError, FileNotFoundError) as e:
        # named errors (UnknownBoard, DesignDoesNotFit, ExportDirNotEmpty, config errors)
        print(f"edgemoe export: error: {type(e).__name__}: {e}")
        return 2
    print(f"exported {cfg.name} / {qcfg.name} / {m['hw']['name']} for {m['board']} ({m['device']}), "
          f"weights: {desc}; config hash {m['config_hash']}")
    for role, rel in m["files"].items():
        print(f"  {role:<18} {m['out']}/{rel}")
    print(f"check: cd {m['out']} && fusesoc --cores-root . run --target lint edgemoe:accel:edgemoe_accel:0.1.0")
    print(f"Vivado: cd {m['out']} && vivado -mode batch -source vivado/create_project.tcl")
    return 0
