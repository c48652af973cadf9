"""`edgemoe synth --top`: the Yosys script, stat parsing (hierarchy totals, per-submodule
groups, buffers vs controller), budget percentages, progress reporting and the CLI, on canned
Yosys output (fast); a real synthesis of the tiny accelerator behind `slow`."""
import json
import subprocess
import sys

import pytest

from edgemoe.hw.synth import SynthError
from edgemoe.hw.synth_accel import (CORE, TOP, last_pass, parse_stat, result_dict, run_yosys_progress,
                            submodules_in, synth_script)

SUBS = ["attention", "axil", "axim", "gate", "layernorm", "linear", "load", "store"]


def test_script_keeps_engines_and_synthesises_out_of_context():
    s = synth_script(SUBS).splitlines()
    assert s[:4] == ["read_rtlil design.il", f"hierarchy -top {TOP}", "proc", "splitnets"]
    keep = s[4].split()
    assert keep[:4] == ["setattr", "-mod", "-set", "keep_hierarchy"]
    assert keep[5:] == [f"{CORE}.{x}" for x in SUBS]
    assert s[5] == f"synth_xilinx -family xcup -top {TOP} -flatten -noiopad"
    assert s[6] == "tee -q -o stat.json stat -json"
    assert synth_script(SUBS, "ecp5").splitlines()[5] == f"synth_ecp5 -top {TOP} -flatten"
    with pytest.raises(ValueError, match="xc7"):
        synth_script(SUBS, "xc7")


def test_submodules_found_in_rtlil_text():
    text = (f"module \\{TOP}\nend\nmodule \\{CORE}\nend\nmodule \\{CORE}.linear\nend\n"
            f"module \\{CORE}.linear.cu\nend\nmodule \\{CORE}.axim\nend\nmodule \\{CORE}.axim.wq\nend\n")
    assert submodules_in(text) == ["axim", "linear"]


def _canned_stat():
    """stat -json of a flattened top holding two kept engines (one instantiated twice, to
    check the instance multiplication), the buffers' RAMB cells and controller logic."""
    def m(cells):
        return {"num_cells": sum(cells.values()), "num_cells_by_type": cells}
    return {
        "creator": "Yosys 0.70 (git sha1 deadbeef)",
        "modules": {
            f"\\{TOP}": m({"LUT6": 100, "FDRE": 50, "RAMB36E2": 3, "RAMB18E2": 1, "CARRY8": 2,
                           f"\\{CORE}.linear": 1, f"\\{CORE}.axim": 2, "$scopeinfo": 4}),
            f"\\{CORE}.linear": m({"LUT2": 10, "LUT6_2": 5, "FDRE": 7, "FDSE": 1, "DSP48E2": 9,
                                   "RAMB18E2": 2}),
            f"\\{CORE}.axim": m({"LUT3": 4, "FDCE": 6, "SRL16E": 1, "RAM32M": 2}),
        },
        "design": {"num_cells_by_type": {"LUT6": 100}},   # ignored: totals come from the modules
    }


def test_parse_stat_totals_groups_and_buffers():
    p = parse_stat(_canned_stat())
    t = p["total"]
    assert (t["lut"], t["ff"], t["dsp"], t["bram36"]) == (100 + 15 + 8, 50 + 8 + 12, 9, 3 + 0.5 + 1)
    g = p["groups"]
    assert (g["linear"]["lut"], g["linear"]["dsp"], g["linear"]["bram36"]) == (15, 9, 1)
    assert (g["axi"]["lut"], g["axi"]["ff"], g["axi"]["lutram"], g["axi"]["srl"]) == (8, 12, 4, 2)
    assert g["buffers"]["bram36"] == 3.5 and g["buffers"]["lut"] == 0
    assert (g["controller"]["lut"], g["controller"]["ff"], g["controller"]["bram36"]) == (100, 50, 0)
    for k in ("lut", "ff", "dsp", "bram36"):
        assert sum(x[k] for x in g.values()) == t[k]
    assert "gate" not in g                # not in the design -> no group
    assert p["yosys"] == "Yosys 0.70"
    assert not any(c.startswith("$scopeinfo") or CORE in c for c in p["cells"])


def test_memory_mapping_from_the_log():
    from edgemoe.hw.synth_accel import memory_mapping
    log = ("5.34. Executing MEMORY_LIBMAP pass (mapping memories to cells).\n"
           f"mapping memory {CORE}.buf_X via $__XILINX_BLOCKRAM_SDP_\n"
           f"mapping memory {CORE}.queue via $__XILINX_LUTRAM_SDP_\n"
           "5.39. Executing MEMORY_MAP pass (converting memories to logic and flip-flops).\n"
           f"Mapping memory \\cu.gelu.rom0 in module \\{CORE}.linear:\n")
    assert memory_mapping(log) == {f"{CORE}.buf_X": "block RAM ($__XILINX_BLOCKRAM_SDP_)",
                                   f"{CORE}.queue": "LUT RAM ($__XILINX_LUTRAM_SDP_)",
                                   f"{CORE}.linear.cu.gelu.rom0": "logic/FF (memory_map)"}


def test_parse_stat_ecp5_counts_lattice_cells():
    st = {"creator": "Yosys 0.70", "modules": {
        f"\\{TOP}": {"num_cells_by_type": {"LUT4": 10, "CCU2C": 3, "TRELLIS_FF": 7, "DP16KD": 2,
                                              f"\\{CORE}.gate": 1}},
        f"\\{CORE}.gate": {"num_cells_by_type": {"MULT18X18D": 4, "TRELLIS_DPR16X4": 1, "LUT4": 5}}}}
    p = parse_stat(st, "ecp5")
    assert p["total"] == {"lut": 21, "ff": 7, "dsp": 4, "bram": 2, "lutram": 1, "carry": 3}
    assert p["groups"]["buffers"]["bram"] == 2 and p["groups"]["gate"]["dsp"] == 4
    assert p["groups"]["controller"]["lut"] == 16


def test_parse_stat_without_top_names_the_modules():
    st = _canned_stat()
    del st["modules"][f"\\{TOP}"]
    with pytest.raises(SynthError, match="edgemoe_accel.core.linear"):
        parse_stat(st)


def test_result_has_budget_percentages_and_estimate():
    from edgemoe.hw.config import get_hw_preset
    from edgemoe.hw.synth_accel import format_result
    from edgemoe.model.config import get_preset
    from edgemoe.quant.config import get_quant_preset
    cfg, q = get_preset("tiny"), get_quant_preset("edge-moe-fixed")
    hw = get_hw_preset("small-8x8").replace(act_buffer_tokens=16)
    res = result_dict(parse_stat(_canned_stat()), cfg, q, hw, "xcup", synth_script(SUBS), 1.0)
    assert res["budget"] == {"name": "xczu9eg", "lut": 274_080, "ff": 548_160, "dsp": 2520, "bram36": 912}
    assert res["utilisation_pct"]["dsp"] == round(100 * 9 / 2520, 2)
    assert res["utilisation_pct"]["bram36"] == round(100 * 4.5 / 912, 2)
    assert res["config"]["act_buffer_tokens"] == 16 and res["lut"] == 123
    from edgemoe.sim.resources import estimate_resources
    est = estimate_resources(cfg, q, hw)
    assert res["estimate"]["total"] == est["total"]
    assert res["estimate"]["groups"]["linear"]["dsp"] == (est["units"]["mac_array"]["dsp"]
                                                          + est["units"]["epilogue"]["dsp"])
    text = format_result(res)
    assert "xczu9eg budget" in text and "estimate" in text and "buffers" in text
    json.dumps(res)


_POPEN = subprocess.Popen


def _fake_yosys(tmp_path, monkeypatch, body):
    """Replace the Yosys child with a Python script `body` (run in the work directory)."""
    def popen(cmd, **kw):
        return _POPEN([sys.executable, "-c", body], **kw)
    monkeypatch.setattr("edgemoe.hw.synth_accel.subprocess.Popen", popen)


def test_progress_reports_the_current_pass(tmp_path, monkeypatch):
    assert last_pass("1. Executing RTLIL frontend.\n2. Executing HIERARCHY pass (x).\n"
                     "2.1. Executing PROC pass.\n2.1.3. Executing OPT_EXPR pass.\n") == "2.1 PROC"
    _fake_yosys(tmp_path, monkeypatch,
                "import time\nopen('yosys.log','w').write('4.7. Executing ABC9 pass.\\n')\n"
                "time.sleep(0.6)")
    seen = []
    r = run_yosys_progress(tmp_path, timeout_s=30, progress=seen.append, every_s=0.2)
    assert r["seconds"] >= 0.5
    assert any("yosys: 4.7 ABC9" in s for s in seen), seen


def test_failure_and_timeout_name_the_pass(tmp_path, monkeypatch):
    _fake_yosys(tmp_path, monkeypatch,
                "import sys\nopen('yosys.log','w').write('5.3. Executing MEMORY_LIBMAP pass.\\n')\n"
                "sys.exit(3)")
    with pytest.raises(SynthError, match=r"exit 3\) in pass 5.3 MEMORY_LIBMAP"):
        run_yosys_progress(tmp_path, timeout_s=30, progress=None, every_s=0.1)
    _fake_yosys(tmp_path, monkeypatch,
                "import time\nopen('yosys.log','w').write('6. Executing ABC pass.\\n')\ntime.sleep(30)")
    with pytest.raises(SynthError, match="timed out after 0 s in pass 6 ABC"):
        run_yosys_progress(tmp_path, timeout_s=0.3, progress=None, every_s=0.1)


def test_cli_top_runs_the_script_and_writes_json(tmp_path, monkeypatch, capsys):
    """The command elaborates the real tiny top, writes run.ys, runs 'yosys' (a fake that checks
    the script and writes the canned stat.json) and prints / writes the result."""
    from edgemoe.sim.cli import main
    stat = json.dumps(_canned_stat())
    _fake_yosys(tmp_path, monkeypatch,
                "import sys\ns = open('run.ys').read()\n"
                "assert 'synth_xilinx -family xcup' in s and 'edgemoe_accel.core.gate' in s, s\n"
                "assert open('design.il').read().count('module ') > 10\n"
                f"open('stat.json','w').write({stat!r})\n"
                "open('yosys.log','w').write('mapping memory edgemoe_accel.core.buf_W via "
                "$__XILINX_BLOCKRAM_SDP_\\n')\n")
    out = tmp_path / "o"
    rc = main(["synth", "--top", "--preset", "tiny", "--hw", "small-8x8", "--act-buffer-tokens", "16",
               "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    res = json.loads((out / "synth_accel.json").read_text())
    assert (res["lut"], res["dsp"], res["bram36"]) == (123, 9, 4.5)
    assert res["config"] == {"model": "tiny", "quant": "edge-moe-fixed", "hw": "small-8x8",
                             "act_buffer_tokens": 16}
    assert "elaborating edgemoe_accel" in text and "xczu9eg budget" in text
    assert res["memories"] == {f"{CORE}.buf_W": "block RAM ($__XILINX_BLOCKRAM_SDP_)"}
    assert "memories as block RAM (1): buf_W" in text
    assert (out / "run.ys").read_text() == res["script"]
    assert res["script"] == synth_script(SUBS)


def test_cli_argument_errors(capsys):
    from edgemoe.sim.cli import main
    assert main(["synth"]) == 2
    assert main(["synth", "--top", "--unit", "gelu"]) == 2
    assert main(["synth", "--unit", "gelu", "--target", "ecp5"]) == 2
    assert main(["synth", "--top", "--hw", "nope"]) == 2
    out = capsys.readouterr().out
    assert "--unit NAME" in out and "not both" in out and "'nope'" in out


@pytest.mark.slow
def test_synth_accel_tiny_resource_baseline(tmp_path):
    """Real Yosys synth_xilinx of the tiny accelerator on small-8x8 with 16-token buffers
    (several minutes, hence `slow`), against tests/baselines/synth_accel_tiny.json."""
    from edgemoe.hw.config import get_hw_preset
    from edgemoe.hw.synth import check_synth_baseline
    from edgemoe.hw.synth_accel import synth_accel
    from edgemoe.model.config import get_preset
    from edgemoe.quant.config import get_quant_preset
    cfg, q = get_preset("tiny"), get_quant_preset("edge-moe-fixed")
    hw = get_hw_preset("small-8x8").replace(act_buffer_tokens=16)
    res = synth_accel(cfg, q, hw, workdir=tmp_path, timeout_s=3600, progress=None)
    g = res["groups"]
    assert set(g) == {"linear", "attention", "layernorm", "gate", "load_store", "axi", "buffers",
                      "controller"}
    for k in ("lut", "ff", "dsp", "bram36"):
        assert sum(x[k] for x in g.values()) == res[k]
    # the compute unit's products are DSPs; the activation buffers are block RAM, not LUTs
    assert g["linear"]["dsp"] >= hw.t_in * hw.t_out
    assert g["buffers"]["bram36"] >= 1
    assert res["utilisation_pct"]["dsp"] < 100
    check_synth_baseline("accel_tiny", res)


@pytest.mark.parametrize("baseline,quant,hw", [
    ("synth_accel_edge_moe.json", "edge-moe-fixed", "zcu102-16x16"),
    ("synth_accel_edge_moe_w8.json", "w8a16-channel", "zcu102-w8-32x32"),
    # a prediction: the 8-bit MAC array is calibrated on the 32x32 top, not on this one
    ("synth_accel_edge_moe_w8_64x16.json", "w8a16-channel", "zcu102-w8-64x16"),
    # the fastest design: 64x16 with the 16384-beat weight FIFO (4 beats per word)
    ("synth_accel_edge_moe_w8_64x16_stream.json", "w8a16-channel", "zcu102-w8-64x16-stream")])
def test_resource_model_matches_synthesised_top(baseline, quant, hw):
    """sim/resources.py (used by the sweep and the power model) against the real synthesis of
    the whole edge-moe top (tests/baselines/, `edgemoe synth --top`): within 10 % per resource;
    the synthesised top fits its part."""
    import json
    from pathlib import Path
    from edgemoe.hw.config import PARTS, get_hw_preset
    from edgemoe.model.config import get_preset
    from edgemoe.quant.config import get_quant_preset
    from edgemoe.sim.resources import estimate_resources
    syn = json.loads((Path(__file__).parent / "baselines" / baseline).read_text())
    assert syn["config"]["quant"] == quant and syn["config"]["hw"] == hw
    h = get_hw_preset(hw)
    est = estimate_resources(get_preset("edge-moe"), get_quant_preset(quant), h)["total"]
    part = PARTS[h.part]
    for k in ("lut", "ff", "dsp", "bram36"):
        assert abs(est[k] - syn[k]) <= 0.10 * syn[k], (k, est[k], syn[k])
        assert syn[k] <= getattr(part, k), (k, syn[k], getattr(part, k))


def test_fit_problems_name_the_resource():
    from edgemoe.hw.synth_accel import fit_problems
    res = {"lut": 100, "ff": 10, "dsp": 3000, "bram36": 5,
           "budget": {"name": "xczu9eg", "lut": 274080, "ff": 548160, "dsp": 2520, "bram36": 912},
           "utilisation_pct": {"lut": 0.04, "ff": 0.0, "dsp": 119.05, "bram36": 0.5}}
    assert fit_problems(res) == ["DSP 3000 > 2520 (119.0% of xczu9eg)"]
    res["dsp"], res["utilisation_pct"]["dsp"] = 2000, 79.4
    assert fit_problems(res) == []
