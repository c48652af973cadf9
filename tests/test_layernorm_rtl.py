"""LayerNorm unit: the width plan against the golden model, RTL (cocotb) vs
quant.approx.layernorm_fixed on Verilator and Icarus, export/lint/CLI, the synthesis baseline."""
from __future__ import annotations

import numpy as np
import pytest

from edgemoe.hw.config import HWConfig, HWConfigError, get_hw_preset
from edgemoe.hw.export import port_list, to_verilog
from edgemoe.hw.layernorm import LayerNorm, layernorm_plan, mul_plan
from edgemoe.hw.units import build_unit
from edgemoe.model.config import get_preset
from edgemoe.quant import approx
from edgemoe.quant.config import get_quant_preset
from edgemoe.quant.fixed import Fmt, FormatError, Overflow, Rounding
from edgemoe.quant.ln_steps import layernorm_steps
from edgemoe.sim.runner import lint_verilator, run_cocotb, simulator_available
from edgemoe.sim.tb_layernorm import ROW_KINDS, layernorm_params_stim, layernorm_rows_stim

TOP = "edgemoe_layernorm"
TB = "edgemoe.sim.tb_layernorm"
DEFAULT_Q = get_quant_preset("edge-moe-fixed")
DEFAULT_HW = get_hw_preset("zcu102-16x16")          # L = 16
L4_HW = HWConfig(name="ln-4lanes", lanes=4)
L8_HW = HWConfig(name="ln-8lanes", lanes=8)
TINY, EDGE = get_preset("tiny"), get_preset("edge-moe")     # D = 64, 192


def narrow_q(rounding="half_even", overflow="sat"):
    """Narrow formats: y saturates (gamma up to 128, act up to 128), rstd saturates (u22.14
    holds < 256 while 1/sqrt(eps) = 1024), other shifts and widths than edge-moe-fixed."""
    return DEFAULT_Q.replace(name=f"ln-narrow-{rounding}-{overflow}", act=Fmt(20, 12),
                             ln_gamma=Fmt(16, 8), ln_beta=Fmt(16, 8), ln_stat=Fmt(40, 20),
                             ln_rstd=Fmt(22, 14, False), rounding=Rounding(rounding),
                             overflow=Overflow(overflow))


# --- the plan (no simulator) -------------------------------------------------------------------
PLAN_CASES = [(DEFAULT_Q, DEFAULT_HW, 64), (DEFAULT_Q, DEFAULT_HW, 192), (DEFAULT_Q, L4_HW, 192),
              (narrow_q(), L4_HW, 64), (narrow_q("trunc", "wrap"), L8_HW, 64)]


@pytest.mark.parametrize("q,hw,d", PLAN_CASES, ids=lambda c: getattr(c, "name", str(c)))
def test_plan_bounds_hold_on_stress_rows(q, hw, d):
    """Every intermediate of the golden model on stress rows lies inside the plan's bounds, which
    the RTL registers are sized from (a too-narrow register would silently drop bits)."""
    p = layernorm_plan(q, hw, d)
    x, _ = layernorm_rows_stim(q, d, 300, seed=11)
    rows = [x] + [q.act.quantize(r) for r in approx.layernorm_rows(d).values()]
    for which in (0, 1):
        g, b = layernorm_params_stim(q, d, which, seed=5)
        for xr in rows:
            st = layernorm_steps(xr, g, b, q)
            for name in ("mean", "mean_n", "e2", "msq", "var", "rstd", "xhat"):
                lo, hi = p.b[name]
                assert lo <= st[name].min() and st[name].max() <= hi, (name, lo, hi)
            lo, hi = p.b["yr"]
            assert lo <= st["y_raw"].min() and st["y_raw"].max() <= hi
    # the stress rows reach the extremes the bounds were derived for
    st = layernorm_steps(x, *layernorm_params_stim(q, d, 1, seed=5), q)
    assert st["var"].min() == p.ln.eps_q                     # constant rows: var = eps only
    assert st["mean"].max() >= q.act.max_int - 1 and st["mean"].min() <= q.act.min_int + 1


@pytest.mark.parametrize("q", [DEFAULT_Q, narrow_q()], ids=lambda q: q.name)
def test_plan_newton_bounds_cover_rsqrt(q):
    """The interval bounds of the Newton iterates contain rsqrt_parts' y for every mantissa
    segment boundary and a dense grid, and are tight (within 0.1% of the largest y)."""
    p = layernorm_plan(q, L4_HW, 64)
    mf = p.rs.mant_frac
    v = approx.rsqrt_grid(q, 1, 50_001)
    seg = 1 << (mf + 2 - p.rs.table_bits)
    bounds = np.arange(1 << mf, 1 << (mf + 2), seg, dtype=np.int64)
    v = np.unique(np.concatenate([v, bounds, bounds - 1, bounds + 1]))
    y, _ = approx.rsqrt_parts(v[v > 0], q)
    assert y.max() <= p.b["y"][1] <= y.max() * 1.001
    assert y.min() > 0 and p.newton[-1][3] > 0          # 3 - u*y**2 stays positive


def test_mul_plan_pieces_are_exact_and_dsp_sized():
    """A product split into 26 x 17-bit unsigned pieces (sign in the top piece) adds up to the
    exact product; DSP counts of the unit's multipliers are the expected ones."""
    from amaranth.hdl import signed, unsigned
    rng = np.random.default_rng(0)
    for a_s, b_s, const in [(signed(33), unsigned(32), None), (signed(43), signed(16), None),
                            (unsigned(27), unsigned(28), None), (unsigned(58), unsigned(31), 1431655765),
                            (signed(40), unsigned(31), 1 << 30)]:
        mp = mul_plan(a_s, b_s, const)
        for _ in range(200):
            a = int(rng.integers(-(1 << 62), 1 << 62)) >> (63 - a_s.width)
            a = a if a_s.signed else abs(a)
            b = const if const is not None else (int(rng.integers(0, 1 << 62)) >> (62 - b_s.width))
            if b_s.signed and const is None:
                b -= 1 << (b_s.width - 1)
            total = 0
            for (alo, aw, asg), (blo, bw, bsg) in mp.terms:
                pa = ((a & ((1 << (alo + aw)) - 1)) >> alo) if not asg else a >> alo
                pb = ((b & ((1 << (blo + bw)) - 1)) >> blo) if not bsg else b >> blo
                assert aw <= 27 and bw <= 27
                total += (pa * pb) << (alo + blo)
            assert total == a * b
    p = layernorm_plan(DEFAULT_Q, DEFAULT_HW, 192)
    dsp = {n: mp.dsp for n, mp in p.mul.items()}
    assert dsp == {"sq": 2, "sx": 4, "sn": 4, "q": 6, "msq": 4, "yy": 2, "ua": 2, "yf": 2,
                   "dr": 4, "xg": 2}
    p64 = layernorm_plan(DEFAULT_Q, DEFAULT_HW, 64)     # K = 2**30: the 1/D multiplies are shifts
    assert p64.mul["sx"].dsp == p64.mul["sn"].dsp == p64.mul["q"].dsp == 0
    assert p.dsp_estimate == 158 and p64.dsp_estimate == 144


def test_plan_buffer_hides_the_statistics_latency():
    for d, hw in ((64, DEFAULT_HW), (192, DEFAULT_HW), (192, L4_HW), (8, L8_HW)):
        p = layernorm_plan(DEFAULT_Q, hw, d)
        assert p.buffer_beats >= max(2 * p.beats, p.beats + p.stats_latency + 2)
        assert p.stats_fifo_depth >= (p.buffer_beats - 1) // p.beats + 1
        assert p.latency == p.beats - 1 + p.stats_latency + p.out_stages


def test_rejects_bad_configs():
    with pytest.raises(HWConfigError, match=r"D=100.*lanes=16"):
        LayerNorm(DEFAULT_Q, DEFAULT_HW, d=100)
    with pytest.raises(HWConfigError, match="model_cfg"):
        LayerNorm(DEFAULT_Q, DEFAULT_HW)
    with pytest.raises(FormatError, match="ln_stat"):      # E[xn**2] cannot fit: var would saturate
        LayerNorm(DEFAULT_Q.replace(ln_stat=Fmt(40, 32)), DEFAULT_HW, d=64)
    with pytest.raises(FormatError, match="even frac"):     # from approx.layernorm_params
        LayerNorm(DEFAULT_Q.replace(ln_stat=Fmt(52, 31)), DEFAULT_HW, d=64)


def test_stimulus_covers_edge_cases():
    q, d = DEFAULT_Q, 64
    x, kinds = layernorm_rows_stim(q, d, 40, seed=3)
    assert set(kinds) == set(ROW_KINDS)
    assert (x == q.act.max_int).any() and (x == q.act.min_int).any()
    assert any((r == r[0]).all() for r in x)                               # constant rows
    assert (np.abs(x) == q.act.quantize(55.0)).any()                       # +-55 outliers
    assert ((x >= q.act.min_int) & (x <= q.act.max_int)).all()
    for which in (0, 1):
        g, b = layernorm_params_stim(q, d, which, seed=3)
        assert g.max() == q.ln_gamma.max_int and g.min() == q.ln_gamma.min_int and (g == 0).any()
        assert b.max() == q.ln_beta.max_int and b.min() == q.ln_beta.min_int


# --- export, lint, CLI -------------------------------------------------------------------------
def test_export_names_and_ports():
    L = DEFAULT_HW.lanes
    component = build_unit("layernorm", DEFAULT_Q, DEFAULT_HW, EDGE)
    assert component.d == 192 and component.eps == EDGE.ln_eps
    assert port_list(component) == {
        "i__payload__data": (L * 32, "i"), "i__valid": (1, "i"), "i__ready": (1, "o"),
        "o__payload__data": (L * 32, "o"), "o__payload__sat_count": (5, "o"),
        "o__payload__stat_sat": (1, "o"), "o__payload__last": (1, "o"),
        "o__valid": (1, "o"), "o__ready": (1, "i"),
        "p__payload__addr": (4, "i"), "p__payload__gamma": (L * 16, "i"),
        "p__payload__beta": (L * 16, "i"), "p__valid": (1, "i"), "p__ready": (1, "o"),
        "busy": (1, "o")}
    v = verilog_of(DEFAULT_Q, DEFAULT_HW, 192, component)
    assert f"module {TOP}(" in v
    for name in (*port_list(component), "clk", "rst"):
        assert f" {name};" in v, f"port {name} missing from the Verilog"


@pytest.mark.parametrize("q,hw,mcfg", [(DEFAULT_Q, DEFAULT_HW, EDGE), (narrow_q(), L4_HW, TINY)],
                         ids=["edge-moe-16", "narrow-4"])
def test_verilator_lint(q, hw, mcfg):
    lint_verilator(verilog_of(q, hw, mcfg.dim), TOP)


def test_cli_verilog(tmp_path, capsys):
    from edgemoe.sim.cli import main
    assert main(["verilog", "--unit", "layernorm", "--preset", "tiny", "--hw", "small-8x8",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "module edgemoe_layernorm" in out and "p__payload__gamma" in out
    assert (tmp_path / "edgemoe_layernorm.v").read_text().count("module edgemoe_layernorm(") == 1


# --- RTL simulation -----------------------------------------------------------------------------
RANDOM, FULL_RATE = (0.25, 0.45), (0.0, 0.0)       # (input gap probability, output stall probability)


_VERILOG: dict = {}


def verilog_of(q, hw, d, component=None) -> str:
    """Exported once per configuration (export takes a few seconds at L = 16)."""
    if (q, hw, d) not in _VERILOG:
        _VERILOG[q, hw, d] = to_verilog(component or LayerNorm(q, hw, d=d), TOP)
    return _VERILOG[q, hw, d]


def run_ln(q, hw, d, n_tokens, phases, simulator="verilator", seed=1, rtl_q=None):
    ok, why = simulator_available(simulator)
    if not ok:
        pytest.skip(why)
    cfg = {"qcfg": q.to_dict(), "hwcfg": hw.to_dict(), "d": d, "eps": 1e-6, "n_tokens": n_tokens,
           "phases": [list(p) for p in phases], "stim_seed": seed + 100}
    res = run_cocotb(verilog_of(rtl_q or q, hw, d), TOP, TB, simulator=simulator, tb_config=cfg,
                     seed=seed, timeout_s=600)
    assert res["compared"] == res["elements"] == n_tokens * d * len(phases)
    assert res["busy_seen"]
    return res


def assert_random_traffic(ph):
    assert ph["cycles_per_beat"] > 1.3             # gaps and stalls really happened
    assert ph["in_stall_cycles"] > 0               # the token buffer filled: input back-pressure


def assert_full_throughput(ph, plan_latency, beats):
    """No gaps, no back-pressure: one beat per cycle in and out, no input stall, and the first
    output exactly plan.latency cycles after the first input."""
    assert ph["in_span"] == beats and ph["out_span"] == beats
    assert ph["in_stall_cycles"] == 0
    assert ph["latency"] == plan_latency
    assert ph["last_out_cycle"] - ph["first_in_cycle"] == beats - 1 + plan_latency


@pytest.mark.parametrize("hw,mcfg", [(DEFAULT_HW, TINY), (DEFAULT_HW, EDGE), (L4_HW, EDGE)],
                         ids=["D64-L16", "D192-L16", "D192-L4"])
def test_layernorm_verilator_random_then_full_rate(hw, mcfg):
    """Phase 0: trained-like gamma/beta, random gaps and back-pressure; phase 1: full-range
    gamma/beta at full rate (the parameters are reloaded in between, while busy is low)."""
    d = mcfg.dim
    n = max(12, 200 // (d // hw.lanes))          # about 200 beats per phase
    res = run_ln(DEFAULT_Q, hw, d, n, [RANDOM, FULL_RATE])
    assert res["plan_latency"] == layernorm_plan(DEFAULT_Q, hw, d).latency
    assert_random_traffic(res["phases"][0])
    assert_full_throughput(res["phases"][1], res["plan_latency"], n * d // hw.lanes)


def test_layernorm_verilator_narrow_saturation():
    """y and rstd saturate (and are counted per beat) in the narrow formats, half-even rounding."""
    q = narrow_q()
    res = run_ln(q, L4_HW, 64, 24, [RANDOM, RANDOM], seed=3)
    expect_y = expect_s = 0
    for s in (0, 1):
        x, _ = layernorm_rows_stim(q, 64, 24, 103 + 1000 * s)
        st = layernorm_steps(x, *layernorm_params_stim(q, 64, s, 103), q)
        expect_y += int(st["y_over"].sum())
        expect_s += int(st["rstd_over"].sum()) * 16
    assert res["y_sat_total"] == expect_y > 0 and res["stat_sat_beats"] == expect_s > 0


def test_layernorm_testbench_catches_wrong_rounding():
    """RTL generated for HALF_EVEN (the narrow build above), checked against the HALF_UP golden
    model: must fail with the first-mismatch report."""
    with pytest.raises(AssertionError, match=r"first mismatch at element \(phase 0\) \d+ "
                                             r"\(cycle \d+\): inputs token \d+ beat \d+ lane \d+.*"
                                             r"x=-?\d+ gamma=-?\d+ beta=-?\d+; row mean=.*expected"):
        run_ln(narrow_q("half_up"), L4_HW, 64, 24, [RANDOM], seed=3, rtl_q=narrow_q("half_even"))


def test_layernorm_icarus_one_beat_per_token():
    """D = L = 8: every beat is a whole token, so the statistics pipeline takes one token per
    cycle; full rate must still hold, then random gaps and back-pressure."""
    res = run_ln(DEFAULT_Q, L8_HW, 8, 24, [FULL_RATE, RANDOM], simulator="icarus", seed=4)
    assert_full_throughput(res["phases"][0], res["plan_latency"], 24)
    assert res["phases"][1]["cycles_per_beat"] > 1.3


def test_layernorm_icarus_narrow_random():
    """Trunc rounding and wrapping overflow, random traffic (too short to fill the buffer)."""
    res = run_ln(narrow_q("trunc", "wrap"), L4_HW, 16, 16, [RANDOM], simulator="icarus", seed=5)
    assert res["phases"][0]["cycles_per_beat"] > 1.3


@pytest.mark.full
def test_layernorm_verilator_full_100k():
    """About 100k elements of D = 192, L = 16 with gaps and back-pressure (both parameter sets),
    then a full-rate phase."""
    res = run_ln(DEFAULT_Q, DEFAULT_HW, 192, 272, [RANDOM, (0.1, 0.2), FULL_RATE], seed=7)
    assert res["compared"] >= 150_000
    for ph in res["phases"][:2]:
        assert ph["in_stall_cycles"] > 0
    assert_full_throughput(res["phases"][2], res["plan_latency"], 272 * 12)


# --- synthesis ------------------------------------------------------------------------------------
def _rtlil_default():
    from edgemoe.hw.export import to_rtlil
    return to_rtlil(LayerNorm(DEFAULT_Q, DEFAULT_HW, EDGE), TOP)


@pytest.mark.slow
def test_synth_layernorm_resource_baseline():
    """edge-moe (D = 192), L = 16, edge-moe-fixed. About 2 min of Yosys, hence `slow`."""
    from edgemoe.hw.synth import check_synth_baseline, synth_xilinx
    res = synth_xilinx(_rtlil_default(), TOP, timeout_s=900)
    res["config"] = {"quant": DEFAULT_Q.name, "hw": DEFAULT_HW.name, "model": EDGE.name}
    p = layernorm_plan(DEFAULT_Q, DEFAULT_HW, 192)
    assert res["dsp"] == p.dsp_estimate            # every multiply is on DSPs, none wasted
    assert res["bram36"] + res["lutram"] > 0       # the token buffer is a memory, not flip-flops
    assert res["ff"] >= DEFAULT_HW.lanes * DEFAULT_Q.act.bits
    check_synth_baseline("layernorm", res)


@pytest.mark.slow
def test_synth_layernorm_ecp5_fmax():
    """A small configuration (D = 64, L = 4): the L = 16 one needs more multipliers than an ECP5-85k has."""
    from edgemoe.hw.export import to_rtlil
    from edgemoe.hw.synth import synth_ecp5_fmax
    res = synth_ecp5_fmax(to_rtlil(LayerNorm(DEFAULT_Q, L4_HW, TINY), TOP), TOP, timeout_s=900)
    assert res["fmax_mhz"] is not None, res["reason"]
    assert res["fmax_mhz"] > 70          # 86 MHz measured (nextpnr-ecp5 0.11, seed 1)
