"""AccelPlan: the shared geometry of the accelerator top (hw/accel.py) and its op engines.

The top is generated for one (ModelConfig, QuantConfig, HWConfig): the attention, LayerNorm and
gate units have their shapes fixed at generation (num_tokens, heads, head_dim, dim, experts,
top_k), and the controller rejects an instruction whose shape differs (ERR_ILLEGAL).

On-chip activation buffers (X, H, W, L of quant.program.Buf): each is a memory of `word`s of
G = hwcfg.t_in lanes (one MAC-array input chunk per read), `vb` bits per lane (vb = max(act.bits, gate_logit.bits), signed two's
complement, lane k at bits [k*vb, (k+1)*vb)). Row r of a buffer with `wpr` words per row is words
[r*wpr, (r+1)*wpr); value c of a row is lane c % G of word c // G. Lanes beyond a row's width
hold whatever was last written there; consumers ignore them (the weight streams pad with zeros).

The MAC array's output width To = hwcfg.t_out and the LayerNorm unit's vector lanes L =
hwcfg.lanes may be narrower than G (each a power-of-two fraction of it): a compute-unit result
(To lanes) or a LayerNorm output beat (L lanes) is a slice of a word, written under a lane mask
of `mask_bits` = G / wg bits, wg = min(To, L) lanes per mask bit (a write port with granularity;
mask_bits = 1 for the square design, whose words are always written whole).

Ports between the top and an op engine (hw/*_op.py) -- all in the engine's view:
  BufRead   en, row, word (out); data (in, G*vb bits): the word is on `data` the cycle after a
            cycle with en = 1 and stays there while en = 0 (a synchronous read port with enable).
  BufWrite  en, row, word, data, mask (out): the word's slices whose mask bit is set (slice i:
            lanes [i*wg, (i+1)*wg)) are written at the clock edge ending a cycle with en = 1. A read of the same word in that cycle returns the OLD value.
  QueueRead en, pos (out); token, weight (in): expert-queue entry `pos`, timing as BufRead.
  QueueWrite en, pos, token, weight (out).
Engine control: `start` (in, one-cycle pulse; the command inputs are valid in that cycle and stay
constant until `done`), `done` (out, one-cycle pulse after the engine's last buffer write has been
issued; the next start may come in the cycle after done), `sat` (out, saturation events counted
this cycle, summed by the top into SAT_COUNT).
"""
from __future__ import annotations

from dataclasses import dataclass

from amaranth.hdl import Array, Cat, Const, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from edgemoe.quant.compiler import buffer_plan
from edgemoe.quant.config import QuantConfig
from edgemoe.quant.program import container_bytes

from .config import HWConfig, HWConfigError


def bits_for(n: int) -> int:
    """Bits of an index 0..n-1 (at least 1)."""
    return max(1, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class AccelPlan:
    G: int                  # lanes per buffer word (= t_in)
    To: int                 # MAC-array output lanes (t_out; divides G)
    L: int                  # LayerNorm vector lanes (lanes; divides G)
    vb: int                 # bits per lane in buffer words
    R: int                  # rows per buffer (act_buffer_tokens)
    row_bits: int           # a row index (0..R-1)
    rows_bits: int          # a row count (0..R)
    wpr: dict               # buffer name -> words per row
    word_bits: int          # a word-in-row index (largest buffer)
    beat_bits: int          # AXI data width
    beat_bytes: int
    act_cb: int             # act container bytes in memory
    vpb: int                # act values per beat (beat_bytes // act_cb)
    tokens: int             # num_tokens of the model (attention n, gate N)
    dim: int
    heads: int
    head_dim: int
    experts: int            # 0 for a model without MoE blocks
    top_k: int
    q_entries: int          # expert-queue memory entries (tokens * top_k)
    qpos_bits: int
    gate_bits: int          # gate_prob bits (queue weight)

    @property
    def word_width(self) -> int:
        return self.G * self.vb

    @property
    def wg(self) -> int:
        """Lanes per write-mask bit: min(To, L)."""
        return min(self.To, self.L)

    @property
    def mask_bits(self) -> int:
        return self.G // self.wg

    def slice_mask(self, lanes: int, i):
        """The mask (a Value) writing slice i (an index Value) of `lanes` lanes of a word."""
        per = lanes // self.wg
        ones = (1 << per) - 1
        if per == self.mask_bits:
            return Const(ones, self.mask_bits)
        return (Const(ones, self.mask_bits) << (i * per))[:self.mask_bits]

    def lanes_of(self, word, lanes: int, i, bits: int):
        """Slice i (a Value, or an int) of `lanes` lanes of buffer word `word`, each lane's low
        `bits` (the buffers hold act codes in vb-bit lanes), packed."""
        vb = self.vb
        parts = [Cat(word[k * vb:k * vb + bits] for k in range(s * lanes, (s + 1) * lanes))
                 for s in range(self.G // lanes)]
        return parts[i] if isinstance(i, int) else Array(parts)[i]

    def full_mask(self):
        return Const((1 << self.mask_bits) - 1, self.mask_bits)

    def depth(self, buf: str) -> int:
        return self.R * self.wpr[buf]


def accel_plan(cfg, qcfg: QuantConfig, hwcfg: HWConfig) -> AccelPlan:
    G = hwcfg.t_in
    for f in ("t_out", "lanes"):
        v = getattr(hwcfg, f)
        if v > G or G % v or (G // v) & (G // v - 1):
            raise HWConfigError(f"HWConfig '{hwcfg.name}': the accelerator top needs {f} = t_in / 2^j "
                                f"(its results are slices of a t_in-lane buffer word), got {f} = {v}, "
                                f"t_in = {G}")
    if cfg.dim % G:
        raise HWConfigError(f"ModelConfig '{cfg.name}': dim = {cfg.dim} must be a multiple of "
                            f"HWConfig '{hwcfg.name}'.t_in = {G} (rows are whole buffer words)")
    dh = cfg.dim // cfg.heads
    if dh % G:
        raise HWConfigError(f"ModelConfig '{cfg.name}': head_dim = {dh} must be a multiple of t_in = {G}")
    B = hwcfg.axi_data_bits // 8
    cb = container_bytes(qcfg.act)
    vpb = B // cb
    if vpb < 1 or (vpb % G and G % vpb):
        raise HWConfigError(f"HWConfig '{hwcfg.name}': {vpb} act values per {hwcfg.axi_data_bits}-bit "
                            f"beat and t_in = {G}: one must divide the other")
    plan = buffer_plan(cfg, qcfg, hwcfg)
    wpr = {b.name: -(-b.width // G) for b in plan.buffers if b.name in ("X", "H", "W", "L")}
    R = hwcfg.act_buffer_tokens
    E = cfg.num_experts if cfg.moe_blocks else 0
    k = cfg.top_k if cfg.moe_blocks else 0
    qn = max(1, cfg.num_tokens * k)
    return AccelPlan(
        G=G, To=hwcfg.t_out, L=hwcfg.lanes, vb=max(qcfg.act.bits, qcfg.gate_logit.bits), R=R, row_bits=bits_for(R),
        rows_bits=R.bit_length(), wpr=wpr, word_bits=bits_for(max(wpr.values())),
        beat_bits=hwcfg.axi_data_bits, beat_bytes=B, act_cb=cb, vpb=vpb,
        tokens=cfg.num_tokens, dim=cfg.dim, heads=cfg.heads, head_dim=dh, experts=E, top_k=k,
        q_entries=qn, qpos_bits=bits_for(qn), gate_bits=qcfg.gate_prob.bits)


def buf_read_signature(p: AccelPlan) -> wiring.Signature:
    return wiring.Signature({"en": Out(1), "row": Out(p.row_bits), "word": Out(p.word_bits),
                             "data": In(p.word_width)})


def buf_write_signature(p: AccelPlan) -> wiring.Signature:
    return wiring.Signature({"en": Out(1), "row": Out(p.row_bits), "word": Out(p.word_bits),
                             "data": Out(p.word_width), "mask": Out(p.mask_bits)})


def queue_read_signature(p: AccelPlan) -> wiring.Signature:
    return wiring.Signature({"en": Out(1), "pos": Out(p.qpos_bits), "token": In(p.row_bits),
                             "weight": In(unsigned(p.gate_bits))})


def queue_write_signature(p: AccelPlan) -> wiring.Signature:
    return wiring.Signature({"en": Out(1), "pos": Out(p.qpos_bits), "token": Out(p.row_bits),
                             "weight": Out(unsigned(p.gate_bits))})
