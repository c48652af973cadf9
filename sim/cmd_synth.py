"""`edgemoe synth`: Yosys resource estimate (UltraScale+) and optional ECP5 Fmax of one unit, or
(--top) of the whole accelerator top edgemoe_accel against the part budget (hw/synth_accel.py)."""
from __future__ import annotations

import json


def add_arguments(parser) -> None:
    from .cmd_verilog import add_common_unit_arguments
    add_common_unit_arguments(parser, unit_required=False)
    parser.add_argument("--top", action="store_true",
                        help="synthesise the whole accelerator top (edgemoe_accel) instead of --unit")
    parser.add_argument("--target", default="xcup", choices=("xcup", "ecp5"),
                        help="--top: Yosys synth_xilinx -family xcup or synth_ecp5")
    parser.add_argument("--act-buffer-tokens", type=int, default=None,
                        help="--top: override HWConfig.act_buffer_tokens (buffer depth)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="--top: keep design.il, run.ys, yosys.log, stat.json and write "
                             "synth_accel.json here")
    parser.add_argument("--fmax", action="store_true",
                        help="also place and route on ECP5-85k (nextpnr) for a relative Fmax")
    parser.add_argument("--json", dest="json_out", default=None, help="write the results here")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per tool run (default 600; --top: 3600)")


def run_top(args) -> int:
    from pathlib import Path

    from edgemoe.hw.synth import SynthError
    from edgemoe.hw.synth_accel import fit_problems, format_result, synth_accel

    from .cmd_verilog import resolve_configs
    if args.fmax:
        print("edgemoe synth: error: --fmax is for one --unit, not --top")
        return 2
    try:
        mcfg, qcfg, hwcfg = resolve_configs(args)
        if args.act_buffer_tokens is not None:
            hwcfg = hwcfg.replace(act_buffer_tokens=args.act_buffer_tokens)
        res = synth_accel(mcfg, qcfg, hwcfg, args.target, workdir=args.out,
                          timeout_s=args.timeout or 3600, progress=lambda s: print(s, flush=True))
    except ValueError as e:   # ConfigError / HWConfigError name the bad field
        print(f"edgemoe synth: error: {e}")
        return 2
    except SynthError as e:
        print(f"edgemoe synth: synthesis failed: {e}")
        return 1
    print(format_result(res))
    paths = [args.json_out] if args.json_out else []
    if args.out:
        paths.append(str(Path(args.out) / "synth_accel.json"))
    for path in paths:
        with open(path, "w") as fh:
            json.dump(res, fh, indent=1)
        print(f"wrote {path}")
    over = fit_problems(res)
    if over:
        print(f"edgemoe synth: the design does NOT fit {res['budget']['name']}: " + "; ".join(over))
        return 1
    print(f"fits {res['budget']['name']}")
    return 0


def run(args) -> int:
    if args.top:
        if args.unit:
            print("edgemoe synth: error: give --unit NAME or --top, not both")
            return 2
        return run_top(args)
    if not args.unit:
        print("edgemoe synth: error: give --unit NAME (one unit) or --top (the whole accelerator)")
        return 2
    if args.target != "xcup" or args.out or args.act_buffer_tokens is not None:
        print("edgemoe synth: error: --target / --out / --act-buffer-tokens go with --top")
        return 2
    args.timeout = args.timeout or 600
    from edgemoe.hw.export import module_name, to_rtlil
    from edgemoe.hw.synth import synth_ecp5_fmax, synth_xilinx
    from edgemoe.hw.units import build_unit

    from .cmd_verilog import resolve_configs
    top = module_name(args.unit)
    try:
        mcfg, qcfg, hwcfg = resolve_configs(args)
        rtlil = to_rtlil(build_unit(args.unit, qcfg, hwcfg, mcfg), top)
    except ValueError as e:   # ConfigError / FormatError / HWConfigError name the bad field
        print(f"edgemoe synth: error: {e}")
        return 2
    res = {"unit": args.unit, "config": {"model": mcfg.name, "quant": qcfg.name, "hw": hwcfg.name},
           "xilinx": synth_xilinx(rtlil, top, timeout_s=args.timeout)}
    x = res["xilinx"]
    print(f"{top} on UltraScale+ (yosys, out of context): LUT {x['lut']}  FF {x['ff']}  "
          f"DSP {x['dsp']}  BRAM36 {x['bram36']}  CARRY {x['carry']}  ({x['seconds']} s)")
    status = 0
    if args.fmax:
        res["ecp5"] = f = synth_ecp5_fmax(rtlil, top, timeout_s=args.timeout)
        if f["fmax_mhz"] is None:
            print(f"ECP5 Fmax: unavailable ({f['reason']})")
            status = 1
        else:
            print(f"ECP5-85k Fmax (nextpnr, out of context): {f['fmax_mhz']} MHz ({f['seconds']} s)")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(res, fh, indent=1)
        print(f"wrote {args.json_out}")
    return status
