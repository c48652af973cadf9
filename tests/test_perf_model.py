"""Whole-inference cycle model (sim/perf_model.py) against sim/perf, model/profile and the
compiler's DRAM traffic."""
import itertools

import numpy as np
import pytest

from edgemoe.hw.config import get_hw_preset
from edgemoe.model.config import get_preset
from edgemoe.model.profile import layer_table, summary
from edgemoe.quant.config import get_quant_preset
from edgemoe.quant.linear import get_mode
from edgemoe.sim import perf_model as pm
from edgemoe.sim.perf import linear_cycles, linear_timing

FIXED, W8 = get_quant_preset("edge-moe-fixed"), get_quant_preset("w8a16")
HW16, HW8 = get_hw_preset("zcu102-16x16"), get_hw_preset("small-8x8")
MAC_TYPES = ("patch_embed", "qkv", "av", "proj", "mlp_fc1", "mlp_fc2", "router", "expert_fc1",
             "expert_fc2")


@pytest.fixture(scope="module")
def tiny():
    return pm.inference_cycles(get_preset("tiny"), FIXED, HW16)


@pytest.fixture(scope="module")
def edge():
    return pm.inference_cycles(get_preset("edge-moe"), FIXED, HW16)


@pytest.mark.parametrize("q,hw", [(FIXED, HW16), (W8, HW16), (FIXED, HW8)])
def test_generalised_schedule_equals_sim_perf(q, hw):
    """linear_schedule with 1-cycle beats is sim.perf.linear_timing exactly (it is what the model
    uses for slower DRAM and for A.V, so it must not drift from the compute unit's model)."""
    g = pm._geometry(q, hw)
    lay = g.layout
    for rows, k, n, mode in itertools.product((1, 2, 7, 16, 17, 129), (16, 40, 192), (16, 50, 576),
                                              ("qkv", "fc1", "router", "expert_fc2")):
        m = get_mode(mode)
        ref = linear_timing(rows, k, n, hw, q, mode)
        s = pm.linear_schedule(rows, lay.chunks(k), lay.tiles(n), lay.tile_beats,
                               lay.bias_beats if m.bias else 0, 1, g.mac_stages, pm.epi_cycles(g, m.gelu))
        assert (s.cycles, s.compute_cycles, s.stall_cycles) == \
            (ref.cycles, ref.compute_cycles, ref.stall_cycles), (rows, k, n, mode)


def test_linear_rows_consistent_with_sim_perf(tiny):
    """Every LINEAR execution = sim.perf.linear_cycles + its fetch + its DRAM first-beat
    latency: without prefetch the full fetch and latency; with instruction prefetch only
    (early_data=False) the full latency and the fetch the predecessor in execution order left
    visible; with early data (the default) also only the latency the predecessor left visible."""
    cfg = get_preset("tiny")
    prog = pm.program_skeleton(cfg, FIXED, HW16)
    L = HW16.dram_latency_cycles
    f_dram, f_over = pm.fetch_cycles(HW16, pm.PerfAssumptions(prefetch=False))
    assert (f_dram, f_over) == (L + 1, pm.PerfAssumptions().decode_cycles)
    nopf = pm.inference_cycles(cfg, FIXED, HW16, assumptions=pm.PerfAssumptions(prefetch=False))
    insonly = pm.inference_cycles(cfg, FIXED, HW16, assumptions=pm.PerfAssumptions(early_data=False))
    a = pm.PerfAssumptions()
    seen = {"ins": set(), "early": set()}
    for rows, kind in ((nopf["layers"], "none"), (insonly["layers"], "ins"), (tiny["layers"], "early")):
        lin = [r for r in rows if r["k"] is not None]
        assert len(lin) > 10
        for r in lin:
            mode = pm._mode_of(prog.instrs[r["pc"]])
            extra = r["cycles"] - linear_cycles(r["rows"], r["k"], r["n"], HW16, FIXED, mode)
            if kind == "none":
                assert extra == L + f_dram + f_over, r["name"]
            elif kind == "ins":
                assert a.prefetched_decode_cycles <= extra - L <= f_dram + f_over, r["name"]
                seen[kind].add(extra - L)
            else:
                assert a.early_decode_cycles <= extra <= L + f_dram + f_over, r["name"]
                seen[kind].add(extra)
    # after a LAYERNORM (long tail) the fetch is hidden; after EXPERT_LOOP it is not
    assert {a.prefetched_decode_cycles, f_dram + f_over} <= seen["ins"]
    # early data: after ATTENTION (no reads) fetch and latency are hidden; after EXPERT_LOOP not
    assert {a.early_decode_cycles, L + f_dram + f_over} <= seen["early"]
    order = [(r["name"], r["expert"]) for r in tiny["layers"]]
    i = order.index(("blocks.1.mlp.expert_fc1", 0))
    assert order[i + 1] == ("blocks.1.mlp.expert_fc2", 0)       # execution order: expert by expert
    assert tiny["totals"]["cycles"] < insonly["totals"]["cycles"] < nopf["totals"]["cycles"]


@pytest.mark.parametrize("preset", ["tiny", "edge-moe"])
def test_macs_match_profile(preset, tiny, edge):
    res = tiny if preset == "tiny" else edge
    cfg = get_preset(preset)
    prof = summary(cfg)["by_type"]
    for t in MAC_TYPES:
        if t != "av":
            assert res["by_type"][t]["macs"] == prof[t]["macs"], t
    # the attention rows split the layer in time (QK and AV passes overlap): MACs by window
    bt = res["by_type"]
    assert bt["qk"]["macs"] + bt["av"]["macs"] == prof["qk"]["macs"] + prof["av"]["macs"]
    assert bt["qk"]["qk_pass"] + bt["av"]["qk_pass"] == bt["av"]["av_pass"]      # H * C each
    assert res["totals"]["macs"] == sum(r["macs"] for r in layer_table(cfg, 0))


@pytest.mark.parametrize("preset,hw", [("tiny", HW16), ("edge-moe", HW16), ("tiny", HW8.replace(attn_p=8)),
                                       ("edge-moe", HW8)])
def test_utilisation_bounds(preset, hw):
    """Utilisation <= 1 everywhere; compute cycles >= MACs / (T_in*T_out) per layer and type."""
    res = pm.inference_cycles(get_preset(preset), FIXED, hw)
    peak = hw.t_in * hw.t_out
    for r in res["layers"]:
        assert r["compute"] + r["dram_wait"] + r["overhead"] == r["cycles"]
        assert 0 <= r["utilisation"] <= 1, r["name"]
        if r["macs"]:
            assert r["compute"] * r["peak_macs_per_cycle"] >= r["macs"], r["name"]
    for t in MAC_TYPES:
        d = res["by_type"][t]
        assert d["compute"] >= d["macs"] / d["peak_macs_per_cycle"], t
        assert d["utilisation"] <= 1
    assert 0 < res["totals"]["mac_utilisation"] <= 1
    assert res["totals"]["cycles"] >= res["totals"]["macs"] / max(peak, hw.attn_p * get_preset(preset).head_dim)


def test_dram_bytes_equal_compiler_traffic():
    """The model's DRAM bytes are dram_traffic of the REAL compiled program for the same
    (golden) routing, per instruction and in total."""
    from edgemoe.quant.compiler import compile_program, dram_traffic, synthetic_state_dict
    from edgemoe.quant.golden import GoldenModel
    from edgemoe.quant.qweights import quantize_weights
    cfg = get_preset("tiny")
    sd = synthetic_state_dict(cfg, 1)
    prog = compile_program(cfg, FIXED, HW16, sd)
    img = np.random.default_rng(0).random((3, cfg.img_h, cfg.img_w))
    routing = GoldenModel(cfg, FIXED, quantize_weights(cfg, FIXED, sd), HW16.attn_p).forward(img, 1).routing
    tr = dram_traffic(prog, routing)
    res = pm.inference_cycles(cfg, FIXED, HW16, routing)
    t = res["totals"]
    assert (t["dram_read_bytes"], t["dram_write_bytes"]) == (tr.total_read, tr.write)
    per_pc = {}
    for r in res["layers"]:
        per_pc[r["pc"]] = per_pc.get(r["pc"], 0) + r["dram_read_bytes"] + r["fetch_bytes"] + r["dram_write_bytes"]
    for it in tr.per_instr:
        assert per_pc[it.pc] == it.read_bytes + it.fetch_bytes + it.write_bytes, it.name
    # the expert loop runs exactly the golden routing's active experts, over their queue lengths
    for b in cfg.moe_blocks:
        idx = np.asarray(routing[b]["topk_idx"])
        counts = np.bincount(idx.ravel(), minlength=cfg.num_experts)
        got = [(r["expert"], r["rows"]) for r in res["layers"] if r["type"] == "expert_fc1" and r["block"] == b]
        assert got == [(e, int(c)) for e, c in enumerate(counts) if c]


def test_edge_moe_dram_floor(edge):
    """Uniform routing activates every expert: DRAM reads >= every parameter of the task at 16 bits
    (plus beat padding, bias lanes and instruction fetches, under 5 %)."""
    cfg = get_preset("edge-moe")
    params = summary(cfg)["params_read_per_task"]
    assert 2 * params <= edge["totals"]["dram_read_bytes"] <= 1.05 * 2 * params
    assert all(r["rows"] in (16, 17) for r in edge["layers"] if r["type"] == "expert_fc1")


def test_routing_sets_expert_work():
    cfg = get_preset("tiny")
    n, k = cfg.num_tokens, cfg.top_k
    two = {b: {"topk_idx": np.tile([0, 1], (n, 1))} for b in cfg.moe_blocks}
    a = pm.inference_cycles(cfg, FIXED, HW16, two)
    u = pm.inference_cycles(cfg, FIXED, HW16)
    assert a["by_type"]["expert_fc1"]["executions"] == 2 * len(cfg.moe_blocks)
    assert u["by_type"]["expert_fc1"]["executions"] == cfg.num_experts * len(cfg.moe_blocks)
    assert sum(r["rows"] for r in u["layers"] if r["type"] == "expert_fc1") == n * k * len(cfg.moe_blocks)
    assert a["totals"]["dram_read_bytes"] < u["totals"]["dram_read_bytes"]
    assert a["by_type"]["expert_fc1"]["macs"] == u["by_type"]["expert_fc1"]["macs"]


def test_bad_routing_is_rejected():
    cfg = get_preset("tiny")
    with pytest.raises(pm.PerfModelError, match=r"topk_idx'\] shape"):
        pm.inference_cycles(cfg, FIXED, HW16, {b: {"topk_idx": np.zeros((3, 2), int)} for b in cfg.moe_blocks})
    with pytest.raises(pm.PerfModelError, match="no entry for MoE block 3"):
        pm.inference_cycles(cfg, FIXED, HW16, {1: {"topk_idx": np.tile([0, 1], (cfg.num_tokens, 1))}})
    with pytest.raises(pm.PerfModelError, match="appears twice"):
        pm.inference_cycles(cfg, FIXED, HW16, {b: {"topk_idx": np.zeros((cfg.num_tokens, 2), int)}
                                               for b in cfg.moe_blocks})


def test_slower_dram_stretches_loads():
    cfg = get_preset("edge-moe")
    assert pm.beat_rate(HW16) == 1.0                     # 9.6 GB/s port < 19.2 GB/s DRAM
    slow = HW16.replace(dram_gbps=2.4)
    assert pm.beat_rate(slow) == pytest.approx(0.25)
    a = pm.inference_cycles(cfg, FIXED, HW16)
    b = pm.inference_cycles(cfg, FIXED, slow)
    assert b["totals"]["cycles"] > a["totals"]["cycles"]
    assert b["totals"]["dram_wait"] > 4 * a["totals"]["dram_wait"]
    assert b["totals"]["compute"] == a["totals"]["compute"]
    assert b["totals"]["dram_bytes"] == a["totals"]["dram_bytes"]
    # a 4x slower stream makes a 16-row expert layer about 4x longer (memory bound)
    e_a = a["by_type"]["expert_fc1"]["cycles"]
    e_b = b["by_type"]["expert_fc1"]["cycles"]
    assert 3.5 * e_a < e_b < 4.5 * e_a


def test_breakdown_text(tiny):
    txt = pm.format_breakdown(tiny)
    assert "ESTIMATE" in txt and "expert_fc1" in txt and f"{tiny['totals']['cycles']:,}" in txt


def test_slow_dram_on_the_32x32_design():
    """zcu102-w8-32x32 at a quarter beat per cycle (the bytes per cycle of a 128-bit HP port at
    half a beat): LayerNorm's parameter beats outlast the unit's fill, every split stays
    non-negative (asserted per row), and the expert layers turn DRAM-bound."""
    from edgemoe.hw.config import get_hw_preset
    from edgemoe.model.config import get_preset
    from edgemoe.quant.config import get_quant_preset
    from edgemoe.sim.perf_model import inference_cycles
    cfg, q = get_preset("edge-moe"), get_quant_preset("w8a16-channel")
    hw = get_hw_preset("zcu102-w8-32x32")
    fast = inference_cycles(cfg, q, hw)
    slow = inference_cycles(cfg, q, hw.replace(dram_gbps=2.4))
    assert slow["totals"]["cycles"] > 1.3 * fast["totals"]["cycles"]
    e = slow["by_type"]["expert_fc1"]
    assert e["dram_wait"] > e["compute"]
    assert slow["by_type"]["layernorm"]["overhead"] >= 0


def test_128_bit_port_at_half_a_beat_equals_256_at_a_quarter():
    """Issue 12's ZCU102 HP port under load (128 bits, 0.5 beat per cycle) moves the bytes per
    cycle of the 256-bit port at 0.25 beat: the model charges both the same (tiles, fetches and
    parameters are counted in bytes), and at 1 beat per cycle the narrower port is slower."""
    from edgemoe.hw.config import get_hw_preset
    from edgemoe.model.config import get_preset
    from edgemoe.quant.config import get_quant_preset
    cfg, q = get_preset("edge-moe"), get_quant_preset("w8a16-channel")
    hw = get_hw_preset("zcu102-w8-32x32")
    quarter = pm.inference_cycles(cfg, q, hw.replace(dram_gbps=2.4))
    narrow = pm.inference_cycles(cfg, q, hw.replace(axi_data_bits=128, dram_gbps=2.4))
    assert (quarter["beat_rate"], narrow["beat_rate"]) == (0.25, 0.5)
    assert narrow["totals"]["cycles"] == quarter["totals"]["cycles"]
    full128 = pm.inference_cycles(cfg, q, hw.replace(axi_data_bits=128))
    assert full128["beat_rate"] == 1.0
    assert full128["totals"]["cycles"] > pm.inference_cycles(cfg, q, hw)["totals"]["cycles"]
