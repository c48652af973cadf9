"""Compiler: (ModelConfig, QuantConfig, HWConfig, weights) -> Program (quant/program.py).

compile_program lays the quantised weights out as the hardware reads them, emits the instruction
list of the whole backbone (one program for every task: the router of the task is selected by
the TASK_ID register), and checks that the model fits the hardware first (check_fit):
  * token rows <= HWConfig.act_buffer_tokens,
  * the on-chip buffer plan (buffer_plan) within the part's BRAM36 budget (hw/config.PARTS),
  * the memory image within the AXI address space (axi_addr_bits),
  * every instruction field within its encoding width, formats the datapath supports.
A failure names what does not fit and by how much (FitError lists every failure).

dram_traffic(program, routing) gives the bytes each instruction moves over the AXI port (the
instruction fetch, parameter and weight reads, the output write), with the expert loops counted
once per ACTIVE expert of the given routing: the input of the cycle and energy models.

Program per block (buffers X residual, H normalised, W wide, L logits; quant/program.py):
  LAYERNORM X->H (norm1); LINEAR H->W qkv; ATTENTION W->H; LINEAR H->X proj (+RESID);
  LAYERNORM X->H (norm2); dense: LINEAR H->W fc1 (+GELU), LINEAR W->X fc2 (+RESID);
  MoE: LINEAR H->L router (LOGIT, index TASK); GATE L; EXPERT_LOOP 2:
       LINEAR H->W expert fc1 (GATHER, GELU, index EXPERT), LINEAR W->X expert fc2 (GATE, RESID,
       SCATTER, index EXPERT).
Embedding: LOAD_ROWS X <- pos_embed; LOAD_ROWS X[0] += cls (ADD); LOAD_ROWS W <- image patches;
LINEAR W->X patch_embed (PATCH, RESID, row_off 1): x = fit(concat(cls, tok) + pos) as the golden
model computes it. Then STORE X -> OUTPUT, END.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from . import approx
from .config import QuantConfig
from .fixed import FormatError
from .linear import MODES, tile_layout
from .program import (INSTR_BYTES, LOAD_ADD, REGION_ALIGN, Base, Buf, Flag, Index, Instr, Op,
                      Program, Region, Symbol, align, container_bytes, encode_values,
                      linear_flags, stream_bytes, weight_stream)
from .qweights import QWeights, quantize_weights

# BRAM36 aspect ratios (data bits x depth) of the Xilinx UltraScale+ RAMB36E2 (ECC/SDP 72-bit mode)
BRAM36_SHAPES = ((1, 32768), (2, 16384), (4, 8192), (9, 4096), (18, 2048), (36, 1024), (72, 512))
DISTRIBUTED_MAX_DEPTH = 64   # memories this shallow (words) are LUTRAM / registers: no BRAM36


class FitError(ValueError):
    """The model does not fit the hardware; .report holds every check."""

    def __init__(self, report: "FitReport"):
        super().__init__(str(report))
        self.report = report


def bram36(port_bits: int, depth: int) -> int:
    """BRAM36 blocks for a memory of `depth` words of `port_bits` bits (best aspect ratio)."""
    if port_bits <= 0 or depth <= 0:
        return 0
    return min(-(-port_bits // w) * -(-depth // d) for w, d in BRAM36_SHAPES)


def memory_bram36(port_bits: int, depth: int) -> int:
    """bram36(), except that shallow memories go to LUTRAM / registers (0 block RAM)."""
    return 0 if depth <= DISTRIBUTED_MAX_DEPTH else bram36(port_bits, depth)


@dataclass(frozen=True)
class BufferSpec:
    name: str
    what: str
    rows: int        # words of `width` values (tokens, queue entries)
    width: int       # values per row
    bits: int        # bits per value
    lanes: int       # values per port access (port width = lanes * bits)

    @property
    def bits_total(self) -> int:
        return self.rows * self.width * self.bits

    @property
    def depth(self) -> int:
        return self.rows * -(-self.width // self.lanes)

    @property
    def distributed(self) -> bool:
        """Shallow memories go to LUTRAM / registers, not block RAM."""
        return self.depth <= DISTRIBUTED_MAX_DEPTH

    @property
    def bram36(self) -> int:
        return memory_bram36(self.lanes * self.bits, self.depth)


@dataclass(frozen=True)
class BufferPlan:
    buffers: tuple[BufferSpec, ...]
    budget_bram36: int

    @property
    def bram36(self) -> int:
        return sum(b.bram36 for b in self.buffers)

    @property
    def bits_total(self) -> int:
        return sum(b.bits_total for b in self.buffers)

    def width(self, name: str) -> int:
        return self.get(name).width

    def get(self, name: str) -> BufferSpec:
        for b in self.buffers:
            if b.name == name:
                return b
        raise KeyError(f"buffer plan has no buffer '{name}'")

    def table(self) -> str:
        lines = [f"{'buffer':<7}{'rows x width x bits':>22}{'kbit':>9}{'BRAM36':>8}  holds"]
        for b in self.buffers:
            lines.append(f"{b.name:<7}{f'{b.rows} x {b.width} x {b.bits}':>22}{b.bits_total / 1024:>9.0f}"
                         f"{'LUTRAM' if b.distributed else b.bram36:>8}  {b.what}")
        lines.append(f"{'total':<7}{'':>22}{self.bits_total / 1024:>9.0f}{self.bram36:>8}  "
                     f"of {self.budget_bram36} BRAM36 ({100 * self.bram36 / self.budget_bram36:.0f}%)")
        return "\n".join(lines)


def wide_width(cfg) -> int:
    dense = any(not cfg.is_moe(i) for i in range(cfg.depth))
    return max(3 * cfg.dim, cfg.mlp_hidden if dense else 0, cfg.expert_hidden if cfg.moe_blocks else 0,
               cfg.in_chans * cfg.patch * cfg.patch)


def buffer_plan(cfg, qcfg: QuantConfig, hwcfg) -> BufferPlan:
    """On-chip memories the program needs, sized for HWConfig.act_buffer_tokens rows. Port widths:
    the compute unit reads max(t_in, t_out) values per cycle; the score memory attn_p; the small
    memories one word per cycle. The MAC array's ping-pong weight tiles are registers (not here)."""
    R = hwcfg.act_buffer_tokens
    act = qcfg.act.bits
    mac = max(hwcfg.t_in, hwcfg.t_out)
    score_int = qcfg.score.bits - qcfg.score.frac          # m = ceil(score): integer bits + sign
    bufs = [
        BufferSpec("X", "residual stream", R, cfg.dim, act, mac),
        BufferSpec("H", "LayerNorm / attention output", R, cfg.dim, act, mac),
        BufferSpec("W", "QKV | MLP hidden | expert hidden | patches", R, wide_width(cfg), act, mac),
        BufferSpec("S", "scores of one head", R, R, qcfg.score.bits, hwcfg.attn_p),
        BufferSpec("SM", "softmax max + 1/sum per row", R, 1, score_int + 1 + qcfg.recip.bits, 1),
        BufferSpec("LN", "LayerNorm gamma | beta", 1, cfg.dim, qcfg.ln_gamma.bits + qcfg.ln_beta.bits,
                   min(hwcfg.lanes, cfg.dim)),
    ]
    if cfg.moe_blocks:
        tok_bits = max(1, (R - 1).bit_length())
        bufs += [
            BufferSpec("L", "gate logits", R, cfg.num_experts, qcfg.gate_logit.bits,
                       min(hwcfg.lanes, cfg.num_experts)),
            BufferSpec("Q", "expert queues (token, gate weight)", R * cfg.top_k, 1,
                       tok_bits + qcfg.gate_prob.bits, 1),
        ]
    return BufferPlan(tuple(bufs), hwcfg.part_budget.bram36)


# ---------------------------------------------------------------------------------------------
# weights region layout
# ---------------------------------------------------------------------------------------------
def _ln_sizes(qcfg, d, B):
    g = align(d * container_bytes(qcfg.ln_gamma), B)
    return g, g + align(d * container_bytes(qcfg.ln_beta), B)


def plan_weights(cfg, qcfg: QuantConfig, hwcfg) -> tuple[dict[str, Symbol], int]:
    """Symbols of the weights region (offsets relative to WEIGHTS_BASE) and its size in bytes.
    Order = execution order; every symbol starts on a beat boundary."""
    lay = tile_layout(qcfg, hwcfg)
    B = hwcfg.axi_data_bits // 8
    cb = container_bytes(qcfg.act)
    D, T = cfg.dim, cfg.num_tokens
    syms: dict[str, Symbol] = {}
    off = 0

    def add(name, kind, size, count=1, **kw):
        nonlocal off
        stride = size if count > 1 else 0
        s = Symbol(name, kind, off, size, count, stride, **kw)
        syms[name] = s
        off = align(off + s.total, B)

    def stream(name, k, n, bias, count=1, patch=False):
        add(name, "stream", stream_bytes(lay, k, n, bias), count, k=k, n=n, bias=bias, patch=patch)

    add("pos_embed", "rows", align(T * D * cb, B), rows=T, k=D)
    add("cls_token", "rows", align(D * cb, B), rows=1, k=D)
    stream("patch_embed.proj", cfg.in_chans * cfg.patch * cfg.patch, D, True, patch=True)
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        add(b + "norm1", "ln", _ln_sizes(qcfg, D, B)[1], k=D)
        stream(b + "attn.qkv", D, 3 * D, True)
        stream(b + "attn.proj", D, D, True)
        add(b + "norm2", "ln", _ln_sizes(qcfg, D, B)[1], k=D)
        if cfg.is_moe(i):
            stream(b + "mlp.routers", D, cfg.num_experts, False, count=cfg.num_tasks)
            stream(b + "mlp.experts.fc1", D, cfg.expert_hidden, True, count=cfg.num_experts)
            stream(b + "mlp.experts.fc2", cfg.expert_hidden, D, True, count=cfg.num_experts)
        else:
            stream(b + "mlp.fc1", D, cfg.mlp_hidden, True)
            stream(b + "mlp.fc2", cfg.mlp_hidden, D, True)
    return syms, off


def program_length(cfg) -> int:
    """Instructions compile_program emits (embedding 4, per block 7 dense / 10 MoE, STORE, END)."""
    return 4 + sum(10 if cfg.is_moe(i) else 7 for i in range(cfg.depth)) + 2


def plan_regions(cfg, qcfg, hwcfg, weights_bytes: int, n_instr: int) -> dict[str, Region]:
    cb = container_bytes(qcfg.act)
    sizes = {"program": n_instr * INSTR_BYTES, "weights": weights_bytes,
             "image": cfg.num_patches * cfg.in_chans * cfg.patch ** 2 * cb,
             "output": cfg.num_tokens * cfg.dim * cb}
    regions, off = {}, 0
    for name, size in sizes.items():
        regions[name] = Region(name, off, align(max(size, 1), REGION_ALIGN))
        off += regions[name].size
    return regions


# ---------------------------------------------------------------------------------------------
# fit check
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitItem:
    what: str
    ok: bool
    detail: str       # "need vs have" in words


@dataclass
class FitReport:
    model: str
    hw: str
    items: list[FitItem]
    plan: BufferPlan | None = None
    image_bytes: int = 0

    @property
    def ok(self) -> bool:
        return all(i.ok for i in self.items)

    @property
    def failures(self) -> list[FitItem]:
        return [i for i in self.items if not i.ok]

    def __str__(self) -> str:
        head = (f"model '{self.model}' fits hardware '{self.hw}'" if self.ok else
                f"model '{self.model}' does not fit hardware '{self.hw}':")
        return "\n".join([head] + [f"  {'ok  ' if i.ok else 'FAIL'} {i.what}: {i.detail}"
                                   for i in self.items])


def _cmp(what, need, have, unit, have_name, sep=""):
    ok = need <= have
    rel = "<=" if ok else ">"
    f = "{:" + sep + "}"
    by = "" if ok else f" (by {f.format(need - have)})"
    return FitItem(what, ok, f"{f.format(need)} {unit} {rel} {have_name} {f.format(have)}{by}".replace("  ", " "))


def check_fit(cfg, qcfg: QuantConfig, hwcfg, raise_error: bool = True) -> FitReport:
    """Every fit check of the module docstring; raises FitError listing all failures."""
    items: list[FitItem] = []
    T = cfg.num_tokens
    items.append(_cmp("activation buffer", T, hwcfg.act_buffer_tokens, "tokens", "act_buffer_tokens"))
    items.append(FitItem("gating", cfg.gating == "multi",
                         f"gating '{cfg.gating}'" + ("" if cfg.gating == "multi" else
                         ": only 'multi' (one router per task) is supported by the ISA; the "
                         "task-conditioned router's concatenated task embedding has no instruction")))
    from .channel import check_channel_datapath
    for what, fn in (("formats: accumulator", lambda: qcfg.check_model(cfg)),
                     ("formats: channel epilogue", lambda: check_channel_datapath(qcfg)),
                     ("formats: weight tiles", lambda: tile_layout(qcfg, hwcfg)),
                     ("formats: layernorm", lambda: approx.layernorm_params(cfg.dim, qcfg))):
        try:
            fn()
            items.append(FitItem(what, True, "supported"))
        except (FormatError, ValueError) as e:
            items.append(FitItem(what, False, str(e)))
    widest = max(T, wide_width(cfg), cfg.num_experts, cfg.heads, cfg.top_k)
    items.append(_cmp("instruction fields (rows/k/n/arg: 16 bits)", widest, (1 << 16) - 1, "", "max"))
    plan = buffer_plan(cfg, qcfg, hwcfg)
    items.append(_cmp("on-chip buffers", plan.bram36, plan.budget_bram36, "BRAM36",
                      f"{hwcfg.part} budget"))
    image_bytes = 0
    if all(i.ok for i in items if i.what.startswith("formats")):
        syms, wbytes = plan_weights(cfg, qcfg, hwcfg)
        regions = plan_regions(cfg, qcfg, hwcfg, wbytes, program_length(cfg))
        image_bytes = sum(r.size for r in regions.values())
        items.append(_cmp("address space", image_bytes, 1 << hwcfg.axi_addr_bits, "B memory image",
                          f"2**axi_addr_bits ({hwcfg.axi_addr_bits})", ","))
        items.append(_cmp("weights region (32-bit addr field)", wbytes, (1 << 32) - 1, "B", "max", ","))
    rep = FitReport(cfg.name, hwcfg.name, items, plan, image_bytes)
    if raise_error and not rep.ok:
        raise FitError(rep)
    return rep


# ---------------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------------
def _tensor(qw: QWeights, key: str, shape: tuple) -> np.ndarray:
    if key not in qw.codes:
        raise KeyError(f"weights: tensor '{key}' missing (needed by the program)")
    a = np.asarray(qw[key], dtype=np.int64)
    if a.size != int(np.prod(shape)):
        raise FormatError(f"weights: tensor '{key}' has shape {list(a.shape)}, expected {list(shape)}")
    return a.reshape(shape)


def compile_program(cfg, qcfg: QuantConfig, hwcfg, weights, check: bool = True) -> Program:
    """weights: a float backbone state dict (quantised here with quant.qweights.quantize_weights,
    folds included) or a QWeights. The program is the same for every task (TASK_ID register)."""
    if check:
        check_fit(cfg, qcfg, hwcfg)
    qw = weights if isinstance(weights, QWeights) else quantize_weights(cfg, qcfg, weights)
    lay = tile_layout(qcfg, hwcfg)
    B = hwcfg.axi_data_bits // 8
    syms, wbytes = plan_weights(cfg, qcfg, hwcfg)
    wreg = np.zeros(wbytes, dtype=np.uint8)
    D, T = cfg.dim, cfg.num_tokens
    Cpp = cfg.in_chans * cfg.patch * cfg.patch

    def put(sym: Symbol, data: np.ndarray, item: int = 0):
        if data.size > sym.size:
            raise AssertionError(f"symbol {sym.name}: {data.size} bytes > {sym.size}")
        o = sym.offset + item * sym.stride
        wreg[o:o + data.size] = data

    chan = qcfg.granularity == "channel"
    if chan and not qw.epi:
        raise FormatError(f"weights for QuantConfig '{qcfg.name}' (granularity 'channel') carry no "
                          "per-channel epilogue: quantise them with quant.qweights.quantize_weights")

    def put_stream(name, w, b, item=0, patch=False, wkey=None, e=None):
        s = syms[name]
        mult = shift = None
        if chan:        # bias, multiplier and shift of every channel come from its epilogue
            if wkey not in qw.epi:
                raise KeyError(f"weights: no channel epilogue for '{wkey}' (needed by the program)")
            ep = qw.epi[wkey] if e is None else qw.epi[wkey].select(e)
            b = None if b is None else np.asarray(ep.bias, dtype=np.int64)
            mult, shift = ep.mult, ep.shift
        put(s, weight_stream(w, b, lay, qcfg.patch_w if patch else qcfg.linear_w, qcfg.bias, name,
                             mult, shift), item)

    def bias_of(key, shape):    # channel: the bias lives in the epilogue (quant/channel.py)
        return np.zeros(shape, dtype=np.int64) if chan else _tensor(qw, key, shape)

    put(syms["pos_embed"], encode_values(_tensor(qw, "pos_embed", (T, D)), qcfg.act, "pos_embed"))
    put(syms["cls_token"], encode_values(_tensor(qw, "cls_token", (1, D)), qcfg.act, "cls_token"))
    put_stream("patch_embed.proj", _tensor(qw, "patch_embed.proj.weight", (D, Cpp)),
               bias_of("patch_embed.proj.bias", (D,)), patch=True, wkey="patch_embed.proj.weight")
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        for ln in ("norm1", "norm2"):
            g_end = _ln_sizes(qcfg, D, B)[0]
            g = encode_values(_tensor(qw, b + ln + ".weight", (D,)), qcfg.ln_gamma, b + ln + ".weight")
            be = encode_values(_tensor(qw, b + ln + ".bias", (D,)), qcfg.ln_beta, b + ln + ".bias")
            buf = np.zeros(syms[b + ln].size, dtype=np.uint8)
            buf[:g.size], buf[g_end:g_end + be.size] = g, be
            put(syms[b + ln], buf)
        for part, n in (("qkv", 3 * D), ("proj", D)):
            k = f"{b}attn.{part}"
            put_stream(k, _tensor(qw, k + ".weight", (n, D)), bias_of(k + ".bias", (n,)), wkey=k + ".weight")
        if cfg.is_moe(i):
            E, He = cfg.num_experts, cfg.expert_hidden
            for t in range(cfg.num_tasks):
                k = f"{b}mlp.routers.{t}.weight"
                put_stream(b + "mlp.routers", _tensor(qw, k, (E, D)), None, t, wkey=k)
            w1 = _tensor(qw, b + "mlp.htoh4_weight", (E, He, D))
            b1 = bias_of(b + "mlp.htoh4_bias", (E, He))
            w2 = _tensor(qw, b + "mlp.h4toh_weight", (E, D, He))
            b2 = bias_of(b + "mlp.h4toh_bias", (E, D))
            for e in range(E):
                put_stream(b + "mlp.experts.fc1", w1[e], b1[e], e, wkey=b + "mlp.htoh4_weight", e=e)
                put_stream(b + "mlp.experts.fc2", w2[e], b2[e], e, wkey=b + "mlp.h4toh_weight", e=e)
        else:
            H = cfg.mlp_hidden
            put_stream(b + "mlp.fc1", _tensor(qw, b + "mlp.fc1.weight", (H, D)),
                       bias_of(b + "mlp.fc1.bias", (H,)), wkey=b + "mlp.fc1.weight")
            put_stream(b + "mlp.fc2", _tensor(qw, b + "mlp.fc2.weight", (D, H)),
                       bias_of(b + "mlp.fc2.bias", (D,)), wkey=b + "mlp.fc2.weight")

    instrs, names = emit_instructions(cfg, syms)
    regions = plan_regions(cfg, qcfg, hwcfg, wbytes, len(instrs))
    image = np.zeros(sum(r.size for r in regions.values()), dtype=np.uint8)
    po, wo = regions["program"].offset, regions["weights"].offset
    for pc, ins in enumerate(instrs):
        image[po + pc * INSTR_BYTES:po + (pc + 1) * INSTR_BYTES] = np.frombuffer(ins.to_bytes(), np.uint8)
    image[wo:wo + wbytes] = wreg
    return Program(cfg, qcfg, hwcfg, instrs, names, regions, syms, image)


def emit_instructions(cfg, syms: dict[str, Symbol]) -> tuple[list[Instr], list[str]]:
    D, T, P = cfg.dim, cfg.num_tokens, cfg.num_patches
    Cpp = cfg.in_chans * cfg.patch * cfg.patch
    instrs, names = [], []

    def emit(name, op, **kw):
        instrs.append(Instr(op, **kw).check(len(instrs)))
        names.append(name)

    def lin(name, mode, src, dst, sym, k, n, rows=T, index=Index.NONE, row_off=0):
        s = syms[sym]
        emit(name, Op.LINEAR, flags=linear_flags(MODES[mode]), src=src, dst=dst, addr=s.offset,
             index=index, stride=s.stride if index is not Index.NONE else 0,
             rows=0 if MODES[mode].queue else rows, row_off=row_off, k=k, n=n)

    emit("embed.pos", Op.LOAD_ROWS, dst=Buf.X, addr=syms["pos_embed"].offset, rows=T, k=D)
    emit("embed.cls", Op.LOAD_ROWS, flags=LOAD_ADD, dst=Buf.X, addr=syms["cls_token"].offset, rows=1, k=D)
    emit("embed.patches", Op.LOAD_ROWS, dst=Buf.W, base=Base.IMAGE, rows=P, k=Cpp)
    s = syms["patch_embed.proj"]
    emit("patch_embed", Op.LINEAR, flags=int(Flag.BIAS | Flag.PATCH | Flag.RESID), src=Buf.W,
         dst=Buf.X, addr=s.offset, rows=P, row_off=1, k=Cpp, n=D)
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        emit(b + "norm1", Op.LAYERNORM, src=Buf.X, dst=Buf.H, addr=syms[b + "norm1"].offset, rows=T, k=D)
        lin(b + "qkv", "qkv", Buf.H, Buf.W, b + "attn.qkv", D, 3 * D)
        emit(b + "attn", Op.ATTENTION, src=Buf.W, dst=Buf.H, rows=T, k=D, arg=cfg.heads)
        lin(b + "proj", "proj", Buf.H, Buf.X, b + "attn.proj", D, D)
        emit(b + "norm2", Op.LAYERNORM, src=Buf.X, dst=Buf.H, addr=syms[b + "norm2"].offset, rows=T, k=D)
        if cfg.is_moe(i):
            E, He = cfg.num_experts, cfg.expert_hidden
            lin(b + "mlp.gate_logits", "router", Buf.H, Buf.L, b + "mlp.routers", D, E, index=Index.TASK)
            emit(b + "mlp.gate", Op.GATE, src=Buf.L, rows=T, n=E, arg=cfg.top_k)
            emit(b + "mlp.experts", Op.EXPERT_LOOP, arg=2)
            lin(b + "mlp.expert_fc1", "expert_fc1", Buf.H, Buf.W, b + "mlp.experts.fc1", D, He,
                index=Index.EXPERT)
            lin(b + "mlp.expert_fc2", "expert_fc2", Buf.W, Buf.X, b + "mlp.experts.fc2", He, D,
                index=Index.EXPERT)
        else:
            lin(b + "mlp.fc1", "fc1", Buf.H, Buf.W, b + "mlp.fc1", D, cfg.mlp_hidden)
            lin(b + "mlp.fc2", "fc2", Buf.W, Buf.X, b + "mlp.fc2", cfg.mlp_hidden, D)
    emit("store", Op.STORE, src=Buf.X, base=Base.OUTPUT, rows=T, k=D)
    emit("end", Op.END)
    return instrs, names


# ---------------------------------------------------------------------------------------------
# DRAM traffic
# ---------------------------------------------------------------------------------------------
def instr_bytes(ins: Instr, qcfg: QuantConfig, hwcfg) -> tuple[int, int]:
    """(bytes read, bytes written) over the AXI port by one execution of `ins`, excluding its own
    fetch (INSTR_BYTES). Transfers are whole beats."""
    B = hwcfg.axi_data_bits // 8
    if ins.op is Op.LOAD_ROWS:
        return align(ins.rows * ins.k * container_bytes(qcfg.act), B), 0
    if ins.op is Op.LAYERNORM:
        return _ln_sizes(qcfg, ins.k, B)[1], 0
    if ins.op is Op.LINEAR:
        return stream_bytes(tile_layout(qcfg, hwcfg), ins.k, ins.n, bool(ins.flags & Flag.BIAS)), 0
    if ins.op is Op.STORE:
        return 0, align(ins.rows * ins.k * container_bytes(qcfg.act), B)
    return 0, 0


@dataclass(frozen=True)
class InstrTraffic:
    pc: int
    name: str
    op: str
    executions: int
    fetch_bytes: int        # instruction fetches (INSTR_BYTES per execution)
    read_bytes: int         # parameters, weights, image (all executions)
    write_bytes: int
    experts: tuple = ()     # expert ids fetched (expert-loop body)


@dataclass
class Traffic:
    per_instr: list[InstrTraffic] = field(default_factory=list)

    @property
    def fetch(self) -> int:
        return sum(t.fetch_bytes for t in self.per_instr)

    @property
    def read(self) -> int:
        return sum(t.read_bytes for t in self.per_instr)

    @property
    def write(self) -> int:
        return sum(t.write_bytes for t in self.per_instr)

    @property
    def total_read(self) -> int:
        """Everything the accelerator reads: what its DRAM_BYTES_READ counter reports."""
        return self.fetch + self.read

    def by_name(self) -> dict[str, InstrTraffic]:
        return {t.name: t for t in self.per_instr}


def _block_of(name: str) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _active(routing, block, num_experts) -> tuple:
    if routing is None:
        return tuple(range(num_experts))
    if block not in routing:
        raise KeyError(f"dram_traffic: routing has no entry for MoE block {block}")
    r = routing[block]
    ids = r["topk_idx"] if isinstance(r, dict) else r
    return tuple(sorted({int(e) for e in np.asarray(ids).ravel()}))


def dram_traffic(program: Program, routing=None) -> Traffic:
    """Bytes per instruction for one run. routing: {block: {"topk_idx": [N, k]}} (as
    GoldenResult.routing) or {block: iterable of expert ids}; None = every expert active (upper
    bound). The expert-loop body counts once per active expert (fetch included)."""
    q, hw, cfg = program.qcfg, program.hwcfg, program.cfg
    out = Traffic()
    body_left, experts = 0, ()
    for pc, (ins, name) in enumerate(zip(program.instrs, program.names)):
        if body_left:
            body_left -= 1
            execs, ex = len(experts), experts
        else:
            execs, ex = 1, ()
        if ins.op is Op.EXPERT_LOOP:
            experts = _active(routing, _block_of(name), cfg.num_experts)
            body_left = ins.arg
        r, w = instr_bytes(ins, q, hw)
        out.per_instr.append(InstrTraffic(pc, name, ins.op.name, execs, execs * INSTR_BYTES,
                                          execs * r, execs * w, ex))
    return out


# ---------------------------------------------------------------------------------------------
# synthetic weights (tests, quick runs)
# ---------------------------------------------------------------------------------------------
def synthetic_state_dict(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded float64 backbone tensors in numpy (fast, unlike building M3ViT): ViT-like scales,
    but non-zero biases and LayerNorm betas and gammas != 1, so every parameter's layout in the
    memory image changes the result."""
    from edgemoe.model.checkpoint import expected_backbone_shapes
    rng = np.random.default_rng(seed)
    sd = {}
    for k, shape in expected_backbone_shapes(cfg).items():
        if re.search(r"\.norm\d\.weight$", k):
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        elif re.search(r"\.norm\d\.bias$", k):
            v = 0.05 * rng.standard_normal(shape)
        elif k.endswith("bias"):
            v = 0.02 * rng.standard_normal(shape)
        elif k == "patch_embed.proj.weight":
            std = (cfg.in_chans * cfg.patch ** 2) ** -0.5
            v = np.clip(std * rng.standard_normal(shape), -2 * std, 2 * std)
        elif ".task_embed." in k:
            v = rng.standard_normal(shape)
        else:
            v = np.clip(0.02 * rng.standard_normal(shape), -0.04, 0.04)
        sd[k] = v
    return sd


# ---------------------------------------------------------------------------------------------
# debug program: every intermediate tensor stored to memory
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tap:
    name: str        # the instruction whose result this is (+ ".experts" after an expert loop)
    offset: int      # bytes from OUTPUT_BASE
    rows: int
    k: int           # act values per row


def debug_program(program: Program, lanes: int) -> tuple[Program, list[Tap]]:
    """`program` with a STORE of each instruction's destination buffer (all tokens, the columns
    it wrote) after it, into the OUTPUT region behind the features; after an expert loop, one
    STORE of X (the accumulated expert outputs). Loop bodies and the gate logits (L, narrower
    than a buffer word when E < lanes) get no tap. Running it on the RTL and on the executor and
    comparing the OUTPUT regions compares every intermediate tensor bit for bit. `lanes`: the
    top's buffer word (STORE needs k % lanes == 0)."""
    cfg, q, hw = program.cfg, program.qcfg, program.hwcfg
    B = hw.axi_data_bits // 8
    cb = container_bytes(q.act)
    T = cfg.num_tokens
    off = align(T * cfg.dim * cb, B)
    instrs, names, taps = [], [], []
    body_left = 0

    def tap(name, buf, k):
        nonlocal off
        if k % lanes:
            return
        instrs.append(Instr(Op.STORE, src=buf, base=Base.OUTPUT, addr=off, rows=T, k=k).check())
        names.append(name + ".tap")
        taps.append(Tap(name, off, T, k))
        off += align(T * k * cb, B)

    for ins, name in zip(program.instrs, program.names):
        instrs.append(ins)
        names.append(name)
        if body_left:
            body_left -= 1
            if body_left == 0:
                tap(name.rsplit(".", 1)[0] + ".experts", Buf.X, cfg.dim)
            continue
        if ins.op is Op.EXPERT_LOOP:
            body_left = ins.arg
        elif ins.op in (Op.LOAD_ROWS, Op.LAYERNORM):
            tap(name, ins.dst, ins.k)
        elif ins.op is Op.LINEAR and ins.dst is not Buf.L:
            tap(name, ins.dst, ins.n)
        elif ins.op is Op.ATTENTION:
            tap(name, ins.dst, ins.k)
    regions = dict(program.regions)
    sizes = {"program": len(instrs) * INSTR_BYTES, "weights": regions["weights"].size,
             "image": regions["image"].size, "output": off}
    new, o = {}, 0
    for n_, size in sizes.items():
        new[n_] = Region(n_, o, align(max(size, 1), REGION_ALIGN))
        o += new[n_].size
    image = np.zeros(o, dtype=np.uint8)
    for pc, ins in enumerate(instrs):
        p0 = new["program"].offset + pc * INSTR_BYTES
        image[p0:p0 + INSTR_BYTES] = np.frombuffer(ins.to_bytes(), np.uint8)
    w_old, w_new = regions["weights"], new["weights"]
    image[w_new.offset:w_new.offset + w_old.size] = program.image[w_old.offset:w_old.offset + w_old.size]
    return Program(cfg, q, hw, instrs, names, new, program.symbols, image), taps
