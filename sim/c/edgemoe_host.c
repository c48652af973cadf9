/* Example host program for the edgemoe accelerator on a Zynq UltraScale+ board under Linux.
 *
 * It does what sim/driver.py's AcceleratorDriver does, in C: checks ID / VERSION / CONFIG_HASH,
 * copies the memory image and the input rows into DRAM, writes the region bases and TASK_ID,
 * starts, polls STATUS, reads the counters and compares the output with the expected features.
 * Registers and fields come from edgemoe_regs.h (generated from sim/regmap.rdl by PeakRDL), the
 * region offsets and the hash from edgemoe_program.h (written by `edgemoe export`).
 *
 * DRAM: a physically contiguous buffer the accelerator can reach (e.g. a reserved-memory
 * region or a u-dma-buf), mapped through /dev/mem with O_SYNC (uncached), so no cache
 * maintenance is needed. Build: cc -O2 -Wall -I. edgemoe_host.c -o edgemoe_host
 * Run (root): ./edgemoe_host REG_PHYS MEM_PHYS MEM_BYTES image.bin input.bin TASK [expected.bin]
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "edgemoe_regs.h"
#include "edgemoe_program.h"

/* The generated struct must sit at the register offsets the accelerator decodes. */
static_assert(offsetof(edgemoe_regs_t, CTRL) == 0x08, "register layout");
static_assert(offsetof(edgemoe_regs_t, INSTR_COUNT) == 0x5c, "register layout");

static void *map_phys(int fd, uint64_t phys, size_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)phys);
    if (p == MAP_FAILED) {
        perror("mmap /dev/mem");
        exit(2);
    }
    return p;
}

static size_t load_file(const char *path, volatile uint8_t *dst, size_t max)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        exit(2);
    }
    uint8_t buf[4096];
    size_t n, total = 0;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) {
        if (total + n > max) {
            fprintf(stderr, "%s: larger than its %zu-byte region\n", path, max);
            exit(2);
        }
        for (size_t i = 0; i < n; i++)
            dst[total + i] = buf[i];
        total += n;
    }
    fclose(f);
    return total;
}

/* A 32-bit register by its byte offset (offsetof the generated struct: the struct is packed,
 * so pointers to its members would be flagged as possibly unaligned). */
static volatile uint32_t *reg32(volatile edgemoe_regs_t *r, size_t offset)
{
    return (volatile uint32_t *)((volatile uint8_t *)r + offset);
}

static void write_base(volatile edgemoe_regs_t *r, size_t lo, uint64_t addr)
{
    *reg32(r, lo) = (uint32_t)addr;
    *reg32(r, lo + 4) = (uint32_t)(addr >> 32);
}

/* 64-bit counter: reading LO latches HI (register map), so LO first. */
static uint64_t read64(volatile edgemoe_regs_t *r, size_t lo)
{
    uint64_t l = *reg32(r, lo);
    return l | (uint64_t)*reg32(r, lo + 4) << 32;
}

int main(int argc, char **argv)
{
    if (argc < 7) {
        fprintf(stderr, "usage: %s REG_PHYS MEM_PHYS MEM_BYTES image.bin input.bin TASK [expected.bin]\n", argv[0]);
        return 2;
    }
    uint64_t reg_phys = strtoull(argv[1], NULL, 0), mem_phys = strtoull(argv[2], NULL, 0);
    size_t mem_bytes = (size_t)strtoull(argv[3], NULL, 0);
    uint32_t task = (uint32_t)strtoul(argv[6], NULL, 0);
    if (mem_bytes < EDGEMOE_IMAGE_BYTES) {
        fprintf(stderr, "memory of %zu bytes < the %u-byte memory image\n", mem_bytes, EDGEMOE_IMAGE_BYTES);
        return 2;
    }
    int fd = open("/dev/mem", O_RDWR | O_SYNC);
    if (fd < 0) {
        perror("/dev/mem");
        return 2;
    }
    volatile edgemoe_regs_t *r = map_phys(fd, reg_phys, 4096);
    volatile uint8_t *mem = map_phys(fd, mem_phys, mem_bytes);

    uint32_t id = r->ID, ver = r->VERSION, hash = r->CONFIG_HASH;
    if (id != EDGEMOE_REGS__ID__ID_reset) {
        fprintf(stderr, "ID reads 0x%08x: no edgemoe accelerator at 0x%" PRIx64 "\n", id, reg_phys);
        return 1;
    }
    if (((ver & EDGEMOE_REGS__VERSION__REGMAP_bm) >> EDGEMOE_REGS__VERSION__REGMAP_bp) != EDGEMOE_REGS__VERSION__REGMAP_reset ||
        ((ver & EDGEMOE_REGS__VERSION__ISA_bm) >> EDGEMOE_REGS__VERSION__ISA_bp) != EDGEMOE_ISA_VERSION) {
        fprintf(stderr, "VERSION 0x%08x: this program was built for another register map or ISA\n", ver);
        return 1;
    }
    if (hash != EDGEMOE_CONFIG_HASH) {
        fprintf(stderr, "CONFIG_HASH 0x%08x != program's 0x%08x: bitstream and program differ\n", hash, EDGEMOE_CONFIG_HASH);
        return 1;
    }
    load_file(argv[4], mem, EDGEMOE_IMAGE_BYTES);
    load_file(argv[5], mem + EDGEMOE_IMAGE_OFFSET, EDGEMOE_INPUT_BYTES);

    if (r->STATUS & EDGEMOE_REGS__STATUS__BUSY_bm) {
        fprintf(stderr, "accelerator busy\n");
        return 1;
    }
    r->TASK_ID = task;
    write_base(r, offsetof(edgemoe_regs_t, PROGRAM_BASE_LO), mem_phys + EDGEMOE_PROGRAM_OFFSET);
    write_base(r, offsetof(edgemoe_regs_t, WEIGHTS_BASE_LO), mem_phys + EDGEMOE_WEIGHTS_OFFSET);
    write_base(r, offsetof(edgemoe_regs_t, IMAGE_BASE_LO), mem_phys + EDGEMOE_IMAGE_OFFSET);
    write_base(r, offsetof(edgemoe_regs_t, OUTPUT_BASE_LO), mem_phys + EDGEMOE_OUTPUT_OFFSET);
    r->CTRL = EDGEMOE_REGS__CTRL__START_bm;

    uint32_t st;
    struct timespec nap = {0, 100000};   /* poll every 0.1 ms */
    for (long i = 0;; i++) {
        st = r->STATUS;
        if (st & (EDGEMOE_REGS__STATUS__DONE_bm | EDGEMOE_REGS__STATUS__ERROR_bm))
            break;
        if (i > 600000) {                /* about a minute */
            fprintf(stderr, "timeout, STATUS 0x%x\n", st);
            return 1;
        }
        nanosleep(&nap, NULL);
    }
    if (st & EDGEMOE_REGS__STATUS__ERROR_bm) {
        fprintf(stderr, "accelerator error %u at pc %u\n", r->ERROR_CODE, r->ERROR_PC);
        return 1;
    }
    printf("cycles %" PRIu64 ", DRAM read %" PRIu64 " B, written %" PRIu64 " B, saturations %u, instructions %u\n",
           read64(r, offsetof(edgemoe_regs_t, CYCLE_COUNT_LO)), read64(r, offsetof(edgemoe_regs_t, DRAM_BYTES_READ_LO)),
           read64(r, offsetof(edgemoe_regs_t, DRAM_BYTES_WRITTEN_LO)), r->SAT_COUNT, r->INSTR_COUNT);

    if (argc > 7) {
        static uint8_t expected[EDGEMOE_OUTPUT_BYTES];
        FILE *f = fopen(argv[7], "rb");
        if (!f || fread(expected, 1, sizeof expected, f) != sizeof expected) {
            perror(argv[7]);
            return 2;
        }
        fclose(f);
        size_t bad = 0;
        for (size_t i = 0; i < sizeof expected; i++)
            bad += mem[EDGEMOE_OUTPUT_OFFSET + i] != expected[i];
        printf("%s: %zu of %zu output bytes differ\n", bad ? "MISMATCH" : "bit-exact", bad, sizeof expected);
        return bad != 0;
    }
    return 0;
}
