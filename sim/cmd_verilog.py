"""`edgemoe verilog`: write one hardware unit as Verilog (.v) and RTLIL (.il)."""
from __future__ import annotations


def add_common_unit_arguments(parser, unit_required: bool = True) -> None:
    """--unit / --preset / --quant / --hw, shared with `edgemoe synth`."""
    from edgemoe.hw.units import UNITS
    parser.add_argument("--unit", required=unit_required, choices=sorted(UNITS), help="hardware unit")
    parser.add_argument("--preset", default="tiny", help="model preset (model.config PRESETS)")
    parser.add_argument("--quant", default="edge-moe-fixed", help="quant preset (quant.config)")
    parser.add_argument("--hw", default="zcu102-16x16", help="hardware preset (hw.config)")


def resolve_configs(args):
    """(ModelConfig, QuantConfig, HWConfig) named by the arguments; unknown names raise with the
    list of known ones."""
    from edgemoe.hw.config import get_hw_preset
    from edgemoe.model.config import get_preset
    from edgemoe.quant.config import get_quant_preset
    return get_preset(args.preset), get_quant_preset(args.quant), get_hw_preset(args.hw)


def add_arguments(parser) -> None:
    add_common_unit_arguments(parser)
    parser.add_argument("--out", default="out/verilog", help="output directory")


def run(args) -> int:
    import json

    from edgemoe.hw.export import module_name, write_unit
    try:
        mcfg, qcfg, hwcfg = resolve_configs(args)
        paths = write_unit(args.unit, qcfg, hwcfg, args.out, mcfg)
    except ValueError as e:   # ConfigError / FormatError / HWConfigError name the bad field
        print(f"edgemoe verilog: error: {e}")
        return 2
    print(f"module {module_name(args.unit)}  (model {mcfg.name}, quant {qcfg.name}, hw {hwcfg.name})")
    print("  input  [    1] clk\n  input  [    1] rst")
    for name, (width, d) in json.loads(paths["ports"].read_text()).items():
        print(f"  {'input ' if d == 'i' else 'output'} [{width:>5}] {name}")
    for kind, p in paths.items():
        print(f"wrote {kind}: {p}")
    return 0
