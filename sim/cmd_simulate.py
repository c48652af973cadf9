"""`edgemoe simulate`: whole-inference RTL simulation of the accelerator top (sim/rtl_sim.py)."""
from __future__ import annotations


def add_arguments(p):
    p.add_argument("--preset", default="tiny", help="model preset (tiny | edge-moe | ...)")
    p.add_argument("--quant", default="edge-moe-fixed", help="quant preset (quant/config.py)")
    p.add_argument("--hw", default=None, help="hardware preset (default: small-8x8 for tiny, "
                                              "zcu102-16x16 otherwise)")
    p.add_argument("--act-buffer-tokens", type=int, default=None,
                   help="override HWConfig.act_buffer_tokens (smaller buffers build faster)")
    p.add_argument("--axi-data-bits", type=int, default=None,
                   help="override HWConfig.axi_data_bits: the AXI4 port width, 32..256 (e.g. 128 for "
                        "a ZCU102 HP port without width conversion; the program is laid out for it)")
    p.add_argument("--weight-intake-beats", type=int, default=None,
                   help="override HWConfig.weight_intake_beats (beats per cycle from the weight FIFO; "
                        "e.g. 1 with --axi-data-bits 128, where a 7-beat column header admits no other)")
    p.add_argument("--task", default="all", help="task name(s), comma separated, or 'all'")
    p.add_argument("--weights", nargs="+", default=None, metavar="KIND",
                   help="as `edgemoe compile --weights` (default: checkpoints/tiny.pt for tiny, "
                        "synthetic otherwise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image", help="input image file (default: the shared Cityscapes image when "
                                   "present, else a matplotlib sample photo)")
    p.add_argument("--latency", type=int, default=None, help="DRAM first-beat latency in cycles "
                                                             "(default: HWConfig.dram_latency_cycles)")
    p.add_argument("--beats-per-cycle", type=float, default=None,
                   help="DRAM bandwidth in AXI beats per cycle (default from HWConfig.dram_gbps)")
    p.add_argument("--intermediates", action="store_true",
                   help="also compare every intermediate tensor (a STORE after each layer: "
                        "edgemoe.quant.compiler.debug_program; the cycles then include those STOREs)")
    p.add_argument("--simulator", default="verilator", choices=("verilator", "icarus"))
    p.add_argument("--fast", action="store_true",
                   help="Verilator C++ harness instead of cocotb (sim/fast_sim.py): same outputs and "
                        "cycles, about 10x faster; Verilator only")
    p.add_argument("--out", default="out/simulate", help="output folder (JSON, PNG, program)")


def default_weights(preset: str) -> list[str]:
    from pathlib import Path
    ck = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny.pt"
    if preset == "tiny" and ck.exists():
        return ["ckpt", str(ck)]
    return ["synthetic"]


def run(args) -> int:
    from edgemoe.hw.config import get_hw_preset
    from edgemoe.model.config import get_preset
    from edgemoe.quant.compiler import compile_program
    from edgemoe.quant.config import get_quant_preset
    from edgemoe.quant.qweights import quantize_weights
    from edgemoe.sim.cmd_compile import _weights
    from edgemoe.sim.rtl_sim import format_table, simulate

    from edgemoe.hw.accel import check_buildable
    from edgemoe.model.images import load_image
    try:
        if args.latency is not None and args.latency < 0:
            raise ValueError(f"--latency {args.latency} must be >= 0 cycles")
        if args.beats_per_cycle is not None and not 0 < args.beats_per_cycle <= 1:
            raise ValueError(f"--beats-per-cycle {args.beats_per_cycle} must be in (0, 1]")
        cfg = get_preset(args.preset)
        q = get_quant_preset(args.quant)
        hw = get_hw_preset(args.hw or ("small-8x8" if args.preset == "tiny" else "zcu102-16x16"))
        if args.act_buffer_tokens:
            hw = hw.replace(act_buffer_tokens=args.act_buffer_tokens)
        if args.axi_data_bits is not None:
            hw = hw.replace(axi_data_bits=args.axi_data_bits)
        if args.weight_intake_beats is not None:
            hw = hw.replace(weight_intake_beats=args.weight_intake_beats)
        if args.fast:
            from edgemoe.sim.fast_sim import check_options
            check_options(args.simulator, hw)         # FastSimOptionError is a ValueError
        tasks = list(cfg.tasks) if args.task == "all" else args.task.split(",")
        for t in tasks:
            cfg.task_index(t)
        check_buildable(cfg, q, hw)                   # before the slow parts
        args.weights = args.weights or default_weights(args.preset)
        sd, desc = _weights(cfg, args)
        prog = compile_program(cfg, q, hw, quantize_weights(cfg, q, sd))
        x, img_desc = load_image(cfg, args.image)     # default: the shared Cityscapes image, else a photo
    except (ValueError, KeyError, FileNotFoundError) as e:   # config / fit / checkpoint / image errors
        print(f"edgemoe simulate: error: {e}")
        return 2
    image = x[0].numpy()
    print(f"{cfg.name} / {q.name} / {hw.name}: {len(prog.instrs)} instructions, memory image "
          f"{prog.image_bytes:,} B, weights: {desc}; image: {img_desc}")
    rep = simulate(prog, tasks, image, args.out, args.latency, args.beats_per_cycle, args.simulator,
                   intermediates=args.intermediates, fast=args.fast)
    ok = True
    for t, r in rep["tasks"].items():
        ok &= r["bit_exact"]
        print(f"\ntask {t}: {'BIT-EXACT' if r['bit_exact'] else 'MISMATCH'} vs golden "
              f"({r['elements']} output codes, {r['mismatches']} differ"
              + (f", first {r['first_mismatch']}" if r["first_mismatch"] else "") + ")")
        print(f"  {r['cycles']:,} cycles = {r['ms']:.3f} ms at {hw.clock_mhz:g} MHz; cycle model "
              f"{r['model_cycles']:,} ({r['model_error']:+.2%}); MAC-array utilisation "
              f"{r['mac_array_utilisation']:.3f}")
        print(f"  DRAM read {r['dram_bytes_read']:,} B, written {r['dram_bytes_written']:,} B; "
              f"saturations {r['sat_count']} (golden {r['golden_sat']}); instructions "
              f"{r['instructions']}; simulated in {r['wall_s']:.1f} s")
        if r["intermediates"]:
            bad = [x for x in r["intermediates"] if x["mismatches"]]
            print(f"  intermediate tensors: {len(r['intermediates']) - len(bad)}/{len(r['intermediates'])} "
                  f"bit-exact" + (f"; first differing: {bad[0]['name']} {bad[0]['first']}" if bad else ""))
        print(format_table(t, r))
    print(f"\nbuild {rep['build_s']:.1f} s, total wall {rep['wall_s']:.1f} s; wrote {args.out}/simulate.json, "
          f"{args.out}/simulate.png")
    return 0 if ok else 1
