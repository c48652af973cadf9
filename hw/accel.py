"""Accelerator: the whole edgemoe accelerator top for one (ModelConfig, QuantConfig, HWConfig).

A controller fetches the program of quant/program.py (ISA and memory layout in its docstring)
over the AXI4 master and executes it one instruction at a time on:
  buffers    X, H, W (and L with MoE blocks): one memory each, words of G = t_in lanes
             (hw/accel_plan.py), one read and one write port (with a lane-slice write mask when
             t_out or the LayerNorm lanes are narrower than G); the expert-queue memory
  engines    LoadOp / StoreOp (hw/move_op.py), LinearOp (the compute unit, hw/linear_op.py),
             LayerNormOp, AttentionOp, GateOp (hw/*_op.py): started by the controller, they talk
             to the buffers through the top's three logical ports (RA: the op's source reads,
             RB: destination reads, WA: destination writes) and receive DRAM beats (weights,
             LayerNorm parameters, rows) from the AXI master's read stream.
  AXI4 master (hw/axi.py): instruction fetch, weight / parameter / row reads, STORE writes.
  AXI4-Lite slave: the register map of sim/regmap.rdl (offsets from the generated sim/regs.py).
Semantics = quant/interpreter.py Machine (the Python executor), bit for bit: buffer contents,
the OUTPUT region, and the error code / pc of a bad program (for the checks listed below).

Controller (one instruction at a time; the next instruction's fetch and data request overlap):
  FETCH    read the 32-byte instruction at PROGRAM_BASE + 32 * pc (256 / axi_data_bits beats of the
           port, 1 at 256 bits: the port may be 32 to 256 bits wide). The first
           instruction and the one after an EXPERT_LOOP are fetched here; every other one is
           prefetched during EXEC of its predecessor (below).
  DECODE   checks -> ERROR_CODE / ERROR_PC and stop:
             (in this order of priority)
             ERR_RUNAWAY  2**20 instructions without END
             ERR_ADDRESS  the instruction's own fetch had an AXI error response
             ERR_ILLEGAL  bad opcode / enum / reserved or unused field set / LINEAR flag
                          combination / LOAD_ROWS flags / src == dst
             ERR_LOOP     EXPERT_LOOP before GATE / nested / empty body; END or EXPERT_LOOP in a
                          body; queue mode or Index.EXPERT outside a loop
             ERR_ILLEGAL  shapes the generated units do not have
                          (LAYERNORM k != dim, ATTENTION rows/k/arg != tokens/dim/heads, GATE
                          rows/n/arg != tokens/experts/top_k) / k % G != 0 for LOAD_ROWS, STORE /
                          LOGIT without dst L / queue mode with rows or row_off
             ERR_BUFFER   rows or widths beyond a buffer
             ERR_ADDRESS  unaligned address, or an AXI error response (outside the memory)
             ERR_DATA     LOAD_ROWS: a container that is not a sign-extended act code
  EXEC     start the engine and the AXI transfer of the instruction, wait for the engine's done
           (STORE: and every write response). Read beats arrive in request order and each goes
           to its owner: this instruction's data (a count of beats), then the prefetched
           instruction, then the next instruction's early data.
           Prefetch: as soon as this instruction's read is handed to the AXI master (no STORE:
           its write errors stay its own), the next pc's instruction (pc + 1, or the loop start
           when the body repeats) is requested; its beats follow this instruction's and go to a
           holding register, so DECODE follows the retire at once.
           Early data: once that instruction is in, if it is a LINEAR or LAYERNORM that DECODE
           will accept under the loop state it will run with (next expert, in_loop, gate_ok),
           with an aligned address, and this instruction is not a LOAD_ROWS or GATE (which may
           still fail), its weight / parameter read is requested too. Its beats wait in the R
           channel (rready low) until it starts, so a LINEAR no longer waits the first-beat
           latency behind a long enough predecessor.
           The bytes read and counted are those of the one-at-a-time controller (every prefetch
           is used; held beats of a program that stops are drained uncounted); an AXI error is
           reported at the pc of the instruction whose beat carried it (ERROR_CODE / ERROR_PC
           as the executor's).
  EXPERT_LOOP arg: the next arg instructions run once per active expert (increasing id; the
           queue of expert e is entries q_base[e] .. + q_len[e] of the queue memory).
           Expert-weight streaming (HWConfig.weight_fifo_beats = SD > 0): a loop whose body is
           one or two LINEARs of at most SD weight beats each is held on chip once the first
           expert has issued them all (lb registers); the later experts replay it from there (no
           instruction fetch: the executor counts the same bytes) and a streamer requests their
           weights in execution order, each request once the SD-beat FIFO has room for all its
           beats. R beats the streamer asked for go to the FIFO; a streamed LINEAR takes its
           beats from there (an AXI error rides along as a 257th bit and stops that instruction,
           at its pc, as the executor does); an unaligned later address stops the streamer and
           that instruction fails ERR_ADDRESS at ISSUE. DRAM_BYTES_READ counts streamed beats
           when used. HWConfig.weight_intake_beats = KI: the FIFO holds words of KI beats (the
           first KI - 1 beats of a word wait in a packing register; the word's error bit is any
           of its beats') and the compute unit takes a word per cycle, so a memory-bound expert
           whose weights were banked ahead during the compute-bound experts before it loads a
           tile KI times faster than the port delivers. With KI = 1 the gain is only the
           refetches and the first-beat latencies.
Every unit is reset by START (a clean state after an error).

Exported module `edgemoe_accel`: clk, rst; m_axi__* (AXI4 master, hw/axi.py), s_axil__*
(AXI4-Lite slave, 8-bit byte addresses), irq (STATUS.DONE | STATUS.ERROR, level).
"""
from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, ResetInserter, Signal
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from edgemoe.quant.channel import attention_qcfg, check_channel_datapath
from edgemoe.quant.compiler import _ln_sizes
from edgemoe.quant.config import QuantConfig
from edgemoe.quant.linear import tile_layout
from edgemoe.quant.program import (ERR_ADDRESS, ERR_BUFFER, ERR_DATA, ERR_ILLEGAL, ERR_LOOP, ERR_RUNAWAY,
                           FIELDS, INSTR_BYTES, ISA_VERSION, LOAD_ADD, USED, Buf, Flag, Op,
                           _RESERVED, config_hash)

from edgemoe.sim import regs

from .accel_plan import accel_plan
from .axi import AxiLiteSlave, AxiMaster, axi4_signature, axil_signature
from .config import HWConfig, HWConfigError

MAX_INSTRUCTIONS = 1 << 20
BUFS = ("X", "H", "W", "L")
# register offsets: sim/regs.py, generated from sim/regmap.rdl (the host driver uses the same)
REG_BASES = (regs.PROGRAM_BASE, regs.WEIGHTS_BASE, regs.IMAGE_BASE, regs.OUTPUT_BASE)   # LO; HI at +4


def _field(words, name):
    w, lo, width = FIELDS[name]
    return words[w][lo:lo + width]


def _unused_masks() -> dict[Op, list[int]]:
    """Per opcode, per word: bits of fields the opcode does not use (must be 0)."""
    out = {}
    for op in Op:
        masks = [0] * 8
        for f, (w, lo, width) in FIELDS.items():
            if f != "op" and f not in USED[op]:
                masks[w] |= ((1 << width) - 1) << lo
        out[op] = masks
    return out


def check_buildable(cfg, qcfg: QuantConfig, hwcfg: HWConfig):
    """The AccelPlan of this top, or HWConfigError naming what the generator cannot build."""
    check_channel_datapath(qcfg)
    if not 32 <= hwcfg.axi_data_bits <= 8 * INSTR_BYTES:
        raise HWConfigError(f"HWConfig '{hwcfg.name}': an instruction ({8 * INSTR_BYTES} bits) spans whole "
                            f"beats of the AXI4 port: axi_data_bits must be 32..{8 * INSTR_BYTES}, "
                            f"got {hwcfg.axi_data_bits}")
    from .compute import compute_geometry
    compute_geometry(qcfg, hwcfg, cfg)     # e.g. weight_intake_beats against this port's beats
    return accel_plan(cfg, qcfg, hwcfg)


class Accelerator(wiring.Component):
    def __init__(self, cfg, qcfg: QuantConfig, hwcfg: HWConfig):
        self.cfg, self.qcfg, self.hwcfg = cfg, qcfg, hwcfg
        self.plan = check_buildable(cfg, qcfg, hwcfg)
        self.moe = bool(cfg.moe_blocks)
        super().__init__({
            "m_axi": Out(axi4_signature(hwcfg.axi_addr_bits, hwcfg.axi_data_bits)),
            "s_axil": In(axil_signature(8)),
            "irq": Out(1),
            # trace for testbenches / ILA: one-cycle pulse per retired instruction (after it ran)
            "retire": Out(1), "retire_pc": Out(20), "retire_expert": Out(8), "busy": Out(1),
        })

    @classmethod
    def from_unit_args(cls, qcfg: QuantConfig, hwcfg: HWConfig, cfg) -> "Accelerator":
        """hw/units.py's factory argument order (qcfg, hwcfg, model config)."""
        return cls(cfg, qcfg, hwcfg)

    def elaborate(self, platform):
        from .attention_op import AttentionOp
        from .gate_op import GateOp
        from .layernorm_op import LayerNormOp
        from .linear_op import LinearOp
        from .move_op import LoadOp, StoreOp

        m = Module()
        cfg, q, hw, p = self.cfg, self.qcfg, self.hwcfg, self.plan
        AB, B = hw.axi_addr_bits, p.beat_bytes
        beat_lg = (B - 1).bit_length()
        layout = tile_layout(q, hw)

        # --- bus interfaces ---------------------------------------------------------------------
        soft_rst = Signal()                 # START: every unit back to its reset state
        m.submodules.axim = axim = AxiMaster(AB, hw.axi_data_bits)
        m.submodules.axil = axil = AxiLiteSlave(8)
        wiring.connect(m, wiring.flipped(self.m_axi), axim.bus)
        wiring.connect(m, wiring.flipped(self.s_axil), axil.bus)
        m.d.comb += axim.clear.eq(soft_rst)

        def unit(name, u):
            m.submodules[name] = ResetInserter(soft_rst)(u)
            return u

        load = unit("load", LoadOp(p, q))
        store = unit("store", StoreOp(p, q))
        lin = unit("linear", LinearOp(cfg, q, hw))
        ln = unit("layernorm", LayerNormOp(cfg, q, hw))
        att = unit("attention", AttentionOp(cfg, attention_qcfg(q), hw))
        gate = unit("gate", GateOp(cfg, q, hw)) if self.moe else None

        # --- registers --------------------------------------------------------------------------
        busy, done, error = Signal(), Signal(), Signal()
        err_code, err_pc = Signal(8), Signal(32)
        task = Signal(8)
        bases = [Signal(64, name=f"base{i}") for i in range(4)]
        cycles, rbytes, wbytes = Signal(64), Signal(64), Signal(64)
        sat, retired = Signal(32), Signal(32)
        counters64 = {regs.CYCLE_COUNT: cycles, regs.DRAM_BYTES_READ: rbytes, regs.DRAM_BYTES_WRITTEN: wbytes}
        hi_latch = Signal(32)
        start_req = Signal()     # START written; taken once the AXI master is idle (the beats of
                                 # a transfer aborted by an error drain first)
        m.d.comb += [self.irq.eq(done | error), self.busy.eq(busy)]

        with m.If(axil.wr_en):
            with m.Switch(axil.wr_addr):
                with m.Case(regs.CTRL):
                    with m.If(axil.wr_data[0] & ~busy):
                        m.d.sync += [start_req.eq(1), done.eq(0), error.eq(0)]
                with m.Case(regs.TASK_ID):
                    m.d.sync += task.eq(axil.wr_data)
                for i, a in enumerate(REG_BASES):
                    with m.Case(a):
                        m.d.sync += bases[i][:32].eq(axil.wr_data)
                    with m.Case(a + 4):
                        m.d.sync += bases[i][32:].eq(axil.wr_data)
        rd_val = Signal(32)
        m.d.comb += axil.rd_data.eq(rd_val)
        with m.If(axil.rd_en):
            with m.Switch(axil.rd_addr):
                readable = {regs.ID: regs.ACCEL_ID, regs.VERSION: ISA_VERSION << 16 | regs.REGMAP_VERSION,
                            regs.STATUS: Cat(busy | start_req, done, error), regs.ERROR_CODE: err_code,
                            regs.ERROR_PC: err_pc, regs.TASK_ID: task, regs.CONFIG_HASH: config_hash(q, hw),
                            regs.SAT_COUNT: sat, regs.INSTR_COUNT: retired}
                for i, a in enumerate(REG_BASES):
                    readable[a], readable[a + 4] = bases[i][:32], bases[i][32:]
                for a, v in readable.items():
                    with m.Case(a):
                        m.d.sync += rd_val.eq(v)
                for a, c in counters64.items():
                    with m.Case(a):
                        m.d.sync += [rd_val.eq(c[:32]), hi_latch.eq(c[32:])]
                    with m.Case(a + 4):
                        m.d.sync += rd_val.eq(hi_latch)
                with m.Default():
                    m.d.sync += rd_val.eq(0)

        # --- buffers ----------------------------------------------------------------------------
        RA = {"en": Signal(), "row": Signal(p.row_bits), "word": Signal(p.word_bits), "data": Signal(p.word_width)}
        RB = {k: Signal.like(v, name=f"rb_{k}") for k, v in RA.items()}
        WA = {k: Signal.like(v, name=f"wa_{k}") for k, v in RA.items()}
        WA["mask"] = Signal(p.mask_bits, name="wa_mask")
        ins = [Signal(32, name=f"ins{i}") for i in range(8)]
        op, src, dst = _field(ins, "op"), _field(ins, "src"), _field(ins, "dst")
        bufs = {}
        for i, name in enumerate(BUFS):
            if name not in p.wpr:
                continue
            mem = Memory(shape=p.word_width, depth=p.depth(name), init=[])
            m.submodules[f"buf_{name}"] = mem
            # a narrower MAC-array output or LayerNorm writes word slices: one enable per slice
            wr = mem.write_port(granularity=p.wg * p.vb) if p.mask_bits > 1 else mem.write_port()
            rd = mem.read_port(transparent_for=())
            wpr, bid = p.wpr[name], int(Buf[name])
            with m.If(src == bid):
                m.d.comb += [rd.addr.eq(RA["row"] * wpr + RA["word"]), rd.en.eq(RA["en"])]
            with m.Else():
                m.d.comb += [rd.addr.eq(RB["row"] * wpr + RB["word"]), rd.en.eq(RB["en"])]
            with m.If(dst == bid):
                m.d.comb += [wr.addr.eq(WA["row"] * wpr + WA["word"]), wr.data.eq(WA["data"]),
                             wr.en.eq(WA["mask"] & WA["en"].replicate(p.mask_bits)
                                      if p.mask_bits > 1 else WA["en"])]
            bufs[bid] = rd
        with m.Switch(src):
            for bid, rd in bufs.items():
                with m.Case(bid):
                    m.d.comb += RA["data"].eq(rd.data)
        with m.Switch(dst):
            for bid, rd in bufs.items():
                with m.Case(bid):
                    m.d.comb += RB["data"].eq(rd.data)

        def bind_read(port, P, cond):
            with m.If(cond):
                m.d.comb += [P["en"].eq(port.en), P["row"].eq(port.row), P["word"].eq(port.word)]
            m.d.comb += port.data.eq(P["data"])

        def bind_write(port, cond):
            with m.If(cond):
                m.d.comb += [WA["en"].eq(port.en), WA["row"].eq(port.row), WA["word"].eq(port.word),
                             WA["data"].eq(port.data), WA["mask"].eq(port.mask)]

        is_op = {o: (op == int(o)) for o in Op}
        bind_read(lin.src, RA, is_op[Op.LINEAR])
        bind_read(lin.dst_rd, RB, is_op[Op.LINEAR])
        bind_write(lin.dst_wr, is_op[Op.LINEAR])
        bind_read(ln.src, RA, is_op[Op.LAYERNORM])
        bind_write(ln.dst, is_op[Op.LAYERNORM])
        bind_read(att.src, RA, is_op[Op.ATTENTION])
        bind_write(att.dst, is_op[Op.ATTENTION])
        bind_read(load.dst_rd, RB, is_op[Op.LOAD_ROWS])
        bind_write(load.dst_wr, is_op[Op.LOAD_ROWS])
        bind_read(store.src, RA, is_op[Op.STORE])
        if gate is not None:
            bind_read(gate.src, RA, is_op[Op.GATE])
            qmem = Memory(shape=p.row_bits + p.gate_bits, depth=p.q_entries, init=[])
            m.submodules.queue = qmem
            qr, qw = qmem.read_port(transparent_for=()), qmem.write_port()
            m.d.comb += [qw.addr.eq(gate.qw.pos), qw.en.eq(gate.qw.en),
                         qw.data.eq(Cat(gate.qw.token, gate.qw.weight)),
                         qr.addr.eq(lin.queue.pos), qr.en.eq(lin.queue.en),
                         lin.queue.token.eq(qr.data[:p.row_bits]), lin.queue.weight.eq(qr.data[p.row_bits:])]

        # --- decode -----------------------------------------------------------------------------
        flags = _field(ins, "flags")
        rows, row_off, k, n, arg = (_field(ins, f) for f in ("rows", "row_off", "k", "n", "arg"))
        n_buf = 4 if self.moe else 3
        wid = {int(Buf[b]): p.wpr[b] * p.G for b in BUFS if b in p.wpr}

        def width_of(b):
            w = Const(0, 16)
            for bid, v in wid.items():
                w = Mux(b == bid, v, w)
            return w

        in_loop = Signal()
        expert = Signal(range(max(p.experts, 2)))
        gate_ok = Signal()
        unused = _unused_masks()

        def decode_checks(ws, in_loop_v, gate_ok_v):
            """DECODE's checks of instruction words ws under loop state (in_loop_v, gate_ok_v):
            (illegal, bad_loop, illegal_op, bad_buffer) in the order of priority above. Applied
            to the instruction in `ins` and, for the early data request, to the prefetched one."""
            op_, src_, dst_ = _field(ws, "op"), _field(ws, "src"), _field(ws, "dst")
            fl = _field(ws, "flags")
            rows_, row_off_, k_, n_, arg_ = (_field(ws, f) for f in ("rows", "row_off", "k", "n", "arg"))
            is_ = {o: (op_ == int(o)) for o in Op}
            qmode = (fl & int(Flag.GATHER | Flag.SCATTER | Flag.GATE)).any()
            ill = [(ws[w] & mask).any() for w, mask in _RESERVED.items()]
            ill += [(op_ == 0) | (op_ > max(Op))]
            ill += [_field(ws, "base") > 2, _field(ws, "index") > 2]
            for o in Op:
                ill.append(is_[o] & Cat(*[(ws[w] & unused[o][w]).any() for w in range(8)]).any())
            src_used = is_[Op.LAYERNORM] | is_[Op.LINEAR] | is_[Op.ATTENTION] | is_[Op.GATE] | is_[Op.STORE]
            dst_used = is_[Op.LOAD_ROWS] | is_[Op.LAYERNORM] | is_[Op.LINEAR] | is_[Op.ATTENTION]
            ill += [src_used & ((src_ == 0) | (src_ >= n_buf + 1)), dst_used & ((dst_ == 0) | (dst_ >= n_buf + 1)),
                    src_used & dst_used & (src_ == dst_)]
            ill.append(is_[Op.LOAD_ROWS] & (fl & ~LOAD_ADD & 0xFF).any())
            lg = fl[4]
            ill.append(is_[Op.LINEAR] & ((lg & (fl[1] | fl[2] | fl[3])) | (fl[2] & ~fl[3])))
            # after the loop checks (the interpreter's order): shapes of this hardware
            opt = [is_[Op.LINEAR] & ((lg != (dst_ == int(Buf.L))) | (qmode & ((rows_ != 0) | (row_off_ != 0))))]
            opt.append((is_[Op.LOAD_ROWS] | is_[Op.STORE]) & (k_[:(p.G - 1).bit_length()] != 0
                                                              if p.G > 1 else Const(0)))
            opt.append(is_[Op.LAYERNORM] & (k_ != p.dim))
            opt.append(is_[Op.ATTENTION] & ((rows_ != p.tokens) | (k_ != p.dim) | (arg_ != p.heads)))
            opt.append(is_[Op.GATE] & ((rows_ != p.tokens) | (n_ != p.experts) | (arg_ != p.top_k)
                                       | (src_ != int(Buf.L)) | Const(not self.moe)))
            R = p.R
            sw, dw = width_of(src_), width_of(dst_)
            buf = [
                is_[Op.LOAD_ROWS] & ((row_off_ + rows_ > R) | (k_ > dw)),
                is_[Op.STORE] & ((rows_ > R) | (k_ > sw)),
                is_[Op.LAYERNORM] & ((rows_ > R) | (k_ > sw) | (k_ > dw)),
                is_[Op.LINEAR] & ~qmode & ((rows_ > R) | (row_off_ + rows_ > R)),
                is_[Op.LINEAR] & ((k_ > sw) | (n_ > dw)),
                is_[Op.ATTENTION] & ((rows_ > R) | (3 * k_ > sw) | (k_ > dw)),
                is_[Op.GATE] & ((rows_ > R) | (n_ > sw)),
            ]
            loop = [
                is_[Op.EXPERT_LOOP] & ((arg_ == 0) | ~gate_ok_v | in_loop_v),
                in_loop_v & (is_[Op.END] | is_[Op.EXPERT_LOOP]),
                is_[Op.LINEAR] & ~in_loop_v & (qmode | (_field(ws, "index") == 2)),
            ]
            return tuple(Cat(*t).any() for t in (ill, loop, opt, buf))

        queue_mode = (flags & int(Flag.GATHER | Flag.SCATTER | Flag.GATE)).any()
        illegal, bad_loop, illegal_op, bad_buffer = Signal(), Signal(), Signal(), Signal()
        m.d.comb += [s.eq(v) for s, v in zip((illegal, bad_loop, illegal_op, bad_buffer),
                                              decode_checks(ins, in_loop, gate_ok))]

        # address of the memory operand of instruction words ws, run for expert expert_v
        def operand_addr(ws, expert_v):
            sel, ix = _field(ws, "base"), _field(ws, "index")
            idx_v = Mux(ix == 1, task, Mux(ix == 2, expert_v, 0))
            base_v = Mux(sel == 0, bases[1], Mux(sel == 1, bases[2], bases[3]))
            return base_v + _field(ws, "addr") + idx_v * _field(ws, "stride")

        op_addr = Signal(AB)
        m.d.sync += op_addr.eq(operand_addr(ins, expert))
        uses_mem = is_op[Op.LOAD_ROWS] | is_op[Op.LAYERNORM] | is_op[Op.LINEAR] | is_op[Op.STORE]

        # transfer sizes
        cb = p.act_cb

        def linear_beats(ws):
            """Weight-stream beats of LINEAR words ws: per column of To outputs, its header (bias
            flag, or always with channel multipliers) and one tile per chunk of G inputs."""
            li, lo = (p.G - 1).bit_length(), (p.To - 1).bit_length()
            kc_v, nc_v = (_field(ws, "k") + (p.G - 1)) >> li, (_field(ws, "n") + (p.To - 1)) >> lo
            hdr = 1 if layout.channel else _field(ws, "flags")[0]
            return nc_v * (kc_v * layout.tile_beats + Mux(hdr, layout.bias_beats, 0))

        lin_beats = Signal(24)
        m.d.sync += lin_beats.eq(linear_beats(ins))
        vals = Signal(32)
        m.d.sync += vals.eq(rows * k)
        move_bytes = vals * cb
        move_beats = (move_bytes + (B - 1)) >> beat_lg
        tail = move_bytes[:beat_lg]               # bytes used in the last beat (0 = all)
        last_strb = Signal(B)
        with m.Switch(tail):
            for t in range(B):
                with m.Case(t):
                    m.d.comb += last_strb.eq((1 << B) - 1 if t == 0 else (1 << t) - 1)
        ln_beats = _ln_sizes(q, p.dim, B)[1] // B

        # --- controller -------------------------------------------------------------------------
        pc = Signal(20)
        loop_start, loop_end = Signal(20), Signal(20)
        rd_cmd_valid, wr_cmd_valid = Signal(), Signal()
        rd_cmd_addr, rd_cmd_beats = Signal(AB), Signal(24)
        m.d.comb += [axim.rd_cmd.valid.eq(rd_cmd_valid), axim.rd_cmd.payload.addr.eq(rd_cmd_addr),
                     axim.rd_cmd.payload.beats.eq(rd_cmd_beats),
                     axim.wr_cmd.valid.eq(wr_cmd_valid), axim.wr_cmd.payload.addr.eq(op_addr),
                     axim.wr_cmd.payload.beats.eq(move_beats), axim.wr_cmd.payload.last_strb.eq(last_strb)]
        with m.If(axim.rd_cmd.valid & axim.rd_cmd.ready):
            m.d.sync += rd_cmd_valid.eq(0)
        with m.If(axim.wr_cmd.valid & axim.wr_cmd.ready):
            m.d.sync += wr_cmd_valid.eq(0)

        # read beats to their consumer
        fetching = Signal()
        # prefetch of the next instruction during EXEC: 0 none, 1 AR issued, 2 instruction held
        # in pf_buf
        pf_state = Signal(2)
        pf_wait = Signal()                            # EXEC and the prefetch not complete
        # an instruction is IB beats (beat 0 = words 0 .. WPB-1): FETCH and the prefetch shift
        # them into pf_buf; the last beat completes it (FETCH_WAIT takes it straight into ins)
        IB, WPB = INSTR_BYTES // B, B // 4
        pf_buf = [Signal(32, name=f"pf_ins{i}") for i in range(8)]
        f_cnt = Signal(range(max(IB, 2)))              # beats of the instruction already in
        f_last = (f_cnt == IB - 1) if IB > 1 else Const(1, 1)

        def shifted_in(beat):
            return pf_buf[WPB:] + [beat[32 * j:32 * (j + 1)] for j in range(WPB)]

        # Beats arrive in request order: the running instruction's data (cur_left beats), then the
        # prefetched instruction, then (early) the next instruction's data, which waits in the R
        # channel (rready low) until that instruction runs. AXI errors go to the beat's owner.
        cur_left = Signal(24)                         # data beats of this instruction still to come
        early = Signal()                              # the next instruction's data is requested
        f_err = Signal()                              # an instruction beat had an error response
        d_err = Signal()                              # a data beat of this instruction had one
        own = cur_left != 0
        # expert-weight streaming (weight_fifo_beats > 0): beats the streamer requested go to
        # the weight FIFO; a streamed LINEAR takes its beats from there (from_fifo)
        SD = hw.weight_fifo_beats
        from_fifo = Signal()
        s_out = Signal(32)                            # streamer beats requested, not yet arrived
        own_r = own & ~from_fifo                      # this instruction's beats come from R
        take_ins = fetching | (pf_wait & ~own_r & (s_out == 0))
        consumers = [(is_op[Op.LOAD_ROWS], load.d), (is_op[Op.LAYERNORM], ln.p), (is_op[Op.LINEAR], lin.w)]
        to_fifo, fifo_pop = Signal(), Signal()
        flush = Signal()                              # a fail: the FIFO empties with the stream
        KI, AXB = hw.weight_intake_beats, hw.axi_data_bits
        if SD:
            # words of KI beats (+ an AXI-error bit): the compute unit takes one word per cycle
            m.submodules.wfifo = wfifo = ResetInserter(soft_rst | flush)(
                SyncFIFOBuffered(width=KI * AXB + 1, depth=SD // KI))
            pk = Signal(max(1, (KI - 1) * AXB), name="pack")    # KI > 1: the word's first beats
            pk_n = Signal(range(KI), name="pack_n")
            pk_err = Signal(name="pack_err")
            with m.If(soft_rst | flush):
                m.d.sync += [pk_n.eq(0), pk_err.eq(0)]

        def feed(s, payload):
            """A consumer's stream payload <- one beat from the port."""
            if s is lin.w and KI > 1:
                return [s.payload.data.eq(payload), s.payload.wide.eq(0)]
            return [s.payload.eq(payload)]
        with m.If(take_ins):
            m.d.comb += axim.rd_data.ready.eq(1)
            with m.If(axim.rd_data.valid):
                m.d.sync += [w.eq(v) for w, v in zip(pf_buf, shifted_in(axim.rd_data.payload))]
                m.d.sync += f_cnt.eq(Mux(f_last, 0, f_cnt + 1))
                with m.If(axim.rd_err):
                    m.d.sync += f_err.eq(1)
                with m.If(pf_wait & f_last):
                    m.d.sync += pf_state.eq(2)
        for cond, s in consumers:
            with m.Elif(cond & busy & own_r):
                m.d.comb += [s.valid.eq(axim.rd_data.valid), *feed(s, axim.rd_data.payload),
                             axim.rd_data.ready.eq(s.ready)]
                with m.If(axim.rd_data.valid & s.ready):
                    m.d.sync += cur_left.eq(cur_left - 1)
                    with m.If(axim.rd_err):
                        m.d.sync += d_err.eq(1)
        if SD:
            with m.Elif(busy & (s_out != 0)):
                # the FIFO always has room: the streamer reserved it before the request. KI > 1:
                # the first KI - 1 beats of a word wait in `pack` (a streamed instruction's beats
                # are whole words: KI divides every tile and header)
                if KI == 1:
                    m.d.comb += [wfifo.w_en.eq(axim.rd_data.valid), wfifo.w_data.eq(Cat(axim.rd_data.payload, axim.rd_err)),
                                 axim.rd_data.ready.eq(wfifo.w_rdy), to_fifo.eq(axim.rd_data.valid & wfifo.w_rdy)]
                else:
                    word_end = pk_n == KI - 1
                    m.d.comb += [wfifo.w_en.eq(axim.rd_data.valid & word_end),
                                 wfifo.w_data.eq(Cat(pk, axim.rd_data.payload, pk_err | axim.rd_err)),
                                 axim.rd_data.ready.eq(~word_end | wfifo.w_rdy),
                                 to_fifo.eq(axim.rd_data.valid & axim.rd_data.ready)]
                    with m.If(to_fifo & ~soft_rst & ~flush):
                        m.d.sync += pk_n.eq(Mux(word_end, 0, pk_n + 1))
                        m.d.sync += pk_err.eq(~word_end & (pk_err | axim.rd_err))
                        with m.Switch(pk_n):
                            for i in range(KI - 1):
                                with m.Case(i):
                                    m.d.sync += pk[i * AXB:(i + 1) * AXB].eq(axim.rd_data.payload)
        with m.Elif(~busy):
            m.d.comb += axim.rd_data.ready.eq(1)     # drain beats of an aborted transfer
        if SD:
            with m.If(is_op[Op.LINEAR] & busy & own & from_fifo):
                if KI == 1:
                    m.d.comb += lin.w.payload.eq(wfifo.r_data[:AXB])
                else:
                    m.d.comb += [lin.w.payload.data.eq(wfifo.r_data[:KI * AXB]), lin.w.payload.wide.eq(1)]
                m.d.comb += [lin.w.valid.eq(wfifo.r_rdy),
                             wfifo.r_en.eq(lin.w.ready), fifo_pop.eq(wfifo.r_rdy & lin.w.ready)]
                with m.If(fifo_pop):
                    m.d.sync += cur_left.eq(cur_left - KI)
                    with m.If(wfifo.r_data[-1]):
                        m.d.sync += d_err.eq(1)
        m.d.comb += [axim.wr_data.valid.eq(store.d.valid & is_op[Op.STORE]),
                     axim.wr_data.payload.eq(store.d.payload), store.d.ready.eq(axim.wr_data.ready & is_op[Op.STORE])]

        # engine command inputs (stable while the instruction runs)
        qlen = Signal(p.qpos_bits + 1)
        qbase = Signal(p.qpos_bits)
        if gate is not None:
            m.d.comb += [qlen.eq(gate.q_len[expert]), qbase.eq(gate.q_base[expert])]
        m.d.comb += [
            load.row_off.eq(row_off), load.words.eq(vals >> (p.G - 1).bit_length()),
            load.wpr_k.eq(k >> (p.G - 1).bit_length()), load.add.eq(flags[0]),
            store.words.eq(vals >> (p.G - 1).bit_length()), store.wpr_k.eq(k >> (p.G - 1).bit_length()),
            lin.flags.eq(flags), lin.rows.eq(Mux(queue_mode, qlen, rows)), lin.row_off.eq(row_off),
            lin.k.eq(k), lin.n.eq(n), lin.q_base.eq(qbase),
            ln.rows.eq(rows),
        ]
        if gate is not None:
            m.d.comb += gate.rows.eq(rows)

        sat_sum = lin.sat + ln.sat + att.sat + load.sat + (gate.sat if gate is not None else 0)
        sat_next = sat + sat_sum
        with m.If(busy):
            m.d.sync += [cycles.eq(cycles + 1), sat.eq(Mux(sat_next[32:].any(), 0xFFFF_FFFF, sat_next[:32]))]
            # streamed beats count when used (as the one-at-a-time controller reads them)
            rd_n = ((axim.rd_data.valid & axim.rd_data.ready & ~to_fifo).as_unsigned()
                    + Mux(fifo_pop, hw.weight_intake_beats, 0))
            m.d.sync += rbytes.eq(rbytes + rd_n * B)
            with m.If(axim.wr_data.valid & axim.wr_data.ready):
                m.d.sync += wbytes.eq(wbytes + B)

        engine_done = Signal()
        m.d.comb += engine_done.eq(Mux(is_op[Op.LOAD_ROWS], load.done, 0) | Mux(is_op[Op.STORE], store.done, 0)
                                   | Mux(is_op[Op.LINEAR], lin.done, 0) | Mux(is_op[Op.LAYERNORM], ln.done, 0)
                                   | Mux(is_op[Op.ATTENTION], att.done, 0)
                                   | (Mux(is_op[Op.GATE], gate.done, 0) if gate is not None else 0))
        starts = {Op.LOAD_ROWS: load.start, Op.STORE: store.start, Op.LINEAR: lin.start,
                  Op.LAYERNORM: ln.start, Op.ATTENTION: att.start}
        if gate is not None:
            starts[Op.GATE] = gate.start

        # expert-weight streamer state (hw.weight_fifo_beats > 0; constant 0 otherwise)
        lb = [[Signal(32, name=f"lb{j}_{i}") for i in range(8)] for j in range(2)]   # loop body
        first_iter, cap_ok, stream_on = Signal(), Signal(), Signal()
        s_exp = Signal.like(expert, name="s_exp")     # the streamer's cursor: expert, body index
        s_j, s_more, s_stop, s_fresh = Signal(), Signal(), Signal(), Signal()
        s_res = Signal(32)                            # FIFO beats reserved: requested, not yet used
        s_req, s_use = Signal(16), Signal(16)         # streamed instructions requested / started
        ctl_req = Signal()                            # the controller writes rd_cmd this cycle

        def stream_reset():
            return [stream_on.eq(0), first_iter.eq(0), from_fifo.eq(0), s_res.eq(0), s_out.eq(0),
                    s_req.eq(0), s_use.eq(0), s_more.eq(0), s_stop.eq(0)]

        def fail(code):
            m.d.sync += [err_code.eq(code), err_pc.eq(pc), error.eq(1), busy.eq(0), in_loop.eq(0),
                         pf_state.eq(0), f_cnt.eq(0), cur_left.eq(0), early.eq(0), f_err.eq(0), d_err.eq(0)]
            m.d.sync += stream_reset()
            m.d.comb += flush.eq(1)
            m.next = "IDLE"

        # next active expert above `expert` (priority encoder over the metaqueue)
        def next_active(after):
            found, nxt = Const(0, 1), Const(0, expert.shape())
            if gate is not None:
                for e in reversed(range(p.experts)):
                    hit = gate.active[e] & ((e > after) if after is not None else Const(1, 1))
                    nxt = Mux(hit, e, nxt)
                    found = found | hit
            return found, nxt

        gate_ovf = gate.overflow if gate is not None else Const(0, 1)
        ex_found, ex_next = next_active(expert)
        first_found, first = next_active(None)
        stored_done = Signal()

        # the prefetched instruction under the loop state it will run with: when DECODE will take
        # it and it is a LINEAR or LAYERNORM, its data is requested early (EXEC below)
        at_loop_end = Signal()
        m.d.comb += at_loop_end.eq(in_loop & (pc == loop_end))
        nx_expert = Mux(at_loop_end & ex_found, ex_next, expert)
        nx_checks = decode_checks(pf_buf, in_loop & ~(at_loop_end & ~ex_found), gate_ok | is_op[Op.GATE])
        nx_op = _field(pf_buf, "op")
        nx_lin, nx_ln = nx_op == int(Op.LINEAR), nx_op == int(Op.LAYERNORM)
        nx_addr, nx_beats = Signal(AB), Signal(24)
        nx_ok, nx_valid = Signal(), Signal()       # registered from pf_buf (valid: it was complete)
        m.d.sync += [nx_addr.eq(operand_addr(pf_buf, nx_expert)),
                     nx_beats.eq(Mux(nx_lin, linear_beats(pf_buf), ln_beats)),
                     nx_ok.eq(~Cat(*nx_checks).any() & (nx_lin | nx_ln) & ~f_err & (retired < MAX_INSTRUCTIONS)),
                     nx_valid.eq(pf_state == 2)]

        body_j = (pc - loop_start)[0]                 # 0 / 1 in a body of one or two
        small_body = (loop_end - loop_start) <= 1
        npc_in_body = Mux(at_loop_end, ex_found, in_loop)
        sins = stream_on & in_loop                    # this instruction's weights are streamed
        if SD:
            # Inside an expert loop whose body is one or two LINEARs of at most SD beats each,
            # once the first iteration has run both: the body is replayed from lb (no fetches)
            # and the weights of the experts still to run are requested in execution order as
            # soon as the FIFO has room for a whole instruction's beats; the port then keeps
            # streaming through compute-bound experts for the DRAM-bound ones after them.
            s_words = [Mux(s_j, lb[1][i], lb[0][i]) for i in range(8)]
            s_addr, s_beats = Signal(AB), Signal(24)
            m.d.sync += [s_addr.eq(operand_addr(s_words, s_exp)), s_beats.eq(linear_beats(s_words)),
                         s_fresh.eq(1)]
            s_found, s_next = next_active(s_exp)
            s_go = Signal()
            s_bad = s_addr[:beat_lg].any() if beat_lg else Const(0)
            m.d.comb += s_go.eq(busy & stream_on & s_more & s_fresh & ~s_stop & ~rd_cmd_valid & ~ctl_req
                                & ~s_bad & (s_res + s_beats <= SD))
            with m.If(stream_on & s_more & s_fresh & s_bad):
                m.d.sync += s_stop.eq(1)      # that instruction stops with ERR_ADDRESS at ISSUE
            m.d.sync += [s_res.eq(s_res + Mux(s_go, s_beats, 0) - Mux(fifo_pop, KI, 0)),
                         s_out.eq(s_out + Mux(s_go, s_beats, 0) - to_fifo)]
            with m.If(s_go):
                m.d.sync += [rd_cmd_valid.eq(1), rd_cmd_addr.eq(s_addr), rd_cmd_beats.eq(s_beats),
                             s_req.eq(s_req + 1), s_fresh.eq(0)]
                with m.If(s_j == (loop_end - loop_start)[0]):
                    m.d.sync += s_j.eq(0)
                    with m.If(s_found):
                        m.d.sync += s_exp.eq(s_next)
                    with m.Else():
                        m.d.sync += s_more.eq(0)
                with m.Else():
                    m.d.sync += s_j.eq(1)

        with m.FSM(name="ctrl"):
            with m.State("IDLE"):
                with m.If(start_req & axim.rd_idle & axim.wr_idle):
                    m.d.comb += soft_rst.eq(1)
                    m.d.sync += [busy.eq(1), done.eq(0), error.eq(0), err_code.eq(0), err_pc.eq(0),
                                 pc.eq(0), cycles.eq(0), rbytes.eq(0), wbytes.eq(0), sat.eq(0),
                                 retired.eq(0), in_loop.eq(0), gate_ok.eq(0), start_req.eq(0),
                                 pf_state.eq(0), f_cnt.eq(0), cur_left.eq(0), early.eq(0),
                                 f_err.eq(0), d_err.eq(0)]
                    m.d.sync += stream_reset()
                    m.next = "FETCH"
            with m.State("FETCH"):
                m.d.comb += ctl_req.eq(1)
                m.d.sync += [rd_cmd_valid.eq(1), rd_cmd_addr.eq(bases[0] + pc * INSTR_BYTES),
                             rd_cmd_beats.eq(IB), f_err.eq(0)]
                m.next = "FETCH_WAIT"
            with m.State("FETCH_WAIT"):
                m.d.comb += fetching.eq(1)
                with m.If(axim.rd_data.valid & f_last):
                    m.d.sync += [w.eq(v) for w, v in zip(ins, shifted_in(axim.rd_data.payload))]
                    m.next = "DECODE"
            with m.State("DECODE"):
                # op_addr / sizes are registered from the instruction in this cycle
                with m.If(retired >= MAX_INSTRUCTIONS):
                    fail(ERR_RUNAWAY)
                with m.Elif(f_err):                    # the fetch itself failed (no instruction)
                    fail(ERR_ADDRESS)
                with m.Elif(illegal):
                    fail(ERR_ILLEGAL)
                with m.Elif(bad_loop):
                    fail(ERR_LOOP)
                with m.Elif(illegal_op):
                    fail(ERR_ILLEGAL)
                with m.Elif(bad_buffer):
                    fail(ERR_BUFFER)
                with m.Else():
                    m.d.sync += retired.eq(retired + 1)
                    m.next = "ISSUE"
            with m.State("ISSUE"):
                m.d.comb += ctl_req.eq(~sins)
                with m.If(uses_mem & op_addr[:beat_lg].any()):
                    fail(ERR_ADDRESS)
                with m.Elif(is_op[Op.END]):
                    m.d.sync += [busy.eq(0), done.eq(1)]
                    m.next = "IDLE"
                with m.Elif(is_op[Op.EXPERT_LOOP]):
                    with m.If(first_found):
                        m.d.sync += [in_loop.eq(1), expert.eq(first), loop_start.eq(pc + 1),
                                     loop_end.eq(pc + arg), pc.eq(pc + 1), first_iter.eq(1)]
                    with m.Else():
                        m.d.sync += pc.eq(pc + arg + 1)
                    m.next = "FETCH"
                with m.Elif(sins & (s_req == s_use)):
                    pass                # its weights are not requested yet (the FIFO is full)
                with m.Else():
                    for o, s in starts.items():
                        with m.If(is_op[o]):
                            m.d.comb += s.eq(1)
                    with m.If(is_op[Op.LOAD_ROWS] & (move_beats != 0)):
                        m.d.sync += [rd_cmd_valid.eq(1), rd_cmd_addr.eq(op_addr), rd_cmd_beats.eq(move_beats)]
                    with m.If(is_op[Op.LAYERNORM] & ~early):
                        m.d.sync += [rd_cmd_valid.eq(1), rd_cmd_addr.eq(op_addr), rd_cmd_beats.eq(ln_beats)]
                    with m.If(is_op[Op.LINEAR] & ~early & ~sins):
                        m.d.sync += [rd_cmd_valid.eq(1), rd_cmd_addr.eq(op_addr), rd_cmd_beats.eq(lin_beats)]
                    m.d.sync += from_fifo.eq(sins)
                    with m.If(sins):
                        m.d.sync += s_use.eq(s_use + 1)
                    if SD:
                        # the first iteration: hold the body and decide whether the loop streams
                        with m.If(in_loop & first_iter & small_body):
                            ok = is_op[Op.LINEAR] & (lin_beats <= SD)
                            fin = Mux(body_j == 0, ok, cap_ok & ok)
                            m.d.sync += cap_ok.eq(fin)
                            for j in range(2):
                                with m.If(body_j == j):
                                    m.d.sync += [w.eq(v) for w, v in zip(lb[j], ins)]
                            with m.If((pc == loop_end) & fin & ex_found):
                                m.d.sync += [stream_on.eq(1), s_exp.eq(ex_next), s_j.eq(0), s_more.eq(1),
                                             s_stop.eq(0), s_fresh.eq(0)]
                    m.d.sync += [cur_left.eq(Mux(is_op[Op.LOAD_ROWS], move_beats, Mux(is_op[Op.LAYERNORM], ln_beats,
                                                                               Mux(is_op[Op.LINEAR], lin_beats, 0)))),
                                 early.eq(0), d_err.eq(0)]
                    with m.If(is_op[Op.STORE] & (move_beats != 0)):
                        m.d.sync += wr_cmd_valid.eq(1)
                    m.d.sync += stored_done.eq(0)
                    m.next = "EXEC"
            with m.State("EXEC"):
                # the pc after this instruction: back to the loop start while experts remain
                npc = Mux(at_loop_end & ex_found, loop_start, pc + 1)
                # a streamer request still waiting for the AXI master does not hold the retire
                # when the next instruction comes from lb (nothing writes rd_cmd before it)
                finishing = ((engine_done | stored_done) & ~wr_cmd_valid & axim.wr_idle
                             & (~rd_cmd_valid | (stream_on & npc_in_body)))
                m.d.comb += pf_wait.eq(pf_state == 1)
                # the next instruction is requested as soon as this one's reads are (its beats
                # follow them); not in the retire cycle itself (FETCH would then see two)
                with m.If((pf_state == 0) & ~is_op[Op.STORE] & ~rd_cmd_valid & ~early
                          & ~axim.error & ~finishing & ~(stream_on & npc_in_body)):
                    m.d.comb += ctl_req.eq(1)
                    m.d.sync += [rd_cmd_valid.eq(1), rd_cmd_addr.eq(bases[0] + npc * INSTR_BYTES),
                                 rd_cmd_beats.eq(IB), pf_state.eq(1), f_err.eq(0)]
                # then its data, behind them (not after LOAD_ROWS or GATE, which may still fail)
                with m.Elif(nx_valid & (pf_state == 2) & nx_ok & ~nx_addr[:beat_lg].any() & ~early
                            & ~rd_cmd_valid & ~is_op[Op.LOAD_ROWS] & ~is_op[Op.GATE] & ~finishing
                            & ~d_err & ~axim.error):
                    m.d.comb += ctl_req.eq(1)
                    m.d.sync += [rd_cmd_valid.eq(1), rd_cmd_addr.eq(nx_addr), rd_cmd_beats.eq(nx_beats),
                                 early.eq(1)]
                with m.If(engine_done):
                    m.d.sync += stored_done.eq(1)
                with m.If(d_err | (is_op[Op.STORE] & axim.error)):
                    fail(ERR_ADDRESS)
                with m.Elif(finishing):
                    with m.If(is_op[Op.LOAD_ROWS] & load.bad):
                        fail(ERR_DATA)
                    with m.Elif(is_op[Op.GATE] & gate_ovf):
                        fail(ERR_BUFFER)
                    with m.Else():
                        m.d.comb += [self.retire.eq(1), self.retire_pc.eq(pc), self.retire_expert.eq(expert)]
                        with m.If(is_op[Op.GATE]):
                            m.d.sync += gate_ok.eq(1)
                        # next pc: loop back / next expert / fall through
                        m.d.sync += [pc.eq(npc), pf_state.eq(0)]
                        with m.If(at_loop_end):
                            m.d.sync += first_iter.eq(0)
                            with m.If(ex_found):
                                m.d.sync += expert.eq(ex_next)
                            with m.Else():
                                m.d.sync += [in_loop.eq(0), stream_on.eq(0)]
                        # a streamed loop replays its body from lb
                        with m.If(stream_on & npc_in_body):
                            for j in range(2):
                                with m.If(Mux(at_loop_end, 0, body_j + 1) == j):
                                    m.d.sync += [w.eq(b) for w, b in zip(ins, lb[j])]
                            m.next = "DECODE"
                        # the prefetched beat is taken as FETCH_WAIT takes one; an AXI error it
                        # raised stops the next instruction's EXEC at npc, as after a FETCH
                        with m.Elif(pf_state == 2):
                            m.d.sync += [w.eq(b) for w, b in zip(ins, pf_buf)]
                            m.next = "DECODE"
                        with m.Elif((pf_state == 1) & ~own & axim.rd_data.valid & f_last):  # arriving now
                            m.d.sync += [w.eq(v) for w, v in zip(ins, shifted_in(axim.rd_data.payload))]
                            m.next = "DECODE"
                        with m.Elif(pf_state == 1):
                            m.next = "FETCH_WAIT"
                        with m.Else():
                            m.next = "FETCH"
        return m
