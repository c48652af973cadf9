"""Compute unit: golden function (quant/linear.py) vs the golden model's layers, weight-stream
layout, cycle model (sim/perf.py), RTL (cocotb) vs golden on Verilator (16x16, 8x8, 32x16,
w8a16) and Icarus, export/lint, and the synthesis baseline."""
from __future__ import annotations

import os

import numpy as np
import pytest

from edgemoe.hw.config import HWConfig, get_hw_preset
from edgemoe.model.config import get_preset
from edgemoe.quant import approx
from edgemoe.quant.config import get_quant_preset
from edgemoe.quant.fixed import Fmt, FormatError, Rounding, SatCounter, requantize
from edgemoe.quant.linear import MODES, linear_golden, pack_weight_stream, tile_layout
from edgemoe.quant.schedule import active_experts, build_expert_queues
from edgemoe.sim.perf import linear_cycles, linear_macs, linear_timing, mac_utilisation
from edgemoe.sim.runner import run_cocotb, simulator_available
from edgemoe.sim.tb_compute import build_program, expected_cycles

TOP = "edgemoe_compute"
TB = "edgemoe.sim.tb_compute"
Q = get_quant_preset("edge-moe-fixed")
W8 = get_quant_preset("w8a16")
WC = get_quant_preset("w8a16-channel")
HW16 = get_hw_preset("zcu102-16x16")
HW8 = get_hw_preset("small-8x8")
HW32 = HWConfig(name="t32x16", t_in=32, t_out=16)
HW8N = HW8.replace(name="small-8x8-axi32", axi_data_bits=32)
HW4 = HWConfig(name="t4x4", t_in=4, t_out=4, lanes=4, act_buffer_tokens=16)
TINY = get_preset("tiny")
EDGE = get_preset("edge-moe")


# --- golden function vs quant/golden.py ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_golden():
    import torch

    from edgemoe.model.m3vit import M3ViT
    from edgemoe.quant.golden import GoldenModel
    from edgemoe.quant.qweights import quantize_weights
    m = M3ViT(TINY, seed=0).eval()
    qw = quantize_weights(TINY, Q, m.state_dict())
    gm = GoldenModel(TINY, Q, qw, attn_p=2)
    img = torch.rand(1, 3, TINY.img_h, TINY.img_w, generator=torch.Generator().manual_seed(0))[0].numpy()
    return qw, gm, gm.forward(img, 0, keep=True), img


def test_linear_golden_equals_golden_model_layers(tiny_golden):
    """Every linear layer of a tiny-model forward pass, recomputed one layer at a time with
    linear_golden (residual adds and the expert scatter-accumulate included), gives the golden
    model's integers exactly."""
    qw, gm, r, img = tiny_golden
    t, w = r.tensors, qw
    # patch embedding (patch_w), then class token and position embedding as the golden model adds
    x = Q.act.quantize(np.asarray(img, dtype=np.float64))
    p, (gh, gw) = TINY.patch, TINY.grid
    patches = x.reshape(3, gh, p, gw, p).transpose(1, 3, 0, 2, 4).reshape(gh * gw, -1)
    tok = linear_golden(patches, w["patch_embed.proj.weight"].reshape(TINY.dim, -1),
                        w["patch_embed.proj.bias"], Q, "patch_embed").y
    emb = gm.add(np.concatenate([w["cls_token"].reshape(1, -1), tok]),
                 w["pos_embed"].reshape(TINY.num_tokens, -1), None, "pos")
    np.testing.assert_array_equal(emb, t["embed"])
    # block 0 (dense): qkv, proj + residual, fc1 + GELU, fc2 + residual
    a = "blocks.0.attn."
    qkv = linear_golden(t["blocks.0.norm1"], w[a + "qkv.weight"], w[a + "qkv.bias"], Q, "qkv")
    np.testing.assert_array_equal(qkv.y, t["blocks.0.qkv"])
    proj = linear_golden(t["blocks.0.attn_out"], w[a + "proj.weight"], w[a + "proj.bias"], Q,
                         "proj", resid=t["embed"])
    np.testing.assert_array_equal(proj.resid, t["blocks.0.resid1"])
    np.testing.assert_array_equal(proj.y, t["blocks.0.resid1"])
    mp = "blocks.0.mlp."
    fc1 = linear_golden(t["blocks.0.norm2"], w[mp + "fc1.weight"], w[mp + "fc1.bias"], Q, "fc1")
    np.testing.assert_array_equal(fc1.y, t[mp + "gelu"])
    fc2 = linear_golden(fc1.y, w[mp + "fc2.weight"], w[mp + "fc2.bias"], Q, "fc2",
                        resid=t["blocks.0.resid1"])
    np.testing.assert_array_equal(fc2.resid, t["blocks.0.out"])
    # block 1 (MoE): router logits, then experts in the metaqueue order, scatter-accumulated
    mp, h2 = "blocks.1.mlp.", t["blocks.1.norm2"]
    lg = linear_golden(h2, w[mp + "routers.0.weight"], None, Q, "router")
    np.testing.assert_array_equal(lg.y, t[mp + "gate_logits"])
    idx, wts, _ = approx.gate_fixed(lg.y, Q, TINY.top_k)
    queues = build_expert_queues(idx, wts, TINY.num_experts)
    xr = t["blocks.1.resid1"].copy()
    assert len(active_experts(queues)) >= 2
    for e in active_experts(queues):
        toks, g = queues[e]
        hid = linear_golden(h2, w[mp + "htoh4_weight"][e], w[mp + "htoh4_bias"][e], Q,
                            "expert_fc1", tokens=toks)
        out = linear_golden(hid.y, w[mp + "h4toh_weight"][e], w[mp + "h4toh_bias"][e], Q,
                            "expert_fc2", tokens=toks, gate_w=g, resid=xr)
        np.testing.assert_array_equal(out.y, out.resid[toks])
        xr = out.resid
    np.testing.assert_array_equal(xr, t["blocks.1.out"])


def test_linear_golden_saturation_matches_golden_model():
    """Saturating data (narrow w8a16 formats, extreme rows): the same integers and the same
    saturation counts as GoldenModel.linear / .add and the expert weighting of .moe."""
    from edgemoe.quant.golden import GoldenModel
    from edgemoe.quant.qweights import QWeights
    q = W8
    gm = GoldenModel(TINY, q, QWeights({}, {}))
    rng = np.random.default_rng(3)
    x = rng.integers(q.act.min_int, q.act.max_int, (7, 64), endpoint=True)
    w = rng.integers(q.linear_w.min_int, q.linear_w.max_int, (32, 64), endpoint=True)
    b = rng.integers(q.bias.min_int, q.bias.max_int, 32, endpoint=True)
    res = rng.integers(q.act.min_int, q.act.max_int, (12, 32), endpoint=True)
    toks = np.array([0, 3, 4, 9, 10, 11, 2])
    g = rng.integers(0, q.gate_prob.max_int, 7, endpoint=True)
    s_ref, s_new = SatCounter(), SatCounter()
    y = gm.linear(x, w, b, s_ref, "y")
    prod_fmt = Fmt(62, q.act.frac + q.gate_prob.frac)
    yw = requantize(y * g[:, None], prod_fmt, q.act, q.rounding, q.overflow, s_ref, "yw")
    want = res.copy()
    want[toks] = gm.add(res[toks], yw, s_ref, "add")
    got = linear_golden(x, w, b, q, "expert_fc2", tokens=toks, gate_w=g, resid=res, sat=s_new)
    np.testing.assert_array_equal(got.resid, want)
    assert s_ref.saturated("y") > 0 and s_ref.saturated("yw") > 0 and s_ref.saturated("add") > 0
    assert int(got.sat.sum()) == s_ref.saturated() == s_new.saturated()
    # plain and residual modes against .linear / .add
    plain = linear_golden(x, w, b, q, "qkv")
    np.testing.assert_array_equal(plain.y, y)
    pr = linear_golden(x, w, b, q, "proj", resid=res[:7])
    np.testing.assert_array_equal(pr.resid, gm.add(res[:7], y, None, "r"))
    lg = linear_golden(x, w, None, q, "router")
    np.testing.assert_array_equal(lg.y, gm.linear(x, w, None, None, "l", out_fmt=q.gate_logit))


def test_linear_golden_rejects_bad_input():
    x = np.zeros((4, 8), dtype=np.int64)
    w = np.zeros((6, 8), dtype=np.int64)
    with pytest.raises(FormatError, match="unknown linear mode"):
        linear_golden(x, w, np.zeros(6), Q, "conv")
    with pytest.raises(FormatError, match="needs a bias"):
        linear_golden(x, w, None, Q, "qkv")
    with pytest.raises(FormatError, match="has no bias"):
        linear_golden(x, w, np.zeros(6), Q, "router")
    with pytest.raises(FormatError, match="needs tokens"):
        linear_golden(x, w, np.zeros(6), Q, "expert_fc1")
    with pytest.raises(FormatError, match="token index out of range"):
        linear_golden(x, w, np.zeros(6), Q, "expert_fc1", tokens=[0, 4])
    with pytest.raises(FormatError, match="residual buffer"):
        linear_golden(x, w, np.zeros(6), Q, "proj")
    with pytest.raises(FormatError, match="destination rows repeat"):
        linear_golden(x, w, np.zeros(6), Q, "expert_fc2", tokens=[1, 1], gate_w=[1, 1],
                      resid=np.zeros((4, 6)))
    with pytest.raises(FormatError, match=r"'w'\[\(0, 0\)\] = 32768 outside s16.14"):
        linear_golden(x, w + (1 << 15), np.zeros(6), Q, "qkv")
    with pytest.raises(FormatError, match="x .* and w"):
        linear_golden(x, w[:, :5], np.zeros(6), Q, "qkv")


# --- weight stream layout ----------------------------------------------------------------------------
@pytest.mark.parametrize("hw,q", [(HW16, Q), (HW8, W8), (HWConfig(t_in=4, t_out=3, axi_data_bits=64), Q)])
def test_weight_stream_layout(hw, q):
    """Unpack the beats with an independent bit-string reader: every tile element and bias lane
    is where quant/linear.py's docstring says, padding is zero."""
    lay = tile_layout(q, hw)
    rng = np.random.default_rng(1)
    n, k = 2 * hw.t_out + 1, 3 * hw.t_in - 2
    w = rng.integers(q.linear_w.min_int, q.linear_w.max_int, (n, k), endpoint=True)
    b = rng.integers(q.bias.min_int, q.bias.max_int, n, endpoint=True)
    beats = pack_weight_stream(w, b, lay)
    kc, nc = lay.chunks(k), lay.tiles(n)
    assert len(beats) == lay.stream_beats(k, n, True) == nc * (lay.bias_beats + kc * lay.tile_beats)
    bits = "".join(format(v, f"0{hw.axi_data_bits}b")[::-1] for v in beats)   # LSB first

    def field(pos, width):
        v = int(bits[pos:pos + width][::-1], 2)
        return v - (1 << width) if v >> (width - 1) else v

    pos = 0
    for j in range(nc):
        for o in range(hw.t_out):
            ch = j * hw.t_out + o
            assert field(pos + o * q.bias.bits, q.bias.bits) == (b[ch] if ch < n else 0)
        pos += lay.bias_beats * hw.axi_data_bits
        for c in range(kc):
            for i in range(hw.t_in):
                for o in range(hw.t_out):
                    ch, f = j * hw.t_out + o, c * hw.t_in + i
                    want = w[ch, f] if ch < n and f < k else 0
                    assert field(pos + (i * hw.t_out + o) * lay.w_bits, lay.w_bits) == want
            pos += lay.tile_beats * hw.axi_data_bits


# --- cycle model -------------------------------------------------------------------------------------
def test_cycle_model_memory_and_compute_bound():
    lay = tile_layout(Q, HW16)
    assert lay.tile_beats == 16 and lay.bias_beats == 1
    # a 3-token expert queue: each pass waits for its 16-beat tile (memory-bound)
    t = linear_timing(3, 192, 384, HW16, Q, "expert_fc1")
    assert t.passes == 12 * 24 and t.stall_cycles >= t.passes * (16 - 3) - 16
    assert t.passes * 16 <= t.cycles <= t.passes * 16 + t.passes // 12 * 2 + 60
    # 129 rows: back-to-back passes, weights hidden behind compute (compute-bound)
    t = linear_timing(129, 192, 768, HW16, Q, "fc1")
    assert t.stall_cycles == 0
    assert t.compute_cycles < t.cycles < t.compute_cycles + 129 + 60
    util = mac_utilisation(linear_macs(129, 192, 768), t.cycles, HW16)
    assert 0.97 < util <= 1.0
    # more rows never cost fewer cycles; GELU adds its latency; wider AXI loads faster
    c = [linear_cycles(r, 128, 64, HW16, Q, "expert_fc2") for r in range(1, 40)]
    assert all(a <= b for a, b in zip(c, c[1:]))
    assert linear_cycles(9, 64, 64, HW16, Q, "fc1") > linear_cycles(9, 64, 64, HW16, Q, "qkv")
    assert linear_cycles(3, 64, 64, HW16.replace(axi_data_bits=512), Q) < linear_cycles(3, 64, 64, HW16, Q)
    with pytest.raises(ValueError, match="act_buffer_tokens"):
        linear_cycles(300, 64, 64, HW16, Q)
    with pytest.raises(ValueError, match="cycles"):
        mac_utilisation(10, 0, HW16)


# --- RTL ---------------------------------------------------------------------------------------------
CLEAN = {"gap": 0.0, "stall": 0.0, "seed": 1}
STRESS = {"gap": 0.3, "stall": 0.3, "seed": 7, "noop": True}


# every module hw/compute.py's generator imports (directly or through Requant / Gelu)
GENERATOR_SOURCES = ("hw/compute.py", "hw/requant.py", "hw/gelu.py", "hw/pipeline.py",
                     "hw/config.py", "hw/export.py", "quant/linear.py", "quant/epilogue.py",
                     "quant/approx.py", "quant/fixed.py", "quant/config.py", "quant/intmath.py")


def compute_verilog(q, hw, mcfg) -> str:
    """The exported Verilog, cached: elaborating a 16x16 / 32x16 array takes 8-14 s per run.
    The key covers the configs, the Amaranth version and the source of every module the
    generator uses (GENERATOR_SOURCES), so a change to any of them regenerates it."""
    import hashlib
    import json
    from importlib.metadata import version
    from pathlib import Path

    from edgemoe.hw.export import to_verilog
    from edgemoe.sim.runner import REPO_ROOT, cache_root
    h = hashlib.sha256(json.dumps([q.to_dict(), hw.to_dict(), repr(mcfg), version("amaranth")],
                                  sort_keys=True, default=str).encode())
    for f in GENERATOR_SOURCES:
        h.update(f.encode() + (REPO_ROOT / f).read_bytes())
    path = Path(cache_root()) / "verilog" / f"{TOP}-{h.hexdigest()[:16]}.v"
    if path.exists():
        return path.read_text()
    from edgemoe.hw.compute import ComputeUnit
    text = to_verilog(ComputeUnit(q, hw, mcfg), TOP)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return text


def run_compute(q, hw, phases, kinds=None, shape="tiny", simulator="verilator", max_experts=None,
                rtl_q=None, timeout_s=600):
    ok, why = simulator_available(simulator)
    if not ok:
        pytest.skip(why)
    mcfg = get_preset(shape)
    cfg = {"shape": shape, "qcfg": q.to_dict(), "hwcfg": hw.to_dict(), "layers": kinds,
           "max_experts": max_experts, "phases": phases}
    res = run_cocotb(compute_verilog(rtl_q or q, hw, mcfg), TOP, TB, simulator=simulator,
                     tb_config=cfg, timeout_s=timeout_s)
    # the testbench compared every lane of every beat; check the totals against the program
    sat = SatCounter()
    layers, _ = build_program(shape, q, hw, 0, kinds, max_experts, sat=sat)
    want_beats = sum(len(L.expected) for L in layers)
    want_sat = sum(L.sat_events for L in layers)
    model = expected_cycles(layers, q, hw)
    assert res["model_cycles"] == model
    for ph in res["phases"]:
        assert ph["beats"] == want_beats and ph["lanes"] == want_beats * hw.t_out
        assert ph["sat"] == want_sat
        if ph["gap"] == 0 and ph["stall"] == 0 and ph["q_gap"] == 0:
            for lr, mc in zip(ph["layers"], model):
                assert abs(lr["cycles"] - mc) <= 0.05 * mc, (lr, mc)
        else:
            assert sum(lr["cycles"] for lr in ph["layers"]) > 1.2 * sum(model)  # stalls happened
            assert ph["noops"] == len(layers)
    return res, layers, sat


def _covers_every_narrowing(sat, layers):
    names = sat.counts
    assert any(k.endswith(".weighted") and v[0] for k, v in names.items())   # gate multiply
    assert any(k.endswith(".resid") and v[0] for k, v in names.items())      # residual add
    assert any("." not in k and v[0] for k, v in names.items())              # requantize


def test_compute_verilator_16x16_tiny():
    """Every mode on the tiny preset's layers at 16x16 (memory-bound: rows < 16 beats per
    tile): a clean run (cycles = model within 5%) and a run with valid gaps, back-pressure,
    memory latency and no-op commands on every stream."""
    res, layers, sat = run_compute(Q, HW16, [CLEAN, STRESS])
    assert {L.mode.name for L in layers} == set(MODES)
    assert any(L.rows == 1 and L.k == HW16.t_in for L in layers)
    _covers_every_narrowing(sat, layers)


def test_compute_verilator_8x8_tiny():
    """8x8 array (compute-bound on the tiny shapes: 9 rows > 4 beats per tile), every mode
    clean; then the residual and expert layers with a starved queue stream (the epilogue must
    wait for the token / gate weight of each row)."""
    run_compute(Q, HW8, [CLEAN])
    run_compute(Q, HW8, [{**STRESS, "q_gap": 0.9}],
                kinds=["fc2", "router", "expert_fc1", "expert_fc2"])


@pytest.mark.slow
def test_compute_verilator_32x16():
    run_compute(Q, HW32, [CLEAN, STRESS], kinds=["qkv", "router", "expert_fc1", "expert_fc2"],
                max_experts=2)
    assert tile_layout(Q, HW32).tile_beats == 32


def test_compute_verilator_w8a16_8x8():
    """Narrow formats (8-bit weights, 16-bit act, 34-bit acc): frequent saturation; a 32-bit
    weight port, so a tile takes 16 beats and a bias 4 beats."""
    lay = tile_layout(W8, HW8N)
    assert (lay.tile_beats, lay.bias_beats) == (16, 4)
    res, layers, sat = run_compute(W8, HW8N, [CLEAN, STRESS],
                                   kinds=["proj", "fc1", "router", "expert_fc1", "expert_fc2"])
    assert res["phases"][0]["sat"] > 50


def test_compute_verilator_w8a16_channel_8x8():
    """Granularity "channel": every column header carries bias + multiplier + shift per lane
    (the router's too, with bias 0), the epilogue is hw/channel_requant.py; every mode, clean
    and stressed, equals linear_golden with the per-channel epilogue lane by lane."""
    lay = tile_layout(WC, HW8)
    assert lay.channel and lay.bias_beats == 2 and lay.stream_beats(8, 8, False) == 2 + lay.tile_beats == 4
    res, layers, sat = run_compute(WC, HW8, [CLEAN, STRESS])
    assert {L.mode.name for L in layers} == set(MODES)
    _covers_every_narrowing(sat, layers)


def test_compute_testbench_catches_wrong_rounding():
    """RTL generated for TRUNC checked against the HALF_UP golden model fails with the
    first-mismatch report (layer, row, lane, cycle, expected, got)."""
    with pytest.raises(AssertionError, match=r"first mismatch in layer qkv: row \d+ \(buffer row "
                                             r"\d+\), lane \d+ \(channel \d+\), cycle \d+: "
                                             r"expected -?\d+, got -?\d+"):
        run_compute(Q, HW8, [CLEAN], kinds=["qkv"], rtl_q=Q.replace(rounding=Rounding.TRUNC))


def test_compute_icarus_4x4():
    """Icarus on the smallest array (4x4, 16-row buffers, one beat per tile, so one-row passes
    would run back to back without the read-before-write guard): router, the shortest expert
    (gather, GELU, gate, scatter-accumulate) and the corner layers clean, the router again with
    gaps and back-pressure."""
    assert tile_layout(Q, HW4).tile_beats == 1
    run_compute(Q, HW4, [CLEAN], kinds=["router", "expert_fc1", "expert_fc2", "corner"],
                max_experts=-1, simulator="icarus")
    run_compute(Q, HW4, [STRESS], kinds=["router"], simulator="icarus")


@pytest.mark.full
def test_compute_verilator_16x16_edge_moe():
    """Edge-MoE shapes (D=192, 129 tokens, QKV 192->576, fc1 192->768, fc2 768->192, 16 experts
    x 384 with the router's real queues), 16x16, clean (cycles vs model) and stressed."""
    res, layers, _ = run_compute(Q, HW16, [CLEAN, STRESS], shape="edge-moe", timeout_s=3600)
    assert {L.mode.name for L in layers} == set(MODES)
    assert sum(L.kind == "expert_fc2" for L in layers) >= 12
    # the figures of the report (pytest -s prints them)
    print(f"\nedge-moe shapes, 16x16, {res['sim_cycles_per_s']:.0f} simulated cycles/s")
    for lr, mc, L in zip(res["phases"][0]["layers"], res["model_cycles"], layers):
        util = mac_utilisation(linear_macs(L.rows, L.k, L.n), lr["cycles"], HW16)
        stressed = res["phases"][1]["layers"][layers.index(L)]["cycles"]
        print(f"  {L.name:14s} rows {L.rows:4d} {L.k:4d}->{L.n:4d}  cycles {lr['cycles']:7d}  model "
              f"{mc:7d}  util {util:.3f}  (stressed {stressed})")


# --- export, lint, synthesis ------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::amaranth.hdl._ir.UnusedElaboratable")
def test_export_ports():
    import gc

    from edgemoe.hw.export import port_list
    from edgemoe.hw.units import build_unit
    unit = build_unit("compute", Q, HW16, TINY)
    ports = port_list(unit)
    A, To, Ti = Q.act.bits, HW16.t_out, HW16.t_in
    assert ports["x__payload"] == (Ti * A, "i") and ports["r__payload"] == (To * A, "i")
    assert ports["w__payload"] == (HW16.axi_data_bits, "i")
    assert ports["y__payload__data"] == (To * A, "o") and ports["y__payload__sat_count"] == (6, "o")
    assert ports["xr__payload__row"] == (8, "o") and ports["q__payload__gate"] == (17, "i")
    for s in ("cmd", "w", "q", "x", "r"):
        assert ports[f"{s}__valid"] == (1, "i") and ports[f"{s}__ready"] == (1, "o")
    for s in ("xr", "rr", "y"):
        assert ports[f"{s}__valid"] == (1, "o") and ports[f"{s}__ready"] == (1, "i")
    with pytest.raises(FormatError, match="gelu_in"):
        build_unit("compute", Q.replace(gelu_in=Fmt(24, 16)), HW16, TINY)
    del unit
    gc.collect()        # the never-elaborated warnings are raised (and filtered) here


@pytest.mark.parametrize("hw", [HW4, HW16], ids=["4x4", "16x16"])
def test_verilator_lint(hw):
    from edgemoe.sim.runner import lint_verilator
    lint_verilator(compute_verilog(Q, hw, TINY), TOP)


def _synth(hw):
    from edgemoe.hw.compute import ComputeUnit
    from edgemoe.hw.export import to_rtlil
    return to_rtlil(ComputeUnit(Q, hw, TINY), TOP)


@pytest.mark.slow
def test_synth_compute_resource_baseline():
    """Yosys synth_xilinx (xcup) of the default 16x16 array (2-6 minutes, hence `slow`): the
    products map to DSP48E2 (two per 32x16 MAC, two per gate multiply, one per GELU lane), the
    accumulator banks and the queue to block RAM, the weight tile and its shadow to registers."""
    from edgemoe.hw.synth import check_synth_baseline, synth_xilinx
    res = synth_xilinx(_synth(HW16), TOP, timeout_s=1800)
    res["config"] = {"quant": Q.name, "hw": HW16.name, "model": TINY.name}
    macs, To = HW16.t_in * HW16.t_out, HW16.t_out
    assert res["dsp"] == 2 * macs + 3 * To
    assert res["bram36"] >= 2 * -(-To * Q.acc.bits // 72)
    assert res["ff"] >= 2 * macs * tile_layout(Q, HW16).w_bits
    check_synth_baseline("compute", res)
