"""Boards that `edgemoe export --board` targets, as data: the device, Vivado's board part, and the
Zynq UltraScale+ PS ports the block design uses. The resource budget is hw.config.PARTS[part]
(one table of part limits for the buffer plan, the resource model and this fit check)."""
from __future__ import annotations

from dataclasses import dataclass

from .config import PARTS


class UnknownBoard(ValueError):
    pass


@dataclass(frozen=True)
class Board:
    name: str
    part: str              # key of hw.config.PARTS (resource budget)
    device: str            # full Vivado part: device-package-speed-temperature
    board_part: str        # Vivado board file (board preset of the PS); needs the board files installed
    ps_ip: str = "zynq_ultra_ps_e"
    hp_port: str = "S_AXI_HP0_FPD"      # PS slave the accelerator's AXI4 master drives (to DDR)
    gp_port: str = "M_AXI_HPM0_FPD"     # PS master that reaches the AXI4-Lite registers
    reg_base: int = 0xA000_0000         # first address of HPM0_FPD's window: the register file
    ddr_low_bytes: int = 2 << 30        # DDR_LOW window the HP port maps (0x0 .. 2 GiB)


BOARDS: dict[str, Board] = {
    "zcu102": Board("zcu102", "xczu9eg", "xczu9eg-ffvb1156-2-e", "xilinx.com:zcu102:part0:3.4"),
    "zcu104": Board("zcu104", "xczu7ev", "xczu7ev-ffvc1156-2-e", "xilinx.com:zcu104:part0:1.1"),
}


def get_board(name: str) -> Board:
    if name not in BOARDS:
        raise UnknownBoard(f"unknown board {name!r}; known boards: {sorted(BOARDS)}")
    b = BOARDS[name]
    if b.part not in PARTS:      # a table edit that forgot the part's limits
        raise UnknownBoard(f"board {name!r}: part {b.part!r} is not in hw.config.PARTS {sorted(PARTS)}")
    return b
