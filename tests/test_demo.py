import json

from edgemoe.sim.demo import main


def test_demo_quick_tiny(tmp_path):
    """The demo end to end on the tiny preset (stages 1-6): outputs exist, the compiled program
    run by the host driver and by the RTL top equals the golden model bit for bit, both tasks."""
    out = tmp_path / "demo"
    assert main(["--preset", "tiny", "--quick", "--out", str(out), "--bench-iters", "2"]) == 0
    rep = json.loads((out / "demo.json").read_text())
    assert (out / "float_outputs.png").stat().st_size > 5000
    for task in ("semseg", "depth"):
        assert rep["accelerator"][task]["bit_exact_vs_golden"] is True
        assert rep["golden"][task]["cosine"] > 0.999
        assert rep["accelerator"][task]["cycles_estimate"] > 0
    assert rep["profile"]["summary"]["backbone_params"] > 0
    for task in ("semseg", "depth"):      # stage 6: the tiny preset through the RTL top
        r = rep["rtl_tiny"][task]
        assert r["bit_exact"] is True and r["cycles"] > 0 and abs(r["model_error"]) < 0.05
