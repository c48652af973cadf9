"""`edgemoe sweep`: design-space sweep (tiles, attention P, quant, DRAM bandwidth, AXI width) ->
Pareto front of latency vs DSP vs energy and the best design that fits the part (estimates)."""
from __future__ import annotations

import json
from pathlib import Path


def _list(conv):
    return lambda s: [conv(x) for x in s.split(",") if x.strip()]


def add_arguments(p):
    from .sweep import DEFAULT_GRID as G
    p.add_argument("--preset", default="edge-moe", help="model preset")
    p.add_argument("--hw", default="zcu102-16x16", help="hardware preset the points vary (part, clock)")
    p.add_argument("--tiles", default=",".join(G["tiles"]), help="T_INxT_OUT list, e.g. 8x8,16x16")
    p.add_argument("--attn-p", type=_list(int), default=G["attn_p"], help="e.g. 2,4,8")
    p.add_argument("--quant", type=_list(str), default=G["quant"], help="quant presets, comma list")
    p.add_argument("--dram-gbps", type=_list(float), default=G["dram_gbps"], help="e.g. 9.6,19.2")
    p.add_argument("--axi-bits", type=_list(int), default=G["axi_bits"], help="e.g. 256,512")
    p.add_argument("--lanes", type=_list(int), default=G["lanes"],
                   help="LayerNorm vector lanes, t_in / 2^j (0: lanes = t_in), e.g. 0,16")
    p.add_argument("--routing", default="uniform", choices=("uniform", "golden"),
                   help="expert routing for the cycle model (golden: the golden model's on the "
                        "default image, synthetic seeded weights)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="use this Dask scheduler instead of a local cluster")
    p.add_argument("--workers", type=int, default=2, help="local cluster workers (threads)")
    p.add_argument("--synth", action="store_true",
                   help="synthesise the compute unit, attention engine, LayerNorm and gate for the "
                        "Pareto points (slow)")
    p.add_argument("--synth-timeout", type=float, default=900, help="seconds per unit synthesis")
    p.add_argument("--out", required=True, metavar="DIR", help="writes DIR/sweep.json and DIR/pareto.png")


def run(args) -> int:
    from edgemoe.hw.config import get_hw_preset
    from edgemoe.model.config import get_preset
    from edgemoe.quant.config import get_quant_preset

    from .perf_model import golden_routing
    from .sweep import SweepError, format_sweep, plot_sweep, run_sweep
    try:
        cfg = get_preset(args.preset)
        for qn in args.quant:
            get_quant_preset(qn)
        hw = get_hw_preset(args.hw)
        routing, rsrc = (golden_routing(cfg, get_quant_preset(args.quant[0]), hw)
                         if args.routing == "golden" else (None, None))
        res = run_sweep(args.preset, {"tiles": args.tiles, "attn_p": args.attn_p, "quant": args.quant,
                                      "dram_gbps": args.dram_gbps, "axi_bits": args.axi_bits, "lanes": args.lanes},
                        args.hw, routing, rsrc, args.scheduler, args.workers, args.synth,
                        args.synth_timeout)
    except (SweepError, ValueError) as e:
        print(f"edgemoe sweep: error: {e}")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(res, indent=1, default=str))
    plot_sweep(res, out / "pareto.png")
    print(format_sweep(res))
    print(f"wrote {out / 'sweep.json'} and {out / 'pareto.png'}")
    return 0
