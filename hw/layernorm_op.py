"""LayerNormOp: the LAYERNORM opcode (quant/interpreter.py Machine._op_layernorm) on the buffers of
the accelerator top (hw/accel_plan.py), around the LayerNorm unit (hw/layernorm.py).

The unit is generated for D = cfg.dim and L = hwcfg.lanes lanes, so the top rejects an
instruction with k != D; unit beat j of a row (j < D/L) is slice j % (G/L) of buffer word
j // (G/L) (L = G: one buffer word = one unit beat).

Ports (engine view):
  start In(1), done Out(1), sat Out(8)     engine control of hw/accel_plan.py
  rows  In(plan.rows_bits)                 token rows 0 .. rows-1 (0: parameters only)
  p     In(stream of plan.beat_bits)       the parameter beats as the top reads them from the
        instruction's address, quant.compiler._ln_sizes(qcfg, D, B)[1] bytes: D ln_gamma codes
        (quant.program containers, little-endian, sign/zero-extended) padded to a whole beat,
        then D ln_beta codes likewise
  src   BufRead  rows 0..rows-1, words 0..D/G-1 (each once per slice)
  dst   BufWrite the same rows and words, one L-lane slice per write
Sequence: gamma beats -> a D/L-word gamma memory (LUTRAM, asynchronous read); beta beats -> one
unit parameter write per word j (gamma[j] from that memory with beta[j]); then the src words
are streamed into the unit (one read per cycle, skid-free: the read port holds its data while
en = 0) and its output beats written to dst (row r word j), one word per cycle. done the cycle
after the last dst write. The parameters are written before any token enters the unit and only
while it is idle (the previous op drained it before its done), as the unit requires.

Beats -> words (of L codes here): a beat holds vpb = beat_bytes / container values of a
parameter format; one of vpb, L must divide the other (else HWConfigError). vpb >= L: a beat
gives vpb/L words, one per cycle (the beat is held by ready = 0 meanwhile; the last beat's
padding words are skipped). vpb < L: a word takes L/vpb beats, one beat per cycle. The container's bits above the format
are ignored (the code is its low `bits`; for the quant presets the container is exactly the
format's width, so nothing is dropped). Machine decodes the whole container without a range
check, so a malformed image (a code outside ln_gamma / ln_beta in a wider container) would
differ; likewise src lanes are taken as their low act.bits (the buffers hold act codes).

Cycles (start cycle to done cycle, both counted), parameter beats without gaps:
2*D/L + LayerNorm plan.latency + rows*D/L + 3, i.e. one unit beat per cycle after the parameter load
and the unit's pipeline fill (measured, tiny D = 64, edge-moe-fixed, rows = 16: G = 16 131
cycles (latency 56), G = 8 207 cycles (latency 60)). With vpb < L the parameter load is one
beat per cycle (D/vpb beats per format).

Saturation (sat, per cycle, = Machine's SatCounter total for the op): per output word the
unit's sat_count (y lanes outside act) plus, on a token's last word, stat_sat (its rstd left
ln_rstd: layernorm_fixed counts one event per row). var cannot saturate: layernorm_plan refuses
formats where it could.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, Value, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from edgemoe.quant.config import QuantConfig
from edgemoe.quant.program import container_bytes

from .accel_plan import accel_plan, buf_read_signature, buf_write_signature
from .config import HWConfig, HWConfigError
from .layernorm import LayerNorm


class LayerNormOp(wiring.Component):
    def __init__(self, cfg, qcfg: QuantConfig, hwcfg: HWConfig):
        self.plan = plan = accel_plan(cfg, qcfg, hwcfg)
        self.cfg, self.q, self.hw = cfg, qcfg, hwcfg
        self.D, self.G, self.L = cfg.dim, plan.G, plan.L
        self.words = cfg.dim // plan.L           # unit beats per row (L lanes each)
        self.fmts = {}
        for nm in ("ln_gamma", "ln_beta"):
            f = getattr(qcfg, nm)
            cb = container_bytes(f)
            vpb = plan.beat_bytes // cb
            if vpb < 1 or (vpb % plan.L and plan.L % vpb):
                raise HWConfigError(
                    f"LayerNormOp: QuantConfig '{qcfg.name}'.{nm} ({cb}-byte containers) gives {vpb} "
                    f"values per {plan.beat_bits}-bit beat and HWConfig '{hwcfg.name}'.lanes = {plan.L}: "
                    f"one must divide the other")
            self.fmts[nm] = (f, cb, vpb)
        self.unit = LayerNorm(qcfg, hwcfg, cfg)
        super().__init__({
            "start": In(1), "done": Out(1), "sat": Out(unsigned(8)),
            "rows": In(plan.rows_bits),
            "p": In(stream.Signature(plan.beat_bits)),
            "src": Out(buf_read_signature(plan)),
            "dst": Out(buf_write_signature(plan)),
        })

    # beats of one parameter format -> words of L codes ------------------------------------------
    def _parser(self, m: Module, active, name: str):
        """Returns (ready, word_valid, codes, j, last): `ready` for the p stream while `active`;
        word_valid: word j (codes: L values, each the container's low bits) is complete this
        cycle (always taken); last: it is the format's last word."""
        f, cb, vpb = self.fmts[name]
        G, nw, cbits = self.L, self.words, 8 * cb     # G: the unit's lanes here
        beat = self.p.payload
        j = Signal(range(nw), name=f"{name}_j")
        last = Signal(name=f"{name}_last")
        valid = Signal(name=f"{name}_wvalid")
        ready = Signal(name=f"{name}_ready")
        m.d.comb += last.eq(j == nw - 1)
        conts = [beat[i * cbits:(i + 1) * cbits] for i in range(vpb)]
        if vpb >= G:
            per = vpb // G                        # words per beat
            s = Signal(range(max(per, 2)), name=f"{name}_s")
            codes = []
            for k in range(G):
                c = Signal(f.bits, name=f"{name}_c{k}")
                with m.Switch(s):
                    for i in range(per):
                        with m.Case(i):
                            m.d.comb += c.eq(conts[i * G + k][:f.bits])
                codes.append(c)
            # the beat is consumed with its last word, or with the format's last word (padding)
            m.d.comb += [ready.eq(active & ((s == per - 1) | last)),
                         valid.eq(active & self.p.valid)]
            with m.If(valid):
                m.d.sync += [s.eq(Mux(ready, 0, s + 1)), j.eq(j + 1)]
        else:
            per = G // vpb                        # beats per word
            s = Signal(range(per), name=f"{name}_s")
            held = [Signal(f.bits, name=f"{name}_h{k}") for k in range((per - 1) * vpb)]
            m.d.comb += [ready.eq(active), valid.eq(active & self.p.valid & (s == per - 1))]
            with m.If(active & self.p.valid):
                m.d.sync += s.eq(Mux(s == per - 1, 0, s + 1))
                with m.Switch(s):
                    for i in range(per - 1):
                        with m.Case(i):
                            m.d.sync += [held[i * vpb + k].eq(conts[k][:f.bits]) for k in range(vpb)]
            with m.If(valid):
                m.d.sync += j.eq(j + 1)
            codes = held + [c[:f.bits] for c in conts]
        # j wraps to 0 after the last word (nw may be a power of two or not)
        with m.If(valid & last):
            m.d.sync += j.eq(0)
        return ready, valid, codes, j, last

    def elaborate(self, platform):
        m = Module()
        P, q = self.plan, self.q
        G, L, vb, A, nw = P.G, P.L, P.vb, q.act.bits, self.words
        sh = (G // L).bit_length() - 1       # unit beat j is slice j % 2^sh of buffer word j >> sh
        m.submodules.unit = u = self.unit

        gam_f = self.fmts["ln_gamma"][0]
        m.submodules.gmem = gmem = Memory(shape=unsigned(L * gam_f.bits), depth=nw, init=[])
        gw = gmem.write_port()
        gr = gmem.read_port(domain="comb")

        # phases: idle -> gamma -> beta -> run -> fin (done) -> idle
        IDLE, GAM, BET, RUN, FIN = range(5)
        phase = Signal(range(5))
        with m.If(self.start & (phase == IDLE)):
            m.d.sync += phase.eq(GAM)

        # --- parameters ----------------------------------------------------------------------
        g_ready, g_valid, g_codes, g_j, g_last = self._parser(m, phase == GAM, "ln_gamma")
        b_ready, b_valid, b_codes, b_j, b_last = self._parser(m, phase == BET, "ln_beta")
        m.d.comb += [self.p.ready.eq(g_ready | b_ready),
                     gw.addr.eq(g_j), gw.data.eq(Cat(*g_codes)), gw.en.eq(g_valid),
                     gr.addr.eq(b_j)]
        with m.If(g_valid & g_last):
            m.d.sync += phase.eq(BET)
        gbits = gam_f.bits
        m.d.comb += [u.p.valid.eq(b_valid), u.p.payload.addr.eq(b_j)]
        m.d.comb += [u.p.payload.gamma[k].eq(gr.data[k * gbits:(k + 1) * gbits]) for k in range(L)]
        m.d.comb += [u.p.payload.beta[k].eq(b_codes[k]) for k in range(L)]

        # --- src words -> unit ---------------------------------------------------------------
        rd_more = Signal()                   # words left to read
        rd_valid = Signal()                  # src.data holds a word the unit has not taken
        rd_row = Signal(P.row_bits)
        rd_word = Signal(range(nw))
        with m.If(b_valid & b_last):
            m.d.sync += [phase.eq(Mux(self.rows == 0, FIN, RUN)), rd_more.eq(self.rows != 0),
                         rd_row.eq(0), rd_word.eq(0)]
        take = Signal()
        m.d.comb += [u.i.valid.eq(rd_valid), take.eq(u.i.valid & u.i.ready)]
        en = Signal()
        m.d.comb += [en.eq(rd_more & (~rd_valid | take)),
                     self.src.en.eq(en), self.src.row.eq(rd_row), self.src.word.eq(rd_word >> sh)]
        rd_sub = 0
        if sh:
            # the word is read again for each of its slices; the slot's slice is registered
            rd_sub = Signal(sh)
            with m.If(en):
                m.d.sync += rd_sub.eq(rd_word[:sh])
        m.d.comb += Value.cast(u.i.payload.data).eq(P.lanes_of(self.src.data, L, rd_sub, A))
        m.d.sync += rd_valid.eq(en | (rd_valid & ~take))
        with m.If(en):
            with m.If(rd_word == nw - 1):
                m.d.sync += [rd_word.eq(0), rd_row.eq(rd_row + 1)]
                with m.If(rd_row == self.rows - 1):
                    m.d.sync += rd_more.eq(0)
            with m.Else():
                m.d.sync += rd_word.eq(rd_word + 1)

        # --- unit -> dst words ---------------------------------------------------------------
        wr_row = Signal(P.row_bits)
        wr_word = Signal(range(nw))
        o = u.o
        lanes = []
        for k in range(L):
            y = Value.cast(o.payload.data[k])
            lanes.append(Cat(y, *([y[A - 1]] * (vb - A))) if vb > A else y)
        m.d.comb += [o.ready.eq(1),
                     self.dst.en.eq(o.valid), self.dst.row.eq(wr_row), self.dst.word.eq(wr_word >> sh),
                     self.dst.data.eq(Cat(*lanes).replicate(G // L)),
                     self.dst.mask.eq(P.slice_mask(L, wr_word[:sh] if sh else 0))]
        with m.If(o.valid):
            m.d.comb += self.sat.eq(o.payload.sat_count + (o.payload.stat_sat & o.payload.last))
            with m.If(wr_word == nw - 1):
                m.d.sync += [wr_word.eq(0), wr_row.eq(wr_row + 1)]
                with m.If(wr_row == self.rows - 1):
                    m.d.sync += phase.eq(FIN)
            with m.Else():
                m.d.sync += wr_word.eq(wr_word + 1)
        with m.If(phase == FIN):
            m.d.comb += self.done.eq(1)
            m.d.sync += [phase.eq(IDLE), wr_row.eq(0), wr_word.eq(0)]
        return m
