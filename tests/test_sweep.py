"""Design-space sweep (sim/sweep.py, `edgemoe sweep`) through a Dask local cluster."""
import json

import pytest

from edgemoe.sim import sweep as sw

TINY_GRID = {"tiles": ["8x8", "16x16", "32x32"], "attn_p": [1, 4], "quant": ["edge-moe-fixed", "w8a16"],
             "dram_gbps": [4.8, 19.2], "axi_bits": [256]}


@pytest.fixture(scope="module")
def tiny_sweep():
    return sw.run_sweep("tiny", TINY_GRID)


def test_front_is_non_dominated_and_complete(tiny_sweep):
    pts, front = tiny_sweep["points"], tiny_sweep["front"]
    assert len(pts) == 3 * 2 * 2 * 2 and all(p["ok"] for p in pts)
    fitting = [i for i, p in enumerate(pts) if p["fits"]]
    assert front and set(front) <= set(fitting)
    for i in front:                                   # nobody dominates a front point
        assert not any(sw.dominates(pts[j], pts[i]) for j in fitting if j != i)
    for k in set(fitting) - set(front):               # everything else is dominated by the front
        assert any(sw.dominates(pts[i], pts[k]) for i in front)


def test_best_design_fits_and_is_fastest(tiny_sweep):
    pts = tiny_sweep["points"]
    b = pts[tiny_sweep["best"]]
    assert b["fits"] and all(v <= 1 for v in b["utilisation"].values())
    assert b["ms"] == min(p["ms"] for p in pts if p["fits"])
    # 32x32 tiles at 32-bit x 16-bit need 2 DSP per MAC: 2048 + attention + LayerNorm > 2520
    big = [p for p in pts if p["t_in"] == 32 and p["quant"] == "edge-moe-fixed"]
    assert big and all(not p["fits"] and p["dsp"] > 2520 for p in big)
    assert not any(pts[i]["t_in"] == 32 and pts[i]["quant"] == "edge-moe-fixed" for i in tiny_sweep["front"])
    assert "dask LocalCluster" in tiny_sweep["workers"] and tiny_sweep["estimate"]


def test_sweep_moves_the_right_way(tiny_sweep):
    pts = tiny_sweep["points"]

    def get(**kw):
        return next(p for p in pts if all(p[k] == v for k, v in kw.items()))
    a = get(t_in=8, attn_p=4, quant="w8a16", dram_gbps=19.2)
    b = get(t_in=16, attn_p=4, quant="w8a16", dram_gbps=19.2)
    assert b["dsp"] > a["dsp"] and b["ms"] < a["ms"]
    slow = get(t_in=16, attn_p=4, quant="edge-moe-fixed", dram_gbps=4.8)
    fast = get(t_in=16, attn_p=4, quant="edge-moe-fixed", dram_gbps=19.2)
    assert slow["ms"] > fast["ms"] and slow["dram_mb"] == fast["dram_mb"]


def test_unbuildable_point_is_reported():
    """A point the accelerator top cannot generate (tiny's head_dim 32 is not a multiple of
    64-lane buffer words; a 512-bit port) is an error naming why, never a silent estimate."""
    pts = [sw.evaluate_point(p, "tiny") for p in sw.grid_points(
        {"tiles": ["64x64"], "attn_p": [4], "quant": ["edge-moe-fixed"], "dram_gbps": [19.2], "axi_bits": [256]})
        + sw.grid_points({"tiles": ["16x16"], "attn_p": [4], "quant": ["edge-moe-fixed"],
                          "dram_gbps": [19.2], "axi_bits": [512]})]
    assert not pts[0]["ok"] and "head_dim = 32 must be a multiple of t_in = 64" in pts[0]["error"]
    assert not pts[1]["ok"] and "axi_data_bits must be 32..256, got 512" in pts[1]["error"]


def test_pareto_on_hand_made_points():
    P = [{"ok": True, "fits": True, "ms": 1, "dsp": 10, "j_per_image": 5},
         {"ok": True, "fits": True, "ms": 2, "dsp": 5, "j_per_image": 5},
         {"ok": True, "fits": True, "ms": 2, "dsp": 10, "j_per_image": 5},     # dominated by 0 and 1
         {"ok": True, "fits": False, "ms": 0.5, "dsp": 1, "j_per_image": 1},   # does not fit: ignored
         {"ok": False, "fits": False, "error": "x"},
         {"ok": True, "fits": True, "ms": 1, "dsp": 10, "j_per_image": 5}]     # tie with 0: both stay
    assert sw.pareto_front(P) == [0, 1, 5]
    assert sw.best_point(P) == 0


def test_grid_errors():
    with pytest.raises(sw.SweepError, match="16by16"):
        sw.parse_tiles("16by16")
    with pytest.raises(sw.SweepError, match="'attn_p' needs"):
        sw.grid_points({**TINY_GRID, "attn_p": []})


def test_sweep_cli_writes_json_and_png(tmp_path):
    from edgemoe.sim.cli import main
    assert main(["sweep", "--preset", "tiny", "--tiles", "8x8,16x16", "--attn-p", "4", "--quant", "w8a16",
                 "--dram-gbps", "19.2", "--axi-bits", "256,512", "--workers", "2", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "sweep.json").read_text())
    assert len(res["points"]) == 4 and res["best"] is not None and res["label"].startswith("ESTIMATE")
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_synth_results_replace_estimates(monkeypatch):
    """--synth plumbing: the front's points get the synthesised units' numbers (yosys itself is
    exercised by the units' own synth tests; here it is replaced by a stub returning a result)."""
    def fake_synth(pt, preset, timeout_s=900):    # runs on a Dask worker (a pickled copy)
        assert preset == "tiny"
        return {"softmax_stats": {"lut": 11, "ff": 22, "dsp": 3, "bram36": 0, "seconds": 0.0,
                                  "flow": "stub"}}
    monkeypatch.setattr(sw, "synth_units", fake_synth)

    def est(p):
        from edgemoe.model.config import get_preset
        from edgemoe.quant.config import get_quant_preset
        from edgemoe.sim.resources import estimate_resources
        return estimate_resources(get_preset("tiny"), get_quant_preset(p["quant"]), sw.point_hw(p))
    res = sw.run_sweep("tiny", {"tiles": ["8x8", "16x16"], "attn_p": [4], "quant": ["w8a16"],
                                "dram_gbps": [19.2], "axi_bits": [256]}, synth=True)
    assert res["front"]
    for i in res["front"]:
        p = res["points"][i]
        assert p["resources_measured"] == ["softmax_stats"] and p["synth"]["softmax_stats"]["lut"] == 11
        assert p["lut"] == 11 + sum(u["lut"] for n, u in est(p)["units"].items() if n != "softmax_stats")
    assert "synthesised" in res["synth"] and "some units synthesised" in res["label"]


def test_synthesised_attention_engine_replaces_its_softmax_parts():
    """--synth synthesises the whole attention engine (hw/attention.py): its result stands for
    attention_qk and the SoftmaxStats / SoftmaxNorm entries inside it drop to 0 (no double count)."""
    from edgemoe.model.config import get_preset
    from edgemoe.quant.config import get_quant_preset
    from edgemoe.hw.config import get_hw_preset
    from edgemoe.sim.resources import estimate_resources
    assert sw.SYNTH_UNITS["attention"] == "attention_qk" and "softmax" not in sw.SYNTH_UNITS
    cfg, q, hw = get_preset("tiny"), get_quant_preset("edge-moe-fixed"), get_hw_preset("zcu102-16x16")
    base = estimate_resources(cfg, q, hw)
    meas = {"lut": 30442, "ff": 17144, "dsp": 396, "bram36": 0}
    r = estimate_resources(cfg, q, hw, measured={"attention_qk": meas})
    assert r["units"]["softmax_stats"]["dsp"] == r["units"]["softmax_norm"]["lut"] == 0
    rest = [u for u in base["units"] if u not in ("attention_qk", "softmax_stats", "softmax_norm")]
    assert r["total"]["dsp"] == 396 + sum(base["units"][u]["dsp"] for u in rest)


def test_grid_lanes_and_non_square_tiles():
    """The LayerNorm lanes are a grid axis (0: = t_in; above a tile's t_in: no such point; 0
    and t_in are one point), non-square tiles are built as such, and a narrower LayerNorm
    costs cycles: tiny's 16x8 with 8 LayerNorm lanes is slower than with 16."""
    pts = sw.grid_points({"tiles": ["8x8", "16x8"], "attn_p": [4], "quant": ["w8a16"], "dram_gbps": [19.2],
                          "axi_bits": [256], "lanes": [0, 8, 16]})
    assert [(p["t_in"], p["t_out"], p["lanes"]) for p in pts] == [(8, 8, 8), (16, 8, 16), (16, 8, 8)]
    hw = sw.point_hw(pts[2])
    assert (hw.t_in, hw.t_out, hw.lanes) == (16, 8, 8) and "-l8-" in hw.name
    ev = [sw.evaluate_point(p, "tiny") for p in pts]
    assert all(e["ok"] for e in ev), [e.get("error") for e in ev]
    assert ev[2]["ms"] > ev[1]["ms"]
