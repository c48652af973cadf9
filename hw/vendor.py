"""`edgemoe export`: the accelerator as a hand-off folder for a board's vendor flow.

export_design(cfg, qcfg, hwcfg, weights, board, out) checks everything first (board, part fit,
buildability, output folder), then writes:
  rtl/edgemoe_accel.v        the accelerator (hw/export.py port names; clk, rst active high)
  rtl/edgemoe_accel_bd.v     a wrapper for Vivado's block design: AXI port names and
                             X_INTERFACE_INFO attributes, active-low aresetn
  tb/tb_edgemoe_accel.v      self-checking smoke test: reset, read ID / VERSION / CONFIG_HASH
                             over AXI4-Lite
  edgemoe_accel.core         FuseSoC CAPI2: targets lint (verilator), sim (icarus; verilator
                             --binary), synth (yosys synth_xilinx), vivado (the board's part)
  vivado/create_project.tcl  project + block design: Zynq UltraScale+ PS with the board preset,
                             HP0 slave <- accelerator AXI4 master, HPM0 -> SmartConnect -> the
                             AXI4-Lite registers, irq -> pl_ps_irq0, pl_clk0 at clock_mhz,
                             addresses, wrapper, bitstream + .xsa
  vivado/edgemoe_accel.xdc   clock constraint (out-of-context runs of the RTL alone)
  component.xml              IP-XACT 1685-2014 of edgemoe_accel: ports of the Verilog, bus
                             interfaces m_axi (aximm master), s_axil (aximm slave), clk, rst, irq
  program/program.json, program/image.bin   the compiled program + memory image
  program/input.bin, program/expected_<task>.bin   an example input (IMAGE region bytes) and
                             its golden output features, for a bit-exactness check on the board
  sw/edgemoe_regs.h, sw/edgemoe_program.h, sw/edgemoe_host.c   C register header (PeakRDL), the
                             program's offsets / hash, example Linux host program (/dev/mem)
  doc/registers.md           register documentation (PeakRDL)
  manifest.json              configs, board, resource estimate, every file
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from .boards import Board, get_board

TOP = "edgemoe_accel"
VLNV = "edgemoe:accel:edgemoe_accel:0.1.0"
HOST_C = Path(__file__).resolve().parent.parent / "sim" / "c" / "edgemoe_host.c"


class ExportError(ValueError):
    pass


class ExportDirNotEmpty(ExportError):
    pass


class DesignDoesNotFit(ExportError):
    pass


@dataclass(frozen=True)
class Port:
    name: str
    width: int
    direction: str      # "in" | "out"


def verilog_ports(text: str, module: str = TOP) -> list[Port]:
    """The port list of `module` in Amaranth's Verilog output (ANSI-less header + one
    `input [w-1:0] name;` / `output ...` declaration per port), in header order."""
    m = re.search(rf"^module {re.escape(module)}\((.*?)\);", text, re.S | re.M)
    if not m:
        raise ExportError(f"module {module} not found in the Verilog")
    names = [n.strip() for n in m.group(1).split(",")]
    body = text[m.end():]
    decl = {}
    for d, hi, name in re.findall(r"^\s*(input|output)\s+(?:wire\s+|reg\s+)?(?:\[(\d+):0\]\s+)?(\w+);",
                                  body, re.M):
        decl.setdefault(name, Port(name, int(hi) + 1 if hi else 1, "in" if d == "input" else "out"))
    missing = [n for n in names if n not in decl]
    if missing:
        raise ExportError(f"module {module}: no declaration for ports {missing}")
    return [decl[n] for n in names]


# ---------------------------------------------------------------------------------------------
# checks (nothing is written before they pass)
# ---------------------------------------------------------------------------------------------
def check_out_dir(out, force: bool) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportDirNotEmpty(f"{out} is not empty: refusing to export into it (use --force to "
                                "write over its files)")
    return out


def check_design(cfg, qcfg, hwcfg, board: Board):
    """(hwcfg for the board's part, resource estimate); DesignDoesNotFit names every resource
    that is over the part's budget (analytic estimate, sim/resources.py) and every failed
    compile-time fit check; HWConfigError if the generator cannot build the configuration."""
    from edgemoe.hw.accel import check_buildable
    from edgemoe.quant.compiler import check_fit
    from edgemoe.sim.resources import estimate_resources
    if hwcfg.part != board.part:     # the board decides the part (and so the budget and hash)
        hwcfg = hwcfg.replace(part=board.part)
    check_buildable(cfg, qcfg, hwcfg)
    fit = check_fit(cfg, qcfg, hwcfg, raise_error=False)
    est = estimate_resources(cfg, qcfg, hwcfg)
    over = [f"{k}: {est['total'][k]:,.0f} estimated > {est['budget'][k]:,} on the {board.part}"
            for k in est["total"] if est["total"][k] > est["budget"][k]]
    over += [f"{i.what}: {i.detail}" for i in fit.failures]
    if over:
        raise DesignDoesNotFit(f"model '{cfg.name}' / quant '{qcfg.name}' / hw '{hwcfg.name}' does not "
                               f"fit board {board.name} ({board.part}):\n  " + "\n  ".join(over))
    return hwcfg, est


# ---------------------------------------------------------------------------------------------
# generated texts
# ---------------------------------------------------------------------------------------------
def bd_wrapper(ports: list[Port]) -> str:
    """Verilog wrapper with the names Vivado's interface inference and module references expect
    (m_axi_<sig>, s_axil_<sig>, aclk, aresetn, irq); logic-free except the reset inversion."""
    lines = [f"// GENERATED by edgemoe export: block-design wrapper of {TOP} (do not edit)",
             "`default_nettype none", f"module {TOP}_bd ("]
    decl = []
    decl.append('  (* X_INTERFACE_INFO = "xilinx.com:signal:clock:1.0 aclk CLK" *)\n'
                '  (* X_INTERFACE_PARAMETER = "ASSOCIATED_BUSIF m_axi:s_axil, ASSOCIATED_RESET aresetn" *)\n'
                "  input  wire aclk")
    decl.append('  (* X_INTERFACE_INFO = "xilinx.com:signal:reset:1.0 aresetn RST" *)\n'
                '  (* X_INTERFACE_PARAMETER = "POLARITY ACTIVE_LOW" *)\n'
                "  input  wire aresetn")
    conns = [".clk(aclk)", ".rst(~aresetn)"]
    for p in ports:
        rng = f"[{p.width - 1}:0] " if p.width > 1 else ""
        d = "input  wire" if p.direction == "in" else "output wire"
        bus, _, sig = p.name.partition("__")
        if sig:
            outer = f"{bus}_{sig}"
            attr = f'  (* X_INTERFACE_INFO = "xilinx.com:interface:aximm:1.0 {bus} {sig.upper()}" *)\n'
            if sig in ("awaddr", "araddr") and bus == "s_axil":
                attr += '  (* X_INTERFACE_PARAMETER = "PROTOCOL AXI4LITE" *)\n'
        elif p.name == "irq":
            outer = p.name
            attr = ('  (* X_INTERFACE_INFO = "xilinx.com:signal:interrupt:1.0 irq INTERRUPT" *)\n'
                    '  (* X_INTERFACE_PARAMETER = "SENSITIVITY LEVEL_HIGH" *)\n')
        else:
            outer, attr = p.name, ""
        decl.append(f"{attr}  {d} {rng}{outer}")
        conns.append(f".{p.name}({outer})")
    lines.append(",\n".join(decl))
    lines.append(");")
    lines.append(f"  {TOP} core (\n    " + ",\n    ".join(conns) + "\n  );")
    lines += ["endmodule", "`default_nettype wire", ""]
    return "\n".join(lines)


def testbench(ports: list[Port], config_hash: int) -> str:
    """Reset the top, read ID, VERSION and CONFIG_HASH over AXI4-Lite, check them against the
    register map (sim/regs.py), print PASS or FAIL and $finish. The AXI4 master sees a memory that
    never answers (the registers need none)."""
    from edgemoe.quant.program import ISA_VERSION
    from edgemoe.sim import regs
    lines = ["// GENERATED by edgemoe export: register smoke test of " + TOP, "`timescale 1ns/1ps",
             "module tb_edgemoe_accel;", "  reg clk = 0, rst = 1;", "  always #5 clk = ~clk;"]
    for p in ports:
        rng = f"[{p.width - 1}:0] " if p.width > 1 else ""
        lines.append(f"  {'reg ' if p.direction == 'in' else 'wire'} {rng}{p.name}{' = 0' if p.direction == 'in' else ''};")
    conns = ", ".join([".clk(clk)", ".rst(rst)"] + [f".{p.name}({p.name})" for p in ports])
    checks = [("ID", regs.ID, regs.ACCEL_ID),
              ("VERSION", regs.VERSION, ISA_VERSION << 16 | regs.REGMAP_VERSION),
              ("CONFIG_HASH", regs.CONFIG_HASH, config_hash)]
    lines += [f"  {TOP} dut ({conns});",
              "  integer errors = 0;", "  reg [31:0] data;",
              "  task axil_read(input [7:0] addr, output [31:0] value);",
              "    begin",
              "      @(negedge clk); s_axil__araddr = addr; s_axil__arvalid = 1; s_axil__rready = 1;",
              "      @(posedge clk); while (!s_axil__arready) @(posedge clk);",
              "      @(negedge clk); s_axil__arvalid = 0;",
              "      while (!s_axil__rvalid) @(posedge clk);",
              "      value = s_axil__rdata; @(negedge clk); s_axil__rready = 0;",
              "    end",
              "  endtask",
              "  initial begin",
              "    repeat (4) @(posedge clk); rst = 0;"]
    for name, off, want in checks:
        lines += [f"    axil_read(8'h{off:02x}, data);",
                  f"    if (data !== 32'h{want:08x}) begin errors = errors + 1; "
                  f"$display(\"FAIL {name}: %h, expected {want:08x}\", data); end"]
    lines += ['    if (errors == 0) $display("PASS: ID, VERSION, CONFIG_HASH");',
              "    $finish;", "  end",
              "  initial begin #100000; $display(\"FAIL: timeout\"); $finish; end",
              "endmodule", ""]
    return "\n".join(lines)


def fusesoc_core(board: Board, clock_mhz: float) -> str:
    # Plain YAML written by hand: fusesoc's CAPI2 is a fixed schema and this stays readable.
    return f"""CAPI=2:
# GENERATED by edgemoe export. fusesoc --cores-root . run --target <lint|sim|synth|vivado> {VLNV}
name: {VLNV}
description: edgemoe M3ViT accelerator (AXI4 master for DRAM, AXI4-Lite registers, irq)

filesets:
  rtl:
    files: [rtl/{TOP}.v]
    file_type: verilogSource
  bd_wrapper:
    files: [rtl/{TOP}_bd.v]
    file_type: verilogSource
  tb:
    files: [tb/tb_{TOP}.v]
    file_type: verilogSource
  constraints:
    files: [vivado/{TOP}.xdc]
    file_type: xdc

targets:
  default: &default
    filesets: [rtl]
    toplevel: {TOP}

  lint:
    <<: *default
    default_tool: verilator
    description: Verilator lint of the generated RTL
    tools:
      verilator:
        mode: lint-only
        # Amaranth's output has unused bits and wide constants by construction: warnings only
        verilator_options: [-Wno-fatal, -Wno-WIDTHEXPAND, -Wno-WIDTHTRUNC, -Wno-UNUSEDSIGNAL]

  sim:
    default_tool: icarus
    description: register smoke test (reset, ID / VERSION / CONFIG_HASH over AXI4-Lite)
    filesets: [rtl, tb]
    toplevel: tb_{TOP}
    tools:
      icarus:
        iverilog_options: [-g2012]
      verilator:
        mode: binary
        verilator_options: [--timing, -Wno-fatal, -Wno-WIDTHEXPAND, -Wno-WIDTHTRUNC, -Wno-UNUSEDSIGNAL]

  synth:
    default_tool: yosys
    description: Yosys synth_xilinx (UltraScale+ family) of the RTL
    filesets: [rtl]
    toplevel: {TOP}
    tools:
      yosys:
        arch: xilinx
        output_format: json
        yosys_synth_options: [-family, xcup]

  vivado:
    default_tool: vivado
    description: Vivado synthesis / implementation of the RTL alone ({board.device}, {clock_mhz:g} MHz)
    filesets: [rtl, constraints]
    toplevel: {TOP}
    tools:
      vivado:
        part: {board.device}
"""


def xdc(clock_mhz: float) -> str:
    period = 1000.0 / clock_mhz
    return (f"# GENERATED by edgemoe export: {clock_mhz:g} MHz on clk (the block design clocks the\n"
            f"# accelerator from the PS's pl_clk0 and derives this constraint itself)\n"
            f"create_clock -name clk -period {period:.3f} [get_ports clk]\n")


def vivado_tcl(board: Board, hwcfg, mem_bytes: int) -> str:
    mhz = hwcfg.clock_mhz
    return f"""# GENERATED by edgemoe export: Vivado project + block design for {board.name} ({board.device}).
# Run from this folder's parent: vivado -mode batch -source vivado/create_project.tcl
# Needs the {board.name} board files ({board.board_part}) for the PS preset.
set here [file normalize [file dirname [info script]]]
set root [file dirname $here]
set proj_dir [file join $root vivado edgemoe_{board.name}]

create_project edgemoe_{board.name} $proj_dir -part {board.device} -force
set_property board_part {board.board_part} [current_project]
add_files -norecurse [list [file join $root rtl {TOP}.v] \\
  [file join $root rtl {TOP}_bd.v]]
add_files -fileset constrs_1 -norecurse [file join $here {TOP}.xdc]
# The out-of-context clock constraint applies to the RTL alone, not inside the block design.
set_property used_in_synthesis false [get_files {TOP}.xdc]
set_property used_in_implementation false [get_files {TOP}.xdc]
update_compile_order -fileset sources_1

create_bd_design edgemoe
set ps [create_bd_cell -type ip -vlnv xilinx.com:ip:zynq_ultra_ps_e zynq_ultra_ps_e_0]
apply_bd_automation -rule xilinx.com:bd_rule:zynq_ultra_ps_e -config {{apply_board_preset 1}} $ps
# HPM0_FPD master (registers), HP0 slave (accelerator DRAM traffic), PL clock, irq.
set_property -dict [list \\
  CONFIG.PSU__USE__M_AXI_GP0 1 \\
  CONFIG.PSU__USE__M_AXI_GP1 0 \\
  CONFIG.PSU__USE__M_AXI_GP2 0 \\
  CONFIG.PSU__USE__S_AXI_GP2 1 \\
  CONFIG.PSU__SAXIGP2__DATA_WIDTH {hwcfg.axi_data_bits if hwcfg.axi_data_bits <= 128 else 128} \\
  CONFIG.PSU__USE__IRQ0 1 \\
  CONFIG.PSU__FPGA_PL0_ENABLE 1 \\
  CONFIG.PSU__CRL_APB__PL0_REF_CTRL__FREQMHZ {mhz:g} \\
] $ps

set accel [create_bd_cell -type module -reference {TOP}_bd edgemoe_0]
set rst [create_bd_cell -type ip -vlnv xilinx.com:ip:proc_sys_reset rst_pl0]
set ctrl_ic [create_bd_cell -type ip -vlnv xilinx.com:ip:smartconnect ctrl_smc]
set_property CONFIG.NUM_SI 1 $ctrl_ic
set mem_ic [create_bd_cell -type ip -vlnv xilinx.com:ip:smartconnect mem_smc]
set_property CONFIG.NUM_SI 1 $mem_ic

# one clock (pl_clk0 at {mhz:g} MHz) for the PS ports, the interconnects and the accelerator
set clk [get_bd_pins $ps/pl_clk0]
connect_bd_net $clk [get_bd_pins $ps/maxihpm0_fpd_aclk] [get_bd_pins $ps/saxihp0_fpd_aclk] \\
  [get_bd_pins $rst/slowest_sync_clk] [get_bd_pins $ctrl_ic/aclk] [get_bd_pins $mem_ic/aclk] \\
  [get_bd_pins $accel/aclk]
connect_bd_net [get_bd_pins $ps/pl_resetn0] [get_bd_pins $rst/ext_reset_in]
connect_bd_net [get_bd_pins $rst/peripheral_aresetn] [get_bd_pins $accel/aresetn] \\
  [get_bd_pins $ctrl_ic/aresetn] [get_bd_pins $mem_ic/aresetn]

# registers: HPM0_FPD -> SmartConnect (AXI4 to AXI4-Lite) -> s_axil
connect_bd_intf_net [get_bd_intf_pins $ps/M_AXI_HPM0_FPD] [get_bd_intf_pins $ctrl_ic/S00_AXI]
connect_bd_intf_net [get_bd_intf_pins $ctrl_ic/M00_AXI] [get_bd_intf_pins $accel/s_axil]
# DRAM: m_axi ({hwcfg.axi_data_bits} bit) -> SmartConnect (width conversion) -> S_AXI_HP0_FPD -> DDR
connect_bd_intf_net [get_bd_intf_pins $accel/m_axi] [get_bd_intf_pins $mem_ic/S00_AXI]
connect_bd_intf_net [get_bd_intf_pins $mem_ic/M00_AXI] [get_bd_intf_pins $ps/S_AXI_HP0_FPD]
connect_bd_net [get_bd_pins $accel/irq] [get_bd_pins $ps/pl_ps_irq0]

# addresses: the register file at {board.reg_base:#x} (4 KiB), the accelerator sees DDR_LOW
assign_bd_address -target_address_space [get_bd_addr_spaces $ps/Data] \\
  [get_bd_addr_segs $accel/s_axil/reg0] -offset {board.reg_base:#x} -range 4K
assign_bd_address -target_address_space [get_bd_addr_spaces $accel/m_axi] \\
  [get_bd_addr_segs $ps/SAXIGP2/HP0_DDR_LOW] -offset 0x0 -range {board.ddr_low_bytes // (1 << 30)}G
# the memory image needs {mem_bytes:,} bytes of that window (PYNQ allocates it in DDR_LOW)

validate_bd_design
save_bd_design
set bd_file [get_files edgemoe.bd]
generate_target all $bd_file
set wrapper [make_wrapper -files $bd_file -top]
add_files -norecurse $wrapper
set_property top edgemoe_wrapper [current_fileset]
update_compile_order -fileset sources_1

# bitstream and the hardware hand-off (.xsa for PetaLinux / Vitis; .bit + .hwh for PYNQ)
launch_runs impl_1 -to_step write_bitstream -jobs 4
wait_on_run impl_1
write_hw_platform -fixed -include_bit -force -file [file join $root vivado edgemoe_{board.name}.xsa]
"""


def ipxact(ports: list[Port]) -> str:
    """IP-XACT 1685-2014 component of edgemoe_accel: the model's ports are exactly the Verilog's
    (clk, rst first), bus interfaces by port prefix (m_axi__ master, s_axil__ slave with the
    register memory map), clock, reset (active high) and interrupt."""
    ns = "http://www.accellera.org/XMLSchema/IPXACT/1685-2014"
    from edgemoe.sim.regmap import registers

    def port_maps(prefix):
        out = []
        for p in ports:
            if p.name.startswith(prefix):
                sig = p.name[len(prefix):].upper()
                out.append(f"""        <ipxact:portMap>
          <ipxact:logicalPort><ipxact:name>{sig}</ipxact:name></ipxact:logicalPort>
          <ipxact:physicalPort><ipxact:name>{p.name}</ipxact:name></ipxact:physicalPort>
        </ipxact:portMap>""")
        return "\n".join(out)

    def single(name, bus, logical, port, extra=""):
        return f"""    <ipxact:busInterface>
      <ipxact:name>{name}</ipxact:name>
      <ipxact:busType vendor="xilinx.com" library="signal" name="{bus}" version="1.0"/>
      <ipxact:abstractionTypes><ipxact:abstractionType>
        <ipxact:abstractionRef vendor="xilinx.com" library="signal" name="{bus}_rtl" version="1.0"/>
        <ipxact:portMaps><ipxact:portMap>
          <ipxact:logicalPort><ipxact:name>{logical}</ipxact:name></ipxact:logicalPort>
          <ipxact:physicalPort><ipxact:name>{port}</ipxact:name></ipxact:physicalPort>
        </ipxact:portMap></ipxact:portMaps>
      </ipxact:abstractionType></ipxact:abstractionTypes>
      <ipxact:slave/>{extra}
    </ipxact:busInterface>"""

    def axi(name, prefix, mode):
        extra = ("\n      <ipxact:slave><ipxact:memoryMapRef memoryMapRef=\"registers\"/></ipxact:slave>"
                 if mode == "slave" else "\n      <ipxact:master><ipxact:addressSpaceRef addressSpaceRef=\"m_axi\"/></ipxact:master>")
        return f"""    <ipxact:busInterface>
      <ipxact:name>{name}</ipxact:name>
      <ipxact:busType vendor="xilinx.com" library="interface" name="aximm" version="1.0"/>
      <ipxact:abstractionTypes><ipxact:abstractionType>
        <ipxact:abstractionRef vendor="xilinx.com" library="interface" name="aximm_rtl" version="1.0"/>
        <ipxact:portMaps>
{port_maps(prefix)}
        </ipxact:portMaps>
      </ipxact:abstractionType></ipxact:abstractionTypes>{extra}
      <ipxact:parameters><ipxact:parameter parameterId="PROTOCOL" resolve="immediate">
        <ipxact:name>PROTOCOL</ipxact:name><ipxact:value>{'AXI4LITE' if mode == 'slave' else 'AXI4'}</ipxact:value>
      </ipxact:parameter></ipxact:parameters>
    </ipxact:busInterface>"""

    addr_bits = next(p.width for p in ports if p.name == "m_axi__araddr")
    regs = "\n".join(f"""        <ipxact:register>
          <ipxact:name>{r.name}</ipxact:name>
          <ipxact:addressOffset>{r.offset:#x}</ipxact:addressOffset>
          <ipxact:size>32</ipxact:size>
          <ipxact:access>{ {'r': 'read-only', 'w': 'write-only', 'rw': 'read-write'}[r.sw] }</ipxact:access>
        </ipxact:register>""" for r in registers())
    port_xml = "\n".join(f"""      <ipxact:port>
        <ipxact:name>{p.name}</ipxact:name>
        <ipxact:wire>
          <ipxact:direction>{p.direction}</ipxact:direction>{f'''
          <ipxact:vectors><ipxact:vector><ipxact:left>{p.width - 1}</ipxact:left><ipxact:right>0</ipxact:right></ipxact:vector></ipxact:vectors>''' if p.width > 1 else ''}
        </ipxact:wire>
      </ipxact:port>""" for p in [Port("clk", 1, "in"), Port("rst", 1, "in")] + ports)
    vendor, library, name, version = VLNV.split(":")
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- GENERATED by edgemoe export: IP-XACT description of {TOP} -->
<ipxact:component xmlns:ipxact="{ns}">
  <ipxact:vendor>{vendor}</ipxact:vendor>
  <ipxact:library>{library}</ipxact:library>
  <ipxact:name>{name}</ipxact:name>
  <ipxact:version>{version}</ipxact:version>
  <ipxact:busInterfaces>
{axi("m_axi", "m_axi__", "master")}
{axi("s_axil", "s_axil__", "slave")}
{single("clk", "clock", "CLK", "clk", '''
      <ipxact:parameters><ipxact:parameter parameterId="ASSOCIATED_BUSIF" resolve="immediate">
        <ipxact:name>ASSOCIATED_BUSIF</ipxact:name><ipxact:value>m_axi:s_axil</ipxact:value>
      </ipxact:parameter><ipxact:parameter parameterId="ASSOCIATED_RESET" resolve="immediate">
        <ipxact:name>ASSOCIATED_RESET</ipxact:name><ipxact:value>rst</ipxact:value>
      </ipxact:parameter></ipxact:parameters>''')}
{single("rst", "reset", "RST", "rst", '''
      <ipxact:parameters><ipxact:parameter parameterId="POLARITY" resolve="immediate">
        <ipxact:name>POLARITY</ipxact:name><ipxact:value>ACTIVE_HIGH</ipxact:value>
      </ipxact:parameter></ipxact:parameters>''')}
{single("irq", "interrupt", "INTERRUPT", "irq", '''
      <ipxact:parameters><ipxact:parameter parameterId="SENSITIVITY" resolve="immediate">
        <ipxact:name>SENSITIVITY</ipxact:name><ipxact:value>LEVEL_HIGH</ipxact:value>
      </ipxact:parameter></ipxact:parameters>''').replace("<ipxact:slave/>", "<ipxact:master/>")}
  </ipxact:busInterfaces>
  <ipxact:addressSpaces>
    <ipxact:addressSpace>
      <ipxact:name>m_axi</ipxact:name>
      <ipxact:range>{1 << addr_bits:#x}</ipxact:range>
      <ipxact:width>{next(p.width for p in ports if p.name == "m_axi__rdata")}</ipxact:width>
    </ipxact:addressSpace>
  </ipxact:addressSpaces>
  <ipxact:memoryMaps>
    <ipxact:memoryMap>
      <ipxact:name>registers</ipxact:name>
      <ipxact:addressBlock>
        <ipxact:name>reg0</ipxact:name>
        <ipxact:baseAddress>0x0</ipxact:baseAddress>
        <ipxact:range>0x100</ipxact:range>
        <ipxact:width>32</ipxact:width>
{regs}
      </ipxact:addressBlock>
    </ipxact:memoryMap>
  </ipxact:memoryMaps>
  <ipxact:model>
    <ipxact:views>
      <ipxact:view><ipxact:name>rtl</ipxact:name><ipxact:componentInstantiationRef>verilog</ipxact:componentInstantiationRef></ipxact:view>
    </ipxact:views>
    <ipxact:instantiations>
      <ipxact:componentInstantiation>
        <ipxact:name>verilog</ipxact:name>
        <ipxact:language>verilog</ipxact:language>
        <ipxact:moduleName>{TOP}</ipxact:moduleName>
        <ipxact:fileSetRef><ipxact:localName>rtl</ipxact:localName></ipxact:fileSetRef>
      </ipxact:componentInstantiation>
    </ipxact:instantiations>
    <ipxact:ports>
{port_xml}
    </ipxact:ports>
  </ipxact:model>
  <ipxact:fileSets>
    <ipxact:fileSet>
      <ipxact:name>rtl</ipxact:name>
      <ipxact:file><ipxact:name>rtl/{TOP}.v</ipxact:name><ipxact:fileType>verilogSource</ipxact:fileType></ipxact:file>
    </ipxact:fileSet>
  </ipxact:fileSets>
  <ipxact:description>{escape("edgemoe M3ViT accelerator: AXI4 master (DRAM), AXI4-Lite registers, level irq")}</ipxact:description>
</ipxact:component>
"""


def program_header(program, input_bytes: int) -> str:
    """C defines of the compiled program for sw/edgemoe_host.c: region offsets in the memory
    image, sizes, ISA version and the CONFIG_HASH the bitstream must report."""
    from edgemoe.quant.program import ISA_VERSION, container_bytes
    cfg = program.cfg
    out_bytes = cfg.num_tokens * cfg.dim * container_bytes(program.qcfg.act)
    d = {"IMAGE_BYTES": program.image_bytes, "INPUT_BYTES": input_bytes, "OUTPUT_BYTES": out_bytes,
         **{f"{n.upper()}_OFFSET": r.offset for n, r in program.regions.items()}}
    lines = [f"/* GENERATED by edgemoe export: program of {cfg.name} / {program.qcfg.name} / "
             f"{program.hwcfg.name} (program/program.json) */",
             "#ifndef EDGEMOE_PROGRAM_H", "#define EDGEMOE_PROGRAM_H",
             f"#define EDGEMOE_ISA_VERSION {ISA_VERSION}u",
             f"#define EDGEMOE_CONFIG_HASH {program.config_hash:#010x}u"]
    lines += [f"#define EDGEMOE_{k} {v}u" for k, v in d.items()]
    lines += [f"#define EDGEMOE_TASK_{t.upper().replace('-', '_')} {i}u" for i, t in enumerate(cfg.tasks)]
    lines += ["#endif", ""]
    return "\n".join(lines)


def example_data(program, image=None) -> dict[str, bytes]:
    """input.bin (the host's IMAGE region bytes for `image`, default the seeded random image of
    sim/tb_accel.py) and expected_<task>.bin (the golden output features) for a board check."""
    import numpy as np

    from edgemoe.quant.interpreter import run_program
    from edgemoe.quant.program import container_bytes
    from edgemoe.sim.driver import host_image_bytes
    cfg = program.cfg
    if image is None:
        image = np.random.default_rng(1).normal(0, 1, (cfg.in_chans, cfg.img_h, cfg.img_w)).astype(np.float32)
    n = cfg.num_tokens * cfg.dim * container_bytes(program.qcfg.act)
    out = {"input.bin": host_image_bytes(program, image)[0].tobytes()}
    for t in cfg.tasks:
        out[f"expected_{t}.bin"] = bytes(run_program(program, image, t).output[:n])
    return out


# ---------------------------------------------------------------------------------------------
# the export
# ---------------------------------------------------------------------------------------------
def export_design(cfg, qcfg, hwcfg, weights, board: str, out, force: bool = False,
                  verilog: str | None = None, image=None, progress=print) -> dict:
    """Check, then write the hand-off folder (module docstring). weights: a state dict or QWeights for
    quant.compiler.compile_program. verilog: the accelerator's Verilog when the caller already
    has it (it must be for the same configs). image: the example input (float [C,H,W]) whose
    golden outputs go to program/expected_<task>.bin. Returns the manifest (files: {role: path})."""
    from edgemoe.hw.accel import Accelerator
    from edgemoe.hw.export import to_verilog
    from edgemoe.quant.compiler import compile_program
    from edgemoe.sim import regmap

    b = get_board(board)
    out = check_out_dir(out, force)
    hwcfg, est = check_design(cfg, qcfg, hwcfg, b)
    program = compile_program(cfg, qcfg, hwcfg, weights)
    if verilog is None:
        progress(f"generating the Verilog of {TOP} ({cfg.name} / {qcfg.name} / {hwcfg.name})...")
        verilog = to_verilog(Accelerator(cfg, qcfg, hwcfg), TOP)
    ports = [p for p in verilog_ports(verilog) if p.name not in ("clk", "rst")]
    root = regmap.compile_regmap()

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    def put(role, rel, text):
        p = out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        files[role] = p

    put("verilog", f"rtl/{TOP}.v", verilog)
    put("bd_wrapper", f"rtl/{TOP}_bd.v", bd_wrapper(ports))
    put("testbench", f"tb/tb_{TOP}.v", testbench(ports, program.config_hash))
    put("fusesoc_core", f"{TOP}.core", fusesoc_core(b, hwcfg.clock_mhz))
    put("vivado_tcl", "vivado/create_project.tcl", vivado_tcl(b, hwcfg, program.image_bytes))
    put("xdc", f"vivado/{TOP}.xdc", xdc(hwcfg.clock_mhz))
    put("ipxact", "component.xml", ipxact(ports))
    prog_dir = program.save(out / "program")
    files["program"], files["image"] = prog_dir / "program.json", prog_dir / "image.bin"
    for name, data in example_data(program, image).items():
        (prog_dir / name).write_bytes(data)
        files[name.removesuffix(".bin")] = prog_dir / name
    files["c_header"] = regmap.write_c_header(out / "sw" / "edgemoe_regs.h", root)
    put("c_program_header", "sw/edgemoe_program.h",
        program_header(program, (prog_dir / "input.bin").stat().st_size))
    files["c_host"] = Path(shutil.copy(HOST_C, out / "sw" / "edgemoe_host.c"))
    files["register_doc"] = regmap.write_markdown(out / "doc" / "registers.md", root)
    manifest = {"board": b.name, "device": b.device, "board_part": b.board_part,
                "model": cfg.name, "quant": qcfg.to_dict(), "hw": hwcfg.to_dict(),
                "config_hash": f"{program.config_hash:#010x}", "image_bytes": program.image_bytes,
                "resources_estimate": {"total": est["total"], "budget": est["budget"],
                                       "utilisation": est["utilisation"]},
                "ports": [[p.name, p.width, p.direction] for p in ports],
                "files": {k: str(v.relative_to(out)) for k, v in files.items()}}
    files["manifest"] = out / "manifest.json"
    manifest["files"]["manifest"] = "manifest.json"
    files["manifest"].write_text(json.dumps(manifest, indent=1, default=float) + "\n")
    manifest["out"] = str(out)
    return manifest
