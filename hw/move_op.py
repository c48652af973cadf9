"""LoadOp / StoreOp: the LOAD_ROWS and STORE opcodes (quant/interpreter.py Machine._op_load_rows,
_op_store): act rows between AXI beats (act containers, quant/program.py "Data in memory") and
an on-chip buffer (hw/accel_plan.py words of G lanes).

Rows are whole buffer words (the top rejects k % G != 0), so the values of a transfer are a flat
sequence of rows*k/G words; a beat holds vpb = beat_bytes / container values: with vpb >= G a
beat carries vpb/G words (the last beat of a transfer may be partly padding), with vpb < G a
word takes G/vpb beats.

LoadOp  ports: start, done, sat (engine control of hw/accel_plan.py); rows, row_off, words
        (total words = rows*k/G, computed by the top), wpr_k (words per row = k/G), add (LOAD_ADD);
        d In(stream of beats); dst_rd / dst_wr (buffer ports); bad Out(1): sticky, a container
        whose bits above act.bits are not the sign extension of the code (ERR_DATA).
        One word per cycle (two with ADD: read, then saturating add and write).
StoreOp ports: start, done; rows, words, wpr_k; src (BufRead); d Out(stream of beats): the beats
        of the transfer in order, padding lanes 0 (the top's write command masks them with the
        last beat's strobe). One word per cycle.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from edgemoe.quant.config import QuantConfig

from .accel_plan import AccelPlan, buf_read_signature, buf_write_signature
from .compute import fit_signed


def _lanes(value, n: int, bits: int):
    return [value[i * bits:(i + 1) * bits] for i in range(n)]


def _extend(v, bits: int):
    """Sign-extend the bit vector v to `bits` bits."""
    return Cat(v, *([v[-1]] * (bits - len(v)))) if bits > len(v) else v[:bits]


class LoadOp(wiring.Component):
    def __init__(self, plan: AccelPlan, qcfg: QuantConfig):
        self.p, self.q = plan, qcfg
        wb = (plan.R * max(plan.wpr.values())).bit_length()
        self.wbits = wb
        super().__init__({
            "start": In(1), "done": Out(1), "sat": Out(unsigned(8)), "bad": Out(1),
            "row_off": In(plan.row_bits), "words": In(wb), "wpr_k": In(plan.word_bits + 1),
            "add": In(1),
            "d": In(stream.Signature(plan.beat_bits)),
            "dst_rd": Out(buf_read_signature(plan)), "dst_wr": Out(buf_write_signature(plan)),
        })

    def elaborate(self, platform):
        m = Module()
        p, q = self.p, self.q
        G, vb, cb, A = p.G, p.vb, p.act_cb, q.act.bits
        cbits = 8 * cb

        def convert(raw):
            """G containers -> G vb-bit lanes, and 'some container is not a sign extension'."""
            out, bad = [], []
            for c in _lanes(raw, G, cbits):
                out.append(_extend(c[:A], vb))
                if cbits > A:
                    up = c[A - 1:]
                    bad.append(~(up.all() | ~up.any()))
            return Cat(*out), (Cat(*bad).any() if bad else Const(0, 1))

        word = Signal(p.word_width)          # the complete word waiting to be written
        word_bad = Signal()
        have = Signal()
        count = Signal(self.wbits)           # words written
        row = Signal(p.row_bits)
        col = Signal(p.word_bits)
        active = Signal()
        reading = Signal()                   # ADD: the dst word was requested last cycle
        consume = Signal()                   # `word` leaves this cycle (written or dropped)
        take = Signal()                      # a new word enters `word` this cycle
        new_word, new_bad = Signal(p.word_width), Signal()

        # --- beats -> words -------------------------------------------------------------------
        if p.vpb >= G:
            wpb = p.vpb // G
            beat = Signal(p.beat_bits)
            idx = Signal(range(max(wpb, 2)))
            full = Signal()                  # `beat` holds words not yet taken
            sel = Signal(G * cbits)
            with m.Switch(idx):
                for i, rw in enumerate(_lanes(beat, wpb, G * cbits)):
                    with m.Case(i):
                        m.d.comb += sel.eq(rw)
            cw, cbad = convert(sel)
            m.d.comb += [take.eq(active & full & (~have | consume)),
                         new_word.eq(cw), new_bad.eq(cbad),
                         self.d.ready.eq(active & (~full | (take & (idx == wpb - 1))))]
            with m.If(take):
                m.d.sync += idx.eq(idx + 1)
                with m.If(idx == wpb - 1):
                    m.d.sync += [full.eq(0), idx.eq(0)]
            with m.If(self.d.valid & self.d.ready):
                m.d.sync += [beat.eq(self.d.payload), full.eq(1), idx.eq(0)]
            drained = ~full & ~have
            with m.If(self.start):
                m.d.sync += [full.eq(0), idx.eq(0)]
        else:
            bpw = G // p.vpb
            n = Signal(range(bpw))
            acc = Signal(G * cbits - p.beat_bits)   # the beats of the word so far
            last = Signal()
            m.d.comb += [last.eq(n == bpw - 1),
                         self.d.ready.eq(active & (~last | ~have | consume)),
                         take.eq(self.d.valid & self.d.ready & last)]
            cw, cbad = convert(Cat(acc, self.d.payload))
            m.d.comb += [new_word.eq(cw), new_bad.eq(cbad)]
            with m.If(self.d.valid & self.d.ready):
                m.d.sync += [acc.eq(Cat(acc, self.d.payload)[p.beat_bits:]),
                             n.eq(Mux(last, 0, n + 1))]
            drained = ~have
            with m.If(self.start):
                m.d.sync += n.eq(0)

        # --- words -> buffer --------------------------------------------------------------------
        summed, flags = [], []
        for o, v in zip(_lanes(self.dst_rd.data, G, vb), _lanes(word, G, vb)):
            s_, f = fit_signed(o[:A].as_signed() + v[:A].as_signed(), A, q.overflow)
            summed.append(_extend(s_, vb))
            flags.append(f)
        m.d.comb += [self.dst_wr.row.eq(row), self.dst_wr.word.eq(col), self.dst_wr.mask.eq(p.full_mask()),
                     self.dst_rd.row.eq(row), self.dst_rd.word.eq(col)]
        with m.If(active & have & (count < self.words)):
            with m.If(self.add & ~reading):
                m.d.comb += self.dst_rd.en.eq(1)
                m.d.sync += reading.eq(1)
            with m.Else():
                m.d.comb += [self.dst_wr.en.eq(1), consume.eq(1),
                             self.dst_wr.data.eq(Mux(self.add, Cat(*summed), word))]
                with m.If(self.add):
                    m.d.comb += self.sat.eq(sum(flags))
                m.d.sync += [reading.eq(0), count.eq(count + 1)]
                with m.If(word_bad):
                    m.d.sync += self.bad.eq(1)
                with m.If(col == self.wpr_k - 1):
                    m.d.sync += [col.eq(0), row.eq(row + 1)]
                with m.Else():
                    m.d.sync += col.eq(col + 1)
        with m.Elif(active & have):           # padding words of the final beat
            m.d.comb += consume.eq(1)
        with m.If(take):
            m.d.sync += [word.eq(new_word), word_bad.eq(new_bad), have.eq(1)]
        with m.Elif(consume):
            m.d.sync += have.eq(0)
        with m.If(active & (count == self.words) & drained & ~self.start):
            m.d.comb += self.done.eq(1)
            m.d.sync += active.eq(0)
        with m.If(self.start):
            m.d.sync += [active.eq(1), count.eq(0), row.eq(self.row_off), col.eq(0), have.eq(0),
                         reading.eq(0), self.bad.eq(0)]
        return m


class StoreOp(wiring.Component):
    def __init__(self, plan: AccelPlan, qcfg: QuantConfig):
        self.p, self.q = plan, qcfg
        wb = (plan.R * max(plan.wpr.values())).bit_length()
        self.wbits = wb
        super().__init__({
            "start": In(1), "done": Out(1),
            "words": In(wb), "wpr_k": In(plan.word_bits + 1),
            "src": Out(buf_read_signature(plan)),
            "d": Out(stream.Signature(plan.beat_bits)),
        })

    def elaborate(self, platform):
        from amaranth.lib.fifo import SyncFIFOBuffered
        m = Module()
        p, q = self.p, self.q
        G, vb, cb, A = p.G, p.vb, p.act_cb, q.act.bits
        cbits = 8 * cb
        DEPTH = 8
        active = Signal()
        issued = Signal(self.wbits)          # words read from the buffer
        popped = Signal(self.wbits)          # words taken out of the FIFO
        row = Signal(p.row_bits)
        col = Signal(p.word_bits)
        pending = Signal()                   # a read was issued last cycle: its word is on src.data
        # words in containers, through a small FIFO so reads issue every cycle
        m.submodules.fifo = fifo = SyncFIFOBuffered(width=G * cbits, depth=DEPTH)
        lanes = _lanes(self.src.data, G, vb)
        m.d.comb += [fifo.w_data.eq(Cat(*[_extend(l[:A], cbits) for l in lanes])),
                     fifo.w_en.eq(pending),
                     self.src.row.eq(row), self.src.word.eq(col)]
        issue = Signal()
        m.d.comb += issue.eq(active & (issued < self.words) & (fifo.level + pending < DEPTH - 1))
        with m.If(issue):
            m.d.comb += self.src.en.eq(1)
            m.d.sync += issued.eq(issued + 1)
            with m.If(col == self.wpr_k - 1):
                m.d.sync += [col.eq(0), row.eq(row + 1)]
            with m.Else():
                m.d.sync += col.eq(col + 1)
        m.d.sync += pending.eq(issue)

        out_valid = Signal()
        out_beat = Signal(p.beat_bits)
        m.d.comb += [self.d.valid.eq(out_valid), self.d.payload.eq(out_beat)]
        free = ~out_valid | self.d.ready     # the output register can take a beat this cycle
        with m.If(self.d.valid & self.d.ready):
            m.d.sync += out_valid.eq(0)
        if p.vpb >= G:
            wpb = p.vpb // G
            asm = Signal(p.beat_bits)        # beat being assembled
            n = Signal(range(wpb + 1))
            last_word = popped + 1 == self.words
            # pop one word per cycle; a completed beat moves to the output when it is free
            pop = Signal()
            complete = Signal()
            m.d.comb += complete.eq(fifo.r_rdy & ((n == wpb - 1) | last_word))
            m.d.comb += pop.eq(fifo.r_rdy & (~complete | free))
            m.d.comb += fifo.r_en.eq(pop)
            with m.If(pop):
                m.d.sync += popped.eq(popped + 1)
                with m.If(complete):
                    m.d.sync += [out_valid.eq(1), n.eq(0), asm.eq(0)]
                    for i in range(wpb):
                        with m.If(n == i):
                            m.d.sync += out_beat.eq(Cat(asm[:i * G * cbits], fifo.r_data,
                                                        Const(0, (wpb - 1 - i) * G * cbits)))
                with m.Else():
                    m.d.sync += n.eq(n + 1)
                    for i in range(wpb):
                        with m.If(n == i):
                            m.d.sync += asm[i * G * cbits:(i + 1) * G * cbits].eq(fifo.r_data)
            with m.If(self.start):
                m.d.sync += [n.eq(0), asm.eq(0)]
            finished = active & (popped == self.words) & ~out_valid
        else:
            bpw = G // p.vpb
            sh = Signal(G * cbits - p.beat_bits)   # the word's beats after the current one
            left = Signal(range(bpw))              # beats of `sh` still to send
            more = left != 0
            load = Signal()
            m.d.comb += load.eq(fifo.r_rdy & ~more & free)
            m.d.comb += fifo.r_en.eq(load)
            with m.If(load):
                m.d.sync += [out_beat.eq(fifo.r_data[:p.beat_bits]), out_valid.eq(1),
                             sh.eq(fifo.r_data[p.beat_bits:]), left.eq(bpw - 1),
                             popped.eq(popped + 1)]
            with m.Elif(more & free):
                m.d.sync += [out_beat.eq(sh[:p.beat_bits]), out_valid.eq(1),
                             sh.eq(sh >> p.beat_bits), left.eq(left - 1)]
            with m.If(self.start):
                m.d.sync += left.eq(0)
            finished = active & (popped == self.words) & ~more & ~out_valid
        with m.If(finished & ~self.start):
            m.d.comb += self.done.eq(1)
            m.d.sync += active.eq(0)
        with m.If(self.start):
            m.d.sync += [active.eq(1), issued.eq(0), popped.eq(0), row.eq(0), col.eq(0),
                         out_valid.eq(0)]
        return m
