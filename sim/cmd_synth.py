"""`edgemoe synth`: Yosys resource estimate (UltraScale+) and optional ECP5 Fmax of one unit."""
from __future__ import annotations

import json


def add_arguments(parser) -> None:
    from .cmd_verilog import add_common_unit_arguments
    add_common_unit_arguments(parser)
    parser.add_argument("--fmax", action="store_true",
                        help="also place and route on ECP5-85k (nextpnr) for a relative Fmax")
    parser.add_argument("--json", dest="json_out", default=None, help="write the results here")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per tool run")


def run(args) -> int:
    from hw.export import module_name, to_rtlil
    from hw.synth import synth_ecp5_fmax, synth_xilinx
    from hw.units import build_unit

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
