"""sim/dram.py (AxiDram, AxiLiteMaster) on a Verilog harness under Verilator: data round trip,
latency, bandwidth, SLVERR, statistics, AXI4-Lite, model speed."""

import pytest

from edgemoe.hw.config import HWConfig
from edgemoe.sim.dram import dram_beats_per_cycle
from edgemoe.sim.runner import REPO_ROOT, run_cocotb, simulator_available

HARNESS = (REPO_ROOT / "sim" / "hdl" / "edgemoe_dram_tb.v").read_text()
TOP = "edgemoe_dram_tb"
needs_verilator = pytest.mark.skipif(not simulator_available("verilator")[0],
                                     reason=simulator_available("verilator")[1])
SIMS = [pytest.param(s, marks=pytest.mark.skipif(not simulator_available(s)[0],
                                                  reason=simulator_available(s)[1]))
        for s in ("verilator", "icarus")]


def run(testcase, simulator="verilator", **cfg):
    return run_cocotb(HARNESS, TOP, "edgemoe.sim.tb_dram", simulator=simulator, testcase=testcase,
                      tb_config=cfg, timeout_s=120)


def test_beats_per_cycle_from_hwconfig():
    # 19.2 GB/s on a 256-bit port at 300 MHz (9.6 GB/s): capped at one beat a cycle
    assert dram_beats_per_cycle(HWConfig()) == 1.0
    assert dram_beats_per_cycle(HWConfig(dram_gbps=4.8)) == pytest.approx(0.5)
    assert dram_beats_per_cycle(HWConfig(dram_gbps=3.2, axi_data_bits=128, clock_mhz=250)) \
        == pytest.approx(0.8)


@pytest.mark.parametrize("simulator", SIMS)
def test_roundtrip_random(simulator):
    r = run("roundtrip", simulator, base=0x1000_0000, size=1 << 16, latency=7, bpc=0.75, pause=0.3,
            ops=60, max_len=700)
    assert r["ops"] >= 60
    st = r["stats"]
    assert st["read_bursts"] > 20 and st["write_bursts"] > 10 and st["r_stall_cycles"] > 0


@pytest.mark.parametrize("simulator", SIMS)
def test_latency_and_bandwidth(simulator):
    cases = [(64, 1.0, 1), (17, 0.5, 1), (3, 1.0, 4), (40, 0.25, 1), (10, 0.3, 1)]
    r = run("timing", simulator, cases=cases)
    by = {(c["latency"], c["bpc"], c["nbursts"]): c for c in r["cases"]}
    for lat, bpc, nb in cases:
        c = by[(lat, bpc, nb)]
        assert c["first_beat"] == lat, c                       # exact latency
        assert c["stats"]["read_beats"] == 128 * nb and c["stats"]["read_bursts"] == nb
        assert c["stats"]["bytes_read"] == 4096 * nb
        # cycles counted through the idle sleep; busy from the AR edge to the last beat
        assert abs(c["stats"]["cycles"] - c["monitor_cycles"]) <= 1, c
        if nb == 1:
            assert abs(c["stats"]["busy_cycles"] - (c["first_beat"] + c["span"])) <= 1, c
    # one beat a cycle, also across 4 outstanding bursts (accepted on consecutive edges)
    assert by[(64, 1.0, 1)]["span"] == 127
    assert by[(3, 1.0, 4)]["span"] == 4 * 128 - 1
    assert by[(3, 1.0, 4)]["ar_cycles"] == [0, 1, 2, 3]
    # token bucket: 0.5 -> exactly 2 cycles a beat, 0.25 -> 4, 0.3 -> 127 / 0.3 within a cycle
    assert by[(17, 0.5, 1)]["span"] == 2 * 127
    assert by[(40, 0.25, 1)]["span"] == 4 * 127
    assert abs(by[(10, 0.3, 1)]["span"] - 127 / 0.3) <= 1


@needs_verilator
def test_slverr_outside_range():
    size = 0x8000
    r = run("slverr", base=0x10000, size=size)
    for name, beats in (("below", 4), ("above", 7), ("across_end", 8)):
        rd = r[f"read_{name}"]
        assert rd["resp"] == 2 and rd["beats"] == beats and 2 in rd["beat_resps"], (name, rd)
    assert r["read_across_end"]["beat_resps"] == [0, 2]      # in-range beats still OKAY
    assert r["read_inside"]["resp"] == 0 and r["read_inside"]["beat_resps"] == [0]
    assert r["write_resps"] == {"below": 2, "above": 2, "across_end": 2}
    assert r["stats"]["slverr_reads"] == 3 and r["stats"]["slverr_writes"] == 3
    assert "outside memory" in r["host_error"]


@needs_verilator
def test_axil_master():
    r = run("axil")
    assert r["ram_seen"] == r["written"] and r["read_back"] == r["written"]
    assert r["host_word"] == 0xDEADBEEF


@needs_verilator
def test_model_speed():
    n = 20_000
    r = run("speed", cycles=n, latency=64, bpc=1.0)
    rd, rw = r["read"], r["read_write"]
    assert rd["errors"] == 0 and rw["errors"] == 0
    # streaming reads: one beat a cycle after the latency (within one burst of slack)
    assert n - 64 - 128 <= rd["rd_beats"] <= n
    assert rd["stats"]["read_beats"] == rd["rd_beats"]
    # reads and writes share the bucket: together at most one beat a cycle, both progress
    assert rw["rd_beats"] + rw["wr_beats"] <= n and rw["rd_beats"] > n / 4 and rw["wr_beats"] > n / 4
    assert rw["stats"]["write_beats"] == rw["wr_beats"]
    print(f"AxiDram speed (Verilator): bare clock {r['bare_clock_cycles_per_s']:,.0f} cycles/s, "
          f"streaming reads {rd['cycles_per_s']:,.0f}, reads+writes {rw['cycles_per_s']:,.0f}, "
          f"idle {r['idle']['cycles_per_s']:,.0f}")
    assert rd["cycles_per_s"] > 5_000


@needs_verilator
def test_driver_over_backend():
    r = run("driver")
    assert r["regions_ok"] == {"program": True, "weights": True}
    assert r["instructions"] > 0 and r["dram_read"] > 0 and r["task"] >= 0
    # STATUS read BUSY 3 times, each followed by a 30-cycle sleep (10 ns clock): > 900 ns
    assert r["run_ns"] > 900
