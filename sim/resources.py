"""Analytic resource model of the whole accelerator (LUT, FF, DSP48E2, BRAM36): an ESTIMATE.

Per unit (every number labelled with its source in the result):
  mac_array      DSP = T_in*T_out * dsp(act.bits x weight lane bits)   (hw.layernorm.mul_plan's
                 DSP48E2 decomposition, 27x18 signed pieces: 32x16 -> 2, 16x8 -> 1);
                 BRAM = 2 accumulator banks of act_buffer_tokens x T_out*acc.bits;
                 LUT/FF = a synthesised compute unit (MAC array + epilogue) less its epilogue's
                 estimate, scaled by T_in*T_out*(act + weight bits): the `linear` group of
                 tests/baselines/synth_accel_edge_moe_w8.json for 8-bit weights (products and
                 first adds in DSPs), else tests/baselines/synth_compute.json.
  epilogue       T_out lanes of Requant (granularity "channel": ChannelRequant,
                 synth_channel_requant.json) and GELU: tests/baselines/synth_requant.json and
                 synth_gelu.json (yosys synth_xilinx, hwcfg.lanes lanes) scaled by T_out/lanes;
                 gate multiply T_out * dsp(act x gate_prob+1); residual add T_out*act.bits LUT.
  attention_qk   the attention engine (hw/attention.py) less its softmax parts: DSP = P*head_dim*
                 (dsp(attn_in x attn_in) QK + dsp(prob x attn_in) AV); BRAM = its Q/K/V memories
                 (num_tokens*heads words of head_dim*attn_in bits, LUTRAM when shallow);
                 LUT/FF = tests/baselines/synth_attention.json scaled by P*head_dim*attn_in bits.
  softmax_stats  tests/baselines/synth_softmax.json (P = attn_p of its config): its shared
                 divider (about 0.8k LUT / 1.9k FF, hw/softmax.py docstring) fixed, the rest
                 scaled by P.
  softmax_norm   tests/baselines/synth_softmax_norm.json scaled to P one-lane normalisers.
  layernorm      tests/baselines/synth_layernorm.json scaled when present; else DSP
                 from edgemoe.hw.layernorm's plan (dsp_estimate) and LUT/FF = ASSUMPTION (6 LUT + 10 FF per
                 datapath bit of a lane, + 3k LUT / 5k FF statistics).
  gate           tests/baselines/synth_gate.json scaled by experts when present; else ASSUMPTION: 2 DSP per expert
                 (exp2 interpolation, probability multiply), 200 LUT + 300 FF per expert plus the
                 pipelined divider (q_bits stages x (sum bits + 1) LUT and FF).
  controller_axi the synthesised top (tests/baselines/synth_accel_edge_moe.json, `edgemoe synth
                 --top`): controller + load/store engines + AXI interfaces, the controller's
                 buffer multiplexers scaled by the buffer word width (t_in x lane bits).
  buffers        quant.compiler.buffer_plan's X, H, W, L, Q in BRAM36 (its S / SM are inside the
                 attention engine of the RTL).
Calibration check: for edge-moe / edge-moe-fixed / zcu102-16x16 this gives 117.7k LUT, 95.4k FF,
1526 DSP, 372 BRAM36 against the synthesised top's 118.6k / 90.7k / 1540 / 366.5
(tests/test_synth_accel.py keeps them within 10 %).
A baseline measured on a hardware configuration other than the point's is scaled linearly in
its lane count (DSP, BRAM) and lanes x datapath width (LUT, FF; act, score or gate_logit
bits against the baseline's quant preset), stated per unit; the synthesised units replace the estimates with real numbers
when sim.sweep is run with --synth.
"""
from __future__ import annotations

import json
from pathlib import Path

BASELINE_DIR = Path(__file__).resolve().parent.parent / "tests" / "baselines"
KEYS = ("lut", "ff", "dsp", "bram36")
CONTROLLER = {"lut": 6000, "ff": 9000, "dsp": 0, "bram36": 4}     # ASSUMPTION (docstring)
SOFTMAX_DIVIDER = {"lut": 800, "ff": 1900}                          # hw/softmax.py docstring
COMPUTE_TOP_BASELINE = "accel_edge_moe_w8"     # tests/baselines/synth_accel_edge_moe_w8.json


def dsp_per_mult(a_bits: int, b_bits: int, is_signed: bool = True) -> int:
    """DSP48E2 count of one a x b multiplier (hw.layernorm.mul_plan's decomposition)."""
    from amaranth.hdl import signed, unsigned

    from edgemoe.hw.layernorm import mul_plan
    sh = signed if is_signed else unsigned
    return mul_plan(sh(a_bits), sh(b_bits)).dsp


def load_baseline(unit: str, baseline_dir=None) -> dict | None:
    p = Path(baseline_dir or BASELINE_DIR) / f"synth_{unit}.json"
    if not p.exists():
        return None
    d = json.loads(p.read_text())
    out = {**{k: d[k] for k in KEYS}, "config": d.get("config") or {}, "path": str(p)}
    if "groups" in d:                      # a whole-top synthesis (hw/synth_accel.py)
        out["groups"] = d["groups"]
    return out


def _baseline_hw(b: dict):
    from edgemoe.hw.config import get_hw_preset
    return get_hw_preset((b.get("config") or {}).get("hw", "zcu102-16x16"))


def _baseline_model(b: dict):
    from edgemoe.model.config import get_preset
    return get_preset((b.get("config") or {}).get("model", "edge-moe"))


def _baseline_q(b: dict):
    from edgemoe.quant.config import get_quant_preset
    return get_quant_preset((b.get("config") or {}).get("quant", "edge-moe-fixed"))


def _scaled(b: dict, lane_f: float, width_f: float, what: str, fixed: dict | None = None) -> dict:
    """Baseline scaled: DSP and BRAM by the lane ratio, LUT and FF by lanes x datapath width
    ratio (`fixed` parts, e.g. a shared divider, are not scaled)."""
    fixed = fixed or {}
    out = {}
    for k in KEYS:
        f = lane_f * (width_f if k in ("lut", "ff") else 1.0)
        out[k] = round(fixed.get(k, 0) + (b[k] - fixed.get(k, 0)) * f)
    out["source"] = (f"synth baseline {Path(b['path']).name} x {lane_f:g} lanes"
                     + (f", LUT/FF x {width_f:.3g} width" if width_f != 1 else "") + f" ({what})")
    return out


def epilogue_estimate(q, hw, baseline_dir=None) -> dict:
    """The compute unit's epilogue at T_out lanes: Requant (or ChannelRequant) and GELU from
    their synth baselines scaled by lanes x act width, gate multiply and residual add analytic."""
    To, A = hw.t_out, q.act.bits
    epi = {"lut": To * A, "ff": 3 * To * A, "dsp": To * dsp_per_mult(A, q.gate_prob.bits + 1),
           "bram36": 0}
    parts = ["gate multiply + residual add analytic"]
    # granularity "channel": hw/channel_requant.py (multiplier + barrel shift) replaces Requant
    rq_unit = "channel_requant" if q.granularity == "channel" else "requant"
    for unit in (rq_unit, "gelu"):
        b = load_baseline(unit, baseline_dir)
        if b is None:
            parts.append(f"{unit}: no baseline")
            continue
        sc = _scaled(b, To / _baseline_hw(b).lanes, A / _baseline_q(b).act.bits, "T_out lanes")
        if unit == "channel_requant":     # DSP per lane is set by acc x mult, not act: lanes only
            sc["dsp"] = round(b["dsp"] * To / _baseline_hw(b).lanes)
        for k in KEYS:
            epi[k] += sc[k]
        parts.append(sc["source"])
    epi["source"] = "; ".join(parts)
    return epi


def unit_estimates(cfg, qcfg, hwcfg, baseline_dir=None) -> dict[str, dict]:
    from edgemoe.quant.compiler import buffer_plan
    from edgemoe.quant.compiler import memory_bram36 as bram   # shallow memories: LUTRAM, as Yosys maps them
    from edgemoe.quant.linear import tile_layout
    q, hw = qcfg, hwcfg
    Ti, To = hw.t_in, hw.t_out
    wb = tile_layout(q, hw).w_bits
    A, ACC = q.act.bits, q.acc.bits
    units: dict[str, dict] = {}

    units["mac_array"] = {
        "dsp": Ti * To * dsp_per_mult(A, wb),
        "lut": To * (Ti - 1) * (A + wb) + To * ACC,
        "ff": 2 * Ti * To * wb + To * max(1, Ti // 4) * (A + wb + 2) + 2 * To * ACC,
        "bram36": 2 * bram(To * ACC, hw.act_buffer_tokens),
        "source": "analytic (module docstring)"}
    comp = load_baseline("compute", baseline_dir)
    # with 8-bit weights the products and the first adds sit in DSPs: a whole-top synthesis of
    # the same weight width (its `linear` group) is the better baseline for the MAC array
    top = load_baseline(COMPUTE_TOP_BASELINE, baseline_dir)
    if top is not None and "linear" in top.get("groups", {}):
        th, tq = _baseline_hw(top), _baseline_q(top)
        if tile_layout(tq, th).w_bits == wb:
            comp = {**top, **{k: top["groups"]["linear"][k] for k in KEYS}}
    epi = units["epilogue"] = epilogue_estimate(q, hw, baseline_dir)
    if comp is not None:
        # the synthesised compute unit (MAC array + epilogue) less its own epilogue, scaled by
        # MACs x datapath width; the point's epilogue (T_out lanes) is its own entry
        bh, bq = _baseline_hw(comp), _baseline_q(comp)
        f = (Ti * To * (A + wb)) / (bh.t_in * bh.t_out * (bq.act.bits + tile_layout(bq, bh).w_bits))
        epi_b = epilogue_estimate(bq, bh, baseline_dir)
        for k in ("lut", "ff"):
            units["mac_array"][k] = max(0, round((comp[k] - epi_b[k]) * f))
        units["mac_array"]["source"] = (f"DSP/BRAM analytic; LUT/FF: synth baseline {Path(comp['path']).name} "
                                        f"(compute unit) less its epilogue, x {f:.3g} (MACs x width)")

    P, dh, ai = hw.attn_p, cfg.head_dim, q.attn_in.bits
    # the attention engine (hw/attention.py): QK lanes P x head_dim attn_in x attn_in multiplies,
    # AV lanes P x head_dim prob x attn_in, SoftmaxStats, P one-lane SoftmaxNorms, Q/K/V memories
    # of n x heads rows of head_dim attn_in codes (BRAM), the two-bank score memory (one word of
    # min(P, n) scores per schedule cycle) and stats memory, all inside one engine
    from edgemoe.quant.schedule import attention_cycles
    n, H = cfg.num_tokens, cfg.heads
    banks = 2 if H > 1 else 1
    eng = {"dsp": P * dh * (dsp_per_mult(ai, ai) + dsp_per_mult(q.prob.bits + 1, ai)),
           "bram36": 3 * bram(dh * ai, n * H) + bram(min(P, n) * q.score.bits, banks * attention_cycles(n, P))}
    b = load_baseline("attention", baseline_dir)
    if b is not None:
        bm, bh, bq = _baseline_model(b), _baseline_hw(b), _baseline_q(b)
        f = (P * dh * ai) / (bh.attn_p * bm.head_dim * bq.attn_in.bits)
        eng.update(lut=round(b["lut"] * f), ff=round(b["ff"] * f))
        esrc = f"synth baseline synth_attention.json x {f:.3g} (P x head_dim x attn_in bits)"
    else:
        eng.update(lut=P * (dh - 1) * 2 * ai * 2, ff=P * dh * ai * 2)
        esrc = "ASSUMPTION (no synth baseline): two adder trees per lane"
    b = load_baseline("softmax", baseline_dir)
    if b is not None:
        units["softmax_stats"] = _scaled(b, P / _baseline_hw(b).attn_p,
                                         q.score.bits / _baseline_q(b).score.bits,
                                         "P / its attn_p, shared divider fixed", SOFTMAX_DIVIDER)
    b = load_baseline("softmax_norm", baseline_dir)
    if b is not None:
        units["softmax_norm"] = _scaled(b, P / _baseline_hw(b).lanes,
                                        q.score.bits / _baseline_q(b).score.bits, "P one-lane normalisers")
    # attention_qk = the engine minus its softmax parts (listed on their own for the power model)
    units["attention_qk"] = {k: max(0, eng[k] - sum(units[u][k] for u in ("softmax_stats", "softmax_norm")
                                                    if u in units)) for k in KEYS}
    units["attention_qk"]["source"] = (f"attention engine: DSP = P*head_dim*(QK + AV multiplies), BRAM = "
                                       f"Q/K/V and score memories; LUT/FF: {esrc}; minus softmax_stats/_norm")

    b = load_baseline("layernorm", baseline_dir)
    if b is not None:
        units["layernorm"] = _scaled(b, hw.lanes / _baseline_hw(b).lanes,
                                     A / _baseline_q(b).act.bits, "lanes")
    else:
        from edgemoe.hw.layernorm import layernorm_plan
        plan = layernorm_plan(q, hw, cfg.dim, cfg.ln_eps)
        units["layernorm"] = {"dsp": plan.dsp_estimate, "lut": 6 * hw.lanes * A + 3000,
                              "ff": 10 * hw.lanes * A + 5000, "bram36": 0,
                              "source": "DSP: hw.layernorm plan.dsp_estimate; LUT/FF: ASSUMPTION "
                                        "(no synth baseline)"}

    if cfg.moe_blocks:
        b = load_baseline("gate", baseline_dir)
        if b is not None:
            units["gate"] = _scaled(b, cfg.num_experts / _baseline_model(b).num_experts,
                                    q.gate_logit.bits / _baseline_q(b).gate_logit.bits, "experts")
        else:
            from edgemoe.hw.gate import gate_plan
            gp = gate_plan(q, cfg.num_experts, cfg.top_k, cfg.num_tokens)
            E = cfg.num_experts
            units["gate"] = {"dsp": 2 * E, "lut": 200 * E + gp.q_bits * (gp.s_bits + 1),
                             "ff": 300 * E + gp.q_bits * (gp.s_bits + 1) * 2, "bram36": 0,
                             "source": "ASSUMPTION (no synth baseline): 2 DSP + 200 LUT + 300 FF "
                                       "per expert + pipelined divider"}

    top = load_baseline("accel_edge_moe", baseline_dir)
    if top is not None and "groups" in top:
        # the synthesised top's controller (decode, buffer multiplexers of G*vb-bit words),
        # load/store engines and AXI interfaces; the multiplexers scale with the word width
        g = top["groups"]
        th, tq = _baseline_hw(top), _baseline_q(top)
        ref_w = th.t_in * max(tq.act.bits, tq.gate_logit.bits)
        w = hw.t_in * max(q.act.bits, q.gate_logit.bits)
        ctl = {k: sum(g[x][k] for x in ("controller", "load_store", "axi")) for k in KEYS}
        ctl["lut"] = round(g["controller"]["lut"] * w / ref_w + g["load_store"]["lut"] + g["axi"]["lut"])
        units["controller_axi"] = {**ctl, "source": f"synthesised top (synth_accel_edge_moe.json: "
                                                    f"controller + load/store + AXI), mux LUT x {w / ref_w:.3g}"}
    else:
        units["controller_axi"] = {**CONTROLLER, "source": "ASSUMPTION: AXI master/lite, decode, muxes"}
    plan = buffer_plan(cfg, q, hw)
    # the top has X, H, W (and L, Q); S/SM of the plan live inside the attention engine (its own
    # Q/K/V memories, counted there)
    units["buffers"] = {"lut": 0, "ff": 0, "dsp": 0,
                        "bram36": sum(b.bram36 for b in plan.buffers if b.name not in ("S", "SM")),
                        "source": "edgemoe.quant.compiler.buffer_plan: X, H, W, L, Q"}
    if hw.weight_fifo_beats:
        from edgemoe.quant.compiler import memory_bram36
        # hw/accel.py's weight FIFO: words of KI beats + an error bit; the loop body registers
        # (2 x 256 FF) and, KI > 1, the (KI - 1)-beat packing register
        ki = hw.weight_intake_beats
        width, depth = ki * hw.axi_data_bits + 1, hw.weight_fifo_beats // ki
        units["weight_fifo"] = {"lut": 200 * ki, "ff": 600 + (ki - 1) * hw.axi_data_bits, "dsp": 0,
                                "bram36": memory_bram36(width, depth),
                                "source": f"weight FIFO {depth} x {width} bits "
                                          "(BRAM as bram36(); pointers, loop-body and packing registers: ASSUMPTION)"}
    return units


def estimate_resources(cfg, qcfg, hwcfg, baseline_dir=None, measured: dict | None = None) -> dict:
    """Per-unit and total resources against the part budget. measured: {unit: synth_xilinx
    dict} replaces those units' estimates (sweep --synth)."""
    units = unit_estimates(cfg, qcfg, hwcfg, baseline_dir)
    for name, m in (measured or {}).items():
        if name not in units:
            raise KeyError(f"measured resources for unknown unit '{name}'; units: {sorted(units)}")
        units[name] = {**{k: m[k] for k in KEYS}, "source": f"synthesised ({m.get('flow', 'yosys')})"}
    if "mac_array" in (measured or {}):      # the synthesised compute unit holds its epilogue
        units["epilogue"] = {**{k: 0 for k in KEYS}, "source": "inside the synthesised compute unit"}
    if "attention_qk" in (measured or {}):   # the synthesised attention engine holds its softmax
        for u in ("softmax_stats", "softmax_norm"):
            if u in units and u not in measured:
                units[u] = {**{k: 0 for k in KEYS}, "source": "inside the synthesised attention engine"}
    total = {k: sum(u[k] for u in units.values()) for k in KEYS}
    part = hwcfg.part_budget
    budget = {"lut": part.lut, "ff": part.ff, "dsp": part.dsp, "bram36": part.bram36}
    util = {k: total[k] / budget[k] for k in KEYS}
    return {"estimate": True, "what": "analytic resource model (sim/resources.py), not a synthesis "
            "of the whole accelerator", "part": part.name, "units": units, "total": total,
            "budget": budget, "utilisation": util, "fits": all(v <= 1.0 for v in util.values())}
