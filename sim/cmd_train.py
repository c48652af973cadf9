"""`edgemoe train`: multi-task training of an M3ViT preset on the synthetic scenes (model/train.py)."""
from __future__ import annotations


def add_arguments(p):
    p.add_argument("--preset", default="tiny", help="model preset (tiny | edge-moe; model/config.py)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's recipe)")
    p.add_argument("--out", required=True, metavar="PATH", help="checkpoint file to write (edgemoe-ckpt-v1)")
    p.add_argument("--batch", type=int, default=None, help="images per step (each trains both tasks)")
    p.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps")
    p.add_argument("--train-n", type=int, default=None, help="training scenes generated and cached")
    p.add_argument("--seed", type=int, default=0, help="weight init and batch sampling seed")
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads (0: torch's default); 1 is faster when other jobs share the cores")
    p.add_argument("--export-bin", metavar="DIR", help="also export the backbone as Edge-MoE float32 .bin files")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def run(args) -> int:
    import shlex
    from dataclasses import replace
    from pathlib import Path

    from edgemoe.model.config import PRESETS
    from edgemoe.model.train import RECIPES, train_and_save

    if args.preset not in RECIPES:
        raise SystemExit(f"edgemoe train: --preset {args.preset!r} has no training recipe; "
                         f"choose one of {sorted(RECIPES)} (all presets: {sorted(PRESETS)})")
    over = {k: getattr(args, a) for k, a in (("steps", "steps"), ("batch", "batch"), ("lr", "lr"),
                                             ("warmup", "warmup"), ("train_n", "train_n"))
            if getattr(args, a) is not None}
    for k, v in over.items():
        if v <= 0 and not (k == "warmup" and v == 0):
            raise SystemExit(f"edgemoe train: --{k.replace('_', '-')} = {v} must be positive")
    recipe = replace(RECIPES[args.preset], **over)
    if "steps" in over and "warmup" not in over:
        recipe = replace(recipe, warmup=min(recipe.warmup, max(1, recipe.steps // 20)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    # rebuilt from the parsed arguments (sys.argv is not ours when called as a library / in tests)
    command = "edgemoe train " + " ".join(
        f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in sorted(vars(args).items())
        if k != "command" and v not in (None, False) and not callable(v)).replace(" True", "")
    res = train_and_save(args.preset, args.out, recipe, seed=args.seed, threads=args.threads,
                         export_bin=args.export_bin, progress=not args.no_progress, command=command)
    m = res["meta"]
    print(f"wrote {res['path']}: {m['steps']} steps, data {m['data_time_s']:.1f} s, train "
          f"{m['train_time_s']:.1f} s, final losses (mean of last 100 steps) "
          + ", ".join(f"{k} {v:.4f}" for k, v in m["losses"].items()))
    if args.export_bin:
        print(f"exported the backbone to {args.export_bin}")
    return 0
