"""The register map has one source, sim/regmap.rdl: the checked-in constants are generated from it,
the C header and docs come from it, the driver and the RTL use the constants, and the RTL and the
Python model behave as the description says."""
import re
import shutil
import subprocess

import pytest

from edgemoe.sim import regmap, regs


def test_checked_in_constants_are_current():
    # fails after an edit of regmap.rdl (or of quant.program.ISA_VERSION) until
    # `python -m edgemoe.sim.regmap` regenerates sim/regs.py
    assert regmap.REGS_PY.read_text() == regmap.python_constants(), \
        "sim/regs.py is stale: run `python -m edgemoe.sim.regmap`"


def test_map_contents():
    from edgemoe.quant.program import ISA_VERSION
    rs = regmap.registers()
    offs = [r.offset for r in rs]
    assert offs == list(range(0, 4 * len(rs), 4)), "registers are dense, 32-bit, in address order"
    assert regs.ACCEL_ID == 0x454D4F45 and regs.REGMAP_VERSION == 1
    assert regs.REGISTERS["VERSION"][2] == ISA_VERSION << 16 | regs.REGMAP_VERSION
    assert regs.REGISTERS["TASK_ID"][1:] == ("rw", 0, 0xFF, 0xFF)
    assert regs.REGISTERS["CTRL"][1] == "w" and regs.CTRL_START == 1
    assert (regs.STATUS_BUSY, regs.STATUS_DONE, regs.STATUS_ERROR) == (1, 2, 4)
    for p in regs.PAIRS:
        assert getattr(regs, p + "_HI") == getattr(regs, p + "_LO") + 4 == getattr(regs, p) + 4


def test_a_changed_description_changes_the_constants(tmp_path, monkeypatch):
    # the staleness test above can fail: move TASK_ID and the generated text differs
    src = regmap.RDL.read_text().replace("} TASK_ID @ 0x18;", "} TASK_ID @ 0x60;")
    (tmp_path / "regmap.rdl").write_text(src)
    monkeypatch.setattr(regmap, "RDL", tmp_path / "regmap.rdl")
    text = regmap.python_constants()
    assert "TASK_ID = 0x60" in text and text != regmap.REGS_PY.read_text()


def test_driver_and_rtl_use_the_generated_constants():
    from edgemoe.hw import accel
    from edgemoe.sim import driver
    for name in ("ID", "VERSION", "CTRL", "STATUS", "TASK_ID", "CONFIG_HASH", "PROGRAM_BASE",
                 "CYCLE_COUNT", "SAT_COUNT", "INSTR_COUNT", "ACCEL_ID", "REGMAP_VERSION"):
        assert getattr(driver, name) == getattr(regs, name)
    src = (regmap.REGS_PY.parent.parent / "hw" / "accel.py").read_text()
    assert "from edgemoe.sim import regs" in src
    # no register offset kept by hand in the RTL: every Case() on the register file uses regs.*
    assert not re.search(r"m\.Case\(0x", src)


def test_python_model_agrees_with_the_description():
    from edgemoe.hw.config import get_hw_preset
    from edgemoe.model.config import get_preset
    from edgemoe.quant.config import get_quant_preset
    from edgemoe.quant.program import config_hash
    from edgemoe.sim.driver import PythonMMIO
    cfg, q, hw = get_preset("tiny"), get_quant_preset("edge-moe-fixed"), get_hw_preset("small-8x8")

    class B:
        qcfg, hwcfg = q, hw
    m = PythonMMIO(B())
    # PythonMMIO refuses writes to read-only registers (an SLVERR), so those steps are left out
    assert regmap.run_register_checks(m.read32, m.write32, config_hash(q, hw), ro_writes=False) == []


def test_c_header_and_docs(tmp_path):
    h = regmap.write_c_header(tmp_path / "edgemoe_regs.h")
    md = regmap.write_markdown(tmp_path / "registers.md")
    text = h.read_text()
    assert "edgemoe_regs_t" in text and "EDGEMOE_REGS__STATUS__DONE_bm 0x2" in text
    doc = md.read_text()
    for r in regmap.registers():
        assert r.name in doc
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    # every register at its offset in the generated struct, checked by the C compiler itself
    asserts = "\n".join(f'static_assert(offsetof(edgemoe_regs_t, {r.name}) == {r.offset:#x}, "{r.name}");'
                        for r in regmap.registers())
    (tmp_path / "t.c").write_text(f'#include <stddef.h>\n#include "edgemoe_regs.h"\n{asserts}\n')
    subprocess.run([cc, "-Wall", "-Werror", "-c", "t.c", "-o", "t.o"], cwd=tmp_path, check=True)
