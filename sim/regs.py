"""Register map constants. GENERATED from sim/regmap.rdl by edgemoe.sim.regmap: do not edit;
run `python -m edgemoe.sim.regmap` after changing the .rdl (tests/test_regmap.py checks it)."""

REGMAP_VERSION = 1
ACCEL_ID = 0x454d4f45

# byte offsets
ID = 0x00
VERSION = 0x04
CTRL = 0x08
STATUS = 0x0c
ERROR_CODE = 0x10
ERROR_PC = 0x14
TASK_ID = 0x18
CONFIG_HASH = 0x1c
PROGRAM_BASE_LO = 0x20
PROGRAM_BASE_HI = 0x24
WEIGHTS_BASE_LO = 0x28
WEIGHTS_BASE_HI = 0x2c
IMAGE_BASE_LO = 0x30
IMAGE_BASE_HI = 0x34
OUTPUT_BASE_LO = 0x38
OUTPUT_BASE_HI = 0x3c
CYCLE_COUNT_LO = 0x40
CYCLE_COUNT_HI = 0x44
DRAM_BYTES_READ_LO = 0x48
DRAM_BYTES_READ_HI = 0x4c
DRAM_BYTES_WRITTEN_LO = 0x50
DRAM_BYTES_WRITTEN_HI = 0x54
SAT_COUNT = 0x58
INSTR_COUNT = 0x5c

# 64-bit LO/HI pairs, addressed by their LO offset (HI at +4)
PROGRAM_BASE = PROGRAM_BASE_LO
WEIGHTS_BASE = WEIGHTS_BASE_LO
IMAGE_BASE = IMAGE_BASE_LO
OUTPUT_BASE = OUTPUT_BASE_LO
CYCLE_COUNT = CYCLE_COUNT_LO
DRAM_BYTES_READ = DRAM_BYTES_READ_LO
DRAM_BYTES_WRITTEN = DRAM_BYTES_WRITTEN_LO
PAIRS = ('PROGRAM_BASE', 'WEIGHTS_BASE', 'IMAGE_BASE', 'OUTPUT_BASE', 'CYCLE_COUNT', 'DRAM_BYTES_READ', 'DRAM_BYTES_WRITTEN',)

# single-bit fields as masks
CTRL_START = 0x1
STATUS_BUSY = 0x1
STATUS_DONE = 0x2
STATUS_ERROR = 0x4

# per register: (offset, software access 'r' | 'w' | 'rw', reset, writable bits, readable bits)
REGISTERS = {
    'ID': (0x00, 'r', 0x454d4f45, 0x0, 0xffffffff),
    'VERSION': (0x04, 'r', 0x10001, 0x0, 0xffffffff),
    'CTRL': (0x08, 'w', 0x0, 0x1, 0x0),
    'STATUS': (0x0c, 'r', 0x0, 0x0, 0x7),
    'ERROR_CODE': (0x10, 'r', 0x0, 0x0, 0xff),
    'ERROR_PC': (0x14, 'r', 0x0, 0x0, 0xffffffff),
    'TASK_ID': (0x18, 'rw', 0x0, 0xff, 0xff),
    'CONFIG_HASH': (0x1c, 'r', 0x0, 0x0, 0xffffffff),
    'PROGRAM_BASE_LO': (0x20, 'rw', 0x0, 0xffffffff, 0xffffffff),
    'PROGRAM_BASE_HI': (0x24, 'rw', 0x0, 0xffffffff, 0xffffffff),
    'WEIGHTS_BASE_LO': (0x28, 'rw', 0x0, 0xffffffff, 0xffffffff),
    'WEIGHTS_BASE_HI': (0x2c, 'rw', 0x0, 0xffffffff, 0xffffffff),
    'IMAGE_BASE_LO': (0x30, 'rw', 0x0, 0xffffffff, 0xffffffff),
    'IMAGE_BASE_HI': (0x34, 'rw', 0x0, 0xffffffff, 0xffffffff),
    'OUTPUT_BASE_LO': (0x38, 'rw', 0x0, 0xffffffff, 0xffffffff),
    'OUTPUT_BASE_HI': (0x3c, 'rw', 0x0, 0xffffffff, 0xffffffff),
    'CYCLE_COUNT_LO': (0x40, 'r', 0x0, 0x0, 0xffffffff),
    'CYCLE_COUNT_HI': (0x44, 'r', 0x0, 0x0, 0xffffffff),
    'DRAM_BYTES_READ_LO': (0x48, 'r', 0x0, 0x0, 0xffffffff),
    'DRAM_BYTES_READ_HI': (0x4c, 'r', 0x0, 0x0, 0xffffffff),
    'DRAM_BYTES_WRITTEN_LO': (0x50, 'r', 0x0, 0x0, 0xffffffff),
    'DRAM_BYTES_WRITTEN_HI': (0x54, 'r', 0x0, 0x0, 0xffffffff),
    'SAT_COUNT': (0x58, 'r', 0x0, 0x0, 0xffffffff),
    'INSTR_COUNT': (0x5c, 'r', 0x0, 0x0, 0xffffffff),
}
