"""Energy model (sim/energy.py) and `edgemoe energy` (sim/cmd_energy.py)."""
import copy
import json

import pytest

from edgemoe.hw.config import get_hw_preset
from edgemoe.model.config import get_preset
from edgemoe.quant.config import get_quant_preset
from edgemoe.sim import energy as en
from edgemoe.sim.perf_model import inference_cycles
from edgemoe.sim.resources import estimate_resources

EDGE = get_preset("edge-moe")
FIXED = get_quant_preset("edge-moe-fixed")
HW16 = get_hw_preset("zcu102-16x16")


@pytest.fixture(scope="module")
def edge_design():
    perf = inference_cycles(EDGE, FIXED, HW16)
    return perf, estimate_resources(EDGE, FIXED, HW16)


def test_calibration_reproduces_edge_moe(edge_design):
    cal = en.calibrate()
    pub = en.EDGE_MOE_PUBLISHED
    assert cal.model_w == pytest.approx(14.54, abs=1e-9) and abs(cal.residual_w) < 1e-9
    assert cal.static_w > 0 and cal.dynamic_w > 0 and cal.dram_w > 0
    # the calibration design run at Edge-MoE's measured latency gives its published W and J
    perf, res = edge_design
    cycles = round(pub["ms_per_image"] * 1e-3 * pub["clock_mhz"] * 1e6)
    e = en.power_from(res, perf, pub["clock_mhz"], cycles)
    assert e["watts"] == pytest.approx(14.54, abs=1e-6)
    assert e["ms_per_image"] == pytest.approx(34.64, rel=1e-6)
    assert e["j_per_image"] == pytest.approx(pub["j_per_image"], rel=1e-3)


def test_more_resources_more_watts(edge_design):
    perf, res = edge_design
    base = en.power_from(res, perf, 300.0)["watts"]
    for key in ("dsp", "lut", "ff", "bram36"):
        more = copy.deepcopy(res)
        more["units"]["mac_array"][key] += 500
        assert en.power_from(more, perf, 300.0)["watts"] > base, key
    # a higher clock at the same cycles: more W, fewer ms
    fast = en.power_from(res, perf, 400.0)
    assert fast["watts"] > base and fast["ms_per_image"] < perf["totals"]["ms"]


def test_more_dram_bytes_more_joules(edge_design):
    perf, res = edge_design
    more = copy.deepcopy(perf)
    more["totals"]["dram_bytes"] *= 2
    a, b = en.power_from(res, perf, 300.0), en.power_from(res, more, 300.0)
    assert b["j_per_image"] - a["j_per_image"] == pytest.approx(en.COEFFS.e_dram.value * perf["totals"]["dram_bytes"])


def test_busy_fractions_are_fractions(edge_design):
    perf, _ = edge_design
    b = en.unit_busy(perf)
    assert all(0 <= v <= 1 for v in b.values())
    assert b["mac_array"] > 0.8                      # the 16x16 design is compute bound
    slow = en.unit_busy(perf, 10 * perf["totals"]["cycles"])
    assert slow["mac_array"] == pytest.approx(b["mac_array"] / 10)


def test_estimate_is_labelled_with_band():
    e = en.energy_estimate(get_preset("tiny"), FIXED, HW16, scenarios=False)
    assert e["estimate"] is True and e["label"].startswith("ESTIMATE")
    lo, hi = e["j_per_image_band"]
    assert lo == pytest.approx(0.7 * e["j_per_image"]) and hi == pytest.approx(1.3 * e["j_per_image"])
    assert e["j_per_image"] == pytest.approx(e["watts"] * e["ms_per_image"] * 1e-3)


def test_every_coefficient_has_a_source():
    for name, c in en.COEFFS.to_dict().items():
        assert c["source"] and c["unit"] and c["value"] > 0, name
    assert "ASSUMPTION" in en.COEFFS.c_dsp.source


def test_scenarios_refit_static():
    """Scaling the dynamic coefficients refits the static term, so Edge-MoE still gives 14.54 W."""
    for dyn, dram in ((0.5, 1), (2, 1), (1, 2)):
        cal = en.calibrate(en.COEFFS.scaled(dyn, dram))
        assert cal.model_w == pytest.approx(14.54)
    assert en.calibrate(en.COEFFS.scaled(2, 1)).static_w < en.calibrate().static_w


def _bench_json(tmp_path, **over):
    r = {"measured": True, "where": "cuda: Test GPU", "preset": "tiny", "task": "semseg", "device": "cuda",
         "dtype": "fp16", "batch": 1, "cuda_graph": False, "ms_per_image": 2.0, "host": "gpuhost",
         "time": "2026-01-01T00:00:00",
         "energy": {"measured": True, "source": "NVML total energy", "joules_per_image": 0.25, "avg_watts": 125.0}}
    r.update(over)
    p = tmp_path / f"bench_{len(list(tmp_path.iterdir()))}.json"
    p.write_text(json.dumps(r))
    return p


def test_energy_cli_tiny(tmp_path):
    """CPU row measured here, energy 'not measured' without a readable RAPL counter (never a
    number); GPU rows from bench JSON keep their own labels; RTL cycles replace the model's."""
    from edgemoe.sim.cli import main
    from edgemoe.sim.cmd_bench import _Rapl
    gpu = _bench_json(tmp_path)
    gpu_nomeas = _bench_json(tmp_path, energy={"measured": False, "note": "no counter"})
    rtl = tmp_path / "rtl.json"
    rtl.write_text(json.dumps({"cycles": 60000}))
    out = tmp_path / "energy.json"
    assert main(["energy", "--preset", "tiny", "--cpu-iters", "3", "--gpu-json", str(gpu),
                 "--gpu-json", str(gpu_nomeas), "--rtl-json", str(rtl), "--json", str(out)]) == 0
    comp = json.loads(out.read_text())
    rows = {r["name"]: r for r in comp["rows"]}
    acc = comp["rows"][0]
    assert acc["kind"] == "estimate" and "RTL simulation rtl.json" in acc["label"]
    assert acc["ms_per_image"][0] == pytest.approx(60000 / 300e3)
    cpu = rows["CPU fp32 batch 1"]
    assert cpu["kind"] == "measured" and "this machine" in cpu["label"] and cpu["ms_per_image"][0] > 0
    if _Rapl().available():
        assert cpu["j_per_image"][0] > 0
    else:
        assert cpu["j_per_image"] is None and cpu["images_per_j"] is None
        assert cpu["energy_note"].startswith("not measured") and cpu["ratio_j_vs_accel"] is None
    g = [r for r in comp["rows"] if r["name"].startswith("CUDA")]
    assert len(g) == 2 and g[0]["j_per_image"] == [0.25, 0.25] and "gpuhost" in g[0]["label"]
    assert g[1]["j_per_image"] is None and "no counter" in g[1]["energy_note"]
    ed = rows["Edge-MoE (published)"]
    assert ed["kind"] == "published" and ed["ratio_j_vs_accel"][0] == pytest.approx(
        0.504 / acc["j_per_image"][0])
    assert not any(r["kind"] == "reported" for r in comp["rows"])   # DESIGN.md rows are edge-moe only


def test_energy_cli_bad_inputs(tmp_path, capsys):
    from edgemoe.sim.cli import main
    wrong = _bench_json(tmp_path, preset="edge-moe")
    assert main(["energy", "--preset", "tiny", "--no-cpu", "--gpu-json", str(wrong)]) == 2
    assert "measured preset 'edge-moe'" in capsys.readouterr().out
    bad = tmp_path / "rtl.json"
    bad.write_text(json.dumps({"cyc": 5}))
    assert main(["energy", "--preset", "tiny", "--no-cpu", "--rtl-json", str(bad)]) == 2
    assert "no 'cycles'" in capsys.readouterr().out


def test_energy_reads_simulate_json_per_task(tmp_path):
    """`edgemoe simulate`'s simulate.json: the accelerator row takes the given task's RTL cycles."""
    from edgemoe.sim.cli import main
    rtl = tmp_path / "simulate.json"
    rtl.write_text(json.dumps({"tasks": {"semseg": {"cycles": 50000}, "depth": {"cycles": 70000}}}))
    out = tmp_path / "energy.json"
    assert main(["energy", "--preset", "tiny", "--no-cpu", "--no-reference", "--task", "depth",
                 "--rtl-json", str(rtl), "--json", str(out)]) == 0
    acc = json.loads(out.read_text())["rows"][0]
    assert acc["ms_per_image"][0] == pytest.approx(70000 / 300e3)


def test_energy_takes_the_rtl_dram_bytes(tmp_path):
    """With simulate.json's DRAM counters the accelerator's DRAM energy follows the bytes the RTL
    moved: more bytes, more joules at the same cycles."""
    from edgemoe.sim.cli import main
    js = []
    for i, nbytes in enumerate((1_000_000, 50_000_000)):
        rtl = tmp_path / f"simulate{i}.json"
        rtl.write_text(json.dumps({"tasks": {"semseg": {"cycles": 50000, "dram_bytes_read": nbytes,
                                                        "dram_bytes_written": 0}}}))
        out = tmp_path / f"energy{i}.json"
        assert main(["energy", "--preset", "tiny", "--no-cpu", "--no-reference",
                     "--rtl-json", str(rtl), "--json", str(out)]) == 0
        comp = json.loads(out.read_text())
        acc = comp["rows"][0]
        assert "DRAM bytes" in acc["label"] and acc["ms_per_image"][0] == pytest.approx(50000 / 300e3)
        js.append(acc["j_per_image"][0])
    assert js[1] > js[0]
