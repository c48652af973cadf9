"""A stand-in for the `pynq` package (tests only: PYNQ exists only on a board image), with the
part of the pynq 4.x API that sim.driver.PynqBackend uses:
  Overlay(bitfile)      .ip_dict, .<ip_name>.mmio with read(offset) / write(offset, value)
  allocate(shape, dtype)  a numpy array with physical_address, device_address, flush(),
                        invalidate(), freebuffer()
Both forward to a backend chosen by the test: `install(read32, write32, memory, base)` puts the
module into sys.modules["pynq"]; read32 / write32 are plain functions (the Python model's MMIO, or
the cocotb AXI4-Lite master wrapped with cocotb.task.resume) and `memory` the numpy byte array the
accelerator's AXI4 master reads (the DRAM model's array), at bus address `base`.
"""
from __future__ import annotations

import sys
import types

import numpy as np


class FakeBuffer(np.ndarray):
    """A view of the backend's memory; the accelerator sees it at physical_address."""
    physical_address = 0
    flushes = 0

    def __array_finalize__(self, obj):
        # views and reshapes (allocate's dtype / shape) keep the address
        self.physical_address = getattr(obj, "physical_address", 0)

    @property
    def device_address(self):
        return self.physical_address

    def flush(self):
        FakeBuffer.flushes += 1      # the DRAM model has no caches: nothing else to do

    def invalidate(self):
        pass

    def freebuffer(self):
        pass


def install(read32, write32, memory: np.ndarray, base: int, ip_name: str = "edgemoe_0",
            bitfiles: list | None = None) -> types.ModuleType:
    mod = types.ModuleType("pynq")
    mod.__doc__ = "fake pynq (edgemoe.sim.fake_pynq)"

    class MMIO:
        def __init__(self):
            self.accesses = 0

        def read(self, offset, length=4):
            self.accesses += 1
            return read32(offset)

        def write(self, offset, value):
            self.accesses += 1
            write32(offset, value)

    class _IP:
        def __init__(self):
            self.mmio = MMIO()

    class Overlay:
        def __init__(self, bitfile, download=True):
            if bitfiles is not None:
                bitfiles.append(bitfile)
            self.ip_dict = {ip_name: {"phys_addr": 0xA000_0000, "addr_range": 0x1000}}
            setattr(self, ip_name, _IP())

    def allocate(shape, dtype=np.uint8, **kw):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if n > memory.size:
            raise MemoryError(f"fake allocate: {n} bytes > the backend's {memory.size}")
        buf = memory[:n].view(FakeBuffer)
        buf.physical_address = base
        return buf.view(dtype).reshape(shape)

    mod.Overlay, mod.MMIO, mod.allocate = Overlay, MMIO, allocate
    sys.modules["pynq"] = mod
    return mod


def uninstall() -> None:
    mod = sys.modules.get("pynq")
    if mod is not None and (mod.__doc__ or "").startswith("fake pynq"):
        del sys.modules["pynq"]
