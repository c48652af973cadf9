"""GELU unit: datapath plan and ROM vs the golden table, stimulus coverage, RTL (cocotb) vs
quant.approx.gelu_fixed on Verilator and Icarus, export/lint, and the synthesis baseline."""
from __future__ import annotations

import time

import numpy as np
import pytest

from edgemoe.hw.config import HWConfig, get_hw_preset
from edgemoe.hw.export import port_list, to_verilog
from edgemoe.hw.gelu import Gelu, gelu_plan
from edgemoe.hw.units import build_unit
from edgemoe.quant.approx import gelu_fixed, gelu_table
from edgemoe.quant.config import get_quant_preset
from edgemoe.quant.fixed import Fmt, Overflow, Rounding, SatCounter
from edgemoe.sim.runner import lint_verilator, run_cocotb, simulator_available
from edgemoe.sim.tb_gelu import gelu_interp, gelu_stimulus, phase_stimulus

TOP = "edgemoe_gelu"
TB = "edgemoe.sim.tb_gelu"
DEFAULT_Q = get_quant_preset("edge-moe-fixed")
DEFAULT_HW = get_hw_preset("zcu102-16x16")
TINY_HW = HWConfig(name="tiny-4lanes", lanes=4)


def narrow_q(rounding="half_even", overflow="sat"):
    """gelu_in = act = s12.6, 32 segments of 1/8 on [0, 4), table u10.8: d's rounding shift
    (5) exceeds the 3 interpolation bits, so the half constant needs the adder path."""
    return DEFAULT_Q.replace(name=f"gelu-narrow-{rounding}-{overflow}", gelu_in=Fmt(12, 6),
                             act=Fmt(12, 6), gelu_table=Fmt(10, 8, False), gelu_step_log2=3,
                             gelu_range=4.0, rounding=Rounding(rounding), overflow=Overflow(overflow))


def wide_in_q():
    """gelu_in s30.24 into act s20.14: relu is requantized (rounded) and can saturate, and the
    index/fraction split drops 2 input bits below the 17-bit fraction r."""
    return DEFAULT_Q.replace(name="gelu-wide-in", gelu_in=Fmt(30, 24), act=Fmt(20, 14))


def left_shift_q():
    """Table u8.4 with act frac 12: d needs no rounding (left shift by 1); 192 segments (not a
    power of two), truncation and wrap-around."""
    return DEFAULT_Q.replace(name="gelu-leftshift", gelu_in=Fmt(16, 12), act=Fmt(16, 12),
                             gelu_table=Fmt(8, 4, False), gelu_range=6.0,
                             rounding=Rounding.TRUNC, overflow=Overflow.WRAP)


# --- plan, ROM and stimulus (no simulator) --------------------------------------------------------
def test_plan_default_widths_and_rom_pairs():
    pl = gelu_plan(DEFAULT_Q)
    assert (pl.p.segments, pl.low, pl.p.interp_bits, pl.d_shift, pl.relu_shift) == (256, 17, 17, 13, 0)
    # the multiply fits one DSP48E2 (27 x 18 signed): slope s13 and r u17 (as s18)
    assert pl.s_bits <= 27 and pl.p.interp_bits + 1 <= 18
    assert pl.t_bits == 16 and not pl.can_saturate
    tab = gelu_table(DEFAULT_Q)
    # the (start, slope) ROM holds exactly T[i] and T[i+1] - T[i] of the golden table
    assert list(pl.rom_t) == tab[:-1].tolist()
    assert list(pl.rom_s) == np.diff(tab).tolist()
    assert max(pl.rom_t) < 1 << pl.t_bits
    assert -(1 << (pl.s_bits - 1)) <= min(pl.rom_s) and max(pl.rom_s) < 1 << (pl.s_bits - 1)


@pytest.mark.parametrize("q", [DEFAULT_Q, narrow_q(), wide_in_q(), left_shift_q()],
                         ids=["default", "narrow", "wide-in", "leftshift"])
def test_plan_saturation_bound_is_exact(q):
    """can_saturate (which removes the sat_count port) is True iff the golden model saturates
    somewhere; the widths hold every intermediate of the whole input range."""
    pl = gelu_plan(q)
    fi = q.gelu_in
    x = np.unique(np.concatenate([np.arange(fi.min_int, fi.max_int + 1, max(1, (fi.max_int >> 16)))
                                  , gelu_stimulus(q, 4, 500, seed=3).ravel(),
                                  [fi.min_int, fi.max_int]]))
    sc = SatCounter()
    gelu_fixed(x, q, sc, "gelu")
    assert (sc.saturated("gelu") > 0) == pl.can_saturate
    d, _ = gelu_interp(x, q)
    assert d.min() >= 0 and int(d.max()) < 1 << pl.dsum_bits


def test_stimulus_covers_edge_cases():
    """Ties of d's rounding with both quotient parities, every kind of segment boundary,
    beyond-table inputs of both signs and the format extremes are all present."""
    for q, hw in ((DEFAULT_Q, DEFAULT_HW), (narrow_q(), TINY_HW), (wide_in_q(), TINY_HW)):
        pl = gelu_plan(q)
        x = gelu_stimulus(q, hw.lanes, 200, seed=5)
        fi = q.gelu_in
        assert (x >= fi.min_int).all() and (x <= fi.max_int).all()
        assert (x == fi.min_int).any() and (x == fi.max_int).any() and (x == 0).any()
        d, seg = gelu_interp(x, q)
        s = pl.d_shift
        tie = (seg >= 0) & ((d & ((1 << s) - 1)) == (1 << (s - 1)))
        quo = d >> s
        assert (tie & (quo % 2 == 0)).any() and (tie & (quo % 2 == 1)).any()
        frac = np.abs(x) & ((1 << pl.low) - 1)
        assert ((seg >= 0) & (frac == 0) & (x > 0)).any() and ((seg >= 0) & (frac == 0) & (x < 0)).any()
        assert ((seg >= 0) & (frac == (1 << pl.low) - 1)).any()
        assert ((seg < 0) & (x > 0)).any() and ((seg < 0) & (x < 0)).any()
        assert (seg == pl.p.segments - 1).any() and (seg == 0).any()
        assert ((seg >= 0).mean() > 0.4)            # most values exercise the interpolation
        if pl.relu_shift > 0:
            low = x & ((1 << pl.relu_shift) - 1)
            assert ((x > 0) & (low == 1 << (pl.relu_shift - 1))).any()


# --- export and lint ------------------------------------------------------------------------------
def test_export_names_and_ports():
    L = DEFAULT_HW.lanes
    component = build_unit("gelu", DEFAULT_Q, DEFAULT_HW)
    ports = port_list(component)
    assert ports == {"i__payload__data": (L * 32, "i"), "i__valid": (1, "i"), "i__ready": (1, "o"),
                     "o__payload__data": (L * 32, "o"), "o__valid": (1, "o"), "o__ready": (1, "i")}
    v = to_verilog(component, TOP)
    assert f"module {TOP}(" in v
    for name in (*ports, "clk", "rst"):
        assert f" {name};" in v, f"port {name} missing from the Verilog"
    # a configuration that can saturate counts it
    wide = Gelu(wide_in_q(), TINY_HW)
    assert port_list(wide)["o__payload__sat_count"] == (3, "o")
    assert " o__payload__sat_count;" in to_verilog(wide, TOP)


@pytest.mark.parametrize("q,hw", [(DEFAULT_Q, DEFAULT_HW), (wide_in_q(), TINY_HW),
                                  (left_shift_q(), TINY_HW)], ids=["default", "wide-in", "leftshift"])
def test_verilator_lint(q, hw):
    lint_verilator(Gelu(q, hw), TOP)


# --- RTL simulation ----------------------------------------------------------------------------------
RANDOM, FULL = (0.3, 0.3), (0.0, 0.0)     # (gap probability, stall probability)


def run_gelu(q, hw, phases, simulator="verilator", seed=1, rtl_q=None, timeout_s=300):
    """Simulate the phases [(n_beats or "all", (gap, stall)), ...] one after another in one
    run ("all": every gelu_in code once); check
    that every element was compared and the saturations match the golden model's; return the
    per-phase results."""
    ok, why = simulator_available(simulator)
    if not ok:
        pytest.skip(why)
    ph = [{"n_beats": n, "all_codes": n == "all", "stim_seed": seed + 100 + i, "gap_prob": g,
           "stall_prob": st} for i, (n, (g, st)) in enumerate(phases)]
    cfg = {"qcfg": q.to_dict(), "hwcfg": hw.to_dict(), "phases": ph}
    res = run_cocotb(Gelu(rtl_q or q, hw), TOP, TB, simulator=simulator, tb_config=cfg,
                     seed=seed, timeout_s=timeout_s)
    assert len(res["phases"]) == len(ph)
    for p, r in zip(ph, res["phases"]):
        x = phase_stimulus(q, hw.lanes, p)
        assert r["compared"] == x.size == r["elements"]
        sc = SatCounter()
        gelu_fixed(x, q, sc, "gelu")
        assert r["sat_total"] == sc.saturated("gelu")
    res["phases"][0]["sim_cycles_per_s"] = res["sim_cycles_per_s"]
    return res["phases"]


def assert_full_throughput(res):
    """No gaps, no back-pressure: one vector per cycle after LATENCY cycles of fill."""
    n = res["n_beats"]
    assert res["latency"] == Gelu.LATENCY
    assert res["last_out_cycle"] - res["first_in_cycle"] == n - 1 + Gelu.LATENCY
    assert res["last_in_cycle"] - res["first_in_cycle"] == n - 1


def test_gelu_verilator_default():
    rnd, full = run_gelu(DEFAULT_Q, DEFAULT_HW, [(300, RANDOM), (200, FULL)])
    assert rnd["cycles_per_beat"] > 1.2        # gaps and stalls really happened
    assert_full_throughput(full)


def test_gelu_verilator_4lanes_half_even():
    q = DEFAULT_Q.replace(name="gelu-default-half-even", rounding=Rounding.HALF_EVEN)
    _, full = run_gelu(q, TINY_HW, [(400, (0.25, 0.4)), (100, FULL)], seed=3)
    assert_full_throughput(full)


@pytest.mark.parametrize("q", [narrow_q("half_even", "sat"), wide_in_q()], ids=["narrow", "wide-in"])
def test_gelu_verilator_variants(q):
    rnd, full = run_gelu(q, TINY_HW, [(400, (0.25, 0.4)), (100, FULL)], seed=5)
    assert (rnd["sat_total"] > 0) == gelu_plan(q).can_saturate
    assert_full_throughput(full)


def test_gelu_verilator_narrow_exhaustive():
    """Every one of the 4096 s12.6 codes, under gaps and back-pressure."""
    res, = run_gelu(narrow_q("half_up", "sat"), TINY_HW, [("all", (0.1, 0.1))], seed=9)
    assert res["compared"] == 4096


def test_gelu_testbench_catches_wrong_rounding():
    """RTL generated for TRUNC, checked against the HALF_EVEN golden model: must fail with the
    first-mismatch report."""
    with pytest.raises(AssertionError, match=r"first mismatch at element \d+ \(cycle \d+\): inputs "
                                             r"phase 0 beat \d+ lane \d+: x=-?\d+, expected"):
        run_gelu(narrow_q("half_even", "sat"), TINY_HW, [(100, RANDOM)], rtl_q=narrow_q("trunc", "sat"))


def test_gelu_icarus_narrow():
    rnd, = run_gelu(narrow_q("half_up", "wrap"), TINY_HW, [(150, RANDOM)], simulator="icarus", seed=7)
    assert rnd["cycles_per_beat"] > 1.2


def test_gelu_icarus_left_shift():
    assert gelu_plan(left_shift_q()).d_shift < 0
    full, = run_gelu(left_shift_q(), TINY_HW, [(120, FULL)], simulator="icarus", seed=8)
    assert_full_throughput(full)


@pytest.mark.full
def test_gelu_verilator_default_full_random():
    """100k elements (6250 vectors of 16 lanes) with gaps and back-pressure, then 1000 vectors
    at full rate; and every code of a 16-bit input format."""
    t0 = time.perf_counter()
    rnd, full = run_gelu(DEFAULT_Q, DEFAULT_HW, [(6250, (0.2, 0.2)), (1000, FULL)], seed=11,
                         timeout_s=900)
    assert_full_throughput(full)
    print(f"\ngelu full run: {rnd['compared'] + full['compared']} elements in "
          f"{time.perf_counter() - t0:.1f} s, {rnd['sim_cycles_per_s']:.0f} cycles/s")
    t1 = time.perf_counter()
    # and every code of a 16-bit configuration (gelu_in = act = s16.10, the default table)
    q16 = DEFAULT_Q.replace(name="gelu-s16", gelu_in=Fmt(16, 10), act=Fmt(16, 10))
    every, = run_gelu(q16, DEFAULT_HW, [("all", (0.1, 0.1))], seed=12)
    assert every["compared"] == 1 << 16
    print(f"gelu exhaustive s16.10: 65536 codes in {time.perf_counter() - t1:.1f} s")


# --- synthesis ------------------------------------------------------------------------------------------
def _synth_default():
    from edgemoe.hw.export import to_rtlil
    return to_rtlil(Gelu(DEFAULT_Q, DEFAULT_HW), TOP)


@pytest.mark.slow
def test_synth_gelu_resource_baseline():
    from edgemoe.hw.synth import check_synth_baseline, synth_xilinx
    res = synth_xilinx(_synth_default(), TOP, timeout_s=300)
    res["config"] = {"quant": DEFAULT_Q.name, "hw": DEFAULT_HW.name}
    L = DEFAULT_HW.lanes
    assert res["dsp"] == L                      # one DSP48E2 per lane for slope * r
    assert res["ff"] >= L * DEFAULT_Q.act.bits + 5
    check_synth_baseline("gelu", res)


@pytest.mark.slow
def test_synth_gelu_ecp5_fmax():
    from edgemoe.hw.synth import synth_ecp5_fmax
    res = synth_ecp5_fmax(_synth_default(), TOP, timeout_s=600)
    assert res["fmax_mhz"] is not None, res["reason"]
    assert res["fmax_mhz"] > 50
