"""Whole-inference cycle model of the accelerator (an estimate, validated against the RTL top).

inference_cycles(cfg, qcfg, hwcfg, routing) walks the program the compiler emits for the model
(quant.compiler.emit_instructions; no weights are needed) and charges every executed
instruction its cycles; the expert-loop body runs once per ACTIVE expert of the routing, over
that expert's queue length. Instructions run one after another (the controller starts an
instruction after the previous one's last output; only the next instruction's fetch and data
request overlap, below), so the total is the sum. Every term is below, each in one function, so that the RTL
validation (target: within 5 %) can point at the term that differs.

Clock and DRAM
  beat rate r = min(1, dram_gbps * 1e9 / (axi_data_bits / 8 * clock_hz)) beats per cycle: the
  AXI port takes at most one beat per cycle; a slower DRAM stretches every transfer by 1/r.
  A DRAM read of b beats costs dram_latency_cycles + ceil(b / r) cycles (first-beat latency
  once per transfer). DRAM bytes per instruction are quant.compiler.dram_traffic's (same routing).
Instruction fetch and early data (every executed instruction, loop bodies once per active expert,
in execution order: a loop body expert by expert)
  F = dram_latency_cycles + ceil(IB / r) (one 32-byte instruction = IB = 32 / (axi_data_bits / 8)
  beats) + PerfAssumptions.decode_cycles when the controller fetches it in FETCH: the first
  instruction, the one after an EXPERT_LOOP, END after STORE. Every other instruction is
  requested right behind its predecessor's own reads (or as it starts), so its beats arrive
  gap = max(-hide, L - run) + ceil(IB / r) + fetch_gap cycles after the predecessor retires
  (hide: the predecessor's cycles after its last read beat; run: its cycles; L =
  dram_latency_cycles): it costs early_decode_cycles + max(0, gap). When the instruction is in
  before that retire (gap <= 0) and is a LINEAR or LAYERNORM after anything but LOAD_ROWS, GATE,
  STORE or control, its data is requested behind it: its first-beat latency L shrinks to
  min(L, max(0, gap + L + data_gap)) (fully hidden behind a tail of L or more).
  hide per type: LINEAR the schedule's tail after the final weight tile, LOAD_ROWS
  MOVE_OVERHEAD, LAYERNORM everything after its parameter beats, ATTENTION and GATE their whole
  run (no reads). PerfAssumptions(early_data=False) models the controller that prefetched only the
  instruction, after its predecessor's reads had ended: o + max(0, F - o - hide - prefetch_slack)
  with o = prefetched_decode_cycles; prefetch=False one without prefetch (every instruction
  pays F).
Expert-weight streaming (hwcfg.weight_fifo_beats = SD > 0, a loop body of one or two LINEARs of
  at most SD beats each, two or more active experts): from the second expert on, the body costs
  no fetch (early_decode_cycles from retire to start); the streamer requests each streamed
  layer's beats once the FIFO has room for all of them (room frees as earlier layers take their
  beats: linear_schedule_fed's load ends), STREAM_REQ_GAP apart and not before the first
  expert's last own beat; they arrive a first-beat latency after the request, behind the port's
  earlier beats, at the beat rate; the layer's schedule then takes each beat no earlier than it
  is there, hwcfg.weight_intake_beats beats per cycle (_streamed_linear).
Validated against the RTL top (hw/accel.py, sim/rtl_sim.py, `edgemoe simulate`): the terms below
are the engines' start-to-done cycles as their docstrings and tests pin them.
LOAD_ROWS / STORE (hw/move_op.py): one buffer word per cycle (two with ADD) and beats at the
  DRAM rate, whichever is slower; LOAD waits the first-beat latency, STORE only its write
  response; + MOVE_OVERHEAD.
LAYERNORM (hw/layernorm_op.py): gamma|beta transfer (first-beat latency + beats at the DRAM
  rate), at least 2 * D/L cycles of parameter writes (L = hwcfg.lanes, a word per cycle), then
  rows * D/L beats through the unit plus its pipeline latency
  (hw.layernorm LayerNorm.LATENCY) + 3.
LINEAR: dram_latency_cycles (first weight beat) + the compute unit's schedule: with r = 1
  exactly sim.perf.linear_timing (weight-stream beats at one per cycle, ping-pong tiles, passes
  of R rows, epilogue); with r < 1 the same schedule with every tile and bias load stretched to
  ceil(beats / r) cycles (linear_schedule; no read-ahead beyond the shadow register). Queue
  modes (expert fc1 / fc2) use R = the expert's queue length.
ATTENTION (hw/attention_op.py on hw/attention.py's own dot-product lanes, not the MAC array):
  LOAD 3*n*D/G + 1 (every Q/K/V word once) + sim.perf.attention_passes (per head a QK pass
  of quant.schedule.attention_cycles(n, P) cycles, its statistics drain and an AV pass of the
  same schedule, the AV pass of head h beside the QK pass of head h + 1) + head_dim/G; split in
  time as "qk" (LOAD, the first QK pass and its drain; peak P * head_dim MACs per cycle) and
  "av" (the rest; peak 2 * P * head_dim: the QK and the AV lanes), each with the MACs done in
  it.
GATE (hw/gate_op.py): ceil(E/G) words per token, Gate.LATENCY + READ_LATENCY, then the N*k
  queue entries written at one per cycle, + 1.
EXPERT_LOOP, END: instruction fetch only.

Cycle classes per executed instruction (they sum to its cycles):
  compute    cycles in which the unit does useful work: LINEAR / A.V: passes * R * row_cycles;
             QK^T: the schedule's cycles; LAYERNORM: rows * beats; GATE: n tokens;
  dram_wait  waiting on DRAM: instruction fetch, first-beat latencies, LOAD_ROWS / STORE /
             LayerNorm parameter transfers, the first weight tile (+ bias) of a layer and the
             weight-stall cycles between passes (memory-bound short expert queues);
  overhead   everything else: pipeline fill/drain, epilogue tail, unit latencies, decode.
MAC utilisation: useful MACs / (peak MACs per cycle of the unit * cycles) per instruction
(MAC array: T_in * T_out; attention engine for QK^T: P * head_dim); whole inference: all
matmul MACs / sum over instructions of (its unit's peak * its cycles), instructions without
MACs counted at the MAC array's peak (the array idles then); macs_per_cycle = MACs / cycles.

Routing: GoldenResult.routing style {block: {"topk_idx": [n, k] ints}} for every MoE block.
routing=None uses uniform_routing(cfg): token t's slot s goes to expert (t*k + s) mod E, i.e.
queues as even as possible and every expert active when n*k >= E (stated default; the golden
model's real routing on an image is golden_routing()).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

# layer types of the breakdown, in network order
CYCLE_TYPES = ("embed", "patch_embed", "layernorm", "qkv", "qk", "av", "proj", "mlp_fc1",
               "mlp_fc2", "router", "gate", "expert_fc1", "expert_fc2", "store", "control")


# early_data: the instructions whose data the controller requests before they start, and those
# after which it does not (LOAD_ROWS and GATE may still fail; STORE and control do not prefetch)
EARLY_TYPES = ("patch_embed", "layernorm", "qkv", "proj", "mlp_fc1", "mlp_fc2", "router",
               "expert_fc1", "expert_fc2")
NO_EARLY_AFTER = ("embed", "gate", "store", "control")

MOVE_OVERHEAD = 5     # LOAD_ROWS / STORE: AXI command register, engine pipeline, done (RTL)
STREAM_REQ_GAP = 2    # the expert-weight streamer: cycles between requests (address register)


class PerfModelError(ValueError):
    pass


@dataclass(frozen=True)
class PerfAssumptions:
    """Controller-level constants (measured on the RTL top, see module docstring)."""
    decode_cycles: int = 7          # controller cycles per instruction besides the fetch's DRAM
                                    # latency and beat (hw/accel.py: FETCH, the AXI master's AR
                                    # register, the R beat, DECODE, ISSUE, the done cycle)
    prefetch: bool = True           # hw/accel.py prefetches the next instruction during EXEC
    prefetched_decode_cycles: int = 4   # retire -> the next EXEC when its beat is already in
    prefetch_slack: int = 2         # prefetch=True, early_data=False: cycles of a predecessor's
                                    # tail beyond the model's own (AR register, rd_idle: measured)
    early_data: bool = True         # hw/accel.py requests the prefetched instruction behind the
                                    # running one's reads and a LINEAR / LAYERNORM's data behind it
    early_decode_cycles: int = 2    # early_data: retire -> the next EXEC when its beats are in
    fetch_gap: int = 0              # early_data: instruction beat -> retire slack (measured)
    data_gap: int = 1               # early_data: data request behind the instruction beat (measured)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# DRAM
# ---------------------------------------------------------------------------------------------
def beat_rate(hwcfg) -> float:
    """AXI beats per cycle the DRAM sustains: min(1, dram_gbps / (axi bytes * clock))."""
    port = hwcfg.axi_data_bits / 8 * hwcfg.clock_mhz * 1e6
    if hwcfg.dram_gbps <= 0:
        raise PerfModelError(f"HWConfig '{hwcfg.name}': dram_gbps = {hwcfg.dram_gbps} must be > 0")
    return min(1.0, hwcfg.dram_gbps * 1e9 / port)


def stretch(beats: int, rate: float) -> int:
    """Cycles to move `beats` AXI beats at `rate` beats per cycle."""
    return beats if rate >= 1.0 else math.ceil(beats / rate - 1e-9)


def dram_transfer_cycles(nbytes: int, hwcfg) -> int:
    """First-beat latency + the beats of one transfer (0 bytes: no transfer, 0 cycles)."""
    if nbytes <= 0:
        return 0
    B = hwcfg.axi_data_bits // 8
    return hwcfg.dram_latency_cycles + stretch(-(-nbytes // B), beat_rate(hwcfg))


def fetch_cycles(hwcfg, assume: PerfAssumptions, hide: int | None = None) -> tuple[int, int]:
    """(dram_wait, overhead) cycles of one instruction fetch + decode. hide: cycles of the
    predecessor during which this instruction's prefetch runs (None: fetched in FETCH)."""
    from edgemoe.quant.program import INSTR_BYTES
    full = dram_transfer_cycles(INSTR_BYTES, hwcfg)
    if not assume.prefetch or hide is None:
        return full, assume.decode_cycles
    o = assume.prefetched_decode_cycles
    visible = full + assume.decode_cycles - o
    return max(0, visible - hide - assume.prefetch_slack), o


# ---------------------------------------------------------------------------------------------
# the compute unit's schedule, generalised (tile load time, cycles per row chunk)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    cycles: int          # command handshake -> last output, inclusive
    passes: int
    compute_cycles: int  # passes * rows * row_cycles
    first_load: int      # cycles before the first pass may start (bias + first tile load)
    stall_cycles: int    # waits for a tile load between passes
    last_load: int = 0   # the cycle the final tile's last beat arrives (the weight read ends)


def linear_schedule(rows: int, kc: int, nc: int, tile_load: int, bias_load: int, row_cycles: int,
                    mac_stages: int, epi_latency: int) -> Schedule:
    """edgemoe.sim.perf.linear_timing's tile-by-tile schedule with a tile taking `tile_load` cycles to
    load (bias: `bias_load`, 0 without bias) and each row chunk `row_cycles` cycles. With
    tile_load = tile_beats, bias_load = bias_beats, row_cycles = 1 it gives sim.perf's cycles
    exactly (tests/test_perf_model.py checks it); used for r < 1 and for A.V."""
    return _tile_schedule(rows * row_cycles, rows, kc, nc, mac_stages, epi_latency, bool(bias_load),
                          lambda t0: t0 + bias_load, lambda t0: t0 + tile_load)


def linear_schedule_fed(rows: int, kc: int, nc: int, tile_beats: int, bias_beats: int,
                        mac_stages: int, epi_latency: int, ready, intake: int = 1) -> tuple[Schedule, list]:
    """linear_schedule for a layer whose weight beats come from the weight FIFO, `intake` beats
    per cycle (HWConfig.weight_intake_beats: FIFO words of that many beats): beat b (stream
    order: per column its header, then its kc tiles) can be taken no earlier than ready(b)
    (cycles from the command; <= 0: already there). A load of n beats takes n / intake cycles
    and ends no earlier than the cycle after its last beat arrived (beats arrive at most one
    per cycle, so the last one binds). -> (Schedule, [(cycle a load ends, beats it took)]) --
    the FIFO room each load frees."""
    b, used = 0, []

    def load(n):
        def f(t0):
            nonlocal b
            end = max(t0 + n // intake, ready(b + n - 1) + 1)
            b += n
            used.append((end, n))
            return end
        return f

    sch = _tile_schedule(rows, rows, kc, nc, mac_stages, epi_latency, bool(bias_beats),
                         load(bias_beats), load(tile_beats))
    return sch, used


def _tile_schedule(D, R, kc, nc, mac_stages, epi_latency, has_bias, load_bias, load_tile) -> Schedule:
    """The compute unit's ping-pong schedule: passes of D cycles over R rows; load_bias(t0) /
    load_tile(t0): the cycle a header / tile load that may start at t0 ends."""
    loader, prev_start, bias_free, epi_free, last_y, stall = 1, None, 0, 0, 0, 0
    bank_free = [0, 0]
    s = first = 0
    for j in range(nc):
        for c in range(kc):
            if c == 0 and has_bias:
                loader = load_bias(max(loader, bias_free))
            t0 = loader if prev_start is None else max(loader, prev_start)
            loader = load_tile(t0)
            s = loader
            if prev_start is not None:
                s = max(s, prev_start + D)
                if R == 1:
                    s = max(s, prev_start + 2 + mac_stages)
                stall += max(0, s - (prev_start + D))
            else:
                first = s - 1
            if c == 0:
                s = max(s, bank_free[j % 2])
                bias_free = s
            prev_start = s
        col_done = s + D + mac_stages + 1
        e_start = max(col_done, epi_free)
        epi_free = e_start + R + 1
        bank_free[j % 2] = e_start + R + 2
        last_y = e_start + R + epi_latency - 1
    return Schedule(last_y + 1, nc * kc, nc * kc * D, first, stall, loader)


def epi_cycles(g, gelu: bool) -> int:
    """Epilogue issue -> y handshake, as sim.perf counts it: the geometry's issue -> y valid
    latency + 1 (the handshake cycle)."""
    return g.epi_latency(gelu) + 1


@lru_cache(maxsize=None)
def _geometry(qcfg, hwcfg):
    from edgemoe.hw.compute import compute_geometry
    return compute_geometry(qcfg, hwcfg)


def linear_layer(rows: int, k_in: int, n_out: int, hwcfg, qcfg, mode) -> dict:
    """Cycles of one LINEAR execution (without its fetch and first-beat latency), split; "tail":
    cycles after the last weight beat (the next instruction's prefetch runs then)."""
    from edgemoe.quant.linear import get_mode

    from edgemoe.sim.perf import linear_timing
    md = get_mode(mode)
    g = _geometry(qcfg, hwcfg)
    lay = g.layout
    bias_beats = lay.bias_beats if lay.has_header(md.bias) else 0
    r = beat_rate(hwcfg)
    sch = linear_schedule(rows, lay.chunks(k_in), lay.tiles(n_out), stretch(lay.tile_beats, r),
                          stretch(bias_beats, r), 1, g.mac_stages, epi_cycles(g, md.gelu))
    if r >= 1.0:
        t = linear_timing(rows, k_in, n_out, hwcfg, qcfg, mode)
        cycles, compute, stall, first = t.cycles, t.compute_cycles, t.stall_cycles, bias_beats + lay.tile_beats
    else:
        cycles, compute, stall, first = sch.cycles, sch.compute_cycles, sch.stall_cycles, sch.first_load
    return {"cycles": cycles, "compute": compute, "dram_wait": first + stall,
            "overhead": cycles - compute - first - stall,
            "passes": lay.chunks(k_in) * lay.tiles(n_out), "tail": max(0, sch.cycles - sch.last_load)}


# ---------------------------------------------------------------------------------------------
# other units
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def unit_latencies(cfg, qcfg, hwcfg) -> dict:
    """Pipeline latencies of the element-wise units, taken from the hardware generators."""
    from edgemoe.hw.gate import Gate
    from edgemoe.hw.layernorm import LayerNorm
    from edgemoe.hw.softmax import SoftmaxStats
    from edgemoe.hw.softmax_norm import SoftmaxNorm
    def probe(unit):
        unit._MustUse__silence = True       # built for its constants only, never elaborated
        return unit
    ln = probe(LayerNorm(qcfg, hwcfg, cfg))
    out = {"layernorm": ln.LATENCY, "layernorm_beats": ln.plan.beats,
           "softmax_stats": probe(SoftmaxStats.from_model(qcfg, hwcfg, cfg)).LATENCY,
           "softmax_norm": SoftmaxNorm.LATENCY}
    if cfg.moe_blocks:
        gate = probe(Gate(qcfg, hwcfg, cfg))
        out.update(gate=gate.LATENCY, gate_read=gate.READ_LATENCY)
    return out


def attention_op_cycles(cfg, qcfg, hwcfg) -> dict:
    """The ATTENTION instruction on hw/attention_op.AttentionOp, start to done: LOAD (3*n*D/G + 1:
    every Q/K/V word once, one per cycle) + the engine's passes (sim.perf.attention_passes) +
    head_dim/G (the last row's words). Split in time: "qk" = LOAD, the first head's QK pass and
    its statistics drain (only the QK lanes work); "av" = the rest, from the first AV issue, where
    each head's AV pass runs beside the next head's QK pass. compute = cycles in which at least
    one pass issues; qk_pass / av_pass = issue cycles of each pass in the window (the energy
    model's busy time of the QK and AV lanes); macs = the MACs done in the window."""
    from edgemoe.sim.perf import attention_passes
    n, H, dh, D, G = cfg.num_tokens, cfg.heads, cfg.head_dim, cfg.dim, hwcfg.t_in
    load = 3 * n * (-(-D // G)) + 1
    ps = attention_passes(n, H, dh, hwcfg, qcfg)
    C, t_av = ps["C"], ps["av"][0]
    total = load + ps["cycles"] + -(-dh // G)
    qk = load + t_av - 1                    # engine cycle t is op cycle load + t - 1
    busy = set()                            # engine cycles (>= t_av) in which a pass issues
    for s0 in ps["qk"][1:] + ps["av"]:
        busy.update(range(max(s0, t_av), s0 + C))
    pair_macs = dh                          # one (query row, key) pair: dh MACs
    return {"qk": {"cycles": qk, "compute": C, "dram_wait": 0, "overhead": qk - C,
                   "qk_pass": C, "av_pass": 0, "macs": n * n * pair_macs},
            "av": {"cycles": total - qk, "compute": len(busy), "dram_wait": 0,
                   "overhead": total - qk - len(busy), "qk_pass": (H - 1) * C, "av_pass": H * C,
                   "macs": (2 * H - 1) * n * n * pair_macs}}


# ---------------------------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------------------------
def uniform_routing(cfg) -> dict:
    """The stated default: token t's slot s -> expert (t*k + s) mod E (distinct per token)."""
    n, k, E = cfg.num_tokens, cfg.top_k, cfg.num_experts
    idx = (np.arange(n)[:, None] * k + np.arange(k)[None, :]) % E
    return {b: {"topk_idx": idx.astype(np.int64)} for b in cfg.moe_blocks}


def golden_routing(cfg, qcfg, hwcfg, task=0, image=None, seed: int = 0) -> tuple[dict, str]:
    """Routing of the golden model on an image (default: model.images.load_image's) with the
    compiler's seeded synthetic weights. Returns (routing, description)."""
    from edgemoe.model.images import load_image
    from edgemoe.quant.compiler import synthetic_state_dict
    from edgemoe.quant.golden import GoldenModel
    from edgemoe.quant.qweights import quantize_weights
    if image is None:
        x, desc = load_image(cfg)
        image = x[0].numpy()
    else:
        desc = "given image"
    qw = quantize_weights(cfg, qcfg, synthetic_state_dict(cfg, seed))
    res = GoldenModel(cfg, qcfg, qw, hwcfg.attn_p).forward(np.asarray(image, np.float64),
                                                          cfg.task_index(task))
    return res.routing, (f"golden model routing, task {cfg.tasks[cfg.task_index(task)]}, {desc}, "
                         f"synthetic weights seed {seed}")


def expert_queues(cfg, routing) -> dict[int, list[tuple[int, int]]]:
    """{block: [(expert, queue length), ...] of the active experts in increasing id}."""
    from edgemoe.quant.schedule import ScheduleError, build_expert_queues
    out = {}
    for b in cfg.moe_blocks:
        if b not in routing:
            raise PerfModelError(f"routing has no entry for MoE block {b} (blocks {sorted(routing)})")
        r = routing[b]
        if not isinstance(r, dict) or "topk_idx" not in r:
            raise PerfModelError(f"routing[{b}] must be a dict with 'topk_idx' [n, k] "
                                 "(GoldenResult.routing): the queue lengths set the cycles")
        idx = np.asarray(r["topk_idx"])
        if idx.ndim != 2 or idx.shape != (cfg.num_tokens, cfg.top_k):
            raise PerfModelError(f"routing[{b}]['topk_idx'] shape {list(idx.shape)} != "
                                 f"[{cfg.num_tokens}, {cfg.top_k}] (num_tokens, top_k)")
        try:
            qs = build_expert_queues(idx, np.zeros(idx.shape), cfg.num_experts)
        except ScheduleError as e:
            raise PerfModelError(f"routing[{b}]: {e}") from None
        out[b] = [(e, len(q.tokens)) for e, q in enumerate(qs) if len(q.tokens)]
    return out


# ---------------------------------------------------------------------------------------------
# the program without weights
# ---------------------------------------------------------------------------------------------
def program_skeleton(cfg, qcfg, hwcfg):
    """The compiled program's instructions and symbols (compile_program without the weights:
    what dram_traffic needs); the memory image is empty."""
    from edgemoe.quant.compiler import check_fit, emit_instructions, plan_regions, plan_weights
    from edgemoe.quant.program import Program
    check_fit(cfg, qcfg, hwcfg)
    syms, wbytes = plan_weights(cfg, qcfg, hwcfg)
    instrs, names = emit_instructions(cfg, syms)
    regions = plan_regions(cfg, qcfg, hwcfg, wbytes, len(instrs))
    return Program(cfg, qcfg, hwcfg, instrs, names, regions, syms, np.zeros(0, np.uint8))


def _linear_type(name: str) -> str:
    leaf = name.split(".")[-1]
    return {"qkv": "qkv", "proj": "proj", "fc1": "mlp_fc1", "fc2": "mlp_fc2",
            "gate_logits": "router", "expert_fc1": "expert_fc1", "expert_fc2": "expert_fc2",
            "patch_embed": "patch_embed"}[leaf]


def _mode_of(ins):
    """The LinearMode of a LINEAR instruction's flags (the timing needs bias and gelu)."""
    from edgemoe.quant.program import linear_mode
    return linear_mode(ins.flags)


def _block(name):
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------
# the whole inference
# ---------------------------------------------------------------------------------------------
def inference_cycles(cfg, qcfg, hwcfg, routing=None, assumptions: PerfAssumptions | None = None,
                     routing_source: str | None = None) -> dict:
    """Cycles, latency, MAC utilisation and DRAM bytes of one image (module docstring)."""
    from edgemoe.quant.compiler import dram_traffic
    from edgemoe.quant.program import Op
    assume = assumptions or PerfAssumptions()
    if routing is None:
        routing = uniform_routing(cfg)
        routing_source = routing_source or ("uniform (stated default): token t slot s -> expert "
                                            "(t*k + s) mod E, every expert active")
    queues = expert_queues(cfg, routing)
    prog = program_skeleton(cfg, qcfg, hwcfg)
    traffic = dram_traffic(prog, routing)
    rate = beat_rate(hwcfg)
    D = cfg.dim
    lat = unit_latencies(cfg, qcfg, hwcfg)
    B = hwcfg.axi_data_bits // 8
    mac_peak = hwcfg.t_in * hwcfg.t_out
    rows_out: list[dict] = []
    body_left, cur_queues, body = 0, [], []

    def row(name, type_, pc, split, macs=0, peak=mac_peak, expert=None, nrows=None, read=0, write=0,
            fetch=0, k=None, n=None):
        r = {"name": name, "type": type_, "block": _block(name), "pc": pc, "expert": expert,
             "rows": nrows, "k": k, "n": n, "macs": int(macs), "peak_macs_per_cycle": peak,
             "cycles": int(split["cycles"]), "compute": int(split["compute"]),
             "dram_wait": int(split["dram_wait"]), "overhead": int(split["overhead"]),
             "dram_read_bytes": int(read), "dram_write_bytes": int(write), "fetch_bytes": int(fetch),
             "qk_pass": int(split.get("qk_pass", 0)), "av_pass": int(split.get("av_pass", 0))}
        assert r["compute"] + r["dram_wait"] + r["overhead"] == r["cycles"] and min(
            r["compute"], r["dram_wait"], r["overhead"]) >= 0, r
        r["utilisation"] = r["macs"] / (peak * r["cycles"]) if r["macs"] else 0.0
        rows_out.append(r)

    # 1. every execution as (rows to emit, hide): the first row takes the instruction's fetch;
    #    hide = cycles after its last DRAM read beat (None: the successor is fetched in FETCH)
    execs_in_order: list[tuple[list, int | None]] = []
    # expert-weight streaming (hw.weight_fifo_beats): per execution index, None / "capture" (the
    # first iteration's last body instruction) / a dict of the streamed LINEAR
    marks: list = []
    SD = hwcfg.weight_fifo_beats
    lay = _geometry(qcfg, hwcfg).layout

    for pc, (ins, name) in enumerate(zip(prog.instrs, prog.names)):
        tr = traffic.per_instr[pc]
        in_body = body_left > 0
        if in_body:
            body_left -= 1
        execs = cur_queues if in_body else [(None, None)]
        if tr.executions != len(execs):
            raise AssertionError(f"pc {pc} {name}: dram_traffic runs it {tr.executions} times, "
                                 f"the routing gives {len(execs)}")
        rd = tr.read_bytes // max(1, tr.executions)
        wr = tr.write_bytes // max(1, tr.executions)
        fb = tr.fetch_bytes // max(1, tr.executions)
        op = ins.op
        per_pc = []
        lin_info = {}
        for expert, qlen in execs:
            kw = dict(read=rd, write=wr, fetch=fb)
            if op is Op.LINEAR:
                mode = _mode_of(ins)
                n_rows = qlen if in_body else ins.rows
                s = linear_layer(n_rows, ins.k, ins.n, hwcfg, qcfg, mode)
                tail = s.pop("tail")
                s.pop("passes")
                s["dram_wait"] += hwcfg.dram_latency_cycles
                s["cycles"] += hwcfg.dram_latency_cycles
                per_pc.append(([(name, _linear_type(name), pc, s,
                                 dict(macs=n_rows * ins.k * ins.n, expert=expert, nrows=n_rows, k=ins.k,
                                      n=ins.n, **kw))], tail))
                lin_info[len(per_pc) - 1] = {"rows": n_rows, "k": ins.k, "n": ins.n, "mode": mode,
                                             "beats": -(-rd // B), "fetch": fb}
            elif op is Op.ATTENTION:
                a = attention_op_cycles(cfg, qcfg, hwcfg)
                # peak: the QK lanes alone, then QK and AV lanes side by side
                peak = hwcfg.attn_p * cfg.head_dim
                per_pc.append(([(name + ".qk", "qk", pc, a["qk"], dict(macs=a["qk"]["macs"], peak=peak,
                                                                       nrows=ins.rows, fetch=fb)),
                                (name + ".av", "av", pc, a["av"], dict(macs=a["av"]["macs"], peak=2 * peak,
                                                                       nrows=ins.rows))],
                               a["qk"]["cycles"] + a["av"]["cycles"]))
            elif op is Op.LAYERNORM:
                wpr = -(-D // hwcfg.lanes)        # unit beats of L lanes per row
                par_beats = -(-rd // B)
                s = {"compute": ins.rows * wpr,
                     "dram_wait": hwcfg.dram_latency_cycles + stretch(par_beats, rate),
                     # the parameter load ends with its last beat, or after a word per cycle
                     # when the beats come faster; the unit fills after it
                     "overhead": lat["layernorm"] + 3 + max(0, 2 * wpr - stretch(par_beats, rate))}
                s["cycles"] = sum(s.values())
                per_pc.append(([(name, "layernorm", pc, s, dict(nrows=ins.rows, **kw))],
                               s["compute"] + s["overhead"]))
            elif op in (Op.LOAD_ROWS, Op.STORE):
                # hw/move_op.py: one buffer word per cycle (two with LOAD_ROWS ADD), beats at
                # the DRAM rate; reads wait the first-beat latency, writes only their response
                words = ins.rows * -(-ins.k // hwcfg.t_in)
                beats = -(-(rd + wr) // B)
                move = max(stretch(beats, rate), words * (2 if ins.flags and op is Op.LOAD_ROWS else 1))
                wait = hwcfg.dram_latency_cycles if op is Op.LOAD_ROWS else 0
                c = wait + move + MOVE_OVERHEAD
                per_pc.append(([(name, "embed" if op is Op.LOAD_ROWS else "store", pc,
                                 {"cycles": c, "compute": 0, "dram_wait": wait + move, "overhead": MOVE_OVERHEAD},
                                 dict(nrows=ins.rows, **kw))],
                               MOVE_OVERHEAD if op is Op.LOAD_ROWS else None))   # STORE: no prefetch
            elif op is Op.GATE:
                W = -(-cfg.num_experts // hwcfg.t_in)
                s = {"compute": ins.rows * W, "dram_wait": 0,
                     "overhead": lat["gate"] + lat["gate_read"] + ins.rows * cfg.top_k + 1}
                s["cycles"] = sum(s.values())
                per_pc.append(([(name, "gate", pc, s, dict(nrows=ins.rows, **kw))], s["cycles"]))
            elif op in (Op.EXPERT_LOOP, Op.END):
                # EXPERT_LOOP goes from ISSUE straight to FETCH: no prefetch of its successor
                per_pc.append(([(name, "control", pc, {"cycles": 0, "compute": 0, "dram_wait": 0,
                                                       "overhead": 0}, kw)], None))
            else:
                raise PerfModelError(f"pc {pc}: opcode {op.name} has no cycle model")
        if in_body:
            body.append((per_pc, lin_info, op))
            if body_left == 0:           # the body runs expert by expert: interleave
                streams = (SD and len(body) <= 2 and len(cur_queues) >= 2
                           and all(o is Op.LINEAR and all(v["beats"] <= SD for v in li.values())
                                   for _, li, o in body))
                for i in range(len(cur_queues)):
                    for j, (b, li, _) in enumerate(body):
                        execs_in_order.append(b[i])
                        marks.append(None if not streams or (i == 0 and j < len(body) - 1)
                                     else "capture" if i == 0 else li[i])
                body = []
        else:
            execs_in_order.extend(per_pc)
            marks.extend([None] * len(per_pc))
        if op is Op.EXPERT_LOOP:
            cur_queues = queues[_block(name)]
            body_left = ins.arg

    # 2. charge each execution its fetch (and, early_data, its first-beat latency), given what
    #    its predecessor hid
    from edgemoe.quant.program import INSTR_BYTES
    L = hwcfg.dram_latency_cycles
    ins_beats = stretch(-(-INSTR_BYTES // B), rate)
    prev = None          # (hide, run, lets the next one's data go early) of the predecessor
    g = _geometry(qcfg, hwcfg)
    now = 0              # cycles since the start: the streamer's clock
    st = None            # streaming loop state: port free, last request, FIFO room frees
    fetch_saved = 0
    for (rws, hide), mark in zip(execs_in_order, marks):
        first_type = rws[0][1]
        saved = 0
        if isinstance(mark, dict):
            split, hide = _streamed_linear(mark, st, now, hwcfg, qcfg, g, lay, SD, assume, rate)
            name, type_, pc, _, kw = rws[0]
            kw = {**kw, "fetch": 0}        # replayed from the held body: no fetch
            fetch_saved += mark["fetch"]
            row(name, type_, pc, split, **kw)
            now += split["cycles"]
            prev = (hide, split["cycles"], True)
            continue
        if not (assume.prefetch and assume.early_data) or prev is None or prev[0] is None:
            f_dram, f_over = fetch_cycles(hwcfg, assume, None if prev is None else prev[0])
        else:
            # the instruction beat arrives `gap` cycles after the predecessor's retire (<= 0:
            # before it): behind the predecessor's reads, or L after it started
            p_hide, p_run, p_allows = prev
            gap = max(-p_hide, L - p_run) + ins_beats + assume.fetch_gap
            f_dram, f_over = max(0, gap), assume.early_decode_cycles
            if first_type in EARLY_TYPES and p_allows and gap <= 0:
                saved = L - min(L, max(0, gap + L + assume.data_gap))
        for j, (name, type_, pc, split, kw) in enumerate(rws):
            if j == 0:
                split = {**split, "cycles": split["cycles"] + f_dram + f_over - saved,
                         "dram_wait": split["dram_wait"] + f_dram - saved, "overhead": split["overhead"] + f_over}
            row(name, type_, pc, split, **kw)
        run = sum(r[3]["cycles"] for r in rws) - saved       # its own cycles, without the fetch
        total = sum(r["cycles"] for r in rows_out[-len(rws):])
        if mark == "capture":
            # the streamer starts behind this instruction's own weight read, which ends `hide`
            # cycles before it retires
            st = {"port": now + total - hide, "req": now + total - run, "requested": 0, "frees": []}
        now += total
        prev = (hide, run, first_type not in NO_EARLY_AFTER)

    return _summarise(cfg, qcfg, hwcfg, rows_out, traffic, routing_source or "given routing",
                      assume, rate, fetch_saved)


def _streamed_linear(info, st, now, hwcfg, qcfg, g, lay, SD, assume, rate) -> tuple[dict, int]:
    """One streamed LINEAR (hw/accel.py's expert-weight streamer) whose instruction starts `now`:
    its weights were requested as soon as the FIFO had room for all of them (room frees as
    earlier layers take their beats; requests at least STREAM_REQ_GAP apart), and arrive behind
    the port's earlier beats, a first-beat latency after the request. Updates st.
    -> (split, cycles after its last beat arrives)."""
    from edgemoe.quant.linear import get_mode
    n = info["beats"]
    md = get_mode(info["mode"])
    L = hwcfg.dram_latency_cycles
    need = st["requested"] + n - SD          # beats that must have been taken before the request
    t_room = 0
    if need > 0:
        acc = 0
        for t, k in sorted(st["frees"]):
            acc += k
            if acc >= need:
                t_room = t
                break
    req = max(st["req"] + STREAM_REQ_GAP, t_room)
    st["requested"] += n
    st["req"] = req
    start = max(now + assume.early_decode_cycles, req + STREAM_REQ_GAP)   # ISSUE waits for it
    first = max(st["port"], req + L)
    arrive = [first + stretch(b + 1, rate) - 1 for b in range(n)]
    if n:
        st["port"] = arrive[-1] + 1
    bias_beats = lay.bias_beats if lay.has_header(md.bias) else 0
    shape = (info["rows"], lay.chunks(info["k"]), lay.tiles(info["n"]), lay.tile_beats, bias_beats,
             g.mac_stages, epi_cycles(g, md.gelu))
    ki = hwcfg.weight_intake_beats
    sch, used = linear_schedule_fed(*shape, lambda b: arrive[b] - start, ki)
    ideal, _ = linear_schedule_fed(*shape, lambda b: 0, ki)
    st["frees"].extend((start + t, k) for t, k in used)
    done = (start - now) + sch.cycles
    wait = (sch.cycles - ideal.cycles) + (start - now - assume.early_decode_cycles)
    split = {"cycles": done, "compute": sch.compute_cycles, "dram_wait": wait,
             "overhead": done - sch.compute_cycles - wait}
    return split, max(0, now + done - st["port"])


def _summarise(cfg, qcfg, hwcfg, rows, traffic, routing_source, assume, rate, fetch_saved=0) -> dict:
    by_type = {}
    for t in CYCLE_TYPES:
        rs = [r for r in rows if r["type"] == t]
        if not rs:
            continue
        d = {k: sum(r[k] for r in rs) for k in ("cycles", "compute", "dram_wait", "overhead", "macs",
                                                 "dram_read_bytes", "dram_write_bytes", "fetch_bytes",
                                                 "qk_pass", "av_pass")}
        d["executions"] = len(rs)
        d["peak_macs_per_cycle"] = rs[0]["peak_macs_per_cycle"]
        d["utilisation"] = d["macs"] / (d["peak_macs_per_cycle"] * d["cycles"]) if d["macs"] else 0.0
        by_type[t] = d
    tot = {k: sum(r[k] for r in rows) for k in ("cycles", "compute", "dram_wait", "overhead", "macs")}
    tot["ms"] = tot["cycles"] / (hwcfg.clock_mhz * 1e3)
    tot["images_per_s"] = 1e3 / tot["ms"]
    # cycle-weighted: each instruction against the peak of the unit that runs it (the MAC
    # array's for instructions without MACs), so it stays <= 1 whatever P * head_dim is
    tot["peak_mac_cycles"] = sum(r["peak_macs_per_cycle"] * r["cycles"] for r in rows)
    tot["mac_utilisation"] = tot["macs"] / tot["peak_mac_cycles"]
    tot["macs_per_cycle"] = tot["macs"] / tot["cycles"]
    tot["dram_read_bytes"] = traffic.total_read - fetch_saved     # streamed loops fetch once
    tot["dram_write_bytes"] = traffic.write
    tot["dram_bytes"] = tot["dram_read_bytes"] + traffic.write
    tot["dram_gbps_average"] = tot["dram_bytes"] / (tot["ms"] * 1e-3) / 1e9
    for t in by_type.values():
        t["share"] = t["cycles"] / tot["cycles"]
    return {"estimate": True, "what": "cycle-model estimate (sim/perf_model.py), not a measurement",
            "model": cfg.name, "quant": qcfg.name, "hw": hwcfg.name, "hwcfg": hwcfg.to_dict(),
            "clock_mhz": hwcfg.clock_mhz, "beat_rate": rate, "routing": routing_source,
            "assumptions": assume.to_dict(), "totals": tot, "by_type": by_type, "layers": rows}


def format_breakdown(res: dict) -> str:
    """Console table: where the cycles go per layer type."""
    t = res["totals"]
    lines = [f"{res['model']} / {res['quant']} / {res['hw']} at {res['clock_mhz']:g} MHz "
             f"(ESTIMATE, {res['what']}); routing: {res['routing']}",
             f"{'type':<12}{'execs':>6}{'cycles':>12}{'share':>7}{'compute':>11}{'dram_wait':>11}"
             f"{'overhead':>10}{'util':>7}{'DRAM MB':>9}"]
    for k, d in res["by_type"].items():
        lines.append(f"{k:<12}{d['executions']:>6}{d['cycles']:>12,}{d['share']:>7.1%}{d['compute']:>11,}"
                     f"{d['dram_wait']:>11,}{d['overhead']:>10,}{d['utilisation']:>7.2f}"
                     f"{(d['dram_read_bytes'] + d['dram_write_bytes'] + d['fetch_bytes']) / 1e6:>9.3f}")
    lines.append(f"{'total':<12}{'':>6}{t['cycles']:>12,}{'':>7}{t['compute']:>11,}{t['dram_wait']:>11,}"
                 f"{t['overhead']:>10,}{t['mac_utilisation']:>7.2f}{t['dram_bytes'] / 1e6:>9.3f}")
    lines.append(f"latency {t['ms']:.3f} ms/image ({t['images_per_s']:.1f} images/s), "
                 f"{t['macs'] / 1e6:.1f} MMAC, DRAM {t['dram_bytes'] / 1e6:.2f} MB/image "
                 f"({t['dram_gbps_average']:.2f} GB/s average)")
    return "\n".join(lines)
