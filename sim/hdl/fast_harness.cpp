// Verilator C++ harness of the accelerator top (hw/accel.py's edgemoe_accel, --prefix Vtop): the
// fast path of sim/fast_sim.py. It replaces the cocotb testbench (sim/tb_accel.py) cycle for
// cycle, so both paths give the same outputs, CYCLE_COUNT, retire trace and DRAM statistics:
//   Dram      = sim/dram.py AxiDram._run (in-order INCR bursts, fixed latency, token bucket,
//               max outstanding, write response delay, SLVERR outside memory, strict checks)
//   host code = sim/driver.py _g_load / _g_run through sim/dram.py AxiLiteMaster
// Timing convention (as cocotb + Verilator schedule it): at every rising edge the testbench reads
// the settled values from before the edge, the design evaluates the edge with the old inputs,
// and the testbench's new input values are applied after it. edge() below does exactly that.
//
// Usage: fast_sim CONFIG      (CONFIG: "key value..." lines written by sim/fast_sim.py)
//        fast_sim --hash      (prints the design hash compiled in, for the stale-build check)
// Exit codes: 0 ok, 2 bad config / io, 3 design hash mismatch, 4 AXI protocol error,
//             5 timeout, 6 driver error (ID / VERSION / CONFIG_HASH / busy / accelerator error).
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "Vtop.h"
#include "verilated.h"

#ifndef EDGEMOE_DESIGN_HASH
#define EDGEMOE_DESIGN_HASH "unset"
#endif

double sc_time_stamp() { return 0; }

// Verilator escapes the "__" of hw/export.py's port names (m_axi__rdata -> m_axi___05Frdata)
#define M(x) m_axi___05F##x
#define L(x) s_axil___05F##x

// the offsets of sim/regs.py (passed in the config, so the harness has no copy of the map)
static std::map<std::string, uint64_t> K;     // numeric config values
static std::map<std::string, std::string> S;  // string config values
struct TaskSpec { std::string name; uint32_t id; std::string image; };
static std::vector<TaskSpec> tasks;

static std::unique_ptr<Vtop> top;
static std::vector<uint8_t> mem;
static uint64_t mem_base;
static uint64_t cyc = 0;          // rising edges so far (edge index = cocotb's sim time // 10)
static uint64_t max_cycles;
static FILE* progress = nullptr;  // tb_accel's progress file: one line per retired instruction

[[noreturn]] static void fail(int code, const std::string& kind, const std::string& msg) {
    std::ofstream f(S["result"]);
    f << "{\"error\": \"" << kind << "\", \"message\": \"" << msg << "\", \"cycle\": " << cyc << "}\n";
    f.close();
    fprintf(stderr, "fast_sim: %s: %s\n", kind.c_str(), msg.c_str());
    if (progress) fclose(progress);
    std::_Exit(code);          // no destructors: the model may be mid-evaluation
}

static std::string hex(uint64_t v) { char b[32]; snprintf(b, sizeof b, "%#llx", (unsigned long long)v); return b; }

// --- wide-port helpers: Verilator types ports <= 32 bits as integers, wider ones as VlWide ------
template <std::size_t N> static void get_bytes(const VlWide<N>& w, uint8_t* p) { memcpy(p, w.data(), N * 4); }
template <std::size_t N> static void set_bytes(VlWide<N>& w, const uint8_t* p) { memcpy(w.data(), p, N * 4); }
template <std::size_t N> static void set_zero(VlWide<N>& w) { memset(w.data(), 0, N * 4); }

constexpr int NB = sizeof(Vtop::M(rdata));           // bus bytes (VlWide<8> for 256 bits)
// ports of 128 and 256 bits are VlWide (hw/accel.py check_buildable allows 32..256; the
// narrower ones are plain integers in Verilator and run on the cocotb path)
static_assert(NB == 16 || NB == 32, "the fast harness takes a 128- or 256-bit AXI4 data port");
constexpr uint32_t FULL_STRB = NB == 32 ? 0xFFFFFFFFu : (1u << NB) - 1;

// --- the inputs the testbench drives: written here, applied after the edge (cocotb's deposit) ---
struct Inputs {
    uint8_t rst = 0;
    // AXI4 slave side (Dram)
    uint8_t arready = 0, rvalid = 0, rlast = 0, rresp = 0, awready = 0, wready = 0, bvalid = 0, bresp = 0;
    uint8_t rdata[NB] = {0};
    bool rdata_dirty = false;
    // AXI4-Lite master side (host)
    uint32_t l_awaddr = 0, l_wdata = 0, l_araddr = 0;
    uint8_t l_awvalid = 0, l_wvalid = 0, l_wstrb = 0, l_bready = 0, l_arvalid = 0, l_rready = 0;
} in;

static void apply_inputs() {
    top->rst = in.rst;
    top->M(arready) = in.arready; top->M(rvalid) = in.rvalid; top->M(rlast) = in.rlast;
    top->M(rresp) = in.rresp; top->M(awready) = in.awready; top->M(wready) = in.wready;
    top->M(bvalid) = in.bvalid; top->M(bresp) = in.bresp;
    if (in.rdata_dirty) { set_bytes(top->M(rdata), in.rdata); in.rdata_dirty = false; }
    top->L(awaddr) = in.l_awaddr; top->L(awvalid) = in.l_awvalid; top->L(wdata) = in.l_wdata;
    top->L(wstrb) = in.l_wstrb; top->L(wvalid) = in.l_wvalid; top->L(bready) = in.l_bready;
    top->L(araddr) = in.l_araddr; top->L(arvalid) = in.l_arvalid; top->L(rready) = in.l_rready;
}

// --- trace monitors (tb_accel._trace / _busy: rising edges of retire and busy) ----------------
static uint64_t t_start = 0;
static std::vector<std::string> trace;    // "[pc, expert, cycle]"
static std::vector<uint64_t> busy_starts;
static uint8_t prev_retire = 0, prev_busy = 0;

static void observe() {
    if (top->retire != prev_retire) {
        prev_retire = top->retire;
        if (prev_retire) {
            uint64_t c = cyc - t_start;
            char b[96];
            snprintf(b, sizeof b, "[%u, %u, %llu]", (unsigned)top->retire_pc, (unsigned)top->retire_expert,
                     (unsigned long long)c);
            trace.push_back(b);
            if (progress) {
                fprintf(progress, "%u %u %llu\n", (unsigned)top->retire_pc, (unsigned)top->retire_expert,
                        (unsigned long long)c);
                fflush(progress);
            }
        }
    }
    if (top->busy != prev_busy) {
        prev_busy = top->busy;
        if (prev_busy) busy_starts.push_back(cyc - t_start);
    }
}

// --- DRAM model: sim/dram.py AxiDram._run, one call per rising edge ----------------------------
struct Burst { uint64_t addr; uint32_t beats, size, k; uint64_t ready_at; bool err; };

struct Dram {
    uint64_t base, size, lat, num, den, cap, maxo, wresp;
    bool strict;
    std::deque<Burst> rq, wq;
    std::deque<std::pair<uint64_t, uint8_t>> bq;
    uint8_t rvalid = 0, bvalid = 0, wready = 0, arready = 0, awready = 0;
    uint64_t tokens = 0, c = 0;           // c: AxiDram._cyc (never reset)
    bool wprio = false;
    int warmup = 2;                        // AxiDram measures the clock period on its first two edges
    // AxiDram sleeps while idle (until arvalid / awvalid change) and adds the skipped edges to its
    // `cycles` statistic only when it wakes; `edges` counts every edge, `cycles` mirrors that.
    bool asleep = false;
    uint8_t sleep_arvalid = 0, sleep_awvalid = 0;
    uint64_t edges = 0;
    // statistics (AxiDram._STATS)
    uint64_t bytes_read = 0, bytes_written = 0, read_bursts = 0, write_bursts = 0, read_beats = 0,
             write_beats = 0, slverr_reads = 0, slverr_writes = 0, busy_cycles = 0, r_stall_cycles = 0,
             cycles = 0;

    void clear() {
        rq.clear(); wq.clear(); bq.clear();
        rvalid = bvalid = wready = arready = awready = 0;
        tokens = den; wprio = false;
    }
    void reset_outputs() {
        in.arready = in.rvalid = in.awready = in.wready = in.bvalid = in.rlast = in.rresp = in.bresp = 0;
        memset(in.rdata, 0, NB); in.rdata_dirty = true;
    }
    uint64_t beat_addr(const Burst& b, uint32_t k) const {
        if (k == 0) return b.addr;
        uint64_t step = 1ull << b.size;
        return (b.addr & ~(step - 1)) + k * step;
    }
    void check_burst(const char* kind, uint64_t addr, uint32_t beats, uint32_t sz, uint32_t burst) {
        if ((1u << sz) > (unsigned)NB)
            fail(4, "AxiProtocolError", std::string("AxiDram: ") + kind + " size " + std::to_string(sz) +
                 " wider than the " + std::to_string(NB) + "-byte bus (addr " + hex(addr) + ")");
        if (!strict) return;
        if (burst != 1)
            fail(4, "AxiProtocolError", std::string("AxiDram: ") + kind + "burst " + std::to_string(burst) +
                 " at " + hex(addr) + ": only INCR (1) supported");
        uint64_t last = (addr & ~((1ull << sz) - 1)) + ((uint64_t)beats << sz) - 1;
        if (addr >> 12 != last >> 12)
            fail(4, "AxiProtocolError", std::string("AxiDram: ") + kind + " burst " + hex(addr) + ", " +
                 std::to_string(beats) + " beats crosses a 4 KiB boundary (AXI forbids it)");
    }
    void w_beat(Burst& bu) {
        uint64_t a = beat_addr(bu, bu.k) & ~(uint64_t)(NB - 1);
        bool last = bu.k == bu.beats - 1;
        if ((bool)top->M(wlast) != last && strict)
            fail(4, "AxiProtocolError", "AxiDram: wlast " + std::to_string(!last) + " on beat " +
                 std::to_string(bu.k) + " of a " + std::to_string(bu.beats) + "-beat write burst at " + hex(bu.addr));
        if (base <= a && a + NB <= base + size) {
            uint8_t d[NB];
            get_bytes(top->M(wdata), d);
            uint32_t strb = top->M(wstrb);
            uint8_t* o = &mem[a - base];
            if (strb == FULL_STRB) memcpy(o, d, NB);
            else for (int i = 0; i < NB; i++) if (strb >> i & 1) o[i] = d[i];
        } else {
            bu.err = true;
        }
        write_beats++;
        bytes_written += 1ull << bu.size;
        bu.k++;
        if (last) {
            bool err = bu.err;
            wq.pop_front();
            slverr_writes += err;
            bq.emplace_back(c + wresp - 1, err ? 2 : 0);
        }
    }
    // one rising edge: top's outputs are the values from before the edge
    void step() {
        edges++;
        if (warmup) { if (--warmup == 0) cycles = edges; return; }
        c++;
        if (asleep && (top->M(arvalid) != sleep_arvalid || top->M(awvalid) != sleep_awvalid)) asleep = false;
        if (!asleep) cycles = edges;     // (asleep, this edge is a no-op: nothing outstanding)
        if (top->rst) { clear(); reset_outputs(); return; }
        uint8_t arready_s = arready, awready_s = awready;
        bool arv = arready_s && top->M(arvalid);
        if (arv) {
            uint64_t addr = top->M(araddr); uint32_t beats = top->M(arlen) + 1u;
            uint32_t sz = top->M(arsize), burst = top->M(arburst);
            check_burst("ar", addr, beats, sz, burst);
            rq.push_back({addr, beats, sz, 0, c + lat - 1, false});
            read_bursts++;
        }
        uint8_t rvalid_s = rvalid;
        if (rvalid_s) {
            if (top->M(rready)) {
                Burst& bu = rq.front();
                read_beats++;
                bytes_read += 1ull << bu.size;
                bu.k++;
                if (bu.k == bu.beats) { slverr_reads += bu.err; rq.pop_front(); }
                rvalid = 0;
            } else {
                r_stall_cycles++;
            }
        }
        bool awv = awready_s && top->M(awvalid);
        if (awv) {
            uint64_t addr = top->M(awaddr); uint32_t beats = top->M(awlen) + 1u;
            uint32_t sz = top->M(awsize), burst = top->M(awburst);
            check_burst("aw", addr, beats, sz, burst);
            wq.push_back({addr, beats, sz, 0, 0, false});
            write_bursts++;
        }
        // wvalid only counts while a write burst waits for data (wready reserves a token)
        bool wvalid = !wq.empty() && top->M(wvalid);
        uint8_t wready_s = wready;
        if (wready_s) {
            if (wvalid) w_beat(wq.front());
            else tokens += den;                  // refund the token wready had reserved
            wready = 0;
        }
        uint8_t bvalid_s = bvalid;
        if (bvalid_s && top->M(bready)) bvalid = 0;
        uint64_t t = tokens + num;
        if (t > cap) t = cap;
        bool want_r = !rvalid && !rq.empty() && rq.front().ready_at <= c;
        bool want_w = wvalid && !wq.empty();
        if (want_r && want_w && t >= den) {
            if (wprio) want_r = false;
            wprio = !wprio;
        }
        if (want_r && t >= den) {
            t -= den;
            Burst& bu = rq.front();
            uint64_t a = beat_addr(bu, bu.k) & ~(uint64_t)(NB - 1);
            if (base <= a && a + NB <= base + size) {
                memcpy(in.rdata, &mem[a - base], NB);
                in.rresp = 0;
            } else {
                bu.err = true;
                memset(in.rdata, 0, NB);
                in.rresp = 2;
            }
            in.rdata_dirty = true;
            in.rlast = bu.k == bu.beats - 1;
            rvalid = 1;
        }
        in.rvalid = rvalid;
        if (want_w && t >= den) { t -= den; wready = 1; }
        in.wready = wready;
        tokens = t;
        if (!bvalid && !bq.empty() && bq.front().first <= c) {
            in.bresp = bq.front().second;
            bq.pop_front();
            bvalid = 1;
        }
        in.bvalid = bvalid;
        arready = rq.size() < maxo;
        awready = wq.size() + bq.size() < maxo;
        in.arready = arready; in.awready = awready;
        if (!rq.empty() || !wq.empty() || !bq.empty() || bvalid) {
            busy_cycles++;
        } else if (arready_s && awready_s && arready && awready && !(arv || awv || rvalid || wready)) {
            asleep = true;
            sleep_arvalid = top->M(arvalid);
            sleep_awvalid = top->M(awvalid);
        }
    }
    std::string stats() const {
        std::ostringstream o;
        o << "{\"bytes_read\": " << bytes_read << ", \"bytes_written\": " << bytes_written
          << ", \"read_bursts\": " << read_bursts << ", \"write_bursts\": " << write_bursts
          << ", \"read_beats\": " << read_beats << ", \"write_beats\": " << write_beats
          << ", \"slverr_reads\": " << slverr_reads << ", \"slverr_writes\": " << slverr_writes
          << ", \"busy_cycles\": " << busy_cycles << ", \"r_stall_cycles\": " << r_stall_cycles
          << ", \"cycles\": " << cycles << "}";
        return o.str();
    }
};
static std::unique_ptr<Dram> dram;

// --- one clock cycle --------------------------------------------------------------------------
// Finish the open edge (design evaluates it with the old inputs, monitors look, the new inputs
// go in, falling edge), then open the next one: the DRAM reads the values from before it. The
// host code runs between two calls, reading top's outputs (pre-edge) and writing `in`.
static bool edge_open = false;
static void edge() {
    if (edge_open) {
        top->clk = 1;
        top->eval();
        observe();
        apply_inputs();
        top->clk = 0;          // no negedge logic in the top: inputs and falling clock in one eval
        top->eval();
        observe();
        cyc++;
    }
    edge_open = true;
    if (cyc > max_cycles) fail(5, "timeout", "no result after " + std::to_string(max_cycles) + " cycles");
    if (dram) dram->step();
}

// --- AXI4-Lite master (sim/dram.py AxiLiteMaster) ---------------------------------------------
static const uint64_t LITE_TIMEOUT = 10000;
static void until(const uint8_t& sig, const std::string& what) {
    for (uint64_t i = 0; i < LITE_TIMEOUT; i++) {
        edge();
        if (sig) return;
    }
    fail(6, "AxiLiteError", "AXI4-Lite " + what + ": no handshake within 10000 cycles");
}
static uint32_t read32(uint32_t off) {
    in.l_araddr = off; in.l_arvalid = 1;
    until(top->L(arready), "read " + hex(off));
    in.l_arvalid = 0; in.l_rready = 1;
    until(top->L(rvalid), "read " + hex(off));
    in.l_rready = 0;
    uint32_t data = top->L(rdata), resp = top->L(rresp);
    if (resp) fail(6, "AxiLiteError", "AXI4-Lite read of offset " + hex(off) + ": rresp " + std::to_string(resp));
    return data;
}
static void write32(uint32_t off, uint32_t v) {
    in.l_awaddr = off; in.l_wdata = v; in.l_wstrb = 0xF; in.l_awvalid = in.l_wvalid = 1;
    bool aw_done = false, w_done = false;
    uint64_t i = 0;
    for (; i < LITE_TIMEOUT; i++) {
        edge();
        aw_done = aw_done || top->L(awready);
        w_done = w_done || top->L(wready);
        in.l_awvalid = !aw_done; in.l_wvalid = !w_done;
        if (aw_done && w_done) break;
    }
    if (i == LITE_TIMEOUT) fail(6, "AxiLiteError", "AXI4-Lite write " + hex(off) + ": awready/wready missing");
    in.l_bready = 1;
    until(top->L(bvalid), "write " + hex(off));
    in.l_bready = 0;
    uint32_t resp = top->L(bresp);
    if (resp) fail(6, "AxiLiteError", "AXI4-Lite write of offset " + hex(off) + ": bresp " + std::to_string(resp));
}
// CocotbAccelBackend.sleep(n cycles): a Timer of n - 1 periods then the next rising edge, which
// is the edge at the Timer's own time (cocotb's Timer fires before the clock's callback there)
static void sleep_cycles(uint64_t n) {
    uint64_t k = n > 1 ? n - 1 : 1;
    for (uint64_t i = 0; i < k; i++) edge();
}

static std::vector<uint8_t> read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) fail(2, "io", "cannot read " + path);
    return std::vector<uint8_t>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}
static void mem_write(uint64_t addr, const std::vector<uint8_t>& d) {
    if (addr < mem_base || addr + d.size() > mem_base + mem.size())
        fail(2, "io", "host write of " + std::to_string(d.size()) + " B at " + hex(addr) + " outside the memory");
    memcpy(&mem[addr - mem_base], d.data(), d.size());
}

static void load_config(const char* path) {
    std::ifstream f(path);
    if (!f) { fprintf(stderr, "fast_sim: cannot read config %s\n", path); exit(2); }
    std::string line;
    while (std::getline(f, line)) {
        std::istringstream ls(line);
        std::string key;
        if (!(ls >> key)) continue;
        // paths are the rest of the line (they may hold spaces)
        auto rest = [&ls]() { std::string r; std::getline(ls >> std::ws, r); return r; };
        if (key == "task") {
            TaskSpec t;
            ls >> t.name >> t.id;
            t.image = rest();
            tasks.push_back(t);
        } else if (key == "result" || key == "progress" || key == "memory" || key == "outdir" ||
                   key == "design_hash") {
            S[key] = rest();
        } else {
            std::string v;
            ls >> v;
            K[key] = std::stoull(v, nullptr, 0);
        }
    }
}
static uint64_t k(const char* name) {
    auto it = K.find(name);
    if (it == K.end()) fail(2, "config", std::string("config lacks key ") + name);
    return it->second;
}

int main(int argc, char** argv) {
    if (argc == 2 && std::string(argv[1]) == "--hash") { printf("%s\n", EDGEMOE_DESIGN_HASH); return 0; }
    if (argc != 2) { fprintf(stderr, "usage: %s CONFIG | --hash\n", argv[0]); return 2; }
    load_config(argv[1]);
    if (S["design_hash"] != EDGEMOE_DESIGN_HASH)
        fail(3, "StaleBuild", "binary built for design " EDGEMOE_DESIGN_HASH ", run asks for " + S["design_hash"]);
    max_cycles = k("max_cycles");
    mem_base = k("mem_base");
    mem.assign(k("mem_size"), 0);
    if (!S["progress"].empty()) progress = fopen(S["progress"].c_str(), "a");

    auto ctx = std::make_unique<VerilatedContext>();
    top = std::make_unique<Vtop>(ctx.get(), "");
    top->clk = 0;
    apply_inputs();
    top->eval();
    // tb_accel: rst high for 3 edges, then the DRAM model starts (AxiDram.from_hwconfig)
    edge();
    in.rst = 1;
    for (int i = 0; i < 3; i++) edge();
    in.rst = 0;
    dram = std::make_unique<Dram>();
    Dram& d = *dram;
    d.base = mem_base; d.size = mem.size(); d.lat = k("latency"); d.num = k("bpc_num"); d.den = k("bpc_den");
    d.cap = d.den + d.num - 1; d.maxo = k("max_outstanding"); d.wresp = k("write_resp_cycles");
    d.strict = k("strict");
    d.clear();
    d.reset_outputs();

    // driver load (sim/driver.py _g_load): identity checks, then the memory image at load_base
    uint32_t ident = read32(k("reg_id"));
    if (ident != k("accel_id")) fail(6, "DriverError", "ID register reads " + hex(ident) + ", expected " + hex(k("accel_id")));
    uint32_t ver = read32(k("reg_version"));
    if ((ver >> 16) != k("isa_version"))
        fail(6, "DriverError", "accelerator ISA version " + std::to_string(ver >> 16) + " != program ISA " + std::to_string(k("isa_version")));
    uint32_t h = read32(k("reg_config_hash"));
    if (h != k("config_hash"))
        fail(6, "ConfigMismatch", "CONFIG_HASH " + hex(h) + " != program's " + hex(k("config_hash")) +
             ": the memory image was compiled for other hardware than this build");
    mem_write(k("load_base"), read_file(S["memory"]));

    const uint64_t regions[4] = {k("addr_program"), k("addr_weights"), k("addr_image"), k("addr_output")};
    const uint32_t reg_bases[4] = {(uint32_t)k("reg_program_base"), (uint32_t)k("reg_weights_base"),
                                   (uint32_t)k("reg_image_base"), (uint32_t)k("reg_output_base")};
    const uint32_t DONE = k("status_done"), ERR = k("status_error"), BUSY = k("status_busy");
    std::ostringstream res;
    res << "{\"design_hash\": \"" EDGEMOE_DESIGN_HASH "\", \"tasks\": {";
    bool first = true;
    for (const TaskSpec& t : tasks) {
        trace.clear();
        busy_starts.clear();
        t_start = cyc;
        auto w0 = std::chrono::steady_clock::now();
        // driver run (sim/driver.py _g_run)
        mem_write(regions[2], read_file(t.image));
        uint32_t st = read32(k("reg_status"));
        if (st & BUSY) fail(6, "DriverError", "accelerator is busy; cannot start");
        write32(k("reg_task_id"), t.id);
        for (int i = 0; i < 4; i++) {
            write32(reg_bases[i], (uint32_t)regions[i]);
            write32(reg_bases[i] + 4, (uint32_t)(regions[i] >> 32));
        }
        write32(k("reg_ctrl"), k("ctrl_start"));
        for (;;) {
            st = read32(k("reg_status"));
            if (st & (DONE | ERR)) break;
            sleep_cycles(k("poll_cycles"));
        }
        if (st & ERR) {
            uint32_t code = read32(k("reg_error_code"));
            uint32_t pc = read32(k("reg_error_pc"));
            fail(6, "AcceleratorError", "task " + t.name + ": accelerator error " + std::to_string(code) +
                 " at pc " + std::to_string(pc));
        }
        // the output region as the host reads it after DONE (features, and taps of a debug program)
        {
            std::string p = S["outdir"] + "/output_" + t.name + ".bin";
            FILE* f = fopen(p.c_str(), "wb");
            uint64_t o = regions[3] - mem_base, n = k("output_bytes");
            if (!f || o + n > mem.size() || fwrite(&mem[o], 1, n, f) != n) fail(2, "io", "cannot write " + p);
            fclose(f);
        }
        uint64_t cnt[3];
        const uint32_t wide[3] = {(uint32_t)k("reg_cycle_count"), (uint32_t)k("reg_dram_bytes_read"),
                                  (uint32_t)k("reg_dram_bytes_written")};
        for (int i = 0; i < 3; i++) {
            uint64_t lo = read32(wide[i]);
            uint64_t hi = read32(wide[i] + 4);
            cnt[i] = hi << 32 | lo;
        }
        uint32_t sat = read32(k("reg_sat_count"));
        uint32_t ins = read32(k("reg_instr_count"));
        double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - w0).count();
        res << (first ? "" : ", ") << "\"" << t.name << "\": {\"cycles\": " << cnt[0]
            << ", \"dram_bytes_read\": " << cnt[1] << ", \"dram_bytes_written\": " << cnt[2]
            << ", \"sat_count\": " << sat << ", \"instructions\": " << ins << ", \"wall_s\": " << wall
            << ", \"sim_cycles\": " << (cyc - t_start)
            << ", \"start_cycle\": " << (busy_starts.empty() ? 0 : busy_starts[0]) << ", \"trace\": [";
        for (size_t i = 0; i < trace.size(); i++) res << (i ? ", " : "") << trace[i];
        res << "], \"dram\": " << d.stats() << "}";
        first = false;
    }
    res << "}, \"total_cycles\": " << cyc << "}\n";
    if (progress) fclose(progress);
    top->final();
    top.reset();               // before its context goes
    std::ofstream f(S["result"]);
    f << res.str();
    return 0;
}
