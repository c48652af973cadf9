"""Bus interfaces of the accelerator top: an AXI4 memory master and an AXI4-Lite register slave.

Signatures (flat members named like the AXI signals, lower case; a top member `m_axi` exports
ports `m_axi__araddr`, ... under the hw/export.py naming rule):
  axi4_signature(addr_bits, data_bits)  master view: a master uses Out(...), a slave In(...).
      AR: araddr arlen(8) arsize(3) arburst(2) arcache(4) arprot(3) arvalid | arready
      R : rdata rresp(2) rlast rvalid (in) | rready (out)
      AW: awaddr awlen awsize awburst awcache awprot awvalid | awready
      W : wdata wstrb(data_bits/8) wlast wvalid | wready
      B : bresp(2) bvalid (in) | bready (out)
    No ID signals: the master uses one ID, so the interconnect ties them to 0 and keeps order.
  axil_signature(addr_bits=8)  32-bit AXI4-Lite, members oriented so that the slave (the
    accelerator top) declares In(axil_signature()): awaddr awvalid wdata wstrb wvalid bready
    araddr arvalid rready become its inputs, awready wready bresp bvalid arready rdata rresp
    rvalid its outputs.

AxiMaster(addr_bits, data_bits, max_burst=256, max_outstanding=8): turns commands
  rd_cmd {addr, beats} and wr_cmd {addr, beats, last_strb} into INCR bursts of at most max_burst
  beats that never cross a 4 KiB boundary. Addresses must be beat aligned (data_bits/8 bytes).
  A command with beats == 0 is accepted and does nothing.
  * rd_data: every beat of every accepted read command, in command order. It is a direct view of
    the R channel (rd_data.valid = rvalid, rready = rd_data.ready): no buffering, no extra latency.
    Up to max_outstanding read bursts are in flight, so a long read streams one beat per cycle.
  * wr_data: the write beats in command order; wstrb is all ones except on the final beat of a
    command, which carries that command's last_strb. Likewise a direct view of the W channel
    (wvalid = wr_data.valid & burst known, wr_data.ready = wready & burst known). AW and W are
    independent: W beats may go out before their AW is accepted (and vice versa).
  * rd_err: the beat on rd_data carries an rresp other than OKAY (a direct view, like rd_data:
    the user attributes the error to whoever takes that beat).
  * rd_idle / wr_idle: no command being split and every issued burst finished (last R beat /
    B response received). They fall the cycle after a command handshake with beats > 0.
  * error: sticky, set by any rresp/bresp other than OKAY; `clear` resets it (and wins over a
    same-cycle error).
  Command acceptance: one command is split at a time per direction; the next is accepted once the
  last burst of the current one has been issued to the AR/AW register. AR/AW outputs are
  registered; the only combinational paths from inputs to outputs are the R and W data views
  above (rvalid -> rd_data.valid, rd_data.ready -> rready, wr_data.valid -> wvalid,
  wready -> wr_data.ready), which cannot loop with an AXI slave (its valids never depend on
  ready) or with a stream peer (its valid never depends on ready).

AxiLiteSlave(addr_bits=8): register-file side
  wr_en (1-cycle pulse) with wr_addr, wr_data, wr_strb: one write, after both AW and W arrived
  (in any order); B (OKAY) is raised in the same cycle as wr_en.
  rd_en (1-cycle pulse) with rd_addr: the user presents rd_data the cycle after rd_en (e.g. a
  register loaded on rd_en); the slave captures it into rdata and raises R (OKAY) one cycle
  later. rd_addr stays stable until the next read is accepted, so a combinational rd_data works.
  One outstanding transaction per direction; no combinational path from an input to an output.
"""
from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out

BEATS_BITS = 24          # width of the `beats` field of rd_cmd / wr_cmd
PAGE_BYTES = 4096        # AXI: a burst must not cross a 4 KiB boundary
AXCACHE = 0b0011         # normal non-cacheable bufferable (what Xilinx HP ports expect)
RESP_OKAY = 0
BURST_INCR = 0b01


def _check_widths(addr_bits: int, data_bits: int):
    if not isinstance(addr_bits, int) or not 12 <= addr_bits <= 64:
        raise ValueError(f"AXI addr_bits = {addr_bits!r} must be an integer in 12..64")
    if not isinstance(data_bits, int) or data_bits not in (8, 16, 32, 64, 128, 256, 512, 1024):
        raise ValueError(f"AXI data_bits = {data_bits!r} must be a power of two in 8..1024")


def axi4_signature(addr_bits: int, data_bits: int) -> wiring.Signature:
    _check_widths(addr_bits, data_bits)
    return wiring.Signature({
        "araddr": Out(addr_bits), "arlen": Out(8), "arsize": Out(3), "arburst": Out(2),
        "arcache": Out(4), "arprot": Out(3), "arvalid": Out(1), "arready": In(1),
        "rdata": In(data_bits), "rresp": In(2), "rlast": In(1), "rvalid": In(1),
        "rready": Out(1),
        "awaddr": Out(addr_bits), "awlen": Out(8), "awsize": Out(3), "awburst": Out(2),
        "awcache": Out(4), "awprot": Out(3), "awvalid": Out(1), "awready": In(1),
        "wdata": Out(data_bits), "wstrb": Out(data_bits // 8), "wlast": Out(1),
        "wvalid": Out(1), "wready": In(1),
        "bresp": In(2), "bvalid": In(1), "bready": Out(1),
    })


def axil_signature(addr_bits: int = 8) -> wiring.Signature:
    if not isinstance(addr_bits, int) or not 2 <= addr_bits <= 32:
        raise ValueError(f"AXI4-Lite addr_bits = {addr_bits!r} must be an integer in 2..32")
    # Oriented like the master's outputs, so the slave side is In(axil_signature()).
    return wiring.Signature({
        "awaddr": Out(addr_bits), "awvalid": Out(1), "awready": In(1),
        "wdata": Out(32), "wstrb": Out(4), "wvalid": Out(1), "wready": In(1),
        "bresp": In(2), "bvalid": In(1), "bready": Out(1),
        "araddr": Out(addr_bits), "arvalid": Out(1), "arready": In(1),
        "rdata": In(32), "rresp": In(2), "rvalid": In(1), "rready": Out(1),
    })


def rd_cmd_layout(addr_bits: int) -> data.StructLayout:
    return data.StructLayout({"addr": addr_bits, "beats": BEATS_BITS})


def wr_cmd_layout(addr_bits: int, data_bits: int) -> data.StructLayout:
    return data.StructLayout({"addr": addr_bits, "beats": BEATS_BITS, "last_strb": data_bits // 8})


class _Splitter:
    """Splits the current command into bursts: `blen` is the next burst's length (from registers
    only), `take` (driven by the user) consumes it and advances addr / remaining."""

    def __init__(self, m: Module, name: str, cmd, addr_bits: int, size_log2: int, max_burst: int):
        self.addr = Signal(addr_bits, name=f"{name}_addr")
        self.rem = Signal(BEATS_BITS, name=f"{name}_rem")
        self.take = Signal(name=f"{name}_take")
        self.busy = Signal(name=f"{name}_busy")
        page_beats = PAGE_BYTES >> size_log2
        cap = min(max_burst, page_beats)
        page_left = Signal(range(page_beats + 1), name=f"{name}_page_left")
        lim = Signal(range(cap + 1), name=f"{name}_lim")
        self.blen = Signal(range(cap + 1), name=f"{name}_blen")
        m.d.comb += [
            self.busy.eq(self.rem != 0),
            page_left.eq(page_beats - self.addr[size_log2:12]),
            lim.eq(Mux(page_left < cap, page_left, cap)),
            self.blen.eq(Mux(self.rem < lim, self.rem, lim)),
            cmd.ready.eq(~self.busy),
        ]
        with m.If(cmd.valid & ~self.busy):
            m.d.sync += [self.addr.eq(cmd.payload.addr), self.rem.eq(cmd.payload.beats)]
        with m.If(self.take):
            m.d.sync += [self.addr.eq(self.addr + (self.blen << size_log2)),
                         self.rem.eq(self.rem - self.blen)]


class AxiMaster(wiring.Component):
    def __init__(self, addr_bits: int = 32, data_bits: int = 256, max_burst: int = 256,
                 max_outstanding: int = 8):
        _check_widths(addr_bits, data_bits)
        if not isinstance(max_burst, int) or not 1 <= max_burst <= 256:
            raise ValueError(f"AxiMaster max_burst = {max_burst!r} must be in 1..256 beats (AXI4 INCR)")
        if not isinstance(max_outstanding, int) or max_outstanding < 1:
            raise ValueError(f"AxiMaster max_outstanding = {max_outstanding!r} must be >= 1")
        self.addr_bits, self.data_bits = addr_bits, data_bits
        self.max_burst, self.max_outstanding = max_burst, max_outstanding
        self.bytes_per_beat = data_bits // 8
        self.size_log2 = self.bytes_per_beat.bit_length() - 1
        super().__init__({
            "bus": Out(axi4_signature(addr_bits, data_bits)),
            "rd_cmd": In(stream.Signature(rd_cmd_layout(addr_bits))),
            "rd_data": Out(stream.Signature(data_bits)),
            "wr_cmd": In(stream.Signature(wr_cmd_layout(addr_bits, data_bits))),
            "wr_data": In(stream.Signature(data_bits)),
            "rd_idle": Out(1), "wr_idle": Out(1), "rd_err": Out(1),
            "error": Out(1), "clear": In(1),
        })

    def elaborate(self, platform):
        m = Module()
        bus = self.bus
        nstrb = self.bytes_per_beat
        m.d.comb += [
            bus.arsize.eq(self.size_log2), bus.awsize.eq(self.size_log2),
            bus.arburst.eq(BURST_INCR), bus.awburst.eq(BURST_INCR),
            bus.arcache.eq(AXCACHE), bus.awcache.eq(AXCACHE),
            bus.arprot.eq(0), bus.awprot.eq(0),
            bus.bready.eq(1),
        ]

        # --- read: AR from the splitter, R passed straight through -------------------------------
        rs = _Splitter(m, "rd", self.rd_cmd, self.addr_bits, self.size_log2, self.max_burst)
        rd_out = Signal(range(self.max_outstanding + 1))     # bursts issued, last beat not seen
        r_done = Signal()
        m.d.comb += [
            rs.take.eq((~bus.arvalid | bus.arready) & rs.busy & (rd_out < self.max_outstanding)),
            self.rd_data.valid.eq(bus.rvalid),
            self.rd_data.payload.eq(bus.rdata),
            self.rd_err.eq(bus.rresp != RESP_OKAY),
            bus.rready.eq(self.rd_data.ready),
            r_done.eq(bus.rvalid & bus.rready & bus.rlast),
        ]
        with m.If(rs.take):
            m.d.sync += [bus.arvalid.eq(1), bus.araddr.eq(rs.addr), bus.arlen.eq(rs.blen - 1)]
        with m.Elif(bus.arready):
            m.d.sync += bus.arvalid.eq(0)
        m.d.sync += rd_out.eq(rd_out + rs.take - r_done)
        m.d.comb += self.rd_idle.eq(~rs.busy & (rd_out == 0))

        # --- write: AW from the splitter; each burst's shape queued for the W side ----------------
        ws = _Splitter(m, "wr", self.wr_cmd, self.addr_bits, self.size_log2, self.max_burst)
        last_strb = Signal(nstrb)
        with m.If(self.wr_cmd.valid & self.wr_cmd.ready):
            m.d.sync += last_strb.eq(self.wr_cmd.payload.last_strb)
        burst = data.StructLayout({"len": 8, "final": 1, "strb": nstrb})
        wq = fifo.SyncFIFO(width=burst.size, depth=self.max_outstanding)
        m.submodules.wq = wq
        wr_out = Signal(range(self.max_outstanding + 1))     # bursts issued, B not seen
        b_done = Signal()
        m.d.comb += [
            ws.take.eq((~bus.awvalid | bus.awready) & ws.busy & (wr_out < self.max_outstanding)
                       & wq.w_rdy),
            wq.w_en.eq(ws.take),
            b_done.eq(bus.bvalid),                                 # bready is always 1
        ]
        w_in = data.View(burst, wq.w_data)
        m.d.comb += [w_in.len.eq(ws.blen - 1), w_in.final.eq(ws.blen == ws.rem),
                     w_in.strb.eq(last_strb)]
        with m.If(ws.take):
            m.d.sync += [bus.awvalid.eq(1), bus.awaddr.eq(ws.addr), bus.awlen.eq(ws.blen - 1)]
        with m.Elif(bus.awready):
            m.d.sync += bus.awvalid.eq(0)
        m.d.sync += wr_out.eq(wr_out + ws.take - b_done)
        m.d.comb += self.wr_idle.eq(~ws.busy & (wr_out == 0))

        head = data.View(burst, wq.r_data)
        wcnt = Signal(8)
        w_fire = Signal()
        m.d.comb += [
            bus.wlast.eq(wcnt == head.len),
            bus.wvalid.eq(self.wr_data.valid & wq.r_rdy),
            self.wr_data.ready.eq(bus.wready & wq.r_rdy),
            bus.wdata.eq(self.wr_data.payload),
            bus.wstrb.eq(Mux(bus.wlast & head.final, head.strb, (1 << nstrb) - 1)),
            w_fire.eq(bus.wvalid & bus.wready),
            wq.r_en.eq(w_fire & bus.wlast),
        ]
        with m.If(w_fire):
            m.d.sync += wcnt.eq(Mux(bus.wlast, 0, wcnt + 1))

        # --- sticky error ----------------------------------------------------------------------
        with m.If(self.clear):
            m.d.sync += self.error.eq(0)
        with m.Elif((bus.rvalid & bus.rready & (bus.rresp != RESP_OKAY))
                    | (bus.bvalid & (bus.bresp != RESP_OKAY))):
            m.d.sync += self.error.eq(1)
        return m


class AxiLiteSlave(wiring.Component):
    def __init__(self, addr_bits: int = 8):
        self.addr_bits = addr_bits
        super().__init__({
            "bus": In(axil_signature(addr_bits)),
            "wr_en": Out(1), "wr_addr": Out(addr_bits), "wr_data": Out(32), "wr_strb": Out(4),
            "rd_en": Out(1), "rd_addr": Out(addr_bits), "rd_data": In(32),
        })

    def elaborate(self, platform):
        m = Module()
        bus = self.bus

        # --- write: hold AW and W until both are here, then one wr_en pulse and B --------------
        aw_full, w_full = Signal(), Signal()
        aw_addr = Signal(self.addr_bits)
        w_data, w_strb = Signal(32), Signal(4)
        m.d.comb += [bus.awready.eq(~aw_full & ~bus.bvalid), bus.wready.eq(~w_full & ~bus.bvalid),
                     bus.bresp.eq(RESP_OKAY)]
        with m.If(bus.awvalid & bus.awready):
            m.d.sync += [aw_full.eq(1), aw_addr.eq(bus.awaddr)]
        with m.If(bus.wvalid & bus.wready):
            m.d.sync += [w_full.eq(1), w_data.eq(bus.wdata), w_strb.eq(bus.wstrb)]
        m.d.sync += self.wr_en.eq(0)
        with m.If(aw_full & w_full):       # bvalid is low here: awready/wready were gated by it
            m.d.sync += [aw_full.eq(0), w_full.eq(0), bus.bvalid.eq(1), self.wr_en.eq(1),
                         self.wr_addr.eq(aw_addr), self.wr_data.eq(w_data),
                         self.wr_strb.eq(w_strb)]
        with m.If(bus.bvalid & bus.bready):
            m.d.sync += bus.bvalid.eq(0)

        # --- read: rd_en pulse, sample rd_data one cycle later, then R ---------------------------
        rd_busy, capture = Signal(), Signal()
        m.d.comb += [bus.arready.eq(~rd_busy), bus.rresp.eq(RESP_OKAY)]
        m.d.sync += [self.rd_en.eq(0), capture.eq(self.rd_en)]
        with m.If(bus.arvalid & ~rd_busy):
            m.d.sync += [rd_busy.eq(1), self.rd_en.eq(1), self.rd_addr.eq(bus.araddr)]
        with m.If(capture):
            m.d.sync += [bus.rdata.eq(self.rd_data), bus.rvalid.eq(1)]
        with m.If(bus.rvalid & bus.rready):
            m.d.sync += [bus.rvalid.eq(0), rd_busy.eq(0)]
        return m
