"""HWConfig: parallelism, memory port, buffers, clock and FPGA part budget of the accelerator."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace


class HWConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Part:
    name: str
    lut: int
    ff: int
    dsp: int
    bram36: int
    uram: int = 0


# FPGA parts as data: add a line to support another part.
PARTS: dict[str, Part] = {
    "xczu9eg": Part("xczu9eg", lut=274_080, ff=548_160, dsp=2520, bram36=912),   # ZCU102
    "xczu7ev": Part("xczu7ev", lut=230_400, ff=460_800, dsp=1728, bram36=312, uram=96),  # ZCU104
}


@dataclass(frozen=True)
class HWConfig:
    name: str = "zcu102-16x16"
    t_in: int = 16            # MAC array input lanes (reduction dimension; = buffer word lanes)
    t_out: int = 16           # MAC array output lanes (and the epilogue's: requant, GELU, gate)
    attn_p: int = 4           # attention parallelism: resident query rows
    lanes: int = 16           # vector lanes of the LayerNorm unit (and of stand-alone GELU /
                              # requant units); the top takes t_out, lanes = t_in / 2^j
    axi_data_bits: int = 256  # AXI4 master data width
    axi_addr_bits: int = 32
    clock_mhz: float = 300.0
    dram_gbps: float = 19.2   # sustained DRAM bandwidth seen by the accelerator port (GB/s)
    dram_latency_cycles: int = 64
    act_buffer_tokens: int = 256   # on-chip activation rows (tokens) per buffer
    part: str = "xczu9eg"
    # expert-weight streaming (hw/accel.py): a FIFO of this many AXI beats between the read
    # port and the compute unit; inside an expert loop the body is held on chip and the weights
    # of the experts still to run are requested as far ahead as the FIFO has room. 0: off.
    weight_fifo_beats: int = 0
    # beats per cycle the compute unit takes from that FIFO (1: the port's rate). Above 1 the
    # FIFO holds words of this many beats, so a memory-bound expert whose weights were banked
    # ahead loads a tile in tile_beats / weight_intake_beats cycles. Must divide the tile and
    # header beats (hw/compute.compute_geometry checks) and weight_fifo_beats.
    weight_intake_beats: int = 1

    def __post_init__(self):
        for f in ("t_in", "t_out", "attn_p", "lanes", "axi_data_bits", "act_buffer_tokens"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise HWConfigError(f"HWConfig '{self.name}': field '{f}' = {v!r} must be a positive integer")
        if not isinstance(self.weight_fifo_beats, int) or self.weight_fifo_beats < 0:
            raise HWConfigError(f"HWConfig '{self.name}': field 'weight_fifo_beats' = {self.weight_fifo_beats!r} "
                                "must be an integer >= 0 (0: no expert-weight streaming)")
        ki = self.weight_intake_beats
        if not isinstance(ki, int) or ki < 1 or ki & (ki - 1):
            raise HWConfigError(f"HWConfig '{self.name}': field 'weight_intake_beats' = {ki!r} must be a power "
                                "of two >= 1")
        if ki > 1 and (self.weight_fifo_beats == 0 or self.weight_fifo_beats % ki):
            raise HWConfigError(f"HWConfig '{self.name}': weight_intake_beats = {ki} needs the weight FIFO: "
                                f"weight_fifo_beats = {self.weight_fifo_beats} must be a positive multiple of it")
        if self.axi_data_bits % 8 or self.axi_data_bits & (self.axi_data_bits - 1):
            raise HWConfigError(f"HWConfig '{self.name}': axi_data_bits = {self.axi_data_bits} must be a power of two >= 8")
        if self.part not in PARTS:
            raise HWConfigError(f"HWConfig '{self.name}': unknown part {self.part!r}; known: {sorted(PARTS)}")
        if self.clock_mhz <= 0:
            raise HWConfigError(f"HWConfig '{self.name}': clock_mhz = {self.clock_mhz} must be > 0")

    @property
    def part_budget(self) -> Part:
        return PARTS[self.part]

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **kw) -> "HWConfig":
        return replace(self, **kw)


HW_PRESETS: dict[str, HWConfig] = {
    "zcu102-16x16": HWConfig(),
    "small-8x8": HWConfig(name="small-8x8", t_in=8, t_out=8, attn_p=2, lanes=8),
    # a non-square small design: results and LayerNorm beats are half-word slices
    "small-8x4": HWConfig(name="small-8x4", t_in=8, t_out=4, attn_p=2, lanes=4),
    # the 8-bit-weight design (issue 12): 32x32 MACs (1024 per cycle), attention P = 8; built
    # for QuantConfig w8a16-channel (per-channel multipliers in the epilogue)
    "zcu102-w8-32x32": HWConfig(name="zcu102-w8-32x32", t_in=32, t_out=32, attn_p=8, lanes=32),
    # the same 1024 MACs as 64 inputs x 16 outputs, LayerNorm on 32 lanes (the MAC-array shape,
    # the vector lanes and the port are separate): half the epilogue lanes, the router's 16
    # logits in one tile column
    "zcu102-w8-64x16": HWConfig(name="zcu102-w8-64x16", t_in=64, t_out=16, attn_p=8, lanes=32),
    # the same with expert-weight streaming: a 16384-beat weight FIFO (4 beats per word, the
    # compute unit takes a word per cycle), so the memory-bound experts load their weights,
    # banked ahead during the compute-bound ones, at 4 beats per cycle
    "zcu102-w8-64x16-stream": HWConfig(name="zcu102-w8-64x16-stream", t_in=64, t_out=16, attn_p=8,
                                       lanes=32, weight_fifo_beats=16384, weight_intake_beats=4),
}


def get_hw_preset(name: str) -> HWConfig:
    if name not in HW_PRESETS:
        raise HWConfigError(f"unknown hardware preset {name!r}; choose one of {sorted(HW_PRESETS)}")
    return HW_PRESETS[name]
