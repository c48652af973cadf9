"""Reusable cocotb helpers for the edgemoe testbenches (imported inside the simulator).

Timing convention (one for all helpers, so drivers and monitors agree):
  every helper coroutine acts once per clock cycle as
      after RisingEdge: write this cycle's inputs (valid/payload, or ready)
      ReadOnly:         sample; a handshake (valid & ready) seen here completes at the next edge
  and records that handshake with `CycleCounter.cycle` (the number of rising edges so far).
  A testbench calls them right after a RisingEdge (e.g. after `start_clock_and_reset`).

Ports follow hw/export.py's naming rule: a stream `i` has `i__valid`, `i__ready` and either one
`i__payload` port (field "") or one `i__payload__<field>` port per struct field. Lanes of a vector
are packed LSB-first into one flat port: `pack_lanes` / `unpack_lanes`.

Data exchange with pytest (sim/runner.py): `tb_config()` reads the JSON file named by the
environment variable EDGEMOE_TB_CONFIG; `write_result(dict)` writes the JSON file whose path the
config gives as "result_path" (read back by run_cocotb).
"""
from __future__ import annotations

import json
import os
import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ReadOnly, RisingEdge

TB_CONFIG_ENV = "EDGEMOE_TB_CONFIG"


# --- data exchange with pytest ------------------------------------------------------------------
def tb_config() -> dict:
    path = os.environ.get(TB_CONFIG_ENV)
    if not path:
        raise RuntimeError(f"{TB_CONFIG_ENV} is not set: run this testbench through sim.runner.run_cocotb")
    with open(path) as f:
        return json.load(f)


def write_result(result: dict) -> None:
    path = tb_config()["result_path"]
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=int)


# --- lanes ----------------------------------------------------------------------------------------
def pack_lanes(values, bits: int) -> int:
    """Lane k of `values` (ints, signed or not) into bits [k*bits, (k+1)*bits) of one integer."""
    mask = (1 << bits) - 1
    word = 0
    for k, v in enumerate(values):
        v = int(v)
        if not -(1 << (bits - 1)) <= v <= mask:
            raise ValueError(f"lane {k} value {v} does not fit in {bits} bits")
        word |= (v & mask) << (k * bits)
    return word


def unpack_lanes(word: int, bits: int, n: int, signed: bool = True) -> list[int]:
    """Inverse of pack_lanes: n lanes, sign-extended by hand when `signed`."""
    mask = (1 << bits) - 1
    out = []
    for k in range(n):
        v = (word >> (k * bits)) & mask
        if signed and v >> (bits - 1):
            v -= 1 << bits
        out.append(v)
    return out


def read_uint(handle) -> int:
    """A port's value as a non-negative integer (raises on X/Z, which a test must not see)."""
    v = handle.value
    return v.to_unsigned() if hasattr(v, "to_unsigned") else int(v)


# --- clock, reset, cycle counting ----------------------------------------------------------------
class CycleCounter:
    """Counts rising edges of `clk` from its start; read `.cycle` at ReadOnly for a stable value."""

    def __init__(self, clk):
        self.clk = clk
        self.cycle = 0
        self._task = cocotb.start_soon(self._run())

    async def _run(self):
        while True:
            await RisingEdge(self.clk)
            self.cycle += 1


async def start_clock_and_reset(dut, clk: str = "clk", rst: str = "rst", period_ns: int = 10,
                                reset_cycles: int = 3, idle_inputs: dict | None = None) -> CycleCounter:
    """Start the clock, hold the (active-high, synchronous) reset for `reset_cycles` edges with
    `idle_inputs` ({port name: value}, e.g. valid=0, ready=0) applied, release it, and return
    just after a rising edge with a CycleCounter running."""
    clk_h, rst_h = getattr(dut, clk), getattr(dut, rst)
    # Plain (scheduled) writes: Icarus drops Immediate writes made before time 0 has run,
    # leaving the inputs undriven (Z).
    for name, value in (idle_inputs or {}).items():
        getattr(dut, name).value = value
    rst_h.value = 1
    Clock(clk_h, period_ns, unit="ns").start()
    for _ in range(reset_cycles):
        await RisingEdge(clk_h)
    rst_h.value = 0
    counter = CycleCounter(clk_h)
    await RisingEdge(clk_h)
    return counter


# --- streams ---------------------------------------------------------------------------------------
def _payload_handles(dut, prefix: str, fields):
    if not fields:
        return {"": getattr(dut, f"{prefix}__payload")}
    return {f: getattr(dut, f"{prefix}__payload__{f}") for f in fields}


class StreamDriver:
    """Drives stream `prefix` (e.g. "i"): `await send(beats)` where each beat is {field: int}
    (field "" for a plain payload). Before each beat, with probability `gap_prob`, it holds valid
    low for a cycle (seeded random gaps). Returns the handshake cycle of every beat."""

    def __init__(self, dut, prefix: str, clk, counter: CycleCounter, fields=("",),
                 gap_prob: float = 0.0, seed: int = 0):
        self.valid = getattr(dut, f"{prefix}__valid")
        self.ready = getattr(dut, f"{prefix}__ready")
        self.payload = _payload_handles(dut, prefix, [f for f in fields if f])
        self.clk, self.counter = clk, counter
        self.gap_prob = gap_prob
        self.rng = random.Random(seed)
        self.valid.value = 0

    async def send(self, beats) -> list[int]:
        cycles = []
        idx = 0
        while idx < len(beats):
            if self.gap_prob and self.rng.random() < self.gap_prob:
                self.valid.value = 0
            else:
                self.valid.value = 1
                for f, h in self.payload.items():
                    h.value = int(beats[idx][f])
                await ReadOnly()
                if read_uint(self.ready):
                    cycles.append(self.counter.cycle)
                    idx += 1
            await RisingEdge(self.clk)
        self.valid.value = 0
        return cycles


class StreamSink:
    """Accepts stream `prefix` (e.g. "o") with ready low with probability `stall_prob` each cycle
    (seeded back-pressure). `.beats` collects {field: int, "cycle": handshake cycle}."""

    def __init__(self, dut, prefix: str, clk, counter: CycleCounter, fields=("",),
                 stall_prob: float = 0.0, seed: int = 1):
        self.valid = getattr(dut, f"{prefix}__valid")
        self.ready = getattr(dut, f"{prefix}__ready")
        self.payload = _payload_handles(dut, prefix, [f for f in fields if f])
        self.clk, self.counter = clk, counter
        self.stall_prob = stall_prob
        self.rng = random.Random(seed)
        self.beats: list[dict] = []
        self.ready.value = 0
        self._task = cocotb.start_soon(self._run())

    async def _run(self):
        while True:
            ready = not (self.stall_prob and self.rng.random() < self.stall_prob)
            self.ready.value = int(ready)
            await ReadOnly()
            if ready and read_uint(self.valid):
                beat = {f: read_uint(h) for f, h in self.payload.items()}
                beat["cycle"] = self.counter.cycle
                self.beats.append(beat)
            await RisingEdge(self.clk)

    async def wait_for(self, n: int, max_cycles: int) -> list[dict]:
        """Wait until n beats arrived; fail after max_cycles more cycles."""
        for _ in range(max_cycles):
            if len(self.beats) >= n:
                return self.beats[:n]
            await RisingEdge(self.clk)
        raise AssertionError(f"stream sink: only {len(self.beats)} of {n} beats arrived "
                             f"within {max_cycles} cycles")


# --- checking ---------------------------------------------------------------------------------------
def first_mismatch(expected, got, inputs=None, cycles=None, what: str = "element") -> None:
    """Compare two equal-length sequences of integers (or tuples); on the first difference raise
    AssertionError("first mismatch at element i (cycle c): inputs ..., expected ..., got ...").
    `inputs[i]` describes element i's inputs, `cycles[i]` its handshake cycle (both optional)."""
    expected, got = list(expected), list(got)
    for i, (e, g) in enumerate(zip(expected, got)):
        if e != g:
            cyc = f" (cycle {cycles[i]})" if cycles is not None and i < len(cycles) else ""
            inp = inputs[i] if inputs is not None and i < len(inputs) else "?"
            raise AssertionError(f"first mismatch at {what} {i}{cyc}: inputs {inp}, "
                                 f"expected {e}, got {g}")
    if len(expected) != len(got):
        raise AssertionError(f"{what} count mismatch: expected {len(expected)}, got {len(got)}")
