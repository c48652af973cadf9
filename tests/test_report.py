"""`edgemoe report` on the tiny preset: one folder, labelled figures, JSON and report.md."""
import json

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_tiny(tmp_path):
    from edgemoe.sim.cli import main
    from edgemoe.sim.cmd_bench import _Rapl
    out = tmp_path / "rep"
    assert main(["report", "--preset", "tiny", "--quant", "edge-moe-fixed", "--cpu-iters", "3",
                 "--out", str(out)]) == 0
    for f in ("latency_breakdown.png", "energy.png", "resources.png", "quant_report.png", "pareto.png"):
        assert (out / f).read_bytes()[:8] == PNG, f
    idx = json.loads((out / "report.json").read_text())
    labels = {k: v["label"] for k, v in idx["artefacts"].items()}
    assert set(labels) == {"latency", "energy", "resources", "quant", "sweep"}
    for k in ("latency", "resources", "sweep"):
        assert labels[k].startswith("ESTIMATE"), k
    assert "COMPUTED" in labels["quant"] and "MEASURED here" in labels["energy"]
    for v in idx["artefacts"].values():
        assert all((out / f).exists() for f in v["files"])

    md = (out / "report.md").read_text()
    for f in ("latency_breakdown.png", "energy.png", "resources.png", "quant_report.png", "pareto.png",
              "perf.json", "energy.json", "sweep.json"):
        assert f"({f})" in md, f
    assert "## Headline (ESTIMATE)" in md and "**measured**: measured on cpu" in md
    assert "**published**" in md and "calibrated on Edge-MoE" in md
    perf = json.loads((out / "perf.json").read_text())
    assert f"{perf['totals']['cycles']:,} cycles" in md
    energy = json.loads((out / "energy.json").read_text())
    cpu = next(r for r in energy["rows"] if r["kind"] == "measured")
    if not _Rapl().available():                 # no invented CPU energy figure
        assert cpu["j_per_image"] is None and "not measured (" in md
    q = json.loads((out / "quant_report.json").read_text())
    assert set(q["presets"]) == {"edge-moe-fixed"} and q["presets"]["edge-moe-fixed"]["approx_errors"]
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["best"] is not None and "(best)" in md
