import json

import pytest

from edgemoe.sim.cli import main
from edgemoe.sim.cmd_bench import measure


def test_bench_cli_tiny_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "--preset", "tiny", "--iters", "3", "--warmup", "1", "--batch", "2",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["batch"] == 2 and r["device"] == "cpu" and r["moe"].startswith("sparse")
    assert r["latency_ms_median"] > 0
    assert r["images_per_s"] == pytest.approx(2 / (r["latency_ms_median"] / 1e3))
    e = r["energy"]
    if not e["measured"]:   # never an invented figure where no counter exists
        assert "not measurable" in e["note"] and "joules_per_image" not in e
    assert "images/s" in capsys.readouterr().out


def test_bench_bad_requests():
    with pytest.raises(ValueError, match="--cuda-graph needs --device cuda"):
        measure("tiny", cuda_graph=True)
    with pytest.raises(ValueError, match="--batch must be >= 1"):
        measure("tiny", batch=0)
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            measure("tiny", device="cuda")


def test_bench_fidelity_tiny(capsys):
    """`make bench`'s fidelity part: both 8-bit-weight presets against the issue-12 targets, with
    figures that come from the quant report (GPTQ closer to float than nearest on tiny)."""
    from edgemoe.sim.bench import BENCHES, bench_fidelity
    assert BENCHES["fidelity"] is bench_fidelity
    r = bench_fidelity("tiny")
    assert list(r) == ["seeded"]          # trained weights exist only for edge-moe
    n, g = r["seeded"]["w8a16-channel"], r["seeded"]["w8a16-gptq"]
    for v in (n, g):
        assert 0.999 <= v["final_cosine_min"] <= 1.0 and 0.0 <= v["routing_changed"] <= 1.0
        assert len(v["final_sqnr_db"]) == 2
    assert min(g["final_sqnr_db"]) > min(n["final_sqnr_db"])
    # each refitted to the seeded weights: finer act, and closer to float than the preset
    for qn in ("w8a16-channel", "w8a16-gptq"):
        f = r["seeded"][qn + "-fit"]
        assert int(f["formats"]["act"].split(".")[1]) > int(r["seeded"][qn]["formats"]["act"].split(".")[1])
        assert min(f["final_sqnr_db"]) > min(r["seeded"][qn]["final_sqnr_db"])
        assert set(f["weight_groups"]) >= {"all", "router"}
    out = capsys.readouterr().out
    assert "w8a16-gptq" in out and "<= 0.5 %" in out
