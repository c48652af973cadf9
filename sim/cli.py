"""The `edgemoe` command line. Each subcommand lives in its own module exposing
`add_arguments(parser)` and `run(args) -> int`; register it in COMMANDS (name -> module, help)."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "profile": ("edgemoe.sim.cmd_profile", "per-layer MACs, parameters, bytes and expert routing"),
    "bench": ("edgemoe.sim.cmd_bench", "CPU/GPU baseline: latency, throughput, energy where measurable"),
    "train": ("edgemoe.sim.cmd_train", "multi-task training on the synthetic scenes -> checkpoint"),
    "eval": ("edgemoe.sim.cmd_eval", "test-split mIoU / depth RMSE: float model vs. golden fixed point"),
    "verilog": ("edgemoe.sim.cmd_verilog", "write one hardware unit as Verilog and RTLIL"),
    "synth": ("edgemoe.sim.cmd_synth", "Yosys resources of one unit (--fmax: ECP5 Fmax) or of the whole accelerator (--top)"),
    "calibrate": ("edgemoe.sim.cmd_calibrate", "choose per-tensor-class fixed-point formats from float ranges"),
    "quant-report": ("edgemoe.sim.cmd_quant_report", "golden vs float fidelity per layer (SQNR, cosine, routing) + PNG"),
    "simulate": ("edgemoe.sim.cmd_simulate", "whole-inference RTL simulation of the accelerator (cocotb + Verilator), bit-exact check, cycles"),
    "compile": ("edgemoe.sim.cmd_compile", "compile a model to the accelerator's program + memory image"),
    "export": ("edgemoe.sim.cmd_export", "Verilog, FuseSoC core, Vivado project Tcl, IP-XACT, C header and program for a board"),
    "energy": ("edgemoe.sim.cmd_energy", "accelerator latency/energy estimate vs CPU (measured), GPU (bench JSON), Edge-MoE"),
    "sweep": ("edgemoe.sim.cmd_sweep", "design-space sweep (tiles, P, quant, bandwidth) via Dask -> Pareto front"),
    "report": ("edgemoe.sim.cmd_report", "one folder: latency/energy/resources/fidelity/Pareto PNGs + JSON + report.md"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="edgemoe", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name, (mod, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        importlib.import_module(mod).add_arguments(p)
    args = ap.parse_args(argv)
    mod = importlib.import_module(COMMANDS[args.command][0])
    return int(mod.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
