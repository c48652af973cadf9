"""Requant unit: golden function vs a pure-int reference, RTL (cocotb) vs golden on Verilator and
Icarus, export/lint, and the synthesis resource baseline."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemoe.hw.config import HWConfig, get_hw_preset
from edgemoe.hw.export import port_list, to_verilog
from edgemoe.hw.requant import Requant
from edgemoe.hw.units import build_unit
from edgemoe.quant.config import get_quant_preset
from edgemoe.quant.epilogue import requant_golden, requant_plan
from edgemoe.quant.fixed import Fmt, FormatError, Overflow, Rounding
from edgemoe.sim.runner import lint_verilator, run_cocotb, simulator_available
from edgemoe.sim.tb_requant import requant_stimulus

TOP = "edgemoe_requant"
TB = "edgemoe.sim.tb_requant"
DEFAULT_Q = get_quant_preset("edge-moe-fixed")
DEFAULT_HW = get_hw_preset("zcu102-16x16")
TINY_HW = HWConfig(name="tiny-4lanes", lanes=4)


def tiny_q(rounding="half_even", overflow="sat"):
    """Narrow formats so saturation, ties and every rounding branch are hit often."""
    return DEFAULT_Q.replace(name=f"requant-tiny-{rounding}-{overflow}", acc=Fmt(20, 10),
                             bias=Fmt(8, 4), act=Fmt(10, 4), rounding=Rounding(rounding),
                             overflow=Overflow(overflow))


def left_shift_q():
    """acc.frac < act.frac: the sum is shifted left (no rounding), still saturated."""
    return DEFAULT_Q.replace(name="requant-leftshift", acc=Fmt(20, 4), bias=Fmt(8, 2),
                             act=Fmt(16, 6))


# --- golden model (no simulator) ------------------------------------------------------------
def reference(a: int, b: int, q) -> tuple[int, bool]:
    """Pure Python ints / Fractions, independent of quant.fixed.shift_round."""
    x = Fraction(a + b * 2 ** (q.acc.frac - q.bias.frac)) / Fraction(2) ** (q.acc.frac - q.act.frac)
    if q.rounding is Rounding.TRUNC:
        r = math.floor(x)
    elif q.rounding is Rounding.HALF_UP:
        r = math.floor(x + Fraction(1, 2))
    else:
        r = round(x)                      # Fraction.__round__: ties to even
    lo, hi = q.act.min_int, q.act.max_int
    over = not lo <= r <= hi
    if q.overflow is Overflow.SAT:
        return min(max(r, lo), hi), over
    w = r & ((1 << q.act.bits) - 1)
    return (w - (1 << q.act.bits) if w > hi else w), over


GOLDEN_CONFIGS = [DEFAULT_Q.replace(rounding=r) for r in Rounding] + \
                 [tiny_q(r.value, o.value) for r in Rounding for o in Overflow] + [left_shift_q()]


@settings(max_examples=60, deadline=None)
@given(cfg_i=st.integers(0, len(GOLDEN_CONFIGS) - 1), data=st.data())
def test_golden_matches_python_int_reference(cfg_i, data):
    q = GOLDEN_CONFIGS[cfg_i]
    lanes = data.draw(st.integers(1, 5))
    # half the draws are aimed at rounding ties and the act range edges
    shift = max(q.acc.frac - q.act.frac, 0)
    tie = st.builds(lambda k: (k << shift) + ((1 << shift) >> 1), st.integers(-(1 << 12), 1 << 12))
    acc_s = st.one_of(st.integers(q.acc.min_int, q.acc.max_int), tie,
                      st.sampled_from([q.acc.min_int, q.acc.max_int, 0, -1, 1]))
    acc = data.draw(st.lists(acc_s, min_size=lanes, max_size=lanes))
    bias = data.draw(st.lists(st.one_of(st.integers(q.bias.min_int, q.bias.max_int), st.just(0)),
                              min_size=lanes, max_size=lanes))
    out, sat = requant_golden(np.array([acc]), np.array([bias]), q)
    ref = [reference(a, b, q) for a, b in zip(acc, bias)]
    assert out[0].tolist() == [r for r, _ in ref]
    assert int(sat[0]) == sum(o for _, o in ref)


def test_golden_known_values():
    q = tiny_q("half_even")            # sum shift 6: 32 is a tie (0.5), 96 is 1.5
    out, sat = requant_golden(np.array([[32, 96, -32, 33, (1 << 19) - 1, -(1 << 19)]]),
                              np.zeros((1, 6), dtype=np.int64), q)
    assert out.tolist() == [[0, 2, 0, 1, 511, -512]] and sat.tolist() == [2]
    out, _ = requant_golden(np.array([[32, 96, -32]]), np.zeros((1, 3), dtype=np.int64),
                            tiny_q("half_up"))
    assert out.tolist() == [[1, 2, 0]]
    out, _ = requant_golden(np.array([[63, -1]]), np.zeros((1, 2), dtype=np.int64), tiny_q("trunc"))
    assert out.tolist() == [[0, -1]]


def test_golden_rejects_bad_inputs():
    q = tiny_q()
    with pytest.raises(FormatError, match="'acc'.*out of range"):
        requant_golden(np.array([[1 << 19]]), np.array([[0]]), q)
    with pytest.raises(FormatError, match="'bias'"):
        requant_golden(np.array([[0]]), np.array([[200]]), q)
    with pytest.raises(FormatError, match="shape"):
        requant_golden(np.zeros((2, 3)), np.zeros((2, 4)), q)
    with pytest.raises(FormatError, match="bias.frac"):
        requant_plan(q.replace(bias=Fmt(16, 12)))


def test_stimulus_covers_edge_cases():
    """The RTL tests are only as good as their stimulus: ties of both parities, both saturation
    directions, in-range results and format extremes must all be present."""
    for q, hw in ((DEFAULT_Q, DEFAULT_HW), (tiny_q(), TINY_HW)):
        acc, bias = requant_stimulus(q, hw.lanes, 200, seed=5)
        plan = requant_plan(q)
        total = acc + (bias << plan.bias_shift)
        s = plan.round_shift
        low = total & ((1 << s) - 1)
        q_floor = total >> s
        ties = low == (1 << (s - 1))
        assert (ties & (q_floor % 2 == 0)).any() and (ties & (q_floor % 2 == 1)).any()
        assert (q_floor > q.act.max_int).any() and (q_floor < q.act.min_int).any()
        assert ((q_floor > q.act.min_int) & (q_floor < q.act.max_int)).mean() > 0.3
        assert (acc == q.acc.max_int).any() and (acc == q.acc.min_int).any()
        assert (bias == q.bias.max_int).any() and (bias == q.bias.min_int).any()
        assert (acc >= q.acc.min_int).all() and (acc <= q.acc.max_int).all()


# --- export and lint --------------------------------------------------------------------------
def test_export_names_and_ports():
    L = DEFAULT_HW.lanes
    component = build_unit("requant", DEFAULT_Q, DEFAULT_HW)
    ports = port_list(component)
    assert ports == {
        "i__payload__acc": (L * 60, "i"), "i__payload__bias": (L * 16, "i"),
        "i__valid": (1, "i"), "i__ready": (1, "o"),
        "o__payload__data": (L * 32, "o"), "o__payload__sat_count": (5, "o"),
        "o__valid": (1, "o"), "o__ready": (1, "i")}
    v = to_verilog(component, TOP)
    assert f"module {TOP}(" in v
    for name in (*ports, "clk", "rst"):
        assert f" {name};" in v, f"port {name} missing from the Verilog"


@pytest.mark.parametrize("q,hw", [(DEFAULT_Q, DEFAULT_HW), (tiny_q("half_even", "wrap"), TINY_HW)],
                         ids=["default", "tiny-wrap"])
def test_verilator_lint(q, hw):
    lint_verilator(Requant(q, hw), TOP)


# --- RTL simulation -----------------------------------------------------------------------------
def run_requant(q, hw, n_beats, simulator="verilator", gap=0.3, stall=0.3, seed=1, rtl_q=None):
    ok, why = simulator_available(simulator)
    if not ok:
        pytest.skip(why)
    cfg = {"qcfg": q.to_dict(), "hwcfg": hw.to_dict(), "n_beats": n_beats, "stim_seed": seed + 100,
           "gap_prob": gap, "stall_prob": stall}
    res = run_cocotb(Requant(rtl_q or q, hw), TOP, TB, simulator=simulator, tb_config=cfg,
                     seed=seed, timeout_s=300)
    # the testbench compared every element and counted the same saturations as the golden model
    acc, bias = requant_stimulus(q, hw.lanes, n_beats, seed + 100)
    _, sat = requant_golden(acc, bias, q)
    assert res["compared"] == n_beats * hw.lanes == res["elements"]
    assert res["sat_total"] == int(sat.sum()) > 0
    return res


def assert_full_throughput(res, n_beats):
    """No gaps, no back-pressure: one vector per cycle after LATENCY cycles of fill."""
    assert res["latency"] == Requant.LATENCY
    assert res["last_out_cycle"] - res["first_in_cycle"] == n_beats - 1 + Requant.LATENCY
    assert res["last_in_cycle"] - res["first_in_cycle"] == n_beats - 1


def test_requant_verilator_default_random_stream():
    res = run_requant(DEFAULT_Q, DEFAULT_HW, 300)
    assert res["cycles_per_beat"] > 1.2     # gaps and stalls really happened


def test_requant_verilator_default_full_throughput():
    res = run_requant(DEFAULT_Q, DEFAULT_HW, 200, gap=0.0, stall=0.0, seed=2)
    assert_full_throughput(res, 200)


@pytest.mark.parametrize("rounding,overflow", [("trunc", "sat"), ("half_up", "wrap"),
                                               ("half_even", "sat")])
def test_requant_verilator_tiny(rounding, overflow):
    q = tiny_q(rounding, overflow)
    run_requant(q, TINY_HW, 400, gap=0.25, stall=0.4, seed=3)
    assert_full_throughput(run_requant(q, TINY_HW, 100, gap=0.0, stall=0.0, seed=4), 100)


def test_requant_testbench_catches_wrong_rounding():
    """RTL generated for TRUNC, checked against the HALF_EVEN golden model: must fail with the
    first-mismatch report (and reuses the trunc build of the test above)."""
    with pytest.raises(AssertionError, match=r"first mismatch at element \d+ \(cycle \d+\): inputs "
                                             r"beat \d+ lane \d+: acc=-?\d+ bias=-?\d+, expected"):
        run_requant(tiny_q("half_even", "sat"), TINY_HW, 100, rtl_q=tiny_q("trunc", "sat"))


def test_requant_icarus_tiny():
    res = run_requant(tiny_q("half_even", "sat"), TINY_HW, 150, simulator="icarus", seed=6)
    assert res["cycles_per_beat"] > 1.2


def test_requant_icarus_left_shift():
    assert requant_plan(left_shift_q()).round_shift < 0
    res = run_requant(left_shift_q(), TINY_HW, 120, simulator="icarus", gap=0.0, stall=0.0, seed=7)
    assert_full_throughput(res, 120)


# --- synthesis ------------------------------------------------------------------------------------
def _synth_default():
    from edgemoe.hw.export import to_rtlil
    return to_rtlil(Requant(DEFAULT_Q, DEFAULT_HW), TOP)


def test_synth_requant_resource_baseline():
    from edgemoe.hw.synth import check_synth_baseline, synth_xilinx
    res = synth_xilinx(_synth_default(), TOP, timeout_s=300)
    res["config"] = {"quant": DEFAULT_Q.name, "hw": DEFAULT_HW.name}
    L = DEFAULT_HW.lanes
    # the output register bank and the valid bits at least; no DSP or BRAM in an adder/shifter
    assert res["ff"] >= L * DEFAULT_Q.act.bits + 3
    assert res["dsp"] == 0 and res["bram36"] == 0
    assert res["lut"] > L * DEFAULT_Q.act.bits // 2
    check_synth_baseline("requant", res)


@pytest.mark.slow
def test_synth_requant_ecp5_fmax():
    from edgemoe.hw.synth import synth_ecp5_fmax
    res = synth_ecp5_fmax(_synth_default(), TOP, timeout_s=300)
    assert res["fmax_mhz"] is not None, res["reason"]
    assert res["fmax_mhz"] > 50
