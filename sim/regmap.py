"""The register map, from its one description (sim/regmap.rdl, SystemRDL) to everything that needs it.

  compile_regmap()      the elaborated map (systemrdl-compiler), VERSION.ISA = quant.program.ISA_VERSION
  registers()           [Reg(name, offset, sw, fields)] in address order
  python_constants()    the text of sim/regs.py (checked in: hw/accel.py and sim/driver.py import it,
                        so importing the RTL needs no SystemRDL compiler)
  write_c_header(path)  <path>: peakrdl-cheader (struct + #define offsets) + the constants below
  write_markdown(path)  <path>: peakrdl-markdown register documentation
`python -m edgemoe.sim.regmap [--docs DIR]` rewrites sim/regs.py (and writes DIR/edgemoe_regs.h,
DIR/edgemoe_regs.md); tests/test_regmap.py fails while the checked-in regs.py is not current.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

RDL = Path(__file__).with_name("regmap.rdl")
REGS_PY = Path(__file__).with_name("regs.py")


@dataclass(frozen=True)
class Field:
    name: str
    lsb: int
    width: int
    reset: int | None
    sw: str            # "r", "w" or "rw"

    @property
    def mask(self) -> int:
        return ((1 << self.width) - 1) << self.lsb


@dataclass(frozen=True)
class Reg:
    name: str
    offset: int
    fields: tuple[Field, ...]

    @property
    def sw(self) -> str:
        """"r" / "w" / "rw": what software may do with the register as a whole."""
        acc = {f.sw for f in self.fields}
        return "rw" if "rw" in acc or acc == {"r", "w"} else acc.pop()

    @property
    def reset(self) -> int:
        """Reset value (fields without a reset, i.e. values the hardware drives, count as 0)."""
        return sum((f.reset or 0) << f.lsb for f in self.fields)

    def writable_mask(self) -> int:
        return sum(f.mask for f in self.fields if "w" in f.sw)

    def readable_mask(self) -> int:
        return sum(f.mask for f in self.fields if "r" in f.sw)


def compile_regmap(isa_version: int | None = None):
    """The elaborated root of regmap.rdl (systemrdl RootNode); raises on any RDL error."""
    from systemrdl import RDLCompiler
    if isa_version is None:
        from edgemoe.quant.program import ISA_VERSION as isa_version
    rdlc = RDLCompiler()
    rdlc.compile_file(str(RDL))
    return rdlc.elaborate("edgemoe_regs", parameters={"ISA_VERSION": int(isa_version)})


def _sw(field) -> str:
    from systemrdl.rdltypes import AccessType
    acc = field.get_property("sw")
    return {AccessType.r: "r", AccessType.w: "w", AccessType.rw: "rw",
            AccessType.rw1: "rw", AccessType.w1: "w"}[acc]


def registers(root=None) -> list[Reg]:
    root = root or compile_regmap()
    out = []
    for r in root.top.registers():
        fields = tuple(Field(f.inst_name, f.lsb, f.width, f.get_property("reset"), _sw(f))
                       for f in r.fields())
        out.append(Reg(r.inst_name, r.address_offset, fields))
    return sorted(out, key=lambda r: r.offset)


def _by_name(regs):
    return {r.name: r for r in regs}


def python_constants(root=None) -> str:
    """Text of sim/regs.py. Names: one offset per register (CYCLE_COUNT_LO ...), the LO offset
    under the pair's name for 64-bit pairs (CYCLE_COUNT = CYCLE_COUNT_LO, as the driver and RTL
    address them), <REG>_<FIELD> masks of single-bit fields, the ID/REGMAP reset values."""
    regs = registers(root)
    by = _by_name(regs)
    lines = ['"""Register map constants. GENERATED from sim/regmap.rdl by edgemoe.sim.regmap: do not edit;',
             'run `python -m edgemoe.sim.regmap` after changing the .rdl (tests/test_regmap.py checks it)."""',
             "",
             f"REGMAP_VERSION = {_field(by, 'VERSION', 'REGMAP').reset}",
             f"ACCEL_ID = {by['ID'].reset:#010x}",
             "", "# byte offsets"]
    lines += [f"{r.name} = {r.offset:#04x}" for r in regs]
    pairs = [r.name[:-3] for r in regs if r.name.endswith("_LO") and r.name[:-3] + "_HI" in by]
    lines += ["", "# 64-bit LO/HI pairs, addressed by their LO offset (HI at +4)"]
    lines += [f"{p} = {p}_LO" for p in pairs]
    lines += [f"PAIRS = ({', '.join(repr(p) for p in pairs)},)"]
    lines += ["", "# single-bit fields as masks"]
    for r in regs:
        for f in r.fields:
            if f.width == 1:
                lines.append(f"{r.name}_{f.name} = {f.mask:#x}")
    lines += ["", "# per register: (offset, software access 'r' | 'w' | 'rw', reset, writable bits, readable bits)",
              "REGISTERS = {"]
    lines += [f"    {r.name!r}: ({r.offset:#04x}, {r.sw!r}, {r.reset:#x}, {r.writable_mask():#x}, "
              f"{r.readable_mask():#x})," for r in regs]
    lines += ["}", ""]
    return "\n".join(lines)


def _field(by, reg, field) -> Field:
    return next(f for f in by[reg].fields if f.name == field)


def write_c_header(path, root=None) -> Path:
    """peakrdl-cheader's header (register struct, EDGEMOE_REGS__<REG> offsets and
    EDGEMOE_REGS__<REG>__<FIELD>_bm/_bp/_bw/_reset defines) for the C host program."""
    from peakrdl_cheader.exporter import CHeaderExporter
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # reuse_typedefs=False: names from the register paths, not from hashed shared types
    CHeaderExporter().export(root or compile_regmap(), str(path), reuse_typedefs=False)
    return path


def write_markdown(path, root=None) -> Path:
    from peakrdl_markdown import MarkdownExporter
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    MarkdownExporter().export(root or compile_regmap(), str(path), input_files=[RDL.name])
    return path


def register_checks(config_hash: int, ro_writes: bool = True):
    """The register map as a test: steps ("r32", offset, expected, what) / ("w32", offset, value)
    for any MMIO (the RTL over AXI4-Lite, the Python model). Fresh from reset: every readable
    register reads its reset value (CONFIG_HASH: config_hash; write-only: 0); read-write
    registers keep exactly their writable bits; with ro_writes, writes to read-only registers
    change nothing (the RTL ignores them; PythonMMIO refuses them, so it runs without).
    CTRL is never written (it would start a run). Run with run_register_checks."""
    from . import regs
    for name, (off, sw, reset, wmask, rmask) in regs.REGISTERS.items():
        want = config_hash if name == "CONFIG_HASH" else reset & rmask
        yield ("r32", off, want, f"{name} after reset")
        if sw == "rw":
            for v in (0xFFFF_FFFF, 0xA5A5_5A5A, 0):
                yield ("w32", off, v)
                yield ("r32", off, v & wmask & rmask, f"{name} after writing {v:#010x}")
        elif sw == "r" and ro_writes:
            yield ("w32", off, ~want & 0xFFFF_FFFF)
            yield ("r32", off, want, f"{name} (read-only) after a write")


def run_register_checks(read32, write32, config_hash: int, ro_writes: bool = True) -> list[str]:
    """register_checks over plain read32 / write32; returns the mismatches (empty: agrees)."""
    bad = []
    for step in register_checks(config_hash, ro_writes):
        if step[0] == "w32":
            write32(step[1], step[2])
        elif (got := read32(step[1])) != step[2]:
            bad.append(f"{step[3]}: read {got:#010x}, expected {step[2]:#010x}")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgemoe.sim.regmap", description=__doc__.splitlines()[0])
    ap.add_argument("--docs", metavar="DIR", help="also write DIR/edgemoe_regs.h and DIR/edgemoe_regs.md")
    args = ap.parse_args(argv)
    root = compile_regmap()
    REGS_PY.write_text(python_constants(root))
    print(f"wrote {REGS_PY}")
    if args.docs:
        for p in (write_c_header(Path(args.docs) / "edgemoe_regs.h", root),
                  write_markdown(Path(args.docs) / "edgemoe_regs.md", root)):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
