"""Gelu: GELU(x) = relu(x) - d(|x|) by table + linear interpolation, L lanes per cycle.

Golden model: quant.approx.gelu_fixed (datapath spec in the quant/approx.py module docstring);
widths from quant.approx.gelu_params via gelu_plan() below, ROM contents from
quant.approx.gelu_table. Testbench: sim/tb_gelu.py, tests/test_gelu_rtl.py.

Per lane (edge-moe-fixed numbers in brackets: gelu_in = act = s32.22, table u18.18, step 1/32):
  t = |x| [32 bits unsigned];  i = t >> low [low = 17];  inside = i < N [N = 256 segments];
  r = t[low-R : low] [R = 17];  ROM[i] = (T[i], T[i+1] - T[i]) [u16 and s13: one 29-bit word];
  d = (T[i] << R) + (T[i+1]-T[i]) * r   [s13 x u17: one DSP48E2 27x18];
  y = fit_act(relu(x) requantized to act - round(d >> s))   [s = 13], d = 0 when not inside.
The ROM stores each segment's start value and slope (N words) instead of T[0..N] read at i and
i+1: the same integers, one read port per lane and no subtractor. Rounding of d is folded into
the post-add: the half-LSB constant fills the R zero low bits of T << R (no adder) and a
half-even tie is "low s bits of d + half are zero", which only clears the quotient's LSB.

Exported module `edgemoe_gelu` (hw/export.py naming rule), L = hwcfg.lanes:
  clk, rst                 in   1        sync domain, active-high synchronous reset
  i__valid                 in   1        input vector available
  i__ready                 out  1        input vector accepted (combinational from o__ready)
  i__payload__data         in   L*gelu_in.bits   lane k at bits [k*gelu_in.bits, ...), signed
  o__valid                 out  1
  o__ready                 in   1
  o__payload__data         out  L*act.bits       lane k at bits [k*act.bits, ...), act codes
  o__payload__sat_count    out  bit_length(L)    only when `can_saturate` (see gelu_plan): lanes
                                                 of this vector whose result left the act range
With gelu_in == act (the project's configurations; quant/calibrate.py requires it) and a signed
act, relu(x) <= act.max and -d >= -0.17 > act.min, so no lane can saturate and the output
payload is just `data`. A configuration where saturation is possible (e.g. act narrower than
gelu_in) gets the sat_count field, so saturation is never silent.
Throughput: one L-lane vector per cycle at steady state (L elements/cycle).
Latency: LATENCY = 6 cycles (input handshake at edge t -> output valid after edge t+6).
Stages: (0) |x|, index/fraction split, relu; (1) ROM read (synchronous read port = the stage
register); (2) operand registers (BRAM output / DSP A,B registers: keeps the ROM's clock-to-out
out of the multiplier's cycle); (3) slope * r (DSP M register); (4) post-add (T << R) + product
+ half, zeroed outside the table; (5) relu - rounded d, saturate/wrap to act (registered
output). The ROMs are Memory objects shared by ROM_PORTS = 2 lanes each (Yosys 0.70 crashes
in memory_libmap on one ROM with 16 read ports); Yosys maps them to LUTs (ROM_ATTRS =
{"rom_style": "block"} gives 8 RAMB36 instead, for about 2.3k fewer LUTs).
Resources (zcu102-16x16, edge-moe-fixed): tests/baselines/synth_gelu.json.
"""
from __future__ import annotations

from dataclasses import dataclass

from amaranth.hdl import Cat, Const, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from edgemoe.quant.approx import GeluParams, gelu_params, gelu_table
from edgemoe.quant.config import QuantConfig
from edgemoe.quant.fixed import Overflow, Rounding, shift_round

from .config import HWConfig
from .pipeline import PipelineControl
from .requant import popcount


@dataclass(frozen=True)
class GeluPlan:
    """Every width of the GELU datapath, derived from the QuantConfig in one place."""
    p: GeluParams
    in_bits: int        # gelu_in bits (signed input lanes)
    low: int            # t >> low is the segment index (in_frac - step_log2)
    addr_bits: int      # ROM address bits (N words)
    t_bits: int         # ROM field T[i] (unsigned, as many bits as the largest entry needs)
    s_bits: int         # ROM field T[i+1] - T[i] (signed)
    rom_t: tuple        # T[0..N-1]
    rom_s: tuple        # T[i+1] - T[i], i = 0..N-1
    d_shift: int        # d has table_frac + R fraction bits: round(d >> d_shift) is in act units
    relu_shift: int     # relu(x) requantized from in_frac to act.frac: round(relu >> relu_shift)
    relu_bits: int      # unsigned width of the requantized relu
    dsum_bits: int      # unsigned width of d + half (never negative)
    rd_bits: int        # unsigned width of round(d >> d_shift)
    y_bits: int         # signed width of relu - round(d)
    can_saturate: bool  # relu - round(d) can leave the act range


def gelu_plan(qcfg: QuantConfig) -> GeluPlan:
    p = gelu_params(qcfg)
    tab = [int(v) for v in gelu_table(qcfg)]          # T[0..N], T[N] = 0
    n = p.segments
    rom_t = tuple(tab[:n])
    rom_s = tuple(tab[i + 1] - tab[i] for i in range(n))
    t_bits = max(1, max(rom_t).bit_length())
    s_bits = max(abs(v) for v in rom_s).bit_length() + 1
    R, rnd = p.interp_bits, qcfg.rounding
    d_shift = p.table_frac + R - p.out_frac
    relu_shift = p.in_frac - p.out_frac
    half = 1 << (d_shift - 1) if d_shift > 0 and rnd is not Rounding.TRUNC else 0
    # d interpolates between two table entries (r < 2**R), so it lies in [0, max(T) << R].
    d_max = max(tab) << R
    dsum_bits = max(1, (d_max + half).bit_length())
    rd_max = int(shift_round(d_max, d_shift, rnd))
    relu_max = int(shift_round(qcfg.gelu_in.max_int, relu_shift, rnd))
    relu_bits = max(1, relu_max.bit_length())
    rd_bits = max(1, rd_max.bit_length())
    y_bits = max(relu_bits, rd_bits) + 1
    act = qcfg.act
    can_sat = relu_max > act.max_int or -rd_max < act.min_int
    return GeluPlan(p, qcfg.gelu_in.bits, p.in_frac - p.step_log2, ceil_log2(n), t_bits, s_bits,
                    rom_t, rom_s, d_shift, relu_shift, relu_bits, dsum_bits, rd_bits, y_bits,
                    can_sat)


def _round_unsigned(v, s: int, rounding: Rounding):
    """round(v >> s) of an unsigned value v for s > 0 (half-up adds the dropped top bit)."""
    v = v.as_unsigned()
    if len(v) < s + 1:
        v = Cat(v, Const(0, s + 1 - len(v)))
    q, hb = v[s:], v[s - 1]
    if rounding is Rounding.TRUNC:
        return q
    if rounding is Rounding.HALF_UP:
        return q + hb
    sticky = v[:s - 1].any() if s >= 2 else 0
    return q + (hb & (sticky | q[0]))


class Gelu(wiring.Component):
    LATENCY = 6
    ROM_PORTS = 2     # read ports per ROM copy (lanes sharing one ROM)
    ROM_ATTRS: dict = {}  # Memory attributes of the ROMs, e.g. {"rom_style": "block"}

    def __init__(self, qcfg: QuantConfig, hwcfg: HWConfig):
        self.qcfg, self.hwcfg = qcfg, hwcfg
        self.lanes = L = hwcfg.lanes
        self.plan = gelu_plan(qcfg)
        self.can_saturate = self.plan.can_saturate
        self.sat_bits = L.bit_length()
        out_fields = {"data": data.ArrayLayout(signed(qcfg.act.bits) if qcfg.act.signed
                                               else unsigned(qcfg.act.bits), L)}
        if self.can_saturate:
            out_fields["sat_count"] = unsigned(self.sat_bits)
        in_layout = data.StructLayout({"data": data.ArrayLayout(signed(qcfg.gelu_in.bits), L)})
        super().__init__({"i": In(stream.Signature(in_layout)),
                          "o": Out(stream.Signature(data.StructLayout(out_fields)))})

    def elaborate(self, platform):
        m = Module()
        q, L, pl = self.qcfg, self.lanes, self.plan
        p, rnd = pl.p, q.rounding
        R, low, W, A = p.interp_bits, pl.low, pl.in_bits, q.act.bits
        s = pl.d_shift

        ctl = PipelineControl(m, self.LATENCY, self.i.valid, self.o.ready, name="gelu")
        m.d.comb += self.i.ready.eq(ctl.in_ready)

        rom_words = [t | ((sl & ((1 << pl.s_bits) - 1)) << pl.t_bits)
                     for t, sl in zip(pl.rom_t, pl.rom_s)]
        roms = []
        for j in range(0, L, self.ROM_PORTS):
            roms.append(Memory(shape=unsigned(pl.t_bits + pl.s_bits), depth=p.segments,
                               init=rom_words, attrs=dict(self.ROM_ATTRS)))
            m.submodules[f"rom{j // self.ROM_PORTS}"] = roms[-1]

        def stage(n, k, **values):
            """Register each value in stage n of lane k (loaded on load[n]). Datapath registers
            need no reset: only the valid bits say whether they hold data."""
            regs = []
            for name, v in values.items():
                r = Signal(Value.cast(v).shape(), name=f"{name}{n}_{k}", reset_less=True)
                with m.If(ctl.load[n]):
                    m.d.sync += r.eq(v)
                regs.append(r)
            return regs

        over = Signal(L, reset_less=True)
        out = Signal(data.ArrayLayout(signed(A) if q.act.signed else unsigned(A), L), reset_less=True)
        half = 1 << (s - 1) if s > 0 and rnd is not Rounding.TRUNC else 0

        for k in range(L):
            x = self.i.payload.data[k]
            # (0) t = |x| (the most negative code becomes 2**(W-1), still W bits unsigned)
            t = Mux(x[-1], -x, x)[:W]
            t = Cat(t, Const(0, max(W, low + pl.addr_bits + 1) - W))
            xpos = Mux(x[-1], 0, x[:W - 1])
            if pl.relu_shift > 0:
                relu = _round_unsigned(xpos, pl.relu_shift, rnd)
            else:
                relu = xpos << -pl.relu_shift
            idx, r, ins, relu = stage(0, k, idx=t[low:low + pl.addr_bits], r=t[low - R:low],
                                      ins=t[low:] < p.segments, relu=relu[:pl.relu_bits])

            # (1) ROM read: the read port's data register is this stage's register
            rp = roms[k // self.ROM_PORTS].read_port(domain="sync")
            m.d.comb += [rp.addr.eq(idx), rp.en.eq(ctl.load[1])]
            r, ins, relu = stage(1, k, r=r, ins=ins, relu=relu)

            # (2) operand registers (BRAM output register / DSP A and B registers): the ROM's
            # clock-to-out and the multiplier are not in one cycle
            t_rom, slope, r, ins, relu = stage(2, k, t=rp.data[:pl.t_bits],
                                               slope=rp.data[pl.t_bits:].as_signed(), r=r, ins=ins,
                                               relu=relu)

            # (3) slope * r: signed s_bits x unsigned R bits (fits a DSP48E2 27 x 18 multiplier)
            prod = slope * r if R else Const(0, signed(2))
            prod, t_rom, ins, relu = stage(3, k, prod=prod, t=t_rom, ins=ins, relu=relu)

            # (4) d + half = (T << R) + half + product, zero outside the table; d >= 0
            if half < (1 << R):
                base = Cat(Const(half, R), t_rom)    # half fits the zero low bits of T << R
            else:
                base = (t_rom << R) + half
            dsum, relu = stage(4, k, dsum=Mux(ins, base + prod, 0)[:pl.dsum_bits], relu=relu)

            # (5) y = relu - round(d >> s), fitted to act
            if s <= 0:
                rd = dsum << -s
            elif pl.dsum_bits <= s:
                rd = Const(0, 1)
            elif rnd is Rounding.HALF_EVEN:
                tie = ~dsum[:s].any()                # d's dropped bits were exactly one half
                rd = Cat(dsum[s] & ~tie, dsum[s + 1:])
            else:
                rd = dsum[s:]
            y = Signal(signed(pl.y_bits), name=f"y_{k}")
            m.d.comb += y.eq(relu - rd)
            if q.act.signed:
                top = y[A - 1:]
                ovf = ~(top.all() | ~top.any()) if pl.y_bits > A else Const(0, 1)
                sat_v = Mux(y[-1], q.act.min_int, q.act.max_int)
            else:
                ovf = y[A:].any() if pl.y_bits > A else y[-1]
                sat_v = Mux(y[-1], 0, q.act.max_int)
            fit = y[:A] if pl.y_bits > A else y      # a narrower y is sign-extended
            res = Mux(ovf, sat_v, fit) if q.overflow is Overflow.SAT else fit
            if not pl.can_saturate:
                ovf, res = Const(0, 1), fit            # proven in range by gelu_plan's bounds
            with m.If(ctl.load[5]):
                m.d.sync += [out[k].eq(res), over[k].eq(ovf)]

        m.d.comb += [self.o.valid.eq(ctl.out_valid), self.o.payload.data.eq(out)]
        if self.can_saturate:
            m.d.comb += self.o.payload.sat_count.eq(popcount(over[k] for k in range(L)))
        return m
