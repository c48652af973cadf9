"""cocotb tests of sim/dram.py on sim/hdl/edgemoe_dram_tb.v (run by tests/test_dram.py, one
testcase per run_cocotb call). cocotbext-axi's AxiMaster drives s_axi_ -> m_axi__ (AxiDram);
AxiLiteMaster drives s_axil__ -> ram_axil_ (cocotbext-axi's AxiLiteRam). A monitor samples
m_axi__ at every rising edge, independently of the model, for timing and statistics checks."""
from __future__ import annotations

import time

import cocotb
import numpy as np
from cocotb.triggers import ClockCycles, RisingEdge, Timer

from edgemoe.sim.dram import AxiDram, AxiLiteMaster, CocotbAccelBackend
from edgemoe.sim.tb_common import start_clock_and_reset, tb_config, write_result

IDLE = {"s_axi_awvalid": 0, "s_axi_wvalid": 0, "s_axi_bready": 0, "s_axi_arvalid": 0,
        "s_axi_rready": 0, "s_axil__awvalid": 0, "s_axil__wvalid": 0, "s_axil__bready": 0,
        "s_axil__arvalid": 0, "s_axil__rready": 0, "gen_rd_en": 0, "gen_wr_en": 0,
        "ram_axil_awready": 0, "ram_axil_wready": 0, "ram_axil_bvalid": 0, "ram_axil_arready": 0,
        "ram_axil_rvalid": 0}


class Monitor:
    """Handshake edges on m_axi__ (cycle = rising edges since start)."""

    def __init__(self, dut):
        self.dut = dut
        self.ar, self.aw, self.r, self.w, self.b = [], [], [], [], []
        self.cycle = 0
        cocotb.start_soon(self._run())

    async def _run(self):
        d = self.dut
        edge = RisingEdge(d.clk)
        while True:
            await edge
            self.cycle += 1
            c = self.cycle
            if d.m_axi__arvalid.value and d.m_axi__arready.value:
                self.ar.append((c, int(d.m_axi__araddr.value), int(d.m_axi__arlen.value) + 1))
            if d.m_axi__rvalid.value and d.m_axi__rready.value:
                self.r.append((c, int(d.m_axi__rlast.value), int(d.m_axi__rresp.value)))
            if d.m_axi__awvalid.value and d.m_axi__awready.value:
                self.aw.append((c, int(d.m_axi__awaddr.value), int(d.m_axi__awlen.value) + 1))
            if d.m_axi__wvalid.value and d.m_axi__wready.value:
                self.w.append(c)
            if d.m_axi__bvalid.value and d.m_axi__bready.value:
                self.b.append((c, int(d.m_axi__bresp.value)))


def axi_master(dut):
    from cocotbext.axi import AxiBus, AxiMaster
    return AxiMaster(AxiBus.from_prefix(dut, "s_axi"), dut.clk, dut.rst)


def pauses(rng, p, n=1 << 16):
    """A cocotbext-axi pause pattern: True (stall) with probability p, cycled."""
    pat = (rng.random(n) < p).tolist()
    while True:
        yield from pat


@cocotb.test()
async def roundtrip(dut):
    """Random unaligned reads / writes (some concurrent) against a numpy reference, with R and
    W back-pressure; statistics against the monitor."""
    cfg = tb_config()
    rng = np.random.default_rng(cfg["seed"])
    await start_clock_and_reset(dut, idle_inputs=IDLE)
    base, size = cfg["base"], cfg["size"]
    dram = AxiDram(dut, base=base, size=size, latency_cycles=cfg["latency"],
                   beats_per_cycle=cfg["bpc"], max_outstanding=4)
    mon = Monitor(dut)
    ref = rng.integers(0, 256, size, dtype=np.uint8)
    dram.write(base, ref)
    axi = axi_master(dut)
    axi.read_if.r_channel.set_pause_generator(pauses(rng, cfg["pause"]))
    axi.write_if.w_channel.set_pause_generator(pauses(rng, cfg["pause"]))
    axi.write_if.b_channel.set_pause_generator(pauses(rng, cfg["pause"]))
    nops = 0
    for i in range(cfg["ops"]):
        n = int(rng.integers(1, cfg["max_len"]))
        a = int(rng.integers(0, size - n))
        if rng.random() < 0.5:
            data = rng.integers(0, 256, n, dtype=np.uint8)
            await axi.write(base + a, data.tobytes(), awid=0)
            ref[a:a + n] = data
            nops += 1
        else:
            # several reads in flight at once
            reqs = []
            for _ in range(int(rng.integers(1, 4))):
                n = int(rng.integers(1, cfg["max_len"]))
                a = int(rng.integers(0, size - n))
                reqs.append((a, n, axi.init_read(base + a, n, arid=0)))
            for a, n, ev in reqs:
                await ev.wait()
                got = np.frombuffer(bytes(ev.data), np.uint8)
                assert ev.data.resp == 0, f"read {base + a:#x}+{n}: resp {ev.data.resp}"
                if not np.array_equal(got, ref[a:a + n]):
                    j = int(np.flatnonzero(got != ref[a:a + n])[0])
                    raise AssertionError(f"op {i}: read [{base + a:#x}, +{n}): first mismatch at byte "
                                         f"{j}: expected {ref[a + j]}, got {got[j]}")
                nops += 1
    await ClockCycles(dut.clk, 4)
    host = dram.read(base, size)
    if not np.array_equal(host, ref):
        j = int(np.flatnonzero(host != ref)[0])
        raise AssertionError(f"memory after the run differs from the reference at {base + j:#x}")
    st = dram.stats()
    expect = {"read_bursts": len(mon.ar), "write_bursts": len(mon.aw), "read_beats": len(mon.r),
              "write_beats": len(mon.w), "bytes_read": 32 * len(mon.r),
              "bytes_written": 32 * len(mon.w), "slverr_reads": 0, "slverr_writes": 0}
    for k, v in expect.items():
        assert st[k] == v, f"statistic {k}: model says {st[k]}, monitor saw {v}"
    assert len(mon.b) == len(mon.aw), f"{len(mon.aw)} write bursts but {len(mon.b)} responses"
    assert st["r_stall_cycles"] > 0 if cfg["pause"] else True, "R back-pressure never seen"
    write_result({"ops": nops, "stats": st, "cycles": mon.cycle})


async def _burst_timing(axi, mon, addr, beats, nbursts=1):
    """Issue nbursts back-to-back bursts, rready always 1; returns (AR edges, R records)."""
    n0, r0 = len(mon.ar), len(mon.r)
    evs = [axi.init_read(addr + k * beats * 32, beats * 32, arid=0) for k in range(nbursts)]
    for ev in evs:
        await ev.wait()
    return mon.ar[n0:], mon.r[r0:]


@cocotb.test()
async def timing(dut):
    """Latency (AR edge -> first R edge) and bandwidth (cycles per beat on 128-beat bursts) for
    the configured (latency, beats_per_cycle) pairs, each with a fresh AxiDram."""
    cfg = tb_config()
    await start_clock_and_reset(dut, idle_inputs=IDLE)
    mon = Monitor(dut)
    axi = axi_master(dut)
    out = []
    for lat, bpc, nbursts in cfg["cases"]:
        dram = AxiDram(dut, base=0, size=1 << 20, latency_cycles=lat, beats_per_cycle=bpc)
        c0 = mon.cycle
        await ClockCycles(dut.clk, 30)              # idle: the model sleeps
        ars, rs = await _burst_timing(axi, mon, 0x4000, 128, nbursts)
        assert len(ars) == nbursts and len(rs) == 128 * nbursts, (len(ars), len(rs))
        assert all(r[2] == 0 for r in rs) and [r[1] for r in rs] == ([0] * 127 + [1]) * nbursts
        out.append({"latency": lat, "bpc": bpc, "nbursts": nbursts,
                    "first_beat": rs[0][0] - ars[0][0], "span": rs[-1][0] - rs[0][0],
                    "ar_cycles": [a[0] - ars[0][0] for a in ars],
                    "stats": dram.stats(), "monitor_cycles": mon.cycle - c0})
        dram.stop()
        await ClockCycles(dut.clk, 2)
    write_result({"cases": out})


@cocotb.test()
async def slverr(dut):
    """Reads / writes below, above and across the end of [base, base+size): SLVERR with the
    right beat count; in-range beats of a straddling write land, nothing else changes."""
    cfg = tb_config()
    base, size = cfg["base"], cfg["size"]
    await start_clock_and_reset(dut, idle_inputs=IDLE)
    dram = AxiDram(dut, base=base, size=size, latency_cycles=5)
    mon = Monitor(dut)
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 256, size, dtype=np.uint8)
    dram.write(base, ref)
    axi = axi_master(dut)
    res = {}
    for name, a, n in (("below", base - 256, 128), ("above", base + size, 200),
                       ("across_end", base + size - 64, 256), ("inside", base, 96)):
        r0 = len(mon.r)
        rd = await axi.read(a, n, arid=0)
        beats = mon.r[r0:]
        res[f"read_{name}"] = {"resp": int(rd.resp), "beats": len(beats),
                               "beat_resps": sorted({b[2] for b in beats}), "nbytes": len(rd.data)}
        if name == "inside":
            assert bytes(rd.data) == ref[:n].tobytes(), "in-range read data wrong"
    wr = {}
    for name, a, n in (("below", base - 128, 64), ("above", base + size + 32, 64),
                       ("across_end", base + size - 32, 96)):
        data = bytes(range(n))
        w = await axi.write(a, data, awid=0)
        wr[name] = int(w.resp)
        if name == "across_end":
            ref[size - 32:] = np.frombuffer(data[:32], np.uint8)
    res["write_resps"] = wr
    await ClockCycles(dut.clk, 2)
    assert np.array_equal(dram.read(base, size), ref), "memory changed outside the in-range beats"
    res["stats"] = dram.stats()
    try:
        dram.read(base + size - 4, 8)
    except ValueError as e:
        res["host_error"] = str(e)
    write_result(res)


@cocotb.test()
async def axil(dut):
    """AxiLiteMaster against cocotbext-axi's AxiLiteRam: writes land in the RAM, RAM contents read
    back through read32."""
    from cocotbext.axi import AxiLiteBus, AxiLiteRam
    await start_clock_and_reset(dut, idle_inputs=IDLE)
    ram = AxiLiteRam(AxiLiteBus.from_prefix(dut, "ram_axil"), dut.clk, dut.rst, size=1 << 12)
    m = AxiLiteMaster(dut)
    rng = np.random.default_rng(3)
    vals = {int(o) * 4: int(v) for o, v in zip(rng.choice(1024, 32, replace=False),
                                               rng.integers(0, 1 << 32, 32, dtype=np.uint64))}
    for off, v in vals.items():
        await m.write32(off, v)
    ram_seen = {off: int.from_bytes(ram.read(off, 4), "little") for off in vals}
    ram.write(0x100, (0xDEADBEEF).to_bytes(4, "little"))
    got = {off: await m.read32(off) for off in vals}
    back = await m.read32(0x100)
    write_result({"written": vals, "ram_seen": ram_seen, "read_back": got, "host_word": back})


@cocotb.test()
async def speed(dut):
    """Model throughput: the harness' generator streams 128-beat bursts (reads, then reads +
    writes) for cfg["cycles"] cycles; wall-clock cycles/s, beats against beats_per_cycle."""
    cfg = tb_config()
    await start_clock_and_reset(dut, idle_inputs=IDLE)
    n = cfg["cycles"]
    # waits are Timers (one wakeup), so the figures are the model's own cost + Verilator
    t0 = time.perf_counter()
    await Timer(10 * n, "ns")
    bare = n / (time.perf_counter() - t0)
    prof = None
    if cfg.get("profile"):
        import cProfile
        prof = cProfile.Profile()
    res = {"bare_clock_cycles_per_s": bare}
    for mode, rd, wr in (("read", 1, 0), ("read_write", 1, 1), ("idle", 0, 0)):
        dram = AxiDram(dut, base=0, size=1 << 20, latency_cycles=cfg["latency"],
                       beats_per_cycle=cfg["bpc"])
        dut.gen_rd_en.value, dut.gen_wr_en.value = rd, wr
        t0 = time.perf_counter()
        if prof and mode == "read":
            prof.enable()
        await Timer(10 * n, "ns")
        dt = time.perf_counter() - t0
        if prof and mode == "read":
            prof.disable()
            prof.dump_stats(cfg["profile"])
        res[mode] = {"cycles_per_s": n / dt, "rd_beats": int(dut.gen_rd_beats.value),
                     "wr_beats": int(dut.gen_wr_beats.value), "b": int(dut.gen_b.value),
                     "errors": int(dut.gen_errors.value), "stats": dram.stats()}
        # bursts are cut mid-way: stop the model, reset harness counters and generators
        dram.stop()
        dut.gen_rd_en.value = dut.gen_wr_en.value = 0
        dut.rst.value = 1
        await ClockCycles(dut.clk, 2)
        dut.rst.value = 0
        await ClockCycles(dut.clk, 1)
    write_result(res)


class _MMIOTarget:
    """cocotbext-axi AxiLiteSlave target over sim.driver.PythonMMIO (a register file whose START
    runs the interpreter): lets AsyncAcceleratorDriver run over AxiLiteMaster + AxiDram."""

    def __init__(self, mmio):
        self.mmio = mmio

    async def read(self, address, length):
        return self.mmio.read32(address).to_bytes(4, "little")[:length]

    async def write(self, address, data):
        self.mmio.write32(address, int.from_bytes(bytes(data), "little"))


@cocotb.test()
async def driver(dut):
    """sim/driver.py's AsyncAcceleratorDriver through CocotbAccelBackend: registers over the
    AXI4-Lite passthrough (PythonMMIO behind it), memory = the AxiDram's array."""
    from cocotbext.axi import AxiLiteBus, AxiLiteSlave
    from edgemoe.hw.config import get_hw_preset
    from edgemoe.model import get_preset
    from edgemoe.quant.compiler import compile_program, synthetic_state_dict
    from edgemoe.quant.config import get_quant_preset
    from edgemoe.quant.golden import GoldenModel
    from edgemoe.quant.qweights import quantize_weights
    from edgemoe.sim.driver import PythonBackend
    q, hw, mcfg = get_quant_preset("edge-moe-fixed"), get_hw_preset("zcu102-16x16"), get_preset("tiny")
    qw = quantize_weights(mcfg, q, synthetic_state_dict(mcfg, 2))
    prog = compile_program(mcfg, q, hw, qw)
    img = np.random.default_rng(7).random((mcfg.in_chans, mcfg.img_h, mcfg.img_w))
    golden = GoldenModel(mcfg, q, qw, attn_p=hw.attn_p).forward(img, "depth")

    await start_clock_and_reset(dut, idle_inputs=IDLE)
    base, nbytes = 0x1000_0000, 1 << 20
    be = CocotbAccelBackend.from_hwconfig(dut, hw, mem_base=base, mem_bytes=nbytes)
    py = PythonBackend(mcfg, q, hw, mem_bytes=nbytes, mem_base=base, busy_polls=3)
    py.mem.data = be.mem.mem                    # the interpreter works on the DRAM model's array
    AxiLiteSlave(AxiLiteBus.from_prefix(dut, "ram_axil"), dut.clk, dut.rst, target=_MMIOTarget(py.mmio))
    drv = be.driver(poll_interval_s=1e-7)       # 30 cycles at 300 MHz
    await drv.load(prog)
    from cocotb.utils import get_sim_time
    t0 = get_sim_time("ns")
    res = await drv.run(img, "depth")
    dt_ns = get_sim_time("ns") - t0
    assert np.array_equal(res.features, golden.features), "features differ from the golden model"
    image = np.frombuffer(bytes(prog.image), np.uint8)
    regions_ok = {}
    for name in ("program", "weights"):           # loaded by the host, read-only to the run
        reg = prog.regions[name]
        got = be.mem.read(drv.addr[name], reg.size)
        regions_ok[name] = bool(np.array_equal(got, image[reg.offset:reg.offset + reg.size]))
    write_result({"instructions": res.instructions, "dram_read": res.dram_bytes_read,
                  "regions_ok": regions_ok, "run_ns": dt_ns, "task": res.task})
