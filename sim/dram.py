"""cocotb side of the accelerator top: DRAM model, AXI4-Lite master, driver backend.

AxiDram         AXI4 slave memory on the accelerator's master port (prefix "m_axi__"): in-order,
                no IDs, INCR bursts; fixed read latency, a token bucket for bandwidth, several
                bursts outstanding, SLVERR outside [base, base + size), strobed writes, statistics.
                Host-side write(addr, data) / read(addr, n) touch the numpy array directly (no
                simulation time), so an AxiDram is also the driver's `Memory`.
AxiLiteMaster   read32(offset) / write32(offset, value) coroutines on the AXI4-Lite slave
                (prefix "s_axil__").
CocotbAccelBackend
                .mmio (AxiLiteMaster), .mem (AxiDram), .sleep(seconds) and driver(): the objects
                sim/driver.py's AsyncAcceleratorDriver needs to run against the RTL top.

Timing convention: every coroutine here wakes once per rising edge of `clk`; what it reads then
are the values from before the edge (what the flops sample), what it writes becomes visible
after the edge. A handshake "at edge t" is valid & ready both high when edge t samples them.
Read latency: the first beat of a burst whose AR handshake is at edge t has its R handshake at
edge t + latency_cycles at the earliest (later only for bandwidth, earlier bursts or rready).

Speed: one coroutine per clock edge handles all five channels, reads a handle only when the
handshake could happen (e.g. rready only while rvalid is driven; narrow ports through the
simulator object's integer read) and writes a handle only when its value changes. While idle
(nothing outstanding, arvalid / awvalid low) it sleeps until arvalid or awvalid changes and
counts the skipped edges from the simulation time. Measured on the test harness (Verilator,
256-bit port, tests/test_dram.py::test_model_speed): ~100k cycles/s streaming reads at one beat
a cycle, ~75k reads + writes, ~250k idle (= the bare clock).
"""
from __future__ import annotations

import math
from collections import deque
from fractions import Fraction

import numpy as np

from edgemoe.quant.interpreter import FlatMemory

OKAY, SLVERR = 0, 2
BURST_INCR = 1


class AxiProtocolError(AssertionError):
    """The master broke an AXI rule (only raised with strict=True)."""


def dram_beats_per_cycle(hwcfg) -> float:
    """Sustained DRAM beats per accelerator clock: dram_gbps over the port's clock x width,
    at most one beat a cycle."""
    port_bytes_per_s = hwcfg.clock_mhz * 1e6 * hwcfg.axi_data_bits / 8
    return min(1.0, hwcfg.dram_gbps * 1e9 / port_bytes_per_s)


def _h(dut, name):
    try:
        return getattr(dut, name)
    except AttributeError:
        raise AttributeError(f"DUT {dut._name} has no port {name!r}") from None


class _Burst:
    __slots__ = ("addr", "beats", "size", "k", "ready_at", "err")

    def __init__(self, addr, beats, size, ready_at):
        self.addr, self.beats, self.size, self.k, self.ready_at = addr, beats, size, 0, ready_at
        self.err = False


class AxiDram:
    """AXI4 slave DRAM on `dut`'s ports `<prefix>araddr` ... (see module docstring).

    latency_cycles     AR handshake edge -> first R handshake edge (>= 1)
    beats_per_cycle    (0, 1]: sustained beats per cycle, shared by reads and writes (one token
                       bucket holding less than two beats: 0.5 gives a beat every other cycle)
    max_outstanding    read bursts (and write bursts) accepted but not finished; arready/awready
                       drop at the limit
    write_resp_cycles  last W handshake edge -> B handshake edge at the earliest (>= 1)
    strict             raise AxiProtocolError on a non-INCR burst, a burst crossing 4 KiB or a
                       wlast in the wrong place (otherwise: served as INCR / counted)
    Statistics: bytes_read / bytes_written (2**size per beat handshaked), read_bursts /
    write_bursts (address handshakes), read_beats / write_beats, slverr_reads / slverr_writes
    (bursts), busy_cycles (a burst outstanding), r_stall_cycles (rvalid & !rready),
    cycles (edges since start).
    """

    def __init__(self, dut, prefix: str = "m_axi__", clock=None, base: int = 0, size: int = 1 << 24,
                 latency_cycles: int = 64, beats_per_cycle: float = 1.0, max_outstanding: int = 16,
                 write_resp_cycles: int = 1, reset=None, strict: bool = True):
        import cocotb
        h = lambda s: _h(dut, prefix + s)
        self.clk = clock if clock is not None else _h(dut, "clk")
        self.rst = reset if reset is not None else getattr(dut, "rst", None)
        self.ar = {s: h("ar" + s) for s in ("addr", "len", "size", "burst", "valid", "ready")}
        self.r = {s: h("r" + s) for s in ("data", "resp", "last", "valid", "ready")}
        self.aw = {s: h("aw" + s) for s in ("addr", "len", "size", "burst", "valid", "ready")}
        self.w = {s: h("w" + s) for s in ("data", "strb", "last", "valid", "ready")}
        self.b = {s: h("b" + s) for s in ("resp", "valid", "ready")}
        self.data_bits = len(self.r["data"])
        self.nbytes = self.data_bits // 8
        if self.data_bits % 8 or self.nbytes & (self.nbytes - 1) or len(self.w["data"]) != self.data_bits:
            raise ValueError(f"AxiDram: rdata {self.data_bits} / wdata {len(self.w['data'])} bits: "
                             "need equal power-of-two byte widths")
        if base < 0 or size <= 0 or base % self.nbytes or size % self.nbytes:
            raise ValueError(f"AxiDram: base {base:#x} and size {size:#x} must be >= 0 / > 0 and "
                             f"multiples of the {self.nbytes}-byte bus width")
        if not isinstance(latency_cycles, int) or latency_cycles < 1:
            raise ValueError(f"AxiDram: latency_cycles {latency_cycles!r} must be an integer >= 1")
        if not 0 < beats_per_cycle <= 1:
            raise ValueError(f"AxiDram: beats_per_cycle {beats_per_cycle} must be in (0, 1]")
        if max_outstanding < 1 or write_resp_cycles < 1:
            raise ValueError(f"AxiDram: max_outstanding {max_outstanding} and write_resp_cycles "
                             f"{write_resp_cycles} must be >= 1")
        self.base, self.size = int(base), int(size)
        self.host = FlatMemory(self.size, self.base)     # the executor's byte memory, bounds-checked
        self.mem = self.host.data
        self._buf = memoryview(self.mem)
        self.latency_cycles, self.max_outstanding = latency_cycles, max_outstanding
        self.write_resp_cycles, self.strict = write_resp_cycles, strict
        # integer token bucket: + num per cycle, a beat costs den
        frac = Fraction(beats_per_cycle).limit_denominator(1 << 12)
        self.beats_per_cycle = float(frac)
        self._num, self._den = frac.numerator, frac.denominator
        self.period_steps = None              # measured on the first two edges
        self.reset_stats()
        self._clear()
        self._task = cocotb.start_soon(self._run())

    @classmethod
    def from_hwconfig(cls, dut, hwcfg, prefix: str = "m_axi__", clock=None, **kw) -> "AxiDram":
        """Latency and bandwidth from HWConfig (dram_latency_cycles, dram_gbps, clock_mhz,
        axi_data_bits); the port width must be axi_data_bits."""
        kw.setdefault("latency_cycles", int(hwcfg.dram_latency_cycles))
        kw.setdefault("beats_per_cycle", dram_beats_per_cycle(hwcfg))
        width = len(_h(dut, prefix + "rdata"))
        if width != hwcfg.axi_data_bits:
            raise ValueError(f"HWConfig '{hwcfg.name}': axi_data_bits = {hwcfg.axi_data_bits} but the "
                             f"DUT's {prefix}rdata is {width} bits")
        return cls(dut, prefix, clock, **kw)

    # --- host side (no simulation time) ------------------------------------------------------
    def write(self, addr: int, data) -> None:
        self.host.write(addr, data)

    def read(self, addr: int, n: int) -> np.ndarray:
        return self.host.read(addr, n)

    # --- statistics ----------------------------------------------------------------------------
    _STATS = ("bytes_read", "bytes_written", "read_bursts", "write_bursts", "read_beats",
              "write_beats", "slverr_reads", "slverr_writes", "busy_cycles", "r_stall_cycles", "cycles")

    def reset_stats(self) -> None:
        for s in self._STATS:
            setattr(self, s, 0)

    def stats(self) -> dict:
        return {s: getattr(self, s) for s in self._STATS}

    def stop(self) -> None:
        """Stop serving the bus (outputs keep their last values); e.g. to swap models in a test."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def idle(self) -> bool:
        return not (self._rq or self._wq or self._bq or self._rvalid or self._bvalid)

    # --- the bus -------------------------------------------------------------------------------
    def _clear(self):
        self._rq: deque[_Burst] = deque()    # accepted read bursts, head being returned
        self._wq: deque[_Burst] = deque()    # accepted write bursts awaiting data
        self._bq: deque = deque()            # (ready_at, resp) write responses
        self._rvalid = self._bvalid = self._wready = 0
        self._arready = self._awready = 0
        self._tokens = self._den             # a full beat's worth
        self._wprio = False
        self._cyc = getattr(self, "_cyc", 0)

    def _beat_addr(self, bu: _Burst, k: int) -> int:
        if k == 0:
            return bu.addr
        step = 1 << bu.size
        return (bu.addr & ~(step - 1)) + k * step

    def _check_burst(self, kind, addr, beats, size, burst):
        if (1 << size) > self.nbytes:
            raise AxiProtocolError(f"AxiDram: {kind} size {size} ({1 << size} B) wider than the "
                                   f"{self.nbytes}-byte bus (addr {addr:#x})")
        if not self.strict:
            return
        if burst != BURST_INCR:
            raise AxiProtocolError(f"AxiDram: {kind}burst {burst} at {addr:#x}: only INCR (1) supported")
        last = (addr & ~((1 << size) - 1)) + (beats << size) - 1
        if addr >> 12 != last >> 12:
            raise AxiProtocolError(f"AxiDram: {kind} burst {addr:#x}, {beats} beats of {1 << size} B "
                                   "crosses a 4 KiB boundary (AXI forbids it)")

    @staticmethod
    def _reader(h):
        """A fast value getter: the simulator object's integer read for ports up to 32 bits
        (cocotb's .value builds a Logic/LogicArray object per read), a binary string otherwise."""
        sim = getattr(h, "_handle", None)
        if sim is not None and hasattr(sim, "get_signal_val_long") and len(h) <= 32:
            if len(h) < 32:
                return sim.get_signal_val_long
            f = sim.get_signal_val_long        # signed for 32 bits: mask back
            return lambda: f() & 0xFFFF_FFFF
        if sim is not None and hasattr(sim, "get_signal_val_binstr"):
            f = sim.get_signal_val_binstr
            return lambda: int(f(), 2)
        return lambda: int(h.value)

    async def _run(self):
        from cocotb.triggers import First, RisingEdge
        from cocotb.utils import get_sim_time
        edge = RisingEdge(self.clk)
        ar, r, aw, w, b = self.ar, self.r, self.aw, self.w, self.b
        g = self._reader
        ar_valid, ar_addr, ar_len, ar_size, ar_burst = (g(ar[s]) for s in ("valid", "addr", "len", "size", "burst"))
        aw_valid, aw_addr, aw_len, aw_size, aw_burst = (g(aw[s]) for s in ("valid", "addr", "len", "size", "burst"))
        r_ready, w_valid, b_ready = g(r["ready"]), g(w["valid"]), g(b["ready"])
        rst = g(self.rst) if self.rst is not None else (lambda: 0)
        h_arready, h_rvalid, h_rdata, h_rresp, h_rlast = ar["ready"], r["valid"], r["data"], r["resp"], r["last"]
        h_awready, h_wready, h_bvalid, h_bresp = aw["ready"], w["ready"], b["valid"], b["resp"]
        arv_change, awv_change = ar["valid"].value_change, aw["valid"].value_change
        lat, num, den, nb = self.latency_cycles, self._num, self._den, self.nbytes
        # bucket capacity: one beat plus the fraction short of the next one, so that the rate
        # is exact (0.3: beats 4, 3, 3 cycles apart) yet never two beats in one cycle
        cap = den + num - 1
        lo, hi = self.base, self.base + self.size
        mask = ~(nb - 1)
        buf = self._buf
        maxo = self.max_outstanding
        self._reset_outputs()
        rlast = rresp = 0
        self._w_last, self._w_data, self._w_strb = g(w["last"]), g(w["data"]), g(w["strb"])
        await edge
        t_edge = get_sim_time()
        await edge
        self.period_steps = period = get_sim_time() - t_edge   # clock period, simulator steps
        self.cycles += 2
        sleep = False
        while True:
            if sleep:
                t_edge = get_sim_time()
                await First(arv_change, awv_change)
                await edge
                skipped = round((get_sim_time() - t_edge) / period) - 1
                self._cyc += skipped
                self.cycles += skipped
                self._tokens = min(cap, self._tokens + skipped * num)
                sleep = False
            else:
                await edge
            self._cyc = cyc = self._cyc + 1     # never reset: burst timestamps use it
            self.cycles += 1
            if rst():
                self._clear()
                self._reset_outputs()
                rlast = rresp = 0
                continue
            rq, wq, bq = self._rq, self._wq, self._bq
            # --- handshakes at this edge (values from before the edge) ---------------------------
            arready, awready = self._arready, self._awready
            arv = ar_valid() if arready else 0
            if arv:
                addr, beats, size, burst = ar_addr(), ar_len() + 1, ar_size(), ar_burst()
                self._check_burst("ar", addr, beats, size, burst)
                rq.append(_Burst(addr, beats, size, cyc + lat - 1))
                self.read_bursts += 1
            rvalid = self._rvalid
            if rvalid:
                if r_ready():
                    bu = rq[0]
                    self.read_beats += 1
                    self.bytes_read += 1 << bu.size
                    bu.k += 1
                    if bu.k == bu.beats:
                        self.slverr_reads += bu.err
                        rq.popleft()
                    self._rvalid = 0
                else:
                    self.r_stall_cycles += 1
            awv = aw_valid() if awready else 0
            if awv:
                addr, beats, size, burst = aw_addr(), aw_len() + 1, aw_size(), aw_burst()
                self._check_burst("aw", addr, beats, size, burst)
                wq.append(_Burst(addr, beats, size, 0))
                self.write_bursts += 1
            # wvalid is sampled while a write burst waits for data: wready (and its bandwidth
            # token) is offered only while the master shows data, so a slow W stream does not
            # steal read bandwidth.
            wvalid = w_valid() if wq else 0
            wready = self._wready
            if wready:
                if wvalid:
                    self._w_beat(wq[0], cyc)
                else:
                    self._tokens += den          # refund the token wready had reserved
                self._wready = 0
            bvalid = self._bvalid
            if bvalid and b_ready():
                self._bvalid = 0
            # --- bandwidth tokens and arbitration -----------------------------------------------
            tokens = self._tokens + num
            if tokens > cap:
                tokens = cap
            want_r = not self._rvalid and rq and rq[0].ready_at <= cyc
            want_w = wvalid and wq
            if want_r and want_w and tokens >= den:
                if self._wprio:
                    want_r = False
                self._wprio = not self._wprio
            # --- R ------------------------------------------------------------------------------
            if want_r and tokens >= den:
                tokens -= den
                bu = rq[0]
                a = self._beat_addr(bu, bu.k) & mask
                if lo <= a and a + nb <= hi:
                    o = a - lo
                    h_rdata.value = int.from_bytes(buf[o:o + nb], "little")
                    resp = OKAY
                else:
                    bu.err = True
                    h_rdata.value = 0
                    resp = SLVERR
                if resp != rresp:
                    h_rresp.value = rresp = resp
                last = int(bu.k == bu.beats - 1)
                if last != rlast:
                    h_rlast.value = rlast = last
                self._rvalid = 1
            if self._rvalid != rvalid:
                h_rvalid.value = self._rvalid
            # --- W (wready reserves a token) ------------------------------------------------------
            if want_w and tokens >= den:
                tokens -= den
                self._wready = 1
            if self._wready != wready:
                h_wready.value = self._wready
            self._tokens = tokens
            # --- B ------------------------------------------------------------------------------
            if not self._bvalid and bq and bq[0][0] <= cyc:
                h_bresp.value = bq.popleft()[1]
                self._bvalid = 1
            if self._bvalid != bvalid:
                h_bvalid.value = self._bvalid
            # --- address channels ---------------------------------------------------------------
            v = int(len(rq) < maxo)
            if v != self._arready:
                h_arready.value = self._arready = v
            v = int(len(wq) + len(bq) < maxo)
            if v != self._awready:
                h_awready.value = self._awready = v
            if rq or wq or bq or self._bvalid:
                self.busy_cycles += 1
            else:
                # idle: sleep until arvalid or awvalid changes, when both were sampled low at this
                # edge with ready high and ready stays high (so no handshake can be missed)
                sleep = (arready and awready and self._arready and self._awready and not
                         (arv or awv or self._rvalid or self._wready))

    def _w_beat(self, bu: _Burst, cyc: int):
        nb = self.nbytes
        a = self._beat_addr(bu, bu.k) & ~(nb - 1)
        last = bu.k == bu.beats - 1
        if self._w_last() != last and self.strict:
            raise AxiProtocolError(f"AxiDram: wlast {int(not last)} on beat {bu.k} of a "
                                   f"{bu.beats}-beat write burst at {bu.addr:#x}")
        if self.base <= a and a + nb <= self.base + self.size:
            o = a - self.base
            data = np.frombuffer(self._w_data().to_bytes(nb, "little"), np.uint8)
            strb = self._w_strb()
            if strb == (1 << nb) - 1:
                self.mem[o:o + nb] = data
            elif strb:
                sel = np.unpackbits(np.frombuffer(strb.to_bytes(max(1, nb // 8), "little"), np.uint8),
                                    bitorder="little")[:nb].astype(bool)
                self.mem[o:o + nb][sel] = data[sel]
        else:
            bu.err = True
        self.write_beats += 1
        self.bytes_written += 1 << bu.size
        bu.k += 1
        if last:
            self._wq.popleft()
            self.slverr_writes += bu.err
            self._bq.append((cyc + self.write_resp_cycles - 1, SLVERR if bu.err else OKAY))

    def _reset_outputs(self):
        for h in (self.ar["ready"], self.r["valid"], self.aw["ready"], self.w["ready"], self.b["valid"],
                  self.r["data"], self.r["resp"], self.r["last"], self.b["resp"]):
            h.value = 0


class AxiLiteError(RuntimeError):
    pass


class AxiLiteMaster:
    """AXI4-Lite master on `<prefix>awaddr` ...: `await read32(offset)`, `await write32(offset,
    value)`, one transaction at a time (a Lock serialises concurrent callers). A response other
    than OKAY raises AxiLiteError (like PythonMMIO's ValueError for an unmapped register);
    `timeout_cycles` without a handshake raises too."""

    def __init__(self, dut, prefix: str = "s_axil__", clock=None, base: int = 0,
                 timeout_cycles: int = 10_000):
        from cocotb.triggers import Lock
        h = lambda s: _h(dut, prefix + s)
        self.clk = clock if clock is not None else _h(dut, "clk")
        self.p = {s: h(s) for s in ("awaddr", "awvalid", "awready", "wdata", "wstrb", "wvalid",
                                    "wready", "bresp", "bvalid", "bready", "araddr", "arvalid",
                                    "arready", "rdata", "rresp", "rvalid", "rready")}
        self.base, self.timeout_cycles = base, timeout_cycles
        self._lock = Lock()
        for s in ("awvalid", "wvalid", "bready", "arvalid", "rready"):
            self.p[s].value = 0

    async def _until(self, sig: str, what: str):
        from cocotb.triggers import RisingEdge
        edge = RisingEdge(self.clk)
        h = self.p[sig]
        for _ in range(self.timeout_cycles):
            await edge
            if h.value:
                return
        raise AxiLiteError(f"AXI4-Lite {what}: no {sig} within {self.timeout_cycles} cycles")

    async def read32(self, offset: int) -> int:
        p = self.p
        async with self._lock:
            p["araddr"].value = self.base + offset
            p["arvalid"].value = 1
            await self._until("arready", f"read {offset:#x}")
            p["arvalid"].value = 0
            p["rready"].value = 1
            await self._until("rvalid", f"read {offset:#x}")
            p["rready"].value = 0
            data, resp = int(p["rdata"].value), int(p["rresp"].value)
        if resp != OKAY:
            raise AxiLiteError(f"AXI4-Lite read of offset {offset:#x}: rresp {resp}")
        return data & 0xFFFF_FFFF

    async def write32(self, offset: int, value: int) -> None:
        from cocotb.triggers import RisingEdge
        p = self.p
        async with self._lock:
            p["awaddr"].value = self.base + offset
            p["wdata"].value = int(value) & 0xFFFF_FFFF
            p["wstrb"].value = 0xF
            p["awvalid"].value = p["wvalid"].value = 1
            aw_done = w_done = False
            edge = RisingEdge(self.clk)
            for _ in range(self.timeout_cycles):
                await edge
                aw_done = aw_done or bool(p["awready"].value)
                w_done = w_done or bool(p["wready"].value)
                p["awvalid"].value = int(not aw_done)
                p["wvalid"].value = int(not w_done)
                if aw_done and w_done:
                    break
            else:
                raise AxiLiteError(f"AXI4-Lite write {offset:#x}: awready/wready missing for "
                                   f"{self.timeout_cycles} cycles")
            p["bready"].value = 1
            await self._until("bvalid", f"write {offset:#x}")
            p["bready"].value = 0
            resp = int(p["bresp"].value)
        if resp != OKAY:
            raise AxiLiteError(f"AXI4-Lite write of offset {offset:#x}: bresp {resp}")


class CocotbAccelBackend:
    """The RTL top as sim/driver.py sees it: `.mmio` (AxiLiteMaster on s_axil__), `.mem` (an
    AxiDram on m_axi__, host accesses straight to its array) and `.sleep(seconds)`, which waits
    seconds * clock_mhz cycles of the modelled clock (ClockCycles, at least one).

        be = CocotbAccelBackend.from_hwconfig(dut, hwcfg, mem_base=0x1000_0000, mem_bytes=64 << 20)
        drv = be.driver(poll_interval_s=2e-6)        # poll STATUS every 600 cycles at 300 MHz
        await drv.load(program); result = await drv.run(image, "depth")
    """

    def __init__(self, dut, dram: AxiDram, mmio: AxiLiteMaster, clock_mhz: float):
        if clock_mhz <= 0:
            raise ValueError(f"clock_mhz {clock_mhz} must be > 0")
        self.dut, self.mem, self.mmio, self.clock_mhz = dut, dram, mmio, clock_mhz
        self.clk = dram.clk

    @classmethod
    def from_hwconfig(cls, dut, hwcfg, mem_base: int = 0x1000_0000, mem_bytes: int = 64 << 20,
                      **dram_kw) -> "CocotbAccelBackend":
        dram = AxiDram.from_hwconfig(dut, hwcfg, base=mem_base, size=mem_bytes, **dram_kw)
        return cls(dut, dram, AxiLiteMaster(dut, clock=dram.clk), hwcfg.clock_mhz)

    async def sleep(self, seconds: float) -> None:
        """Wait about n = ceil(seconds * clock_mhz * 1e6) cycles (>= 1): one Timer of n - 1 clock
        periods when the model has measured the period (no wakeup per cycle), then the next
        rising edge."""
        from cocotb.triggers import ClockCycles, RisingEdge, Timer
        n = max(1, math.ceil(seconds * self.clock_mhz * 1e6))
        period = self.mem.period_steps
        if period:
            if n > 1:
                await Timer((n - 1) * period, "step")
            await RisingEdge(self.clk)
        else:
            await ClockCycles(self.clk, n)

    def driver(self, **kw):
        from edgemoe.sim.driver import AsyncAcceleratorDriver
        return AsyncAcceleratorDriver(self.mmio, self.mem, sleep=self.sleep, **kw)
