"""edgemoe.Design (sim/api.py): the README's example, each call checked against the module it
wraps."""
import json
from pathlib import Path

import numpy as np
import pytest

import edgemoe

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
CKPT = Path(edgemoe.__file__).parent / "checkpoints" / "tiny.pt"


def test_design_from_checkpoint_golden_and_run():
    if not CKPT.is_file():
        pytest.skip("checkpoints/tiny.pt not present")
    d = edgemoe.Design(str(CKPT), quant="edge-moe-fixed", hw="small-8x8")
    assert d.cfg.name == "tiny" and "checkpoint" in repr(d)
    x = np.random.default_rng(0).normal(0, 1, (1, 3, d.cfg.img_h, d.cfg.img_w)).astype(np.float32)
    g = d.golden(x, "depth")
    assert g.shape == (d.cfg.num_tokens, d.cfg.dim) and np.issubdtype(g.dtype, np.integer)
    r = d.run(x, "depth")                  # the program on the Python model of the accelerator
    np.testing.assert_array_equal(r.features, g)
    assert r.cycles > 0 and r.dram_bytes_read > 0
    # the trained weights are used, not a seeded init
    assert not np.array_equal(g, edgemoe.Design("tiny", hw="small-8x8").golden(x, "depth"))


def test_design_bad_inputs():
    with pytest.raises(ValueError, match="unknown model preset"):
        edgemoe.Design("no-such-model")
    with pytest.raises(ValueError, match="weights"):
        edgemoe.Design("tiny", weights="trained")
    d = edgemoe.Design("tiny", weights="synthetic")
    with pytest.raises(ValueError, match="image shape"):
        d.golden(np.zeros((3, 8, 8), np.float32))


def test_design_simulate_export_report(tiny_design, tiny_verilog, tmp_path):
    cfg, q, hw, sd = tiny_design
    d = edgemoe.Design(cfg, quant=q, hw=hw, weights=sd)
    d._verilog = tiny_verilog              # the session's cached elaboration of the same configs
    x = np.random.default_rng(2).normal(0, 1, (3, cfg.img_h, cfg.img_w)).astype(np.float32)
    sim = d.simulate(x, tasks=["depth"], out_dir=tmp_path / "sim")
    t = sim["tasks"]["depth"]
    assert t["bit_exact"] and t["mismatches"] == 0 and t["cycles"] > 1000
    assert (d.verilog(tmp_path / "rtl")).read_text() == tiny_verilog
    m = d.export(tmp_path / "zcu102", board="zcu102", image=x)
    assert (tmp_path / "zcu102" / "rtl" / "edgemoe_accel.v").read_text() == tiny_verilog
    exp = (tmp_path / "zcu102" / "program" / "expected_depth.bin").read_bytes()
    from edgemoe.quant.program import encode_values
    assert exp == encode_values(d.golden(x, "depth").reshape(-1), q.act, "features").tobytes()[:len(exp)]
    rep = d.report(tmp_path / "report")
    assert rep["fit"]["ok"] and rep["results"]["simulate"]["tasks"]["depth"]["bit_exact"]
    assert rep["results"]["export"]["board"] == m["board"] == "zcu102"
    for f in rep["files"]:
        assert (tmp_path / "report" / f).stat().st_size > 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "ESTIMATE" in md and "bit-exact True" in md
    assert json.loads((tmp_path / "report" / "report.json").read_text())["model"] == "tiny"


@pytest.mark.slow
def test_readme_example_runs(tmp_path):
    """The README's Python API example, verbatim, in a fresh folder (minutes: it elaborates,
    simulates and synthesises the tiny top; `pytest -m slow`)."""
    import re
    import subprocess
    import sys
    readme = (Path(edgemoe.__file__).parent / "README.md").read_text()
    code = re.search(r"## Python API.*?```python\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "checkpoints").symlink_to(CKPT.parent)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out" / "zcu102" / "component.xml").is_file()
    assert (tmp_path / "out" / "report" / "report.md").is_file()
