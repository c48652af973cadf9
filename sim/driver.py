"""Host driver of the edgemoe accelerator, written against two small interfaces so that the same
code drives the Python model, a PYNQ board, and the cocotb simulation of the RTL top (hw/accel.py).

Interfaces
----------
  MMIO    read32(offset) -> int, write32(offset, value)      AXI4-Lite slave, byte offsets
  Memory  base, size (bus addresses the accelerator sees), write(addr, data), read(addr, n)
Methods may be plain or `async` (coroutines): AcceleratorDriver needs plain ones,
AsyncAcceleratorDriver awaits whatever is awaitable. Both share one implementation: every
operation is a generator that yields bus requests ("r32", off) / ("w32", off, v) /
("wmem", addr, data) / ("rmem", addr, n) / ("sleep", seconds); the sync and async runners only
differ in how they perform a request. The cocotb backend is sim/dram.py's CocotbAccelBackend
(AXI4-Lite master for MMIO, the AXI4 DRAM model's array as the memory, ClockCycles for sleep);
sim/tb_accel.py runs AsyncAcceleratorDriver through it against the RTL top.

Register map (AXI4-Lite, 32-bit registers, byte offsets): described once in sim/regmap.rdl
(SystemRDL); the offsets and fields below come from the generated sim/regs.py, which the RTL
(hw/accel.py) imports too. Documentation: `python -m edgemoe.sim.regmap --docs DIR`
(DIR/edgemoe_regs.md) or an `edgemoe export` folder's doc/registers.md. In short: ID, VERSION
(ISA_VERSION << 16 | REGMAP_VERSION), CTRL.START, STATUS (BUSY, DONE, ERROR), ERROR_CODE,
ERROR_PC, TASK_ID, CONFIG_HASH, the four region bases and the 64-bit counters as LO/HI pairs
(reading LO latches HI, so read LO then HI), SAT_COUNT, INSTR_COUNT. The PythonBackend has no
clock: its CYCLE_COUNT is one "cycle" per retired instruction.

Run sequence (AcceleratorDriver.run): quantise the image (QuantConfig.act, as the golden model),
im2col to patch rows, write them to the image region; write TASK_ID and the four bases; START;
poll STATUS every poll_interval_s until DONE or ERROR (timeout_s: DriverError); read the output
region and the counters.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgemoe.quant.fixed import SatCounter
from edgemoe.quant.program import (ERROR_NAMES, ISA_VERSION, REGION_ALIGN, Program, ProgramError, align,
                           config_hash, container_bytes, decode_values, encode_values,
                           image_patch_codes, quantise_image)

from . import regs
from .regs import (ACCEL_ID, CONFIG_HASH, CTRL, CTRL_START, CYCLE_COUNT, DRAM_BYTES_READ,  # noqa: F401
                   DRAM_BYTES_WRITTEN, ERROR_CODE, ERROR_PC, ID, IMAGE_BASE, INSTR_COUNT, OUTPUT_BASE,
                   PROGRAM_BASE, REGMAP_VERSION, SAT_COUNT, STATUS, STATUS_BUSY, STATUS_DONE,
                   STATUS_ERROR, TASK_ID, VERSION, WEIGHTS_BASE)


class MMIO(Protocol):
    def read32(self, offset: int) -> int: ...
    def write32(self, offset: int, value: int) -> None: ...


class Memory(Protocol):
    base: int
    size: int
    def write(self, addr: int, data) -> None: ...
    def read(self, addr: int, n: int): ...


class DriverError(RuntimeError):
    def __init__(self, msg: str, code: int = 0, pc: int | None = None):
        super().__init__(msg)
        self.code, self.pc = code, pc


@dataclass
class RunResult:
    features: np.ndarray       # [num_tokens, D] act codes
    task: int
    cycles: int
    dram_bytes_read: int
    dram_bytes_written: int
    sat_count: int             # SAT_COUNT: saturation events inside the accelerator
    instructions: int
    input_saturated: int = 0   # image values the host's quantisation saturated (act range)


def host_image_bytes(program: Program, image) -> tuple[np.ndarray, int]:
    """What the host writes to the IMAGE region: float [C,H,W] -> act codes (golden
    quantisation, saturations counted), or integer act codes as given; then patch rows in act
    containers. Returns (bytes, saturated input values)."""
    a = np.asarray(image)
    sat = SatCounter()
    codes = a.astype(np.int64) if np.issubdtype(a.dtype, np.integer) else \
        quantise_image(program.cfg, program.qcfg, a, sat)
    return encode_values(image_patch_codes(program.cfg, codes), program.qcfg.act, "image"), sat.saturated()


class _Core:
    """The driver logic as request generators (module docstring)."""

    def __init__(self, mmio, mem, poll_interval_s: float = 1e-4, timeout_s: float = 60.0):
        if poll_interval_s <= 0 or timeout_s <= 0:
            raise ValueError(f"poll_interval_s {poll_interval_s} and timeout_s {timeout_s} must be > 0")
        self.mmio, self.mem = mmio, mem
        self.poll_interval_s, self.timeout_s = poll_interval_s, timeout_s
        self.program: Program | None = None
        self.addr: dict[str, int] = {}

    # --- request generators ------------------------------------------------------------------
    def _g_load(self, program: Program, base: int | None):
        ident = yield ("r32", ID)
        if ident != ACCEL_ID:
            raise DriverError(f"ID register reads {ident:#010x}, expected {ACCEL_ID:#010x}: no "
                              "edgemoe accelerator at this MMIO address")
        ver = yield ("r32", VERSION)
        if ver >> 16 != ISA_VERSION:
            raise DriverError(f"accelerator ISA version {ver >> 16} != program ISA {ISA_VERSION}")
        h = yield ("r32", CONFIG_HASH)
        if h != program.config_hash:
            raise DriverError(f"CONFIG_HASH {h:#010x} != program's {program.config_hash:#010x}: the "
                              f"program was compiled for other hardware (quant '{program.qcfg.name}', "
                              f"hw '{program.hwcfg.name}')")
        base = align(self.mem.base, REGION_ALIGN) if base is None else base
        if base % REGION_ALIGN:
            raise DriverError(f"load base {base:#x} is not {REGION_ALIGN}-byte aligned")
        end = base + program.image_bytes
        if base < self.mem.base or end > self.mem.base + self.mem.size:
            raise DriverError(f"memory image of {program.image_bytes:,} B at {base:#x} does not fit the "
                              f"memory [{self.mem.base:#x}, {self.mem.base + self.mem.size:#x})")
        if end > 1 << program.hwcfg.axi_addr_bits:
            raise DriverError(f"memory image ends at {end:#x}, beyond the accelerator's "
                              f"{program.hwcfg.axi_addr_bits}-bit address space")
        yield ("wmem", base, program.image)
        self.program = program
        self.addr = {n: base + r.offset for n, r in program.regions.items()}

    def _g_run(self, image, task):
        p = self._need_program()
        t = p.cfg.task_index(task)
        data, in_sat = host_image_bytes(p, image)
        yield ("wmem", self.addr["image"], data)
        st = yield ("r32", STATUS)
        if st & STATUS_BUSY:
            raise DriverError("accelerator is busy; cannot start")
        yield ("w32", TASK_ID, t)
        for reg, name in ((PROGRAM_BASE, "program"), (WEIGHTS_BASE, "weights"), (IMAGE_BASE, "image"),
                          (OUTPUT_BASE, "output")):
            yield ("w32", reg, self.addr[name] & 0xFFFF_FFFF)
            yield ("w32", reg + 4, self.addr[name] >> 32)
        yield ("w32", CTRL, CTRL_START)
        polls = max(1, int(np.ceil(self.timeout_s / self.poll_interval_s)))
        for _ in range(polls):
            st = yield ("r32", STATUS)
            if st & (STATUS_DONE | STATUS_ERROR):
                break
            yield ("sleep", self.poll_interval_s)
        else:
            raise DriverError(f"accelerator not done after {self.timeout_s} s (STATUS {st:#x})")
        if st & STATUS_ERROR:
            code = yield ("r32", ERROR_CODE)
            pc = yield ("r32", ERROR_PC)
            name = p.names[pc] if 0 <= pc < len(p.names) else "?"
            raise DriverError(f"accelerator error {code} ({ERROR_NAMES.get(code, 'unknown')}) at pc {pc} "
                              f"({name})", code, pc)
        n = p.cfg.num_tokens * p.cfg.dim
        raw = yield ("rmem", self.addr["output"], n * container_bytes(p.qcfg.act))
        feats = decode_values(np.frombuffer(bytes(raw), np.uint8), n, p.qcfg.act)
        c = {}
        for name, reg in (("cycles", CYCLE_COUNT), ("read", DRAM_BYTES_READ), ("written", DRAM_BYTES_WRITTEN)):
            lo = yield ("r32", reg)
            hi = yield ("r32", reg + 4)
            c[name] = hi << 32 | lo
        sat = yield ("r32", SAT_COUNT)
        ins = yield ("r32", INSTR_COUNT)
        return RunResult(feats.reshape(p.cfg.num_tokens, p.cfg.dim), t, c["cycles"], c["read"],
                         c["written"], sat, ins, in_sat)

    def _need_program(self) -> Program:
        if self.program is None:
            raise DriverError("no program loaded: call load(program) first")
        return self.program


class AcceleratorDriver(_Core):
    """Blocking driver: load(program), run(image, task) -> RunResult."""

    def _drive(self, gen):
        try:
            req = next(gen)
            while True:
                req = gen.send(self._do(req))
        except StopIteration as e:
            return e.value

    def _do(self, req):
        kind = req[0]
        if kind == "r32":
            return int(self.mmio.read32(req[1])) & 0xFFFF_FFFF
        if kind == "w32":
            return self.mmio.write32(req[1], int(req[2]) & 0xFFFF_FFFF)
        if kind == "wmem":
            return self.mem.write(req[1], req[2])
        if kind == "rmem":
            return self.mem.read(req[1], req[2])
        time.sleep(req[1])

    def load(self, program: Program, base: int | None = None) -> None:
        """Check the hardware identity and write the memory image at `base` (default: the start of
        the memory, 4 KiB aligned)."""
        self._drive(self._g_load(program, base))

    def run(self, image, task) -> RunResult:
        return self._drive(self._g_run(image, task))


class AsyncAcceleratorDriver(_Core):
    """The same driver for async buses (cocotb): `await load(...)`, `await run(...)`. `sleep` is an
    async callable taking seconds (default asyncio.sleep; cocotb: a Timer or ClockCycles)."""

    def __init__(self, mmio, mem, sleep=None, **kw):
        super().__init__(mmio, mem, **kw)
        if sleep is None:
            import asyncio
            sleep = asyncio.sleep
        self.sleep = sleep

    async def _drive(self, gen):
        try:
            req = next(gen)
            while True:
                req = gen.send(await self._do(req))
        except StopIteration as e:
            return e.value

    async def _do(self, req):
        kind = req[0]
        if kind == "sleep":
            return await self.sleep(req[1])
        if kind == "r32":
            r = self.mmio.read32(req[1])
        elif kind == "w32":
            r = self.mmio.write32(req[1], int(req[2]) & 0xFFFF_FFFF)
        elif kind == "wmem":
            r = self.mem.write(req[1], req[2])
        else:
            r = self.mem.read(req[1], req[2])
        if inspect.isawaitable(r):
            r = await r
        return int(r) & 0xFFFF_FFFF if kind == "r32" else r

    async def load(self, program: Program, base: int | None = None) -> None:
        await self._drive(self._g_load(program, base))

    async def run(self, image, task) -> RunResult:
        return await self._drive(self._g_run(image, task))


# ---------------------------------------------------------------------------------------------
# Python backend: the register file around quant.interpreter.Machine
# ---------------------------------------------------------------------------------------------
class PythonMMIO:
    """The register map above; START runs the interpreter to completion at once, then STATUS
    reports BUSY for `busy_polls` reads before DONE/ERROR (so the driver's poll loop runs)."""

    def __init__(self, backend: "PythonBackend", busy_polls: int = 1):
        self.b, self.busy_polls = backend, busy_polls
        self.regs = {off: 0 for off, *_ in regs.REGISTERS.values()}
        self.regs.update({ID: ACCEL_ID, VERSION: ISA_VERSION << 16 | REGMAP_VERSION,
                          CONFIG_HASH: config_hash(backend.qcfg, backend.hwcfg)})
        self._latched: dict[int, int] = {}
        self._busy_left = 0
        self._status = 0
        self.last_stats = None
        self.last_error: ProgramError | None = None

    # writable bits of the read-write registers (TASK_ID keeps 8 bits, as in the RTL)
    _RW = {off: wmask for off, sw, _reset, wmask, _rmask in regs.REGISTERS.values() if sw == "rw"}
    _WIDE = {CYCLE_COUNT, DRAM_BYTES_READ, DRAM_BYTES_WRITTEN}

    def _check(self, off):
        if off not in self.regs:
            raise ValueError(f"AXI4-Lite access to unmapped register offset {off:#x} (SLVERR)")

    def read32(self, off: int) -> int:
        self._check(off)
        if off == STATUS:
            if self._busy_left:
                self._busy_left -= 1
                return STATUS_BUSY
            return self._status
        if off in self._WIDE:
            v = self.regs[off]
            self._latched[off] = v >> 32
            return v & 0xFFFF_FFFF
        if off - 4 in self._WIDE:
            return self._latched.get(off - 4, 0)
        return self.regs[off] & 0xFFFF_FFFF

    def write32(self, off: int, value: int) -> None:
        self._check(off)
        if off == CTRL:
            if value & CTRL_START and not self._busy_left:
                self._start()
            return
        if off not in self._RW:
            raise ValueError(f"write to read-only register offset {off:#x}")
        self.regs[off] = value & self._RW[off]

    def _addr(self, off):
        return self.regs[off] | self.regs[off + 4] << 32

    def _start(self):
        from edgemoe.quant.interpreter import Registers
        for off in (ERROR_CODE, ERROR_PC, SAT_COUNT, INSTR_COUNT, *self._WIDE):
            self.regs[off] = 0
        self.last_error = None
        regs = Registers(self._addr(PROGRAM_BASE), self._addr(WEIGHTS_BASE), self._addr(IMAGE_BASE),
                         self._addr(OUTPUT_BASE), self.regs[TASK_ID])
        m = self.b.machine()
        try:
            st = m.run(regs)
        except ProgramError as e:
            self.last_error, st = e, m._st
            self.regs[ERROR_CODE], self.regs[ERROR_PC] = e.code, e.pc or 0
            self._status = STATUS_DONE | STATUS_ERROR
        else:
            self._status = STATUS_DONE
        self.last_stats = st
        self.regs[CYCLE_COUNT] = st.retired
        self.regs[INSTR_COUNT] = st.retired
        self.regs[DRAM_BYTES_READ] = st.dram_read
        self.regs[DRAM_BYTES_WRITTEN] = st.write_bytes
        self.regs[SAT_COUNT] = min(st.sat.saturated(), 0xFFFF_FFFF)
        self._busy_left = self.busy_polls


class PythonBackend:
    """A simulated accelerator for one (ModelConfig widths, QuantConfig, HWConfig): `.mmio` (the
    register file, PythonMMIO) and `.mem` (a FlatMemory DRAM at bus address mem_base)."""

    def __init__(self, cfg, qcfg, hwcfg, mem_bytes: int = 64 << 20, mem_base: int = 0x1000_0000,
                 busy_polls: int = 1):
        from edgemoe.quant.compiler import buffer_plan
        from edgemoe.quant.interpreter import FlatMemory
        self.cfg, self.qcfg, self.hwcfg = cfg, qcfg, hwcfg
        self.plan = buffer_plan(cfg, qcfg, hwcfg)
        self.mem = FlatMemory(mem_bytes, mem_base)
        self.mmio = PythonMMIO(self, busy_polls)

    @classmethod
    def for_program(cls, program: Program, **kw) -> "PythonBackend":
        kw.setdefault("mem_bytes", align(program.image_bytes + REGION_ALIGN, 1 << 20))
        return cls(program.cfg, program.qcfg, program.hwcfg, **kw)

    def machine(self):
        from edgemoe.quant.interpreter import Machine
        return Machine(self.qcfg, self.hwcfg, self.plan, self.mem)

    def driver(self, **kw) -> AcceleratorDriver:
        return AcceleratorDriver(self.mmio, self.mem, **kw)


# ---------------------------------------------------------------------------------------------
# PYNQ backend (on the board; cannot run here)
# ---------------------------------------------------------------------------------------------
class BackendUnavailable(RuntimeError):
    pass


class _PynqMMIO:
    def __init__(self, mmio):
        self.m = mmio

    def read32(self, off):
        return int(self.m.read(off))

    def write32(self, off, value):
        self.m.write(off, int(value))


class _PynqMemory:
    """A pynq.allocate'd physically contiguous buffer; flush/invalidate keep the PS caches and
    the accelerator's AXI master coherent on non-coherent ports (HP)."""

    def __init__(self, buf):
        self.buf = buf
        self.base = int(getattr(buf, "device_address", None) or buf.physical_address)
        self.size = int(buf.nbytes)

    def write(self, addr, data):
        b = np.frombuffer(bytes(data), np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
        o = addr - self.base
        self.buf[o:o + b.size] = b
        self.buf.flush()

    def read(self, addr, n):
        self.buf.invalidate()
        o = addr - self.base
        return np.array(self.buf[o:o + n], dtype=np.uint8)


class PynqBackend:
    """On a PYNQ board (ZCU102/104 PYNQ image): pynq.Overlay(bitfile) with the accelerator IP
    `ip_name` (its AXI4-Lite slave -> .mmio) and one pynq.allocate'd DRAM buffer of mem_bytes for
    the memory image. Usage: b = PynqBackend("edgemoe.bit"); d = AcceleratorDriver(b.mmio, b.mem);
    d.load(program); d.run(image, "depth"). Needs the `pynq` package (only on the board)."""

    def __init__(self, bitfile: str, ip_name: str = "edgemoe_0", mem_bytes: int = 64 << 20):
        try:
            import pynq
        except ImportError as e:
            raise BackendUnavailable("PynqBackend needs the 'pynq' package, which exists only on a PYNQ "
                                     "board image; it is not installed here (use PythonBackend to run "
                                     "the program on the interpreter)") from e
        self.overlay = pynq.Overlay(bitfile)
        if not hasattr(self.overlay, ip_name):
            raise BackendUnavailable(f"{bitfile}: overlay has no IP named {ip_name!r} "
                                     f"(IPs: {sorted(self.overlay.ip_dict)})")
        self.mmio = _PynqMMIO(getattr(self.overlay, ip_name).mmio)
        self.mem = _PynqMemory(pynq.allocate(shape=(mem_bytes,), dtype=np.uint8))
