"""AttentionOp: the ATTENTION opcode's op engine (quant.interpreter.Machine._op_attention).

Wraps hw/attention.AttentionEngine (qcfg, hwcfg, n = cfg.num_tokens, cfg.heads, dh = cfg.dim //
cfg.heads) between the W buffer (source) and the H buffer (destination) of the accelerator top
(geometry and port contract: hw/accel_plan.py). The top only starts it for rows = num_tokens,
k = dim, heads = cfg.heads (other shapes are ERR_ILLEGAL there), so it has no command inputs.

Ports (engine view; G = hwcfg.t_in lanes per buffer word, S = dh / G words per head row):
  start  in   1   one-cycle pulse
  done   out  1   one-cycle pulse, the cycle after the last H word write
  sat    out  Sb  saturation events this cycle (Sb = max(8, bits of G + the engine's most
                  events per cycle), 8 for every preset): the attn_in requantisations of the
                  word consumed last cycle (registered) plus the engine's `sat` (score, softmax
                  sum / recip / prob and output requantize events, registered there); every
                  event is reported by the cycle of the last H write, so before done
  src    BufRead  (W): row r value c = lane c % G of word c // G; Q at [0, D), K at [D, 2D),
                  V at [2D, 3D), head h of each at columns h*dh .. (h+1)*dh (act codes)
  dst    BufWrite (H): row r values [0, D) (head h at h*dh ..) as act codes, sign-extended to
                  the vb-bit lanes

Phases:
  LOAD     reads the 3*D/G words of every row r = 0 .. n-1 in address order, one per cycle.
           Word w of a row is slot w % S of the (sel = w // (D/G), head = (w // S) % H, row r)
           beat of the engine's write port. Every lane is requantised act -> attn_in exactly as
           quant.fixed.requantize (shift act.frac - attn_in.frac, qcfg.rounding, qcfg.overflow;
           hw/compute.round_shift + fit_signed) and the out-of-range lanes are counted into
           `sat`. Slots 0 .. S-2 of a beat are held in registers; the last slot comes straight
           from the read port (its data holds while en = 0), so a word is consumed, and the next
           one issued, in the same cycle: one word per cycle, with w back-pressure honoured.
  COMPUTE  the engine's QK / AV passes (it starts by itself when its 3*H*n-th row arrives).
  STORE    each engine output row (row, head, dh act codes; rows in finish order, heads in
           order) is written as S words to H row `row`, words head*S .. head*S + S-1, one word
           per cycle; o.ready is given with the last word. done follows the H*n-th row.

Cycles (start pulse at cycle 0; the engine's w port is always ready in its LOAD phase):
  LOAD    = 3*n*D/G + 1: reads issued in cycles 1 .. 3nD/G, each consumed the cycle after its
            issue, so the last w handshake is at cycle 3nD/G + 1 (one word per cycle).
  COMPUTE = sim.perf.attention_cycles_engine(n, H, dh, hwcfg, qcfg), from the last w handshake
            to the engine's last output-row handshake had o never been stalled.
  tail    = S - 1: o.ready comes with a row's last word, so the last row's handshake is S - 1
            cycles late. Earlier rows queue in the engine's 32-deep output FIFO without slowing
            it (the AV pass finishes at most P rows per n cycles, and n >= P*S at the tiny
            shape); a shape whose last rows finish within S cycles of each other would add more.
  done    = 1 (the cycle after the last H write).
  Measured (tests/test_attention_op.py, tiny: n = 9, H = 2, dh = 32, edge-moe-fixed):
  small-8x8 (G = 8, P = 2): 217 + 184 + 3 + 1 = 405 cycles; zcu102-16x16 (G = 16, P = 4):
  109 + 130 + 1 + 1 = 241 cycles, both exactly the formula (the AV pass of a head beside the
  next head's QK pass; 488 and 306 when the AV pass recomputed the scores after QK).

Saturation: `sat` summed over an op equals the total of Machine._op_attention's SatCounter:
attn_in (per value, n*3*D, counted here), score (per score, H*n*n, the QK pass only), softmax
sum (per score) and recip (per row), prob (per probability) and out (per output code, n*D),
the last five counted by hw/attention.AttentionEngine (tests/test_attention_op.py asserts the
equality with stimulus that saturates each of them).
"""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, Value, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from edgemoe.quant.config import QuantConfig
from edgemoe.quant.fixed import Overflow, Rounding

from .accel_plan import accel_plan, buf_read_signature, buf_write_signature
from .attention import AttentionEngine
from .compute import fit_signed, round_shift
from .config import HWConfig, HWConfigError
from .requant import popcount


class AttentionOp(wiring.Component):
    def __init__(self, cfg, qcfg: QuantConfig, hwcfg: HWConfig):
        self.cfg, self.qcfg, self.hwcfg = cfg, qcfg, hwcfg
        self.plan = p = accel_plan(cfg, qcfg, hwcfg)
        if cfg.num_tokens > p.R:
            raise HWConfigError(f"HWConfig '{hwcfg.name}': act_buffer_tokens = {p.R} < ModelConfig "
                                f"'{cfg.name}'.num_tokens = {cfg.num_tokens} (attention rows)")
        for b, need in (("W", 3 * cfg.dim), ("H", cfg.dim)):
            if p.wpr[b] * p.G < need:
                raise HWConfigError(f"buffer {b} holds {p.wpr[b] * p.G} values per row, "
                                    f"ATTENTION needs {need}")
        self.n, self.H, self.D = cfg.num_tokens, cfg.heads, cfg.dim
        self.dh = cfg.dim // cfg.heads
        self.S = self.dh // p.G                 # words per head row (accel_plan: dh % G == 0)
        self.shift = qcfg.act.frac - qcfg.attn_in.frac
        self.engine = AttentionEngine(qcfg, hwcfg, self.n, self.H, self.dh)
        sat_bits = max(8, (p.G + self.engine.sat_max).bit_length())
        super().__init__({"start": In(1), "done": Out(1), "sat": Out(unsigned(sat_bits)),
                          "src": Out(buf_read_signature(p)), "dst": Out(buf_write_signature(p))})

    def _requant_lane(self, x):
        """(attn_in code, overflow flag) of one signed vb-bit act lane (quant.fixed.requantize)."""
        q = self.qcfg
        v = round_shift(x, self.shift, Rounding(q.rounding))
        return fit_signed(v, q.attn_in.bits, Overflow(q.overflow))

    def elaborate(self, platform):
        m = Module()
        p, q = self.plan, self.qcfg
        G, vb, n, H, S = p.G, p.vb, self.n, self.H, self.S
        wpr_qkv = 3 * self.D // G               # words of Q|K|V per W row
        m.submodules.engine = eng = self.engine

        IDLE, LOAD, RUN = range(3)
        phase = Signal(range(3), name="phase")

        # ---- LOAD: read W words, requantize, pack beats --------------------------------------
        i_row = Signal(range(max(n, 2)), name="i_row")
        i_word = Signal(range(wpr_qkv), name="i_word")
        i_slot = Signal(range(max(S, 2)), name="i_slot")
        i_head = Signal(range(max(H, 2)), name="i_head")
        i_sel = Signal(range(3), name="i_sel")
        i_more = Signal(name="i_more")          # words left to issue
        # tags of the word now on src.data (the last issued read)
        have = Signal(name="have")
        d_row = Signal.like(i_row, name="d_row")
        d_slot = Signal.like(i_slot, name="d_slot")
        d_head = Signal.like(i_head, name="d_head")
        d_sel = Signal.like(i_sel, name="d_sel")

        lanes, ovf = [], []
        for k in range(G):
            v, o = self._requant_lane(self.src.data[k * vb:(k + 1) * vb].as_signed())
            lanes.append(v)
            ovf.append(o)
        held = [Signal(q.attn_in.bits * G, name=f"slot{j}") for j in range(S - 1)]

        last_slot = d_slot == S - 1
        wp = eng.w.payload
        m.d.comb += [eng.w.valid.eq(have & last_slot), wp.sel.eq(d_sel), wp.head.eq(d_head),
                     wp.row.eq(d_row)]
        for j in range(S):
            for k in range(G):
                src_lane = lanes[k] if j == S - 1 else \
                    held[j][k * q.attn_in.bits:(k + 1) * q.attn_in.bits]
                m.d.comb += wp.data[j * G + k].eq(src_lane)
        consume = Signal(name="consume")
        m.d.comb += consume.eq(have & (~last_slot | eng.w.ready))
        with m.If(consume & ~last_slot):
            with m.Switch(d_slot):
                for j in range(S - 1):
                    with m.Case(j):
                        m.d.sync += held[j].eq(Cat(*[_sext(lanes[k], q.attn_in.bits)
                                                      for k in range(G)]))
        in_sat = Signal(range(G + 1), name="in_sat")     # attn_in events of the last word
        m.d.sync += in_sat.eq(Mux(consume, popcount(ovf), 0))
        m.d.comb += self.sat.eq(in_sat + eng.sat)

        issue = Signal(name="issue")
        m.d.comb += issue.eq((phase == LOAD) & i_more & (~have | consume))
        m.d.comb += [self.src.en.eq(issue), self.src.row.eq(i_row), self.src.word.eq(i_word)]
        with m.If(issue):
            m.d.sync += [have.eq(1), d_row.eq(i_row), d_slot.eq(i_slot), d_head.eq(i_head),
                         d_sel.eq(i_sel)]
            # advance (row, word) with (sel, head, slot) alongside, no division
            with m.If(i_word == wpr_qkv - 1):
                m.d.sync += [i_word.eq(0), i_slot.eq(0), i_head.eq(0), i_sel.eq(0),
                             i_row.eq(i_row + 1)]
                with m.If(i_row == n - 1):
                    m.d.sync += i_more.eq(0)
            with m.Else():
                m.d.sync += i_word.eq(i_word + 1)
                with m.If(i_slot == S - 1):
                    m.d.sync += i_slot.eq(0)
                    with m.If(i_head == H - 1):
                        m.d.sync += [i_head.eq(0), i_sel.eq(i_sel + 1)]
                    with m.Else():
                        m.d.sync += i_head.eq(i_head + 1)
                with m.Else():
                    m.d.sync += i_slot.eq(i_slot + 1)
        with m.Elif(consume):
            m.d.sync += have.eq(0)

        # ---- STORE: engine output rows -> H words --------------------------------------------
        o_slot = Signal(range(max(S, 2)), name="o_slot")
        o_rows = Signal(range(H * n + 1), name="o_rows")
        op = eng.o.payload
        wr = Signal(name="wr")
        m.d.comb += [wr.eq((phase == RUN) & eng.o.valid),
                     eng.o.ready.eq(wr & (o_slot == S - 1)),
                     self.dst.en.eq(wr), self.dst.row.eq(op.row),
                     self.dst.word.eq(op.head * S + o_slot), self.dst.mask.eq(p.full_mask())]
        with m.Switch(o_slot):
            for j in range(S):
                with m.Case(j):
                    m.d.comb += self.dst.data.eq(Cat(*[_sext(op.data[j * G + k], vb)
                                                       for k in range(G)]))
        with m.If(wr):
            m.d.sync += o_slot.eq(o_slot + 1)
            with m.If(o_slot == S - 1):
                m.d.sync += [o_slot.eq(0), o_rows.eq(o_rows + 1)]

        # ---- control ----------------------------------------------------------------------------
        m.d.sync += self.done.eq(0)
        with m.Switch(phase):
            with m.Case(IDLE):
                with m.If(self.start):
                    m.d.sync += [phase.eq(LOAD), i_row.eq(0), i_word.eq(0), i_slot.eq(0),
                                 i_head.eq(0), i_sel.eq(0), i_more.eq(1), have.eq(0),
                                 o_slot.eq(0), o_rows.eq(0)]
            with m.Case(LOAD):
                with m.If(~i_more & ~have):
                    m.d.sync += phase.eq(RUN)
            with m.Case(RUN):
                with m.If(wr & (o_slot == S - 1) & (o_rows == H * n - 1)):
                    m.d.sync += [phase.eq(IDLE), self.done.eq(1)]
        return m


def _sext(v, width: int):
    """Signed value v as `width` bits (sign-extended; v fits by construction)."""
    v = Value.cast(v)
    return v[:width] if len(v) >= width else Cat(v, v[-1].replicate(width - len(v)))
