"""`edgemoe report`: one folder with report.md, JSON and PNGs (latency breakdown, energy vs
CPU/GPU/Edge-MoE, resources vs the part, quantisation fidelity, Pareto front); see sim/report.py."""
from __future__ import annotations


def add_arguments(p):
    p.add_argument("--preset", default="edge-moe", help="model preset")
    p.add_argument("--quant", default="edge-moe-fixed",
                   help="quant preset(s), comma list; the first is the accelerator's")
    p.add_argument("--hw", default="zcu102-16x16", help="hardware preset")
    p.add_argument("--task", default=None, help="task name or index (default: the first)")
    p.add_argument("--routing", default="uniform", choices=("uniform", "golden"))
    p.add_argument("--gpu-json", action="append", default=[], metavar="PATH",
                   help="`edgemoe bench --json` result measured elsewhere (repeatable)")
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU measurement")
    p.add_argument("--cpu-iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the measurement")
    p.add_argument("--no-quant-report", action="store_true", help="skip the golden-vs-float section")
    p.add_argument("--workers", type=int, default=2, help="Dask local-cluster workers for the sweep")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS", help="existing Dask scheduler")
    p.add_argument("--out", required=True, metavar="DIR")


def run(args) -> int:
    from .report import build_report
    quants = [x.strip() for x in args.quant.split(",") if x.strip()]
    try:
        idx = build_report(args.preset, args.out, quants, args.hw, args.task, args.routing,
                           not args.no_cpu, args.cpu_iters, args.threads, args.gpu_json,
                           None, not args.no_quant_report, args.workers, args.scheduler)
    except (ValueError, FileNotFoundError) as e:
        print(f"edgemoe report: error: {e}")
        return 2
    print(idx["text"]["breakdown"])
    print(idx["text"]["sweep"])
    print(f"wrote {args.out}/report.md ({len(idx['artefacts'])} sections, {idx['seconds']:.0f} s)")
    return 0
