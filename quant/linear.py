"""Golden function of one linear layer of the unified compute unit, in every mode, and the
weight-tile memory layout the unit reads (the compiler side of hw/compute.py).

One layer: y = epilogue(x_in @ W^T), W [N, K] integer codes (linear_w, or patch_w for the patch
embedding), x_in [rows, K] act codes. The epilogue, per output element, in this order:
    acc  = exact integer dot product                                   [acc]
    y    = requant_golden(acc, bias)   (bias aligned to acc, one rounding, saturate)
           to act, or to gate_logit for the router (no bias there)     [act | gate_logit]
    y    = gelu_fixed(y)                     if mode.gelu              [act]
    y    = fit(round(y * g >> gate_prob.frac))  if mode.gate           [act]
           (g = the row's gate weight in gate_prob codes)
    out  = fit(resid[dest] + y)              if mode.resid             [act]
Rows: row r of the layer reads x_in[r] = x[tokens[r]] when mode.gather (expert fc1: the queue's
token indices), else x[r]; its result goes to destination row dest[r] = tokens[r] when
mode.scatter (expert fc2: scatter-accumulate into the residual stream), else r.
This is exactly GoldenModel.linear / .mlp / .moe / .add of quant/golden.py, one layer at a time
(tests/test_compute_rtl.py checks it on the tiny model's layers); the order of the narrowing
steps is the datapath's. Every narrowing is counted per element (`LinearResult.sat`).

Weight stream layout (what the compiler writes to DRAM for the unit's AXI port, in read order):
for each output tile column j (T_out output channels), first the column's bias (when the mode
has one) in `bias_beats` beats, then for each input chunk c (T_in input features) the weight
tile in `tile_beats` beats. A tile is T_in rows i of T_out codes o, element e = i*T_out + o at
bits [e*W, (e+1)*W) of the tile's bit string (W = weight lane bits), tile element (i, o) =
W[j*T_out + o, c*T_in + i]; the bit string is cut into axi_data_bits beats, beat 0 = lowest
bits, the last beat zero-padded. Bias: lane o at bits [o*bias.bits, ...). Channels beyond N and
features beyond K are zero (zero weights make the pad lanes of x irrelevant and the pad lanes of
y zero).
Granularity "channel" (quant/channel.py): the column header comes first in every layer's stream,
router included (bias 0 there), and lane o holds bias | multiplier << bias.bits | shift <<
(bias.bits + mult_bits) in epi_bits = bias.bits + mult_bits + SHIFT_BITS; the requantize is then
quant.channel.channel_epilogue(acc, bias, M, S) to act (gelu_in for GELU modes, gate_logit for the
router, all of act's width) and the rest of the epilogue is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import approx
from .channel import SHIFT_BITS, channel_epilogue
from .config import QuantConfig
from .epilogue import requant_golden
from .fixed import Fmt, FormatError, SatCounter, shift_round
from .intmath import exact_matmul


@dataclass(frozen=True)
class LinearMode:
    """Flags of one linear layer. Every M3ViT linear layer is one of MODES."""
    name: str
    bias: bool = True      # bias beats in the weight stream, added before the requantize
    gelu: bool = False     # GELU after the requantize
    gate: bool = False     # multiply by the row's gate weight (gate_prob codes)
    resid: bool = False    # add into the destination row of the residual buffer
    logit: bool = False    # requantize to gate_logit instead of act (router logits)
    patch: bool = False    # weights in patch_w codes (patch embedding)
    gather: bool = False   # input row r is buffer row tokens[r]
    scatter: bool = False  # output row r goes to buffer row tokens[r]

    @property
    def queue(self) -> bool:
        """The layer needs the per-row token queue (tokens and gate weights)."""
        return self.gather or self.scatter or self.gate

    def __post_init__(self):
        if self.logit and (self.gelu or self.gate or self.resid):
            raise FormatError(f"linear mode '{self.name}': logit output cannot be combined with "
                              "gelu, gate or resid")
        if self.gate and not self.resid:
            raise FormatError(f"linear mode '{self.name}': gate needs resid (the weighted expert "
                              "output is scatter-accumulated)")


MODES: dict[str, LinearMode] = {m.name: m for m in (
    LinearMode("qkv"),                                        # plain: requant only
    LinearMode("patch_embed", patch=True),                    # flattened patches, patch_w
    LinearMode("proj", resid=True),                           # x = sat(x + proj)
    LinearMode("fc1", gelu=True),                             # dense MLP fc1 + GELU
    LinearMode("fc2", resid=True),                            # x = sat(x + fc2)
    LinearMode("router", bias=False, logit=True),             # gate logits, no bias
    LinearMode("expert_fc1", gelu=True, gather=True),         # h[tokens] -> hidden rows
    LinearMode("expert_fc2", gate=True, resid=True, scatter=True),  # x[t] += w * fc2
)}


def get_mode(mode) -> LinearMode:
    if isinstance(mode, LinearMode):
        return mode
    if mode not in MODES:
        raise FormatError(f"unknown linear mode {mode!r}; choose one of {sorted(MODES)}")
    return MODES[mode]


# ---------------------------------------------------------------------------------------------
# weight-tile layout
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileLayout:
    t_in: int
    t_out: int
    w_bits: int        # weight lane width: max(linear_w.bits, patch_w.bits) (signed codes)
    bias_bits: int
    axi_bits: int
    # granularity "channel": each header lane also carries the channel's epilogue multiplier
    # (mult_bits, unsigned) and shift (shift_bits, unsigned) above its bias; 0 = class layout
    mult_bits: int = 0
    shift_bits: int = 0

    @property
    def channel(self) -> bool:
        return self.mult_bits > 0

    @property
    def epi_bits(self) -> int:
        """Bits of one header lane: bias (+ multiplier + shift in the channel layout)."""
        return self.bias_bits + self.mult_bits + self.shift_bits

    def has_header(self, bias: bool) -> bool:
        """A column header is in the stream: the mode has a bias, or the layout is per channel
        (its multiplier and shift are needed with or without a bias; the bias is then 0)."""
        return bool(bias) or self.channel

    @property
    def tile_bits(self) -> int:
        return self.t_in * self.t_out * self.w_bits

    @property
    def tile_beats(self) -> int:
        return -(-self.tile_bits // self.axi_bits)

    @property
    def bias_beats(self) -> int:
        """Beats of one column header (t_out lanes of epi_bits)."""
        return -(-(self.t_out * self.epi_bits) // self.axi_bits)

    def chunks(self, k: int) -> int:
        return -(-k // self.t_in)

    def tiles(self, n: int) -> int:
        return -(-n // self.t_out)

    def stream_beats(self, k: int, n: int, bias: bool) -> int:
        """Beats of one layer's weight stream."""
        return self.tiles(n) * (self.chunks(k) * self.tile_beats +
                                (self.bias_beats if self.has_header(bias) else 0))


def tile_layout(qcfg: QuantConfig, hwcfg) -> TileLayout:
    """The one place that derives the weight stream geometry from the configs."""
    if qcfg.patch_w.frac != qcfg.linear_w.frac:
        raise FormatError(f"QuantConfig '{qcfg.name}': patch_w.frac {qcfg.patch_w.frac} != "
                          f"linear_w.frac {qcfg.linear_w.frac}: the compute unit has one "
                          "accumulator alignment for both")
    if not (qcfg.linear_w.signed and qcfg.patch_w.signed):
        raise FormatError(f"QuantConfig '{qcfg.name}': the compute unit needs signed weights")
    chan = qcfg.granularity == "channel"
    return TileLayout(hwcfg.t_in, hwcfg.t_out, max(qcfg.linear_w.bits, qcfg.patch_w.bits),
                      qcfg.bias.bits, hwcfg.axi_data_bits,
                      qcfg.mult_bits if chan else 0, SHIFT_BITS if chan else 0)


def header_lanes(b, n: int, layout: TileLayout, mult=None, shift=None) -> np.ndarray:
    """The column headers' lane values [tiles(n) * t_out] (non-negative ints of epi_bits): bias
    in the low bias_bits (two's complement), then multiplier and shift in the channel layout.
    Pad channels are 0 (their y is then 0 whatever the accumulator holds)."""
    nc = layout.tiles(n)
    out = np.zeros(nc * layout.t_out, dtype=np.int64)
    if b is not None:
        out[:n] = np.asarray(b, dtype=np.int64).reshape(-1) & ((1 << layout.bias_bits) - 1)
    if layout.channel:
        if mult is None or shift is None:
            raise FormatError("weight stream: the channel layout needs every channel's multiplier and shift")
        M = np.asarray(mult, dtype=np.int64).reshape(-1)
        S = np.asarray(shift, dtype=np.int64).reshape(-1)
        if M.shape != (n,) or S.shape != (n,):
            raise FormatError(f"weight stream: multiplier {M.shape} / shift {S.shape} != ({n},)")
        if M.min() < 0 or M.max() >= 1 << layout.mult_bits or S.min() < 0 or S.max() >= 1 << layout.shift_bits:
            raise FormatError(f"weight stream: multipliers in [{M.min()}, {M.max()}] or shifts in "
                              f"[{S.min()}, {S.max()}] outside {layout.mult_bits} / {layout.shift_bits} "
                              "unsigned bits")
        out[:n] |= (M << layout.bias_bits) | (S << (layout.bias_bits + layout.mult_bits))
    elif mult is not None or shift is not None:
        raise FormatError("weight stream: multipliers / shifts given for a class-granularity layout")
    return out


def split_header(lanes, layout: TileLayout):
    """Inverse of header_lanes: (bias signed, multiplier, shift) arrays (None, None in class)."""
    v = np.asarray(lanes, dtype=np.int64)
    BB = layout.bias_bits
    b = v & ((1 << BB) - 1)
    b = np.where(b >= 1 << (BB - 1), b - (1 << BB), b)
    if not layout.channel:
        return b, None, None
    M = (v >> BB) & ((1 << layout.mult_bits) - 1)
    S = (v >> (BB + layout.mult_bits)) & ((1 << layout.shift_bits) - 1)
    return b, M, S


def _pack(codes, bits: int) -> int:
    """Codes (flat, signed) into one integer, element e at bits [e*bits, (e+1)*bits)."""
    mask = (1 << bits) - 1
    word = 0
    for e, v in enumerate(np.asarray(codes, dtype=np.int64).tolist()):
        word |= (v & mask) << (e * bits)
    return word


def _beats(word: int, n_beats: int, axi_bits: int) -> list[int]:
    mask = (1 << axi_bits) - 1
    return [(word >> (b * axi_bits)) & mask for b in range(n_beats)]


def pad_weights(w, k_pad: int, n_pad: int) -> np.ndarray:
    w = np.asarray(w, dtype=np.int64)
    out = np.zeros((n_pad, k_pad), dtype=np.int64)
    out[:w.shape[0], :w.shape[1]] = w
    return out


def pack_weight_stream(w, b, layout: TileLayout, mult=None, shift=None) -> list[int]:
    """The layer's weight stream (list of axi beats as ints), in the order the unit reads it
    (module docstring). b is None for a mode without bias; mult / shift: the channel layout's
    epilogue integers per output channel."""
    w = np.asarray(w, dtype=np.int64)
    n, k = w.shape
    kc, nc = layout.chunks(k), layout.tiles(n)
    wp = pad_weights(w, kc * layout.t_in, nc * layout.t_out)
    scaled = mult is not None or shift is not None       # header_lanes refuses them in class layout
    hdr = header_lanes(b, n, layout, mult, shift) if layout.has_header(b is not None) or scaled else None
    beats = []
    for j in range(nc):
        if hdr is not None:
            beats += _beats(_pack(hdr[j * layout.t_out:(j + 1) * layout.t_out], layout.epi_bits),
                            layout.bias_beats, layout.axi_bits)
        for c in range(kc):
            tile = wp[j * layout.t_out:(j + 1) * layout.t_out, c * layout.t_in:(c + 1) * layout.t_in]
            beats += _beats(_pack(tile.T.reshape(-1), layout.w_bits), layout.tile_beats, layout.axi_bits)
    return beats


# ---------------------------------------------------------------------------------------------
# golden function
# ---------------------------------------------------------------------------------------------
@dataclass
class LinearResult:
    y: np.ndarray        # [rows, N] the values the unit emits (act, or gate_logit codes)
    dest: np.ndarray     # [rows] destination buffer row of each output row
    sat: np.ndarray      # [rows, N] narrowing events per element (0..3)
    resid: np.ndarray | None = None   # the residual buffer after the layer (resid modes)


def _in_range(name, q, fmt: Fmt):
    bad = (q < fmt.min_int) | (q > fmt.max_int)
    if bad.any():
        i = tuple(int(v) for v in np.argwhere(bad)[0])
        raise FormatError(f"linear: '{name}'[{i}] = {int(q[i])} outside {fmt}")


def channel_out_fmt(qcfg: QuantConfig, md: LinearMode) -> Fmt:
    """Format the channel epilogue writes: gate_logit (router), gelu_in (GELU modes), else act
    (qkv's attn_in codes have act's width: quant.channel.check_channel_datapath)."""
    return qcfg.gate_logit if md.logit else qcfg.gelu_in if md.gelu else qcfg.act


def linear_golden(x, w, b, qcfg: QuantConfig, mode, *, tokens=None, gate_w=None, resid=None,
                  rows: int | None = None, sat: SatCounter | None = None,
                  name: str = "linear", scale=None) -> LinearResult:
    """One layer in `mode` (a MODES key or LinearMode); see the module docstring.

    x: [rows_buf, K] source buffer (act codes); rows = len(tokens) with gather, else `rows`
    (default: all rows of x). w: [N, K] codes in linear_w (patch_w for patch modes); b: [N] bias
    codes or None (required iff mode.bias). tokens: [rows] int token indices (gather/scatter),
    gate_w: [rows] gate_prob codes (gate). resid: [rows_buf', N] act codes, the residual
    buffer (resid modes); it is not modified, the updated copy is returned. scale: granularity
    "channel" only, (multiplier [N], shift [N]) of the channel epilogue
    (quant.channel.channel_epilogue replaces the requantize; b = None means a zero bias).
    """
    q, md = qcfg, get_mode(mode)
    x = np.asarray(x, dtype=np.int64)
    w = np.asarray(w, dtype=np.int64)
    if x.ndim != 2 or w.ndim != 2 or w.shape[1] != x.shape[1]:
        raise FormatError(f"linear '{name}': x {x.shape} and w {w.shape} must be [rows, K] and [N, K]")
    n = w.shape[0]
    w_fmt = q.patch_w if md.patch else q.linear_w
    chan = q.granularity == "channel"
    if chan != (scale is not None):
        raise FormatError(f"linear '{name}': granularity '{q.granularity}' "
                          f"{'needs' if chan else 'takes no'} per-channel multipliers and shifts")
    if not chan and q.acc.frac != q.act.frac + w_fmt.frac:
        raise FormatError(f"QuantConfig '{q.name}': acc.frac {q.acc.frac} != act.frac + "
                          f"{'patch_w' if md.patch else 'linear_w'}.frac")
    _in_range("x", x, q.act)
    _in_range("w", w, w_fmt)
    if md.queue:
        if tokens is None:
            raise FormatError(f"linear '{name}': mode '{md.name}' needs tokens")
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if rows is not None and rows != len(tokens):
            raise FormatError(f"linear '{name}': rows {rows} != len(tokens) {len(tokens)}")
        rows = len(tokens)
    rows = x.shape[0] if rows is None else int(rows)
    if rows < 1:
        raise FormatError(f"linear '{name}': rows = {rows}; a layer needs at least one row")
    if md.gather:
        if tokens.min() < 0 or tokens.max() >= x.shape[0]:
            raise FormatError(f"linear '{name}': token index out of range 0..{x.shape[0] - 1}")
        xin = x[tokens]
    else:
        if rows > x.shape[0]:
            raise FormatError(f"linear '{name}': rows {rows} > x rows {x.shape[0]}")
        xin = x[:rows]
    dest = tokens if md.scatter else np.arange(rows, dtype=np.int64)

    if md.bias or (chan and b is not None):
        if b is None or np.shape(b) != (n,):
            raise FormatError(f"linear '{name}': mode '{md.name}' needs a bias of shape ({n},)")
        bias = np.broadcast_to(np.asarray(b, dtype=np.int64), (rows, n))
    else:
        if b is not None:
            raise FormatError(f"linear '{name}': mode '{md.name}' has no bias")
        bias = np.zeros((rows, n), dtype=np.int64)

    acc = exact_matmul(xin, w.T)
    if chan:
        mult, shift = (np.asarray(a, dtype=np.int64).reshape(-1) for a in scale)
        if mult.shape != (n,) or shift.shape != (n,):
            raise FormatError(f"linear '{name}': multiplier {mult.shape} / shift {shift.shape} != ({n},)")
        y, over = channel_epilogue(acc, bias, mult, shift, channel_out_fmt(q, md), q)
        events = over.astype(np.int64)
    else:
        rq = q.replace(act=q.gate_logit) if md.logit else q
        y, s = requant_golden(acc[..., None], bias[..., None], rq, name=name)
        y, events = y[..., 0], s.copy()        # per element: the lane axis has length 1
    if sat is not None:
        sat.add(name, int(events.sum()), events.size)

    if md.gelu:   # relu(y) - d(|y|), d in [0, 0.17]: stays in act when gelu_in == act (no count)
        y = approx.gelu_fixed(y, q, sat, name + ".gelu")
    if md.gate:
        if gate_w is None:
            raise FormatError(f"linear '{name}': mode '{md.name}' needs gate_w")
        g = np.asarray(gate_w, dtype=np.int64).reshape(-1)
        if g.shape != (rows,):
            raise FormatError(f"linear '{name}': gate_w shape {g.shape} != ({rows},)")
        _in_range("gate_w", g, q.gate_prob)
        r = shift_round(y * g[:, None], q.gate_prob.frac, q.rounding)
        events += (r < q.act.min_int) | (r > q.act.max_int)
        y = q.act.fit(r, q.overflow, sat, name + ".weighted")
    out_resid = None
    if md.resid:
        if resid is None:
            raise FormatError(f"linear '{name}': mode '{md.name}' needs the residual buffer")
        out_resid = np.array(resid, dtype=np.int64)
        if out_resid.ndim != 2 or out_resid.shape[1] != n or dest.max() >= out_resid.shape[0]:
            raise FormatError(f"linear '{name}': residual buffer {out_resid.shape} cannot take rows "
                              f"up to {int(dest.max())} of {n} channels")
        if len(np.unique(dest)) != len(dest):
            raise FormatError(f"linear '{name}': destination rows repeat within one layer")
        _in_range("resid", out_resid, q.act)
        t = out_resid[dest] + y
        events += (t < q.act.min_int) | (t > q.act.max_int)
        y = q.act.fit(t, q.overflow, sat, name + ".resid")
        out_resid[dest] = y
    return LinearResult(y, dest, events, out_resid)
