"""The accelerator's program: instruction set, binary encoding, memory image, storage on disk.

This module is the contract between the compiler (quant/compiler.py), the Python executor
(quant/interpreter.py), the host driver (sim/driver.py) and the RTL controller (to come).

Instruction set (ISA_VERSION 1)
===============================
Every instruction is 8 little-endian 32-bit words (INSTR_BYTES = 32 bytes, one beat of a 256-bit
AXI port), fetched from PROGRAM_BASE + 32 * pc. All instructions share one field layout:

  word  bits    field    meaning
  w0    7:0     op       opcode (Op); 0 is illegal, so zeroed memory never executes
  w0    15:8    flags    LINEAR: the LinearMode flags (Flag); LOAD_ROWS: bit 0 = ADD; else 0
  w0    19:16   dst      destination on-chip buffer (Buf)
  w0    23:20   src      source on-chip buffer (Buf)
  w0    25:24   base     which base register `addr` is relative to (Base)
  w0    27:26   index    address index: none / TASK_ID register / current expert (Index)
  w0    31:28   -        reserved, 0
  w1    31:0    addr     byte offset from the base register (beat aligned)
  w2    31:0    stride   bytes added to addr per index step: addr + index_value * stride
  w3    15:0    rows     token rows processed (queue modes: 0, the expert queue gives them)
  w3    31:16   row_off  first destination row (LINEAR / LOAD_ROWS)
  w4    15:0    k        input width (values per row)
  w4    31:16   n        output width (LINEAR, GATE: number of experts)
  w5    15:0    arg      ATTENTION: heads; GATE: top_k; EXPERT_LOOP: body length
  w5    31:16   -        reserved, 0
  w6, w7        -        reserved, 0
Fields an opcode does not use (USED below) must be 0: the decoder rejects anything else, so a
corrupted program stops with an error instead of computing garbage.

On-chip buffers (Buf), each act_buffer_tokens rows (quant.compiler.buffer_plan gives widths/BRAM):
  X  residual stream   [rows, D]            act codes
  H  LayerNorm output / attention output [rows, D]   act codes
  W  wide buffer       [rows, max(3D, mlp_hidden, expert_hidden, C*p*p)]: QKV, MLP hidden,
                       expert hidden, image patches (never live at the same time)
  L  gate logits       [rows, E]            gate_logit codes
  plus, internal to their units: the expert queues + metaqueue (GATE -> EXPERT_LOOP), the score
  matrix and softmax statistics of one head (ATTENTION).

Opcodes (semantics; rows r < rows, "fit" = saturate to act per qcfg.overflow, counted):
  LOAD_ROWS  dst[row_off+r, :k] = M[r, :k]  (flags ADD: = fit(dst + M)); M = rows x k act codes
             at base+addr, row-major, act containers (see "Data in memory").
  LAYERNORM  dst[r, :k] = layernorm_fixed(src[r, :k], gamma, beta); gamma: k ln_gamma codes at
             base+addr, beta: k ln_beta codes at the next beat boundary after gamma.
  LINEAR     quant.linear.linear_golden in the mode given by flags (BIAS GELU GATE RESID LOGIT
             PATCH GATHER SCATTER, the fields of quant.linear.LinearMode), weights [n, k] (+ bias)
             as the compute unit's weight stream (quant.linear layout) at
             base + addr + index_value * stride. Input row r = src[r] (GATHER: src[token[r]]);
             result row r -> dst[row_off + r] (SCATTER: dst[token[r]]); RESID adds into that dst
             row; GATE scales by the row's gate weight; LOGIT writes gate_logit codes (dst = L).
             With GATHER / SCATTER / GATE the rows are the current expert's queue (rows = 0,
             row_off = 0, only inside an EXPERT_LOOP body).
  ATTENTION  all heads of softmax(Q.K^T) V: src = W[:rows, :3k] = [Q | K | V] act codes (head h
             in columns h*dh..(h+1)*dh of each, dh = k / arg), requantised to attn_in (granularity
             "channel": src is already attn_in codes and dst stays in attn_in codes,
             quant.channel.attention_qcfg); scores to
             `score` (Q carries log2(e)/sqrt(dh)); online softmax statistics in the key order
             quant.schedule.row_key_order(rows, HWConfig.attn_p); p = 2**(s-m) * (1/S) in prob;
             dst[:rows, :k] = requant(p @ V) in act.
  GATE       router softmax + top-k over src = L[:rows, :n] (quant.approx.gate_fixed, top_k =
             arg), then the expert queues and metaqueue (quant.schedule.build_expert_queues).
  EXPERT_LOOP  runs the next `arg` instructions once per expert of the metaqueue (increasing
             expert id; the Index.EXPERT value is that id), then continues after them. Only the
             experts with a non-empty queue are run, so only their weights are fetched.
  STORE      M[r, :k] at base+addr = src[r, :k] (act containers).
  END        stops; STATUS.done.

Data in memory (all little-endian, two's complement for signed formats)
-----------------------------------------------------------------------
  * act / ln_gamma / ln_beta values ("containers"): each code in the smallest of 1, 2, 4, 8
    bytes that holds the format's bits, sign-extended (zero-extended if unsigned). Rows are
    packed (row pitch = k * container bytes); a vector or row block starts on a beat boundary.
  * weight streams: bit-packed exactly as quant.linear documents (pack_weight_stream): per output
    tile column, the bias (t_out lanes x bias.bits) then kc tiles of t_in x t_out codes at
    max(linear_w, patch_w).bits each (granularity "channel": every column has a header whose
    lanes carry bias, multiplier and shift, quant.linear.header_lanes), every part padded to
    whole axi_data_bits beats; beat b of a
    part is bytes [b*B, (b+1)*B) (B = axi_data_bits / 8), bit i of the part is bit i%8 of byte
    i//8. weight_stream() here is the vectorised twin of quant.linear.pack_weight_stream (tested
    byte-equal).
  * IMAGE region: the quantised image as patch rows [num_patches, C*p*p] (act containers), patch
    (gy, gx) at row gy*grid_w + gx, features in (c, ky, kx) order: the host does this im2col
    (image_patch_codes), the accelerator then reads plain rows.
  * OUTPUT region: features [num_tokens, D] act containers (class token first).

Memory image and address map
----------------------------
One byte image holds four regions, each starting on a REGION_ALIGN (4 KiB) boundary in this
order: program, weights, image, output. Instructions address memory only relative to the base
registers (PROGRAM_BASE, WEIGHTS_BASE, IMAGE_BASE, OUTPUT_BASE), so the image is relocatable and
the host may place the image and output regions elsewhere. Inside the weights region every
parameter block (Symbol) starts on a beat boundary; stacked blocks (the routers of all tasks,
the experts of one layer) are `count` items `stride` bytes apart. Every task's router is in the
image and the task is the TASK_ID register: switching task rewrites one register, nothing else.

On disk (FORMAT_VERSION 1): a directory with program.json (format, versions, the three configs,
regions, symbols, instructions with names and encoded words, image size and sha256) and
image.bin (the whole memory image). load_program() checks the hash and that the program region
decodes to the listed instructions.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from pathlib import Path

import numpy as np

from .config import QuantConfig
from .fixed import Fmt, FormatError
from .linear import TileLayout, header_lanes, pad_weights, split_header

FORMAT_NAME = "edgemoe-program"
FORMAT_VERSION = 1
ISA_VERSION = 1
INSTR_WORDS = 8
INSTR_BYTES = 4 * INSTR_WORDS
REGION_ALIGN = 4096
REGIONS = ("program", "weights", "image", "output")


class Op(IntEnum):
    LOAD_ROWS = 1
    LAYERNORM = 2
    LINEAR = 3
    ATTENTION = 4
    GATE = 5
    EXPERT_LOOP = 6
    STORE = 7
    END = 8


class Buf(IntEnum):
    NONE = 0
    X = 1
    H = 2
    W = 3
    L = 4


class Base(IntEnum):
    WEIGHTS = 0
    IMAGE = 1
    OUTPUT = 2


class Index(IntEnum):
    NONE = 0
    TASK = 1
    EXPERT = 2


class Flag(IntFlag):
    """LINEAR flags: one bit per quant.linear.LinearMode field."""
    BIAS = 1
    GELU = 2
    GATE = 4
    RESID = 8
    LOGIT = 16
    PATCH = 32
    GATHER = 64
    SCATTER = 128


LOAD_ADD = 1          # LOAD_ROWS flag: saturating add into the buffer instead of a copy

# fields each opcode uses; all others must be zero
USED: dict[Op, frozenset] = {
    Op.LOAD_ROWS: frozenset({"flags", "dst", "base", "addr", "rows", "row_off", "k"}),
    Op.LAYERNORM: frozenset({"dst", "src", "base", "addr", "rows", "k"}),
    Op.LINEAR: frozenset({"flags", "dst", "src", "base", "index", "addr", "stride", "rows",
                          "row_off", "k", "n"}),
    Op.ATTENTION: frozenset({"dst", "src", "rows", "k", "arg"}),
    Op.GATE: frozenset({"src", "rows", "n", "arg"}),
    Op.EXPERT_LOOP: frozenset({"arg"}),
    Op.STORE: frozenset({"src", "base", "addr", "rows", "k"}),
    Op.END: frozenset(),
}

# field -> (word, low bit, width)
FIELDS: dict[str, tuple[int, int, int]] = {
    "op": (0, 0, 8), "flags": (0, 8, 8), "dst": (0, 16, 4), "src": (0, 20, 4),
    "base": (0, 24, 2), "index": (0, 26, 2),
    "addr": (1, 0, 32), "stride": (2, 0, 32),
    "rows": (3, 0, 16), "row_off": (3, 16, 16),
    "k": (4, 0, 16), "n": (4, 16, 16),
    "arg": (5, 0, 16),
}
_RESERVED = {0: 0xF000_0000, 5: 0xFFFF_0000, 6: 0xFFFF_FFFF, 7: 0xFFFF_FFFF}

# error codes (the ERROR_CODE register of the controller; ProgramError.code)
ERR_ILLEGAL = 1       # bad opcode, reserved bits, unused field, enum value or flag combination
ERR_ADDRESS = 2       # memory access outside the memory or not beat aligned
ERR_BUFFER = 3        # rows / widths beyond an on-chip buffer
ERR_LOOP = 4          # EXPERT_LOOP / queue misuse
ERR_RUNAWAY = 5       # no END within the instruction limit
ERR_DATA = 6          # a value outside its format in memory (e.g. an image code)
ERROR_NAMES = {ERR_ILLEGAL: "illegal instruction", ERR_ADDRESS: "bad address",
               ERR_BUFFER: "buffer overflow", ERR_LOOP: "expert loop misuse",
               ERR_RUNAWAY: "runaway program", ERR_DATA: "bad data"}


class ProgramError(ValueError):
    """An instruction or memory image the controller cannot execute (code: ERROR_CODE)."""

    def __init__(self, code: int, pc: int | None, msg: str):
        where = f"pc {pc}: " if pc is not None else ""
        super().__init__(f"{ERROR_NAMES.get(code, 'error')} ({code}): {where}{msg}")
        self.code, self.pc = code, pc


@dataclass(frozen=True)
class Instr:
    op: Op
    flags: int = 0
    dst: Buf = Buf.NONE
    src: Buf = Buf.NONE
    base: Base = Base.WEIGHTS
    index: Index = Index.NONE
    addr: int = 0
    stride: int = 0
    rows: int = 0
    row_off: int = 0
    k: int = 0
    n: int = 0
    arg: int = 0

    def check(self, pc: int | None = None) -> "Instr":
        """Field ranges and the unused-fields-are-zero rule; raises ProgramError(ERR_ILLEGAL)."""
        for f, (_, _, width) in FIELDS.items():
            v = int(getattr(self, f))
            if not 0 <= v < (1 << width):
                raise ProgramError(ERR_ILLEGAL, pc, f"{Op(self.op).name}: field '{f}' = {v} does "
                                   f"not fit {width} bits")
        for f in FIELDS:
            if f != "op" and f not in USED[self.op] and int(getattr(self, f)) != 0:
                raise ProgramError(ERR_ILLEGAL, pc, f"{Op(self.op).name}: field '{f}' = "
                                   f"{int(getattr(self, f))} is unused by this opcode and must be 0")
        if self.op is Op.LOAD_ROWS and self.flags & ~LOAD_ADD:
            raise ProgramError(ERR_ILLEGAL, pc, f"LOAD_ROWS: flags {self.flags:#x}: only ADD (1)")
        return self

    def encode(self) -> list[int]:
        self.check()
        words = [0] * INSTR_WORDS
        for f, (w, lo, width) in FIELDS.items():
            words[w] |= int(getattr(self, f)) << lo
        return words

    def to_bytes(self) -> bytes:
        return np.asarray(self.encode(), dtype="<u4").tobytes()

    @classmethod
    def decode(cls, words, pc: int | None = None) -> "Instr":
        words = [int(w) for w in words]
        if len(words) != INSTR_WORDS:
            raise ProgramError(ERR_ILLEGAL, pc, f"instruction has {len(words)} words, expected {INSTR_WORDS}")
        for w, mask in _RESERVED.items():
            if words[w] & mask:
                raise ProgramError(ERR_ILLEGAL, pc, f"reserved bits set in word {w}: {words[w]:#010x}")
        v = {f: (words[w] >> lo) & ((1 << width) - 1) for f, (w, lo, width) in FIELDS.items()}
        try:
            v["op"] = Op(v["op"])
            v["dst"], v["src"] = Buf(v["dst"]), Buf(v["src"])
            v["base"], v["index"] = Base(v["base"]), Index(v["index"])
        except ValueError as e:
            raise ProgramError(ERR_ILLEGAL, pc, f"{e} (words {[hex(w) for w in words]})") from None
        return cls(**v).check(pc)

    @classmethod
    def from_bytes(cls, data, pc: int | None = None) -> "Instr":
        return cls.decode(np.frombuffer(bytes(data), dtype="<u4"), pc)

    def to_dict(self) -> dict:
        d = {"op": self.op.name}
        for f in FIELDS:
            if f != "op" and f in USED[self.op]:
                v = getattr(self, f)
                d[f] = v.name if isinstance(v, (Buf, Base, Index)) else int(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Instr":
        kw = dict(d)
        kw["op"] = Op[kw["op"]]
        for f, enum in (("dst", Buf), ("src", Buf), ("base", Base), ("index", Index)):
            if f in kw:
                kw[f] = enum[kw[f]]
        return cls(**kw)

    def __str__(self) -> str:
        op = self.op
        parts = [f"{op.name:<11}"]
        if "src" in USED[op] or "dst" in USED[op]:
            to = "queues" if op is Op.GATE else self.dst.name if "dst" in USED[op] else "mem"
            parts.append(f"{self.src.name if 'src' in USED[op] else 'mem'}->{to}")
        for f in ("rows", "row_off", "k", "n", "arg"):
            if f in USED[op] and getattr(self, f):
                parts.append(f"{f}={getattr(self, f)}")
        if op is Op.LINEAR and self.flags:
            parts.append("flags=" + "|".join(fl.name for fl in Flag if self.flags & fl))
        if op is Op.LOAD_ROWS and self.flags & LOAD_ADD:
            parts.append("ADD")
        if "addr" in USED[op]:
            a = f"@{self.base.name}+{self.addr:#x}"
            if self.index is not Index.NONE:
                a += f"+{self.index.name}*{self.stride:#x}"
            parts.append(a)
        return " ".join(parts)


def linear_flags(mode) -> int:
    """Flag bits of a quant.linear.LinearMode."""
    return sum(int(fl) for fl in Flag if getattr(mode, fl.name.lower()))


def linear_mode(flags: int):
    from .linear import LinearMode
    return LinearMode(f"flags={flags:#04x}", **{fl.name.lower(): bool(flags & fl) for fl in Flag})


# ---------------------------------------------------------------------------------------------
# data layout helpers
# ---------------------------------------------------------------------------------------------
def container_bytes(fmt: Fmt) -> int:
    """Bytes of one value in memory: the smallest of 1, 2, 4, 8 holding fmt.bits."""
    for c in (1, 2, 4, 8):
        if fmt.bits <= 8 * c:
            return c
    raise FormatError(f"format {fmt}: wider than 64 bits")


def align(x: int, a: int) -> int:
    return -(-x // a) * a


def encode_values(codes, fmt: Fmt, name: str = "values") -> np.ndarray:
    """Integer codes -> uint8 little-endian containers (module docstring). Refuses codes outside fmt."""
    q = np.asarray(codes, dtype=np.int64).reshape(-1)
    if q.size and (q.min() < fmt.min_int or q.max() > fmt.max_int):
        i = int(np.flatnonzero((q < fmt.min_int) | (q > fmt.max_int))[0])
        raise FormatError(f"'{name}': code {int(q[i])} at flat index {i} outside format {fmt}")
    cb = container_bytes(fmt)
    return q.astype("<i8").view(np.uint8).reshape(-1, 8)[:, :cb].reshape(-1).copy()


def decode_values(data, count: int, fmt: Fmt) -> np.ndarray:
    cb = container_bytes(fmt)
    raw = np.frombuffer(bytes(data[:count * cb]) if not isinstance(data, np.ndarray)
                        else data[:count * cb].tobytes(), dtype=f"<{'i' if fmt.signed else 'u'}{cb}")
    if raw.size != count:
        raise FormatError(f"decode_values: {raw.size} values in the data, expected {count}")
    return raw.astype(np.int64)


def pack_bits(codes2d, bits: int, nbytes: int) -> np.ndarray:
    """[rows, m] codes -> uint8 [rows, nbytes]: element e of a row at bits [e*bits, (e+1)*bits)
    of the row's little-endian bit string (two's complement, truncated to `bits`), zero padded."""
    c = np.asarray(codes2d, dtype=np.int64)
    rows, m = c.shape
    if bits % 8 == 0:
        b = c.astype("<i8").view(np.uint8).reshape(rows, m, 8)[:, :, :bits // 8].reshape(rows, -1)
    else:
        bb = ((c[:, :, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(rows, m * bits)
        b = np.packbits(bb, axis=1, bitorder="little")
    if b.shape[1] > nbytes:
        raise FormatError(f"pack_bits: {m} x {bits} bits do not fit {nbytes} bytes")
    out = np.zeros((rows, nbytes), dtype=np.uint8)
    out[:, :b.shape[1]] = b
    return out


def unpack_bits(u8, m: int, bits: int, signed: bool = True) -> np.ndarray:
    """Inverse of pack_bits: uint8 [rows, nbytes] -> int64 [rows, m]."""
    u8 = np.asarray(u8, dtype=np.uint8)
    rows = u8.shape[0]
    if bits in (8, 16, 32, 64):
        raw = np.ascontiguousarray(u8[:, :m * bits // 8])
        return raw.view(f"<{'i' if signed else 'u'}{bits // 8}").astype(np.int64).reshape(rows, m)
    if bits % 8 == 0:
        cb = bits // 8
        b = u8[:, :m * cb].reshape(rows, m, cb).astype(np.int64)
        v = np.zeros((rows, m), dtype=np.int64)
        for i in range(cb):
            v |= b[..., i] << (8 * i)
    else:
        bb = np.unpackbits(u8, axis=1, bitorder="little")[:, :m * bits].reshape(rows, m, bits)
        v = (bb.astype(np.int64) << np.arange(bits)).sum(axis=-1)
    if signed and bits < 64:
        v = np.where(v >= (1 << (bits - 1)), v - (1 << bits), v)
    return v


def stream_bytes(layout: TileLayout, k: int, n: int, bias: bool) -> int:
    return layout.stream_beats(k, n, bias) * (layout.axi_bits // 8)


def weight_stream(w, b, layout: TileLayout, w_fmt: Fmt | None = None, bias_fmt: Fmt | None = None,
                  name: str = "weights", mult=None, shift=None) -> np.ndarray:
    """One layer's weight stream as bytes (uint8), identical to
    b''.join(beat.to_bytes(B, 'little') for beat in quant.linear.pack_weight_stream(w, b, layout,
    mult, shift)). mult / shift: the channel layout's epilogue integers per output channel."""
    w = np.asarray(w, dtype=np.int64)
    if w.ndim != 2:
        raise FormatError(f"'{name}': weights must be [N, K], got shape {w.shape}")
    # codes outside the lane format would be truncated by the packing: refuse them
    for nm, a, f in (("weights", w, w_fmt or Fmt(layout.w_bits, 0)),
                     ("bias", b, bias_fmt or Fmt(layout.bias_bits, 0))):
        if a is not None:
            a = np.asarray(a, dtype=np.int64)
            if a.size and (a.min() < f.min_int or a.max() > f.max_int):
                raise FormatError(f"'{name}' {nm}: codes in [{a.min()}, {a.max()}] outside format {f}")
    n, k = w.shape
    kc, nc, B = layout.chunks(k), layout.tiles(n), layout.axi_bits // 8
    wp = pad_weights(w, kc * layout.t_in, nc * layout.t_out)
    tiles = wp.reshape(nc, layout.t_out, kc, layout.t_in).transpose(0, 2, 3, 1)
    tb = pack_bits(tiles.reshape(nc * kc, layout.t_in * layout.t_out), layout.w_bits,
                   layout.tile_beats * B).reshape(nc, kc * layout.tile_beats * B)
    if b is not None and np.shape(b) != (n,):
        raise FormatError(f"'{name}': bias shape {np.shape(b)} != ({n},)")
    if layout.has_header(b is not None) or mult is not None or shift is not None:
        try:    # (header_lanes refuses multipliers for a class-granularity layout)
            hdr = header_lanes(b, n, layout, mult, shift)
        except FormatError as e:
            raise FormatError(f"'{name}': {e}") from None
        bb = pack_bits(hdr.reshape(nc, layout.t_out), layout.epi_bits, layout.bias_beats * B)
        tb = np.concatenate([bb, tb], axis=1)
    return tb.reshape(-1)


def unpack_weight_stream(data, k: int, n: int, bias: bool, layout: TileLayout, scales: bool = False):
    """Inverse of weight_stream: bytes -> (w [n, k], b [n] or None), with scales=True
    (w, b, mult [n] or None, shift [n] or None). Reads exactly stream_bytes(layout, k, n, bias)
    bytes; padding lanes are dropped. In the channel layout a bias-less mode's header bias (0)
    is returned as b."""
    B = layout.axi_bits // 8
    kc, nc = layout.chunks(k), layout.tiles(n)
    u8 = np.frombuffer(bytes(data), dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    need = stream_bytes(layout, k, n, bias)
    if u8.size < need:
        raise FormatError(f"weight stream: {u8.size} bytes, need {need}")
    col = u8[:need].reshape(nc, -1)
    hdr = layout.has_header(bias)
    bb = layout.bias_beats * B if hdr else 0
    b = M = S = None
    if hdr:
        lanes = unpack_bits(col[:, :bb], layout.t_out, layout.epi_bits, signed=False).reshape(-1)[:n]
        b, M, S = split_header(lanes, layout)
    tiles = unpack_bits(col[:, bb:].reshape(nc * kc, layout.tile_beats * B),
                        layout.t_in * layout.t_out, layout.w_bits)
    wp = tiles.reshape(nc, kc, layout.t_in, layout.t_out).transpose(0, 3, 1, 2)
    w = wp.reshape(nc * layout.t_out, kc * layout.t_in)[:n, :k]
    return (w, b, M, S) if scales else (w, b)


def quantise_image(cfg, qcfg: QuantConfig, image, sat=None) -> np.ndarray:
    """Float image [C, H, W] -> act codes, exactly as GoldenModel.patch_embed quantises it."""
    img = np.asarray(image, dtype=np.float64)
    if img.shape != (cfg.in_chans, cfg.img_h, cfg.img_w):
        raise ValueError(f"image shape {img.shape} != expected {(cfg.in_chans, cfg.img_h, cfg.img_w)} "
                         f"for model '{cfg.name}'")
    return qcfg.act.quantize(img, overflow=qcfg.overflow, sat=sat, name="input")


def image_patch_codes(cfg, codes) -> np.ndarray:
    """Act codes [C, H, W] -> the IMAGE region's patch rows [num_patches, C*p*p] (host im2col,
    the same flattening as GoldenModel.patch_embed)."""
    x = np.asarray(codes, dtype=np.int64)
    if x.shape != (cfg.in_chans, cfg.img_h, cfg.img_w):
        raise ValueError(f"image codes shape {x.shape} != expected {(cfg.in_chans, cfg.img_h, cfg.img_w)} "
                         f"for model '{cfg.name}'")
    p, (gh, gw) = cfg.patch, cfg.grid
    return x.reshape(cfg.in_chans, gh, p, gw, p).transpose(1, 3, 0, 2, 4).reshape(gh * gw, -1)


# ---------------------------------------------------------------------------------------------
# the program object
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Region:
    name: str
    offset: int      # bytes from the start of the memory image (REGION_ALIGN aligned)
    size: int        # bytes (REGION_ALIGN multiple)


@dataclass(frozen=True)
class Symbol:
    """One parameter block in the weights region (offset relative to WEIGHTS_BASE)."""
    name: str
    kind: str        # "rows" (act rows), "ln" (gamma|beta), "stream" (weight stream)
    offset: int
    size: int        # bytes of one item (beat padded)
    count: int = 1   # stacked items (tasks' routers, experts)
    stride: int = 0  # bytes between items (count > 1)
    rows: int = 0    # "rows": rows x k values
    k: int = 0
    n: int = 0       # "stream": output channels
    bias: bool = False
    patch: bool = False

    @property
    def total(self) -> int:
        return self.size if self.count == 1 else self.count * self.stride


def config_hash(qcfg: QuantConfig, hwcfg) -> int:
    """32-bit identity of the hardware a program is compiled for (the CONFIG_HASH register):
    crc32 of the canonical JSON of the QuantConfig's datapath fields and the HWConfig. The
    preset's name and its weight rounding are left out: they choose codes, not hardware (a
    w8a16-gptq program runs on a w8a16-channel bitstream)."""
    q = {k: v for k, v in qcfg.to_dict().items() if k not in ("name", "weight_rounding")}
    s = json.dumps({"quant": q, "hw": hwcfg.to_dict()}, sort_keys=True)
    return zlib.crc32(s.encode())


@dataclass
class Program:
    cfg: object                 # ModelConfig
    qcfg: QuantConfig
    hwcfg: object               # HWConfig
    instrs: list[Instr]
    names: list[str]            # what each instruction computes (e.g. blocks.1.mlp.expert_fc1)
    regions: dict[str, Region]
    symbols: dict[str, Symbol]
    image: np.ndarray = field(repr=False)   # uint8: the whole memory image

    @property
    def config_hash(self) -> int:
        return config_hash(self.qcfg, self.hwcfg)

    @property
    def image_bytes(self) -> int:
        return int(self.image.size)

    def words(self) -> np.ndarray:
        return np.concatenate([np.asarray(i.encode(), dtype=np.uint32) for i in self.instrs])

    def listing(self) -> str:
        return "\n".join(f"{pc:4d}  {str(ins):<70} {nm}"
                         for pc, (ins, nm) in enumerate(zip(self.instrs, self.names)))

    def address_map(self) -> str:
        lines = [f"{'region':<8} {'offset':>12} {'size':>12}"]
        for r in self.regions.values():
            lines.append(f"{r.name:<8} {r.offset:#12x} {r.size:>12,}")
        return "\n".join(lines)

    def region_bytes(self, name: str) -> np.ndarray:
        r = self.regions[name]
        return self.image[r.offset:r.offset + r.size]

    def symbol_bytes(self, name: str, item: int = 0) -> np.ndarray:
        s = self.symbols[name]
        if not 0 <= item < s.count:
            raise IndexError(f"symbol '{name}' has {s.count} items, not {item}")
        o = self.regions["weights"].offset + s.offset + item * s.stride
        return self.image[o:o + s.size]

    # --- disk format ---------------------------------------------------------------------------
    def save(self, out) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        img = np.ascontiguousarray(self.image, dtype=np.uint8)
        (out / "image.bin").write_bytes(img.tobytes())
        meta = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "isa_version": ISA_VERSION,
            "instr_bytes": INSTR_BYTES, "region_align": REGION_ALIGN,
            "model": _model_to_dict(self.cfg), "quant": self.qcfg.to_dict(), "hw": self.hwcfg.to_dict(),
            "config_hash": self.config_hash,
            "regions": [dataclasses.asdict(r) for r in self.regions.values()],
            "symbols": [dataclasses.asdict(s) for s in self.symbols.values()],
            "instructions": [dict(ins.to_dict(), name=nm, words=[f"{w:#010x}" for w in ins.encode()])
                             for ins, nm in zip(self.instrs, self.names)],
            "image_bytes": int(img.size), "image_sha256": hashlib.sha256(img.tobytes()).hexdigest(),
        }
        (out / "program.json").write_text(json.dumps(meta, indent=1))
        return out


def _model_to_dict(cfg) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def _model_from_dict(d: dict):
    from edgemoe.model.config import ModelConfig
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"program.json: model config has unknown field(s) {unknown}")
    return ModelConfig(**{k: tuple(v) if str(fields[k].type).startswith("tuple") else v
                          for k, v in d.items()})


def load_program(path) -> Program:
    """Read a directory written by Program.save; verifies version, size, hash and program words."""
    from edgemoe.hw.config import HWConfig
    path = Path(path)
    meta_p, img_p = path / "program.json", path / "image.bin"
    for p in (meta_p, img_p):
        if not p.is_file():
            raise FileNotFoundError(f"{path}: missing {p.name} (expected a directory written by Program.save)")
    meta = json.loads(meta_p.read_text())
    if meta.get("format") != FORMAT_NAME or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_p}: format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                         f"this toolkit reads {FORMAT_NAME!r} version {FORMAT_VERSION}")
    if meta.get("isa_version") != ISA_VERSION:
        raise ValueError(f"{meta_p}: ISA version {meta.get('isa_version')} != {ISA_VERSION}")
    img = np.frombuffer(img_p.read_bytes(), dtype=np.uint8).copy()
    if img.size != meta["image_bytes"]:
        raise ValueError(f"{img_p}: {img.size} bytes, program.json says {meta['image_bytes']}")
    if hashlib.sha256(img.tobytes()).hexdigest() != meta["image_sha256"]:
        raise ValueError(f"{img_p}: sha256 differs from program.json (image modified or truncated)")
    cfg = _model_from_dict(meta["model"])
    qcfg = QuantConfig.from_dict(meta["quant"])
    hwcfg = HWConfig(**meta["hw"])
    regions = {r["name"]: Region(**r) for r in meta["regions"]}
    symbols = {s["name"]: Symbol(**s) for s in meta["symbols"]}
    instrs, names = [], []
    for d in meta["instructions"]:
        d = dict(d)
        names.append(d.pop("name"))
        words = [int(w, 16) for w in d.pop("words")]
        ins = Instr.from_dict(d).check(len(instrs))
        if ins.encode() != words:
            raise ValueError(f"{meta_p}: instruction {len(instrs)} fields do not match its words")
        instrs.append(ins)
    prog = Program(cfg, qcfg, hwcfg, instrs, names, regions, symbols, img)
    o = regions["program"].offset
    for pc, ins in enumerate(instrs):
        got = Instr.from_bytes(img[o + pc * INSTR_BYTES:o + (pc + 1) * INSTR_BYTES], pc)
        if got != ins:
            raise ValueError(f"{img_p}: program region instruction {pc} decodes to {got}, "
                             f"program.json lists {ins}")
    if meta.get("config_hash") != prog.config_hash:
        raise ValueError(f"{meta_p}: config_hash {meta.get('config_hash')} != recomputed {prog.config_hash}")
    return prog
