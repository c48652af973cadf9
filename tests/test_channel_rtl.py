"""Per-channel epilogue unit (hw/channel_requant.py) against quant.channel.channel_epilogue: the
golden function vs a Fraction reference, the RTL on Verilator and Icarus, lint."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from edgemoe.hw.channel_requant import ChannelRequant
from edgemoe.hw.config import HWConfig, get_hw_preset
from edgemoe.hw.export import port_list
from edgemoe.hw.units import build_unit
from edgemoe.quant.channel import MAX_SHIFT, channel_epilogue
from edgemoe.quant.config import get_quant_preset
from edgemoe.quant.fixed import Fmt, FormatError, Overflow, Rounding
from edgemoe.sim.runner import lint_verilator, run_cocotb, simulator_available
from edgemoe.sim.tb_channel_requant import channel_stimulus

TOP = "edgemoe_channel_requant"
TB = "edgemoe.sim.tb_channel_requant"
Q = get_quant_preset("w8a16-channel")
HW = get_hw_preset("zcu102-16x16")
TINY_HW = HWConfig(name="tiny-4lanes", lanes=4)


def narrow_q(rounding="half_even", overflow="sat"):
    """Narrow formats: saturation and every rounding branch are hit often."""
    y = Fmt(10, 3)
    return Q.replace(name=f"chan-narrow-{rounding}-{overflow}", acc=Fmt(20, 0), bias=Fmt(12, 0),
                     act=y, gelu_in=y, attn_in=Fmt(10, 5), gate_logit=Fmt(10, 2), mult_bits=8,
                     rounding=Rounding(rounding), overflow=Overflow(overflow))


def reference(a, b, m, s, q):
    x = Fraction((a + b) * m, 1 << s)
    fl = x.numerator // x.denominator
    rem = x - fl
    if q.rounding is Rounding.TRUNC:
        r = fl
    elif q.rounding is Rounding.HALF_UP:
        r = fl + (rem >= Fraction(1, 2))
    else:
        r = fl + (rem > Fraction(1, 2) or (rem == Fraction(1, 2) and fl % 2 == 1))
    lo, hi = q.act.min_int, q.act.max_int
    if q.overflow is Overflow.SAT:
        return min(max(r, lo), hi)
    w = r & ((1 << q.act.bits) - 1)
    return w - (1 << q.act.bits) if w > hi else w


@pytest.mark.parametrize("q", [Q, Q.replace(rounding=Rounding.HALF_EVEN),
                               narrow_q("half_even", "wrap"), narrow_q("trunc"), narrow_q("half_up")],
                         ids=["w8a16-channel", "half-even", "narrow-wrap", "narrow-trunc", "narrow-up"])
def test_golden_matches_fraction_reference_and_stimulus_covers(q):
    acc, bias, mult, shift = channel_stimulus(q, 4, 300, seed=3)
    y, over = channel_epilogue(acc, bias, mult, shift, q.act, q)
    ref = [reference(int(a), int(b), int(m), int(s), q) for a, b, m, s in
           zip(acc.ravel(), bias.ravel(), mult.ravel(), shift.ravel())]
    assert y.ravel().tolist() == ref
    # the stimulus reaches what a wrong datapath would get wrong
    p = (acc + bias) * mult
    ties = np.array([(int(v) & ((1 << int(s)) - 1)) == (1 << (int(s) - 1)) if s else False
                     for v, s in zip(p.ravel(), shift.ravel())])
    odd = np.array([(int(v) >> int(s)) & 1 for v, s in zip(p.ravel(), shift.ravel())])
    assert (ties & (odd == 1)).any() and (ties & (odd == 0)).any()
    assert over.any() and (~over).mean() > 0.3
    assert (shift == 0).any() and (shift == MAX_SHIFT).any()
    assert (np.abs(y) > 4).mean() > 0.2                # not just 0 / -1 after huge shifts


def test_refuses_class_granularity_and_narrow_formats():
    with pytest.raises(FormatError, match="granularity 'channel'"):
        ChannelRequant(get_quant_preset("w8a16"), HW)
    with pytest.raises(FormatError, match="attn_in.*as wide as act"):
        ChannelRequant(Q.replace(attn_in=Fmt(12, 8)), HW)


def test_ports():
    L = HW.lanes
    ports = port_list(build_unit("channel_requant", Q, HW))
    assert ports == {
        "i__payload__acc": (L * Q.acc.bits, "i"), "i__payload__bias": (L * Q.bias.bits, "i"),
        "i__payload__mult": (L * Q.mult_bits, "i"), "i__payload__shift": (L * 6, "i"),
        "i__valid": (1, "i"), "i__ready": (1, "o"),
        "o__payload__data": (L * Q.act.bits, "o"), "o__payload__sat_count": (5, "o"),
        "o__valid": (1, "o"), "o__ready": (1, "i")}


def test_verilator_lint():
    lint_verilator(ChannelRequant(Q, HW), TOP)


def run_unit(q, hw, n, simulator="verilator", gap=0.3, stall=0.3, seed=1, rtl_q=None):
    ok, why = simulator_available(simulator)
    if not ok:
        pytest.skip(why)
    cfg = {"qcfg": q.to_dict(), "hwcfg": hw.to_dict(), "n_beats": n, "stim_seed": seed + 100,
           "gap_prob": gap, "stall_prob": stall}
    res = run_cocotb(ChannelRequant(rtl_q or q, hw), TOP, TB, simulator=simulator, tb_config=cfg,
                     seed=seed, timeout_s=300)
    acc, bias, mult, shift = channel_stimulus(q, hw.lanes, n, seed + 100)
    _, over = channel_epilogue(acc, bias, mult, shift, q.act, q)
    assert res["compared"] == n * hw.lanes == res["elements"]
    assert res["sat_total"] == int(over.sum()) > 0
    return res


def test_rtl_verilator_w8a16_channel():
    run_unit(Q, HW, 200)
    res = run_unit(Q, HW, 100, gap=0.0, stall=0.0, seed=2)
    assert res["latency"] == ChannelRequant.LATENCY
    assert res["last_out_cycle"] - res["first_in_cycle"] == 99 + ChannelRequant.LATENCY


@pytest.mark.parametrize("rounding,overflow", [("half_even", "wrap"), ("trunc", "sat")])
def test_rtl_verilator_narrow(rounding, overflow):
    run_unit(narrow_q(rounding, overflow), TINY_HW, 300, seed=4)


def test_testbench_catches_wrong_rounding():
    with pytest.raises(AssertionError, match=r"first mismatch at element \d+ .*mult=\d+ shift=\d+"):
        run_unit(narrow_q("half_even", "wrap"), TINY_HW, 200, rtl_q=narrow_q("trunc", "wrap"))


def test_rtl_icarus_narrow():
    run_unit(narrow_q("half_up"), TINY_HW, 150, simulator="icarus", seed=6)


@pytest.mark.slow
def test_synth_channel_requant_resource_baseline():
    """16 lanes of the w8a16-channel epilogue: the multiplier goes to DSP48E2 (a 37 x 16 product:
    two per lane at most), the barrel shifter to LUTs; kept as the resource model's baseline."""
    from edgemoe.hw.export import to_rtlil
    from edgemoe.hw.synth import check_synth_baseline, synth_xilinx
    from edgemoe.sim.resources import dsp_per_mult
    u = ChannelRequant(Q, HW)
    res = synth_xilinx(to_rtlil(u, TOP), TOP, timeout_s=600)
    res["config"] = {"quant": Q.name, "hw": HW.name}
    L = HW.lanes
    assert 0 < res["dsp"] <= L * dsp_per_mult(u.sum_bits, Q.mult_bits + 1)
    assert res["ff"] >= L * Q.act.bits and res["lut"] > L * u.prod_bits
    assert res["bram36"] == 0
    check_synth_baseline("channel_requant", res)
