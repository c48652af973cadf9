"""Gate + patch-reordering unit: RTL (cocotb) vs quant.approx.gate_fixed + quant.schedule on
Verilator and Icarus, export/lint/registry, and the synthesis resource baseline."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from edgemoe.hw.config import get_hw_preset
from edgemoe.hw.export import port_list, to_verilog
from edgemoe.hw.gate import Gate, gate_latency, gate_plan
from edgemoe.hw.units import build_unit
from edgemoe.model.config import get_preset
from edgemoe.quant.approx import exp2_fixed, gate_fixed
from edgemoe.quant.config import get_quant_preset
from edgemoe.quant.fixed import Fmt, FormatError, Overflow, Rounding
from edgemoe.sim.runner import lint_verilator, run_cocotb, simulator_available
from edgemoe.sim.tb_gate import gate_stimulus, golden_layer

TOP = "edgemoe_gate"
TB = "edgemoe.sim.tb_gate"
DEFAULT_Q = get_quant_preset("edge-moe-fixed")
DEFAULT_HW = get_hw_preset("zcu102-16x16")
TINY = get_preset("tiny")          # E=4, k=2, 9 tokens
EDGE = get_preset("edge-moe")      # E=16, k=2, 129 tokens


def sat_q(rounding="half_even"):
    """Narrow sum and gate_prob so that both saturate (sum of 4 equal experts = 4.0 > 3.99;
    a dominant expert's p = 1.0 > u16.16's max) and every rounding branch is hit."""
    return DEFAULT_Q.replace(name=f"gate-sat-{rounding}", sum=Fmt(22, 20, False),
                             gate_prob=Fmt(16, 16, False), rounding=Rounding(rounding))


@lru_cache(maxsize=None)
def gate_verilog(q, mc) -> str:
    """Exported Verilog of one configuration, shared by the tests (the export of the E=16 unit
    takes several seconds)."""
    return to_verilog(Gate(q, DEFAULT_HW, mc), TOP)


# --- plan, stimulus, registry, export ----------------------------------------------------------
def test_plan_widths_and_errors():
    p = gate_plan(DEFAULT_Q, 16, 2, 129)
    # S <= 16.0 in u32.20 -> 25 bits; q2 = floor(2**43 / S) < 2**24 -> 24 divider stages
    assert (p.s_bits, p.q_bits, p.recip_bits, p.p_bits, p.tok_bits, p.len_bits) == (25, 24, 23, 17, 8, 8)
    assert not (p.sum_can_sat or p.recip_can_sat or p.p_can_sat)
    ps = gate_plan(sat_q(), 4, 2, 9)
    assert ps.sum_can_sat and ps.p_can_sat and not ps.recip_can_sat
    with pytest.raises(FormatError, match="would wrap"):
        gate_plan(sat_q().replace(overflow=Overflow.WRAP), 4, 2, 9)
    with pytest.raises(FormatError, match="cannot hold 1.0"):
        gate_plan(DEFAULT_Q.replace(exp=Fmt(16, 16, False)), 4, 2, 9)
    with pytest.raises(ValueError, match="top_k = 5 exceeds num_experts = 4"):
        gate_plan(DEFAULT_Q, 4, 5, 9)
    with pytest.raises(ValueError, match="ModelConfig"):
        Gate(DEFAULT_Q, DEFAULT_HW, None)


def test_stimulus_covers_edge_cases():
    """Ties of p codes, all-equal rows, format extremes, exponents beyond the clamp, and (for the
    narrow config) saturation must all occur in what the RTL tests drive."""
    for mc in (TINY, EDGE):
        lg = gate_stimulus(DEFAULT_Q, mc.num_experts, 200, seed=7)
        f = DEFAULT_Q.gate_logit
        assert lg.min() >= f.min_int and lg.max() <= f.max_int
        assert (lg == f.min_int).any() and (lg == f.max_int).any()
        assert (lg == lg[:, :1]).all(axis=1).sum() >= 5                      # all-equal rows
        _, _, probs = gate_fixed(lg, DEFAULT_Q, mc.top_k)
        srt = -np.sort(-probs, axis=1)
        ties = (srt[:, mc.top_k - 1] == srt[:, mc.top_k]) & ~(lg == lg[:, :1]).all(axis=1)
        assert ties.sum() >= 3                         # top-k boundary ties not from equal rows
        x = lg - lg.max(axis=1, keepdims=True)
        assert ((x >> f.frac) == -22).any() and ((x >> f.frac) < -22).any()   # clamp edges
        assert (exp2_fixed(x, DEFAULT_Q, f) == 0).any() and (probs == 1 << 16).any()
    for q in (sat_q(), sat_q("trunc")):
        lg = gate_stimulus(q, 4, 100, seed=3)
        res = golden_layer(lg, np.arange(100), q, 4, 2)
        assert res[3] > 0


def test_registry_and_ports():
    assert gate_latency(gate_plan(DEFAULT_Q, 16, 2, 129)) == 40
    g = build_unit("gate", DEFAULT_Q, DEFAULT_HW, TINY)
    assert isinstance(g, Gate) and g.LATENCY == 37 and g.token_interval == 4
    ports = port_list(g)
    assert ports == {
        "start": (1, "i"), "i__payload__logits": (4 * 32, "i"), "i__payload__token": (4, "i"),
        "i__payload__last": (1, "i"), "i__valid": (1, "i"), "i__ready": (1, "o"),
        "o__payload__expert": (2, "o"), "o__payload__token": (4, "o"),
        "o__payload__weight": (17, "o"), "o__payload__last": (1, "o"),
        "o__payload__final": (1, "o"), "o__valid": (1, "o"), "o__ready": (1, "i"),
        "lengths": (4 * 4, "o"), "active": (4, "o"), "done": (1, "o"), "overflow": (1, "o"),
        "sat_count": (1, "o"), "dbg__valid": (1, "o"), "dbg__token": (4, "o"),
        "dbg__sel": (4, "o"), "dbg__probs": (4 * 17, "o")}
    v = to_verilog(g, TOP)
    assert f"module {TOP}(" in v
    for name in ("clk", "rst", *ports):
        assert f" {name};" in v, f"port {name} missing from the Verilog"


def test_cli_verilog(tmp_path, capsys):
    from edgemoe.sim.cli import main
    assert main(["verilog", "--unit", "gate", "--preset", "tiny", "--out", str(tmp_path)]) == 0
    assert (tmp_path / f"{TOP}.v").exists() and "o__payload__final" in capsys.readouterr().out


@pytest.mark.parametrize("q,mc", [(DEFAULT_Q, EDGE), (sat_q(), TINY)], ids=["edge-moe", "tiny-sat"])
def test_verilator_lint(q, mc):
    lint_verilator(gate_verilog(q, mc), TOP)


# --- RTL simulation -----------------------------------------------------------------------------
def run_gate(q, mc, layers, simulator="verilator", gap=0.3, stall=0.3, seed=1, rtl_q=None,
             testcase="gate_layers"):
    ok, why = simulator_available(simulator)
    if not ok:
        pytest.skip(why)
    latency = gate_latency(gate_plan(rtl_q or q, mc.num_experts, mc.top_k, mc.num_tokens))
    cfg = {"qcfg": q.to_dict(), "num_experts": mc.num_experts, "top_k": mc.top_k,
           "num_tokens": mc.num_tokens, "layers": layers, "stim_seed": seed + 100,
           "gap_prob": gap, "stall_prob": stall}
    res = run_cocotb(gate_verilog(rtl_q or q, mc), TOP, TB, simulator=simulator, tb_config=cfg, seed=seed, timeout_s=600,
                     testcase=testcase)
    if testcase == "gate_layers":
        n = sum(layer["n"] for layer in layers)
        assert res["tokens"] == n and res["entries"] == n * mc.top_k
        assert res["compared"] == n * (mc.top_k + mc.num_experts + 1)
    return res, latency


def assert_full_rate(res, latency, mc):
    """No gaps, no back-pressure: one token per cycle in, LATENCY to the commit, READ_LATENCY to
    the first entry, then one entry per cycle with no bubble between experts."""
    n, k = mc.num_tokens, mc.top_k
    assert res["cycles_per_token"] == 1.0
    assert res["latency"] == latency
    assert res["read_latency"] == Gate.READ_LATENCY
    assert res["read_cycles"] == n * k
    assert res["drain"] == latency + Gate.READ_LATENCY + n * k - 1


def test_gate_verilator_tiny_layers():
    layers = [{"n": 9}, {"n": 6, "sparse": True}, {"n": 9}, {"n": 1}]
    res, _ = run_gate(DEFAULT_Q, TINY, layers)
    assert res["layers"][0]["last_in"] - res["layers"][0]["first_in"] > 9   # gaps happened


def test_gate_verilator_tiny_full_rate():
    res, latency = run_gate(DEFAULT_Q, TINY, [{"n": 9}, {"n": 9}], gap=0.0, stall=0.0, seed=2)
    assert_full_rate(res, latency, TINY)


def test_gate_verilator_edge_moe():
    res, _ = run_gate(DEFAULT_Q, EDGE, [{"n": 129}, {"n": 100, "sparse": True}], seed=3)
    assert res["sim_cycles_per_s"] > 0


def test_gate_verilator_edge_moe_full_rate():
    res, latency = run_gate(DEFAULT_Q, EDGE, [{"n": 129}], gap=0.0, stall=0.0, seed=4)
    assert_full_rate(res, latency, EDGE)


def wrap_q():
    """gate_prob u16.16 under Overflow.WRAP: a dominant expert's p = 1.0 wraps to 0."""
    return DEFAULT_Q.replace(name="gate-wrap", gate_prob=Fmt(16, 16, False),
                             overflow=Overflow.WRAP)


@pytest.mark.parametrize("q", [sat_q("half_even"), sat_q("trunc"), wrap_q()],
                         ids=["sat-half_even", "sat-trunc", "wrap-half_up"])
def test_gate_verilator_saturating(q):
    res, _ = run_gate(q, TINY, [{"n": 9}, {"n": 9}, {"n": 9}], seed=5)
    assert res["sat_total"] > 0


def test_gate_verilator_odd_shape():
    """E=5, k=3: trees with pass-through nodes at every level, a top-k deeper than two rounds."""
    odd = TINY.replace(name="tiny-e5k3", num_experts=5, top_k=3)
    run_gate(DEFAULT_Q, odd, [{"n": 9}, {"n": 7, "sparse": True}], seed=8)


def test_gate_elaborates_edge_shapes():
    from amaranth.hdl import Fragment
    for mc in (TINY.replace(num_experts=1, top_k=1), TINY.replace(top_k=4)):
        assert "module edgemoe_gate(" in to_verilog(Gate(DEFAULT_Q, DEFAULT_HW, mc), TOP)
    g = Gate(DEFAULT_Q, DEFAULT_HW, get_preset("vit-s-nyud"))      # E=16, k=4, 1201 tokens
    Fragment.get(g, None)
    assert g.LATENCY == 10 + 4 + 2 + 24 and g.plan.tok_bits == 11       # top-k in parallel


def test_gate_verilator_overflow_and_flush():
    res, _ = run_gate(DEFAULT_Q, TINY, [], testcase="gate_overflow_flush")
    assert res["overflow_entries"] == TINY.num_tokens * TINY.top_k


def test_gate_testbench_catches_wrong_rounding():
    """RTL generated for TRUNC checked against the HALF_EVEN golden model must fail with the
    first-mismatch report (reuses the trunc build of the saturating test)."""
    with pytest.raises(AssertionError, match=r"first mismatch at gate probabilities of row \d+ "
                                             r"\(cycle \d+\): inputs layer 0 token \d+: logits"):
        run_gate(sat_q("half_even"), TINY, [{"n": 9}] * 3, rtl_q=sat_q("trunc"), seed=5)


def test_gate_icarus_tiny():
    res, _ = run_gate(sat_q("half_even"), TINY, [{"n": 9}, {"n": 5, "sparse": True}],
                      simulator="icarus", seed=6)
    assert res["sat_total"] > 0


# --- full-size random run -------------------------------------------------------------------
@pytest.mark.full
def test_gate_verilator_edge_moe_full():
    """~100k tokens: 776 layers of 129 tokens (E=16, k=2), random gaps and back-pressure."""
    res, _ = run_gate(DEFAULT_Q, EDGE, [{"n": 129}] * 776, gap=0.1, stall=0.1, seed=11)
    assert res["tokens"] == 776 * 129


# --- synthesis ------------------------------------------------------------------------------------
def _synth_default():
    from edgemoe.hw.export import to_rtlil
    return to_rtlil(Gate(DEFAULT_Q, DEFAULT_HW, EDGE), TOP)


@pytest.mark.slow
def test_synth_gate_resource_baseline():
    """~1.5 min of Yosys for the E=16 unit, hence `slow` (run with -m slow)."""
    from edgemoe.hw.synth import check_synth_baseline, synth_xilinx
    res = synth_xilinx(_synth_default(), TOP, timeout_s=600)
    res["config"] = {"quant": DEFAULT_Q.name, "hw": DEFAULT_HW.name, "model": EDGE.name}
    # one DSP per lane for the interpolation (19 x 16) and one for the normalise (17 x 23)
    assert res["dsp"] == 2 * EDGE.num_experts
    assert res["ff"] >= 24 * 25          # the divider's partial remainders at least
    check_synth_baseline("gate", res)


@pytest.mark.slow
def test_synth_gate_ecp5_fmax():
    """On the tiny shape (E=4): nextpnr-ecp5 (WebAssembly) does not finish the E=16 unit in
    20 min; the per-lane paths are the same."""
    from edgemoe.hw.export import to_rtlil
    from edgemoe.hw.synth import synth_ecp5_fmax
    res = synth_ecp5_fmax(to_rtlil(Gate(DEFAULT_Q, DEFAULT_HW, TINY), TOP), TOP, timeout_s=900)
    assert res["fmax_mhz"] is not None, res["reason"]
    assert res["fmax_mhz"] > 80
