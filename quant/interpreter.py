"""Python executor of the accelerator's program: what the RTL controller will do, instruction by
instruction, on a byte-addressed memory.

Machine fetches 32-byte instructions from PROGRAM_BASE, decodes them (quant/program.py), reads
every parameter and weight FROM THE MEMORY (unpacking the weight tiles, so the layout is what is
tested) and computes with the golden primitives: quant.linear.linear_golden (the compute unit in
each mode), quant.approx (LayerNorm, softmax, gate), quant.intmath.exact_matmul and the key
order of quant.schedule. It knows only what the hardware knows: QuantConfig, HWConfig and the
buffer plan (buffer widths); shapes come from the instructions. Errors stop the run with a
ProgramError carrying the controller's ERROR_CODE and the pc.

Counters (RunStats), as the PythonBackend of sim/driver.py reports them: instructions retired,
bytes fetched / read / written over the AXI port (whole beats, the same rules as
quant.compiler.dram_traffic), saturation events; plus a trace of every execution (pc, expert,
bytes) and the routing each GATE produced.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import approx
from .compiler import buffer_plan
from .config import QuantConfig
from .fixed import Fmt, FormatError, SatCounter, requantize
from .intmath import exact_matmul
from .channel import attention_qcfg
from .linear import linear_golden, tile_layout
from .program import (ERR_ADDRESS, ERR_BUFFER, ERR_DATA, ERR_ILLEGAL, ERR_LOOP, ERR_RUNAWAY,
                      INSTR_BYTES, LOAD_ADD, Base, Buf, Index, Instr, Op, Program,
                      ProgramError, align, container_bytes, decode_values, encode_values,
                      image_patch_codes, linear_mode, quantise_image, stream_bytes,
                      unpack_weight_stream)
from .schedule import active_experts, build_expert_queues, row_key_order


class MemoryAccessError(ValueError):
    pass


class FlatMemory:
    """Byte memory covering bus addresses [base, base + size), backed by a numpy array."""

    def __init__(self, size: int, base: int = 0):
        if size <= 0 or base < 0:
            raise ValueError(f"FlatMemory: size {size} must be > 0 and base {base} >= 0")
        self.base, self.size = int(base), int(size)
        self.data = np.zeros(self.size, dtype=np.uint8)

    def _off(self, addr: int, n: int) -> int:
        o = int(addr) - self.base
        if o < 0 or n < 0 or o + n > self.size:
            raise MemoryAccessError(f"access [{addr:#x}, {addr + n:#x}) outside memory "
                                    f"[{self.base:#x}, {self.base + self.size:#x})")
        return o

    def read(self, addr: int, n: int) -> np.ndarray:
        o = self._off(addr, n)
        return self.data[o:o + n].copy()

    def write(self, addr: int, data) -> None:
        b = np.frombuffer(bytes(data), dtype=np.uint8) if not isinstance(data, np.ndarray) \
            else np.asarray(data, dtype=np.uint8).reshape(-1)
        o = self._off(addr, b.size)
        self.data[o:o + b.size] = b


@dataclass
class Registers:
    program_base: int
    weights_base: int
    image_base: int
    output_base: int
    task: int = 0


@dataclass(frozen=True)
class Exec:
    pc: int
    op: str
    expert: int | None
    read_bytes: int
    write_bytes: int


@dataclass
class RunStats:
    retired: int = 0
    fetch_bytes: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    sat: SatCounter = field(default_factory=SatCounter)
    trace: list[Exec] = field(default_factory=list)
    routing: dict = field(default_factory=dict)     # GATE pc -> topk_idx [rows, k]

    @property
    def dram_read(self) -> int:
        return self.fetch_bytes + self.read_bytes


class Machine:
    """The controller + units for one (QuantConfig, HWConfig, buffer plan), on memory `mem`
    (any object with read(addr, n) -> uint8 array/bytes and write(addr, data))."""

    def __init__(self, qcfg: QuantConfig, hwcfg, plan, mem, ln_eps: float = 1e-6):
        # ln_eps is a generation-time constant of the LayerNorm unit (quantised into ln_stat)
        self.q, self.hw, self.plan, self.mem, self.ln_eps = qcfg, hwcfg, plan, mem, ln_eps
        self.layout = tile_layout(qcfg, hwcfg)
        self.beat = hwcfg.axi_data_bits // 8
        R = hwcfg.act_buffer_tokens
        self.bufs = {Buf[b.name]: np.zeros((R, b.width), dtype=np.int64)
                     for b in plan.buffers if b.name in Buf.__members__}
        self._orders: dict[int, np.ndarray] = {}

    @classmethod
    def for_program(cls, program: Program, mem) -> "Machine":
        return cls(program.qcfg, program.hwcfg,
                   buffer_plan(program.cfg, program.qcfg, program.hwcfg), mem, program.cfg.ln_eps)

    # --- memory -----------------------------------------------------------------------------
    def _read(self, addr: int, n: int, pc: int) -> np.ndarray:
        if addr % self.beat:
            raise ProgramError(ERR_ADDRESS, pc, f"read address {addr:#x} not aligned to the "
                               f"{self.beat}-byte AXI beat")
        nb = align(n, self.beat)
        try:
            data = np.asarray(self.mem.read(addr, nb), dtype=np.uint8).reshape(-1)
        except MemoryAccessError as e:
            raise ProgramError(ERR_ADDRESS, pc, str(e)) from None
        self._st.read_bytes += nb
        self._cur[0] += nb
        return data[:n]

    def _write(self, addr: int, data: np.ndarray, pc: int) -> None:
        if addr % self.beat:
            raise ProgramError(ERR_ADDRESS, pc, f"write address {addr:#x} not aligned to the "
                               f"{self.beat}-byte AXI beat")
        try:
            self.mem.write(addr, data)      # whole beats on the bus, byte strobes on the last
        except MemoryAccessError as e:
            raise ProgramError(ERR_ADDRESS, pc, str(e)) from None
        nb = align(data.size, self.beat)
        self._st.write_bytes += nb
        self._cur[1] += nb

    def _fetch(self, regs: Registers, pc: int) -> Instr:
        try:
            raw = np.asarray(self.mem.read(regs.program_base + pc * INSTR_BYTES, INSTR_BYTES), np.uint8)
        except MemoryAccessError as e:
            raise ProgramError(ERR_ADDRESS, pc, f"instruction fetch: {e}") from None
        self._st.fetch_bytes += INSTR_BYTES
        return Instr.from_bytes(raw.tobytes(), pc)

    # --- buffers ----------------------------------------------------------------------------
    def _buf(self, b: Buf, pc: int, what: str) -> np.ndarray:
        if b not in self.bufs:
            raise ProgramError(ERR_ILLEGAL, pc, f"{what}: buffer {b.name} does not exist in this "
                               f"hardware (buffers: {[x.name for x in self.bufs]})")
        return self.bufs[b]

    def _fits(self, buf: np.ndarray, name: str, rows: int, width: int, pc: int) -> None:
        if rows > buf.shape[0] or width > buf.shape[1]:
            raise ProgramError(ERR_BUFFER, pc, f"buffer {name}: access of {rows} rows x {width} "
                               f"values exceeds its {buf.shape[0]} rows x {buf.shape[1]} values")

    def _base(self, ins: Instr, regs: Registers) -> int:
        return {Base.WEIGHTS: regs.weights_base, Base.IMAGE: regs.image_base,
                Base.OUTPUT: regs.output_base}[ins.base] + ins.addr

    # --- run --------------------------------------------------------------------------------
    def run(self, regs: Registers, max_instructions: int = 1 << 20) -> RunStats:
        st = self._st = RunStats()
        self.queues, self.metaqueue = None, None
        pc = 0
        while True:
            if st.retired >= max_instructions:
                raise ProgramError(ERR_RUNAWAY, pc, f"{max_instructions} instructions without END")
            ins = self._fetch(regs, pc)
            st.retired += 1
            if ins.op is Op.END:
                return st
            if ins.op is Op.EXPERT_LOOP:
                if ins.arg < 1:
                    raise ProgramError(ERR_LOOP, pc, "EXPERT_LOOP with an empty body")
                if self.queues is None:
                    raise ProgramError(ERR_LOOP, pc, "EXPERT_LOOP before any GATE (no expert queues)")
                held = None         # the body as the weight streamer holds it (no refetch)
                for i, e in enumerate(self.metaqueue):
                    fetched = []
                    for j in range(1, ins.arg + 1):
                        body = held[j - 1] if held else self._fetch(regs, pc + j)
                        if body.op in (Op.END, Op.EXPERT_LOOP):
                            raise ProgramError(ERR_LOOP, pc + j, f"{body.op.name} inside an expert-loop body")
                        st.retired += 1
                        self._exec(body, pc + j, regs, e)
                        fetched.append(body)
                    if i == 0 and self._streams(fetched):
                        held = fetched
                pc += ins.arg + 1
                continue
            self._exec(ins, pc, regs, None)
            pc += 1

    def _streams(self, body: list) -> bool:
        """hw/accel.py's expert-weight streamer takes this loop (HWConfig.weight_fifo_beats > 0, a
        body of one or two LINEARs of at most that many beats each): from the second expert on,
        the body is replayed from on-chip registers, so its instructions are not fetched again."""
        D = self.hw.weight_fifo_beats
        if not D or len(body) > 2:
            return False
        for b in body:
            if b.op is not Op.LINEAR:
                return False
            md = linear_mode(b.flags)
            if align(stream_bytes(self.layout, b.k, b.n, md.bias), self.beat) // self.beat > D:
                return False
        return True

    def _exec(self, ins: Instr, pc: int, regs: Registers, expert: int | None) -> None:
        self._cur = [0, 0]
        try:
            getattr(self, "_op_" + ins.op.name.lower())(ins, pc, regs, expert)
        except FormatError as e:       # a value outside its format in memory
            raise ProgramError(ERR_DATA, pc, str(e)) from None
        self._st.trace.append(Exec(pc, ins.op.name, expert, self._cur[0], self._cur[1]))

    # --- opcodes ----------------------------------------------------------------------------
    def _op_load_rows(self, ins, pc, regs, expert):
        q = self.q
        dst = self._buf(ins.dst, pc, "LOAD_ROWS")
        self._fits(dst, ins.dst.name, ins.row_off + ins.rows, ins.k, pc)
        n = ins.rows * ins.k
        data = self._read(self._base(ins, regs), n * container_bytes(q.act), pc)
        v = decode_values(data, n, q.act).reshape(ins.rows, ins.k)
        if v.size and (v.min() < q.act.min_int or v.max() > q.act.max_int):
            raise ProgramError(ERR_DATA, pc, f"LOAD_ROWS: codes outside act {q.act} in memory")
        rows = slice(ins.row_off, ins.row_off + ins.rows)
        if ins.flags & LOAD_ADD:
            v = q.act.fit(dst[rows, :ins.k] + v, q.overflow, self._st.sat, f"pc{pc}.load_add")
        dst[rows, :ins.k] = v

    def _op_layernorm(self, ins, pc, regs, expert):
        q = self.q
        src = self._buf(ins.src, pc, "LAYERNORM src")
        dst = self._buf(ins.dst, pc, "LAYERNORM dst")
        for b, nm in ((src, ins.src.name), (dst, ins.dst.name)):
            self._fits(b, nm, ins.rows, ins.k, pc)
        a = self._base(ins, regs)
        ng = ins.k * container_bytes(q.ln_gamma)
        gamma = decode_values(self._read(a, ng, pc), ins.k, q.ln_gamma)
        beta = decode_values(self._read(a + align(ng, self.beat), ins.k * container_bytes(q.ln_beta), pc),
                             ins.k, q.ln_beta)
        dst[:ins.rows, :ins.k] = approx.layernorm_fixed(src[:ins.rows, :ins.k], gamma, beta, q,
                                                        eps=self.ln_eps, sat=self._st.sat, name=f"pc{pc}.layernorm")

    def _op_linear(self, ins, pc, regs, expert):
        q = self.q
        try:
            md = linear_mode(ins.flags)
        except FormatError as e:
            raise ProgramError(ERR_ILLEGAL, pc, f"LINEAR flags {ins.flags:#04x}: {e}") from None
        if (md.queue or ins.index is Index.EXPERT) and expert is None:
            raise ProgramError(ERR_LOOP, pc, "LINEAR with queue flags or expert index outside an expert loop")
        if md.queue and (ins.rows or ins.row_off):
            raise ProgramError(ERR_ILLEGAL, pc, "LINEAR in a queue mode must have rows = row_off = 0")
        if md.logit != (ins.dst is Buf.L):
            raise ProgramError(ERR_ILLEGAL, pc, "LINEAR: the LOGIT flag and destination L go together")
        src = self._buf(ins.src, pc, "LINEAR src")
        dst = self._buf(ins.dst, pc, "LINEAR dst")
        idx = {Index.NONE: 0, Index.TASK: regs.task, Index.EXPERT: expert or 0}[ins.index]
        addr = self._base(ins, regs) + idx * ins.stride
        data = self._read(addr, stream_bytes(self.layout, ins.k, ins.n, md.bias), pc)
        w, b, mult, shift = unpack_weight_stream(data, ins.k, ins.n, md.bias, self.layout, scales=True)
        scale = (mult, shift) if self.layout.channel else None
        tokens = gate_w = None
        if md.queue:
            tokens, gate_w = self.queues[expert]
            rows = len(tokens)
        else:
            rows = ins.rows
        self._fits(src, ins.src.name, rows if not md.gather else 0, ins.k, pc)
        if md.scatter:
            self._fits(dst, ins.dst.name, 0, ins.n, pc)
            dsl = slice(0, dst.shape[0])
        else:
            self._fits(dst, ins.dst.name, ins.row_off + rows, ins.n, pc)
            dsl = slice(ins.row_off, ins.row_off + rows)
        res = linear_golden(src[:, :ins.k], w, b, q, md, tokens=tokens,
                            gate_w=gate_w if md.gate else None,
                            resid=dst[dsl, :ins.n] if md.resid else None,
                            rows=rows, sat=self._st.sat, name=f"pc{pc}.linear", scale=scale)
        if md.resid:
            dst[dsl, :ins.n] = res.resid
        elif md.scatter:
            dst[tokens, :ins.n] = res.y
        else:
            dst[dsl, :ins.n] = res.y

    def _op_attention(self, ins, pc, regs, expert):
        # the unit's view: act = its input / output format (attn_in in channel granularity)
        q, sat = attention_qcfg(self.q), self._st.sat
        n, D, H = ins.rows, ins.k, ins.arg
        if H < 1 or D % H:
            raise ProgramError(ERR_ILLEGAL, pc, f"ATTENTION: k = {D} not divisible by heads {H}")
        src = self._buf(ins.src, pc, "ATTENTION src")
        dst = self._buf(ins.dst, pc, "ATTENTION dst")
        self._fits(src, ins.src.name, n, 3 * D, pc)
        self._fits(dst, ins.dst.name, n, D, pc)
        if n < 1:
            raise ProgramError(ERR_ILLEGAL, pc, "ATTENTION with 0 rows")
        dh, nm = D // H, f"pc{pc}.attn"
        qkv = requantize(src[:n, :3 * D], q.act, q.attn_in, q.rounding, q.overflow, sat, nm + ".attn_in")
        qh, kh, vh = (qkv[:, j * D:(j + 1) * D].reshape(n, H, dh).transpose(1, 0, 2) for j in range(3))
        s = requantize(exact_matmul(qh, kh.transpose(0, 2, 1)), Fmt(62, 2 * q.attn_in.frac), q.score,
                       q.rounding, q.overflow, sat, nm + ".score")
        if n not in self._orders:
            self._orders[n] = row_key_order(n, self.hw.attn_p)
        recip, m = approx.softmax_stats(s, self._orders[n], q, sat, nm)
        p = approx.softmax_normalise(s, m, recip, q, sat, nm)
        o = requantize(exact_matmul(p, vh), Fmt(62, q.prob.frac + q.attn_in.frac), q.act, q.rounding,
                       q.overflow, sat, nm + ".out")
        dst[:n, :D] = o.transpose(1, 0, 2).reshape(n, D)

    def _op_gate(self, ins, pc, regs, expert):
        src = self._buf(ins.src, pc, "GATE src")
        self._fits(src, ins.src.name, ins.rows, ins.n, pc)
        if not 1 <= ins.arg <= ins.n or ins.rows < 1:
            raise ProgramError(ERR_ILLEGAL, pc, f"GATE: top_k {ins.arg} must be in 1..{ins.n}, rows >= 1")
        idx, w, _ = approx.gate_fixed(src[:ins.rows, :ins.n], self.q, ins.arg, self._st.sat, f"pc{pc}.gate")
        self.queues = build_expert_queues(idx, w, ins.n)
        self.metaqueue = active_experts(self.queues)
        self._st.routing[pc] = idx

    def _op_store(self, ins, pc, regs, expert):
        src = self._buf(ins.src, pc, "STORE src")
        self._fits(src, ins.src.name, ins.rows, ins.k, pc)
        self._write(self._base(ins, regs), encode_values(src[:ins.rows, :ins.k], self.q.act, "STORE"), pc)


# ---------------------------------------------------------------------------------------------
# convenience: one image through a Program
# ---------------------------------------------------------------------------------------------
@dataclass
class InterpResult:
    features: np.ndarray      # [num_tokens, D] act codes read back from the OUTPUT region
    stats: RunStats
    output: np.ndarray | None = None   # the whole OUTPUT region (bytes), e.g. a debug program's taps


def image_codes(program: Program, image, sat=None) -> np.ndarray:
    """Float image [C,H,W] -> act codes (golden quantisation); integer arrays are taken as codes."""
    a = np.asarray(image)
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.int64)
    return quantise_image(program.cfg, program.qcfg, a, sat)


def run_program(program: Program, image, task, mem_base: int = 0x1000_0000) -> InterpResult:
    """Load the memory image at mem_base, write the image, run, read the features."""
    cfg, q = program.cfg, program.qcfg
    task = cfg.task_index(task)
    mem = FlatMemory(program.image_bytes, mem_base)
    mem.write(mem_base, program.image)
    reg = {n: mem_base + r.offset for n, r in program.regions.items()}
    patches = image_patch_codes(cfg, image_codes(program, image))
    mem.write(reg["image"], encode_values(patches, q.act, "image"))
    stats = Machine.for_program(program, mem).run(
        Registers(reg["program"], reg["weights"], reg["image"], reg["output"], task))
    n = cfg.num_tokens * cfg.dim
    out = decode_values(mem.read(reg["output"], n * container_bytes(q.act)), n, q.act)
    return InterpResult(out.reshape(cfg.num_tokens, cfg.dim), stats,
                        mem.read(reg["output"], program.regions["output"].size))
