"""Analytic resource model of the whole accelerator (LUT, FF, DSP48E2, BRAM36): an ESTIMATE.

Per unit (every number labelled with its source in the result):
  mac_array      DSP = T_in*T_out * dsp(act.bits x weight lane bits)   (hw.layernorm.mul_plan's
                 DSP48E2 decomposition, 27x18 signed pieces: 32x16 -> 2, 16x8 -> 1);
                 LUT = T_out*(T_in-1)*(act+w bits) adder tree (one LUT per sum bit on the carry
                 chain) + T_out*acc.bits accumulate adders;
                 FF = 2*T_in*T_out*w bits (ping-pong weight tiles) + T_out*(T_in/4)*(act+w+2)
                 (adder-tree registers every 2 levels) + 2*T_out*acc.bits;
                 BRAM = 2 accumulator banks of act_buffer_tokens x T_out*acc.bits.
  epilogue       T_out lanes of Requant and GELU: tests/baselines/synth_requant.json and
                 synth_gelu.json (yosys synth_xilinx, hwcfg.lanes lanes) scaled by T_out/lanes;
                 gate multiply T_out * dsp(act x gate_prob+1); residual add T_out*act.bits LUT.
  attention_qk   P lanes of head_dim multipliers attn_in x attn_in (DSP), head_dim-1 adders each
                 (LUT 2*attn_in bits per adder), the P resident Q rows (FF).
  softmax_stats  tests/baselines/synth_softmax.json (P = attn_p of its config): its shared
                 divider (about 0.8k LUT / 1.9k FF, hw/softmax.py docstring) fixed, the rest
                 scaled by P.
  softmax_norm   tests/baselines/synth_softmax_norm.json scaled by lanes.
  layernorm      tests/baselines/synth_layernorm.json scaled when present; else DSP
                 from hw.layernorm's plan (dsp_estimate) and LUT/FF = ASSUMPTION (6 LUT + 10 FF per
                 datapath bit of a lane, + 3k LUT / 5k FF statistics).
  gate           tests/baselines/synth_gate.json scaled by experts when present; else ASSUMPTION: 2 DSP per expert
                 (exp2 interpolation, probability multiply), 200 LUT + 300 FF per expert plus the
                 pipelined divider (q_bits stages x (sum bits + 1) LUT and FF).
  controller_axi ASSUMPTION: 6k LUT, 9k FF, 4 BRAM36 (AXI4 master with read FIFO, AXI4-Lite
                 registers, instruction decode, buffer multiplexers); nothing is generated yet.
  buffers        quant.compiler.buffer_plan (X, H, W, S, SM, LN, L, Q) in BRAM36.
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


def dsp_per_mult(a_bits: int, b_bits: int, is_signed: bool = True) -> int:
    """DSP48E2 count of one a x b multiplier (hw.layernorm.mul_plan's decomposition)."""
    from amaranth.hdl import signed, unsigned

    from hw.layernorm import mul_plan
    sh = signed if is_signed else unsigned
    return mul_plan(sh(a_bits), sh(b_bits)).dsp


def load_baseline(unit: str, baseline_dir=None) -> dict | None:
    p = Path(baseline_dir or BASELINE_DIR) / f"synth_{unit}.json"
    if not p.exists():
        return None
    d = json.loads(p.read_text())
    return {**{k: d[k] for k in KEYS}, "config": d.get("config") or {}, "path": str(p)}


def _baseline_hw(b: dict):
    from hw.config import get_hw_preset
    return get_hw_preset((b.get("config") or {}).get("hw", "zcu102-16x16"))


def _baseline_model(b: dict):
    from model.config import get_preset
    return get_preset((b.get("config") or {}).get("model", "edge-moe"))


def _baseline_q(b: dict):
    from quant.config import get_quant_preset
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


def unit_estimates(cfg, qcfg, hwcfg, baseline_dir=None) -> dict[str, dict]:
    from quant.compiler import bram36, buffer_plan
    from quant.linear import tile_layout
    q, hw = qcfg, hwcfg
    Ti, To = hw.t_in, hw.t_out
    wb = tile_layout(q, hw).w_bits
    A, ACC = q.act.bits, q.acc.bits
    units: dict[str, dict] = {}

    units["mac_array"] = {
        "dsp": Ti * To * dsp_per_mult(A, wb),
        "lut": To * (Ti - 1) * (A + wb) + To * ACC,
        "ff": 2 * Ti * To * wb + To * max(1, Ti // 4) * (A + wb + 2) + 2 * To * ACC,
        "bram36": 2 * bram36(To * ACC, hw.act_buffer_tokens),
        "source": "analytic (module docstring); no synth baseline of the compute unit"}

    epi = {"lut": To * A, "ff": 3 * To * A, "dsp": To * dsp_per_mult(A, q.gate_prob.bits + 1),
           "bram36": 0}
    parts = ["gate multiply + residual add analytic"]
    for unit in ("requant", "gelu"):
        b = load_baseline(unit, baseline_dir)
        if b is None:
            parts.append(f"{unit}: no baseline")
            continue
        sc = _scaled(b, To / _baseline_hw(b).lanes, A / _baseline_q(b).act.bits, "T_out lanes")
        for k in KEYS:
            epi[k] += sc[k]
        parts.append(sc["source"])
    epi["source"] = "; ".join(parts)
    units["epilogue"] = epi

    P, dh, ai = hw.attn_p, cfg.head_dim, q.attn_in.bits
    units["attention_qk"] = {
        "dsp": P * dh * dsp_per_mult(ai, ai), "lut": P * (dh - 1) * 2 * ai,
        "ff": P * dh * ai + P * max(1, dh // 4) * (2 * ai + 2), "bram36": 0,
        "source": "analytic: P x head_dim multipliers attn_in x attn_in, adder trees, resident Q rows"}

    b = load_baseline("softmax", baseline_dir)
    if b is not None:
        units["softmax_stats"] = _scaled(b, P / _baseline_hw(b).attn_p,
                                         q.score.bits / _baseline_q(b).score.bits,
                                         "P / its attn_p, shared divider fixed", SOFTMAX_DIVIDER)
    b = load_baseline("softmax_norm", baseline_dir)
    if b is not None:
        units["softmax_norm"] = _scaled(b, hw.lanes / _baseline_hw(b).lanes,
                                        q.score.bits / _baseline_q(b).score.bits, "lanes")

    b = load_baseline("layernorm", baseline_dir)
    if b is not None:
        units["layernorm"] = _scaled(b, hw.lanes / _baseline_hw(b).lanes,
                                     A / _baseline_q(b).act.bits, "lanes")
    else:
        from hw.layernorm import layernorm_plan
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
            from hw.gate import gate_plan
            gp = gate_plan(q, cfg.num_experts, cfg.top_k, cfg.num_tokens)
            E = cfg.num_experts
            units["gate"] = {"dsp": 2 * E, "lut": 200 * E + gp.q_bits * (gp.s_bits + 1),
                             "ff": 300 * E + gp.q_bits * (gp.s_bits + 1) * 2, "bram36": 0,
                             "source": "ASSUMPTION (no synth baseline): 2 DSP + 200 LUT + 300 FF "
                                       "per expert + pipelined divider"}

    units["controller_axi"] = {**CONTROLLER, "source": "ASSUMPTION: AXI master/lite, decode, muxes"}
    plan = buffer_plan(cfg, q, hw)
    units["buffers"] = {"lut": 0, "ff": 0, "dsp": 0, "bram36": plan.bram36,
                        "source": "quant.compiler.buffer_plan"}
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
    total = {k: sum(u[k] for u in units.values()) for k in KEYS}
    part = hwcfg.part_budget
    budget = {"lut": part.lut, "ff": part.ff, "dsp": part.dsp, "bram36": part.bram36}
    util = {k: total[k] / budget[k] for k in KEYS}
    return {"estimate": True, "what": "analytic resource model (sim/resources.py), not a synthesis "
            "of the whole accelerator", "part": part.name, "units": units, "total": total,
            "budget": budget, "utilisation": util, "fits": all(v <= 1.0 for v in util.values())}
