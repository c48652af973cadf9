"""`edgemoe eval`: task metrics of a trained checkpoint, float vs. the golden fixed-point backbone."""
from __future__ import annotations


def add_arguments(p):
    p.add_argument("--ckpt", required=True, metavar="PATH", help="checkpoint written by `edgemoe train`")
    p.add_argument("--quant", default="edge-moe-fixed",
                   help="comma-separated quant presets for the golden model ('none': float only)")
    p.add_argument("--n", type=int, default=64, help="test scenes (the first n of the test split)")
    p.add_argument("--base-seed", type=int, default=0, help="base seed of the test split")
    p.add_argument("--attn-p", type=int, default=4, help="attention parallelism P of the golden schedule")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    p.add_argument("--rtl", action="store_true",
                   help="also (c): the RTL accelerator under cocotb + Verilator (tiny preset; uses the "
                        "first --quant preset and the --rtl-hw attention parallelism for the golden model)")
    p.add_argument("--rtl-hw", default="small-8x8", help="hardware preset of the RTL run")
    p.add_argument("--json", metavar="PATH", help="also write the full report as JSON")


def run(args) -> int:
    import json

    import torch

    from edgemoe.model.evaluate import evaluate_checkpoint, format_report

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.n <= 0:
        raise SystemExit(f"edgemoe eval: --n = {args.n} must be positive")
    quant = tuple(q.strip() for q in args.quant.split(",") if q.strip())
    if quant in (("none",), ()):
        quant = ()
    if args.rtl and not quant:
        raise SystemExit("edgemoe eval: --rtl needs a --quant preset (the RTL's number formats)")
    rep = evaluate_checkpoint(args.ckpt, quant=quant, n=args.n, base_seed=args.base_seed,
                              attn_p=args.attn_p, progress=True, rtl=args.rtl,
                              rtl_quant=quant[0] if quant else "edge-moe-fixed", rtl_hw=args.rtl_hw)
    print(format_report(rep))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1)
        print(f"wrote {args.json}")
    return 0
