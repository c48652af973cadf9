"""cocotb testbench of hw/compute.py (module edgemoe_compute) against quant.linear.linear_golden.

The program: every linear layer of one M3ViT block shaped like a ModelConfig preset (`shape`:
"tiny" or "edge-moe"): patch embedding, QKV, projection (+ residual), dense fc1 (+GELU) and
fc2 (+ residual), router logits, then for every active expert fc1 (gather + GELU) and fc2
(gate weight + scatter-accumulate into the residual buffer), the expert queues built from the
router's logits with quant.approx.gate_fixed / quant.schedule.build_expert_queues; last two
"corner" layers (one row, one input chunk, padded output lanes, a one-token scatter). Inputs are
random act codes (LayerNorm-like rows, residual rows, pixels) with rows at the format extremes,
weights ~ N(0, 1/K) with one output channel at the largest code, so every narrowing (requantize,
gate multiply, residual add) saturates somewhere. `build_program` (importable without cocotb)
returns the layers with their weight streams, queues and the expected output beats.

The environment models the accelerator top around the unit: activation buffers (numpy arrays)
behind two in-order memory readers (xr -> x, rr -> r: random acceptance stalls, 1-3 cycles of
latency, at most 4 responses pending), the weight stream (AXI beats), the queue stream, the
command stream, and a y sink that writes every result into its destination buffer row (so the
residual read-modify-write and the fc1 -> fc2 chaining go through the buffers as in the top).
One coroutine acts once per cycle for all streams (fast). Before each command the layer's source
and destination buffers are set to the golden state (so a subset of layers can run alone).

tb_config: {"shape", "qcfg", "hwcfg", "seed", "layers": null | [kinds], "max_experts": null|int,
"phases": [{"gap": p, "stall": p, "seed": s, "noop": bool, "q_gap": p}], "max_cycles_factor":
float}: gap = probability of a valid gap per cycle on every input stream (q_gap on the queue
stream, default gap), stall = probability of ready low on xr, rr and y; noop = a zero-row
command before every layer (must be accepted and do nothing).
Result: {"phases": [{"layers": [{"name", "kind", "rows", "k", "n", "cycles", ...}], "cycles",
"beats", "lanes", "sat"}], "sim_cycles_per_s", ...}.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np

from edgemoe.quant import approx
from edgemoe.quant.linear import LinearMode, get_mode, linear_golden, pack_weight_stream, tile_layout
from edgemoe.quant.schedule import active_experts, build_expert_queues

KINDS = ("patch_embed", "qkv", "proj", "fc1", "fc2", "router", "expert_fc1", "expert_fc2", "corner")


@dataclass
class Layer:
    name: str
    kind: str
    mode: LinearMode
    rows: int
    k: int
    n: int
    src: str
    dst: str
    beats: list
    tokens: np.ndarray | None
    gate: np.ndarray | None
    pre: dict                      # buffer name -> padded array to load before the command
    expected: list                 # (dest row, tile, lanes tuple, sat count) per y beat
    t_in: int
    t_out: int
    sat_events: int = 0            # narrowing events of the layer (golden)

    @property
    def cmd(self) -> dict:
        return {"rows": self.rows, "kc": -(-self.k // self.t_in), "nc": -(-self.n // self.t_out)}


def _dims(shape: str):
    from edgemoe.model.config import get_preset
    return get_preset(shape)


def build_program(shape: str, qcfg, hwcfg, seed: int = 0, kinds=None, max_experts=None,
                  sat=None):
    """Layers (with expected results) of one block shaped like preset `shape`; see module doc.
    kinds: the layer kinds to run (others only update the golden buffers); max_experts: run
    only the first n active experts (-n: the n with the shortest queues); sat: a SatCounter for
    the golden narrowing counts.
    Returns (layers, buffer widths {name: padded columns})."""
    cfg = _dims(shape)
    lay = tile_layout(qcfg, hwcfg)
    Ti, To = lay.t_in, lay.t_out
    rng = np.random.default_rng(seed)
    q = qcfg
    D, H, E, EH, N, P = cfg.dim, cfg.mlp_hidden, cfg.num_experts, cfg.expert_hidden, \
        cfg.num_tokens, cfg.num_patches
    PK = cfg.patch * cfg.patch * cfg.in_chans

    def pad_to(a, cols):
        out = np.zeros((a.shape[0], cols), dtype=np.int64)
        out[:, :a.shape[1]] = a
        return out

    def padw(n, unit):
        return -(-n // unit) * unit

    chan = q.granularity == "channel"
    W_STD = 40.0          # channel granularity: int8 weight codes of this spread (scale in M, S)

    def act(shape_, std):
        return q.act.quantize(rng.normal(0.0, std, shape_))

    def weights(n, k, w_fmt, extreme=True):
        if chan:
            w = np.clip(np.round(rng.normal(0.0, W_STD, (n, k))), w_fmt.min_int, w_fmt.max_int).astype(np.int64)
        else:
            w = w_fmt.quantize(rng.normal(0.0, 1.0 / np.sqrt(k), (n, k)))
        if extreme and n > 1:
            w[1] = w_fmt.max_int           # one channel at the largest code: saturates
        return w

    def bias(n):
        if chan:     # accumulator-scale biases, of the size of a typical dot product
            b = np.round(rng.normal(0.0, 0.05 * 2 ** q.act.frac * W_STD * 8, n)).astype(np.int64)
        else:
            b = q.bias.quantize(rng.normal(0.0, 0.05, n))
        b[0], b[-1] = q.bias.max_int, q.bias.min_int
        return b

    def scales(n, k):
        """Channel granularity: per-channel (multiplier, shift) that bring a dot product of k
        terms back to about act's std (spread over a decade), as quant.channel.multiplier makes them."""
        from edgemoe.quant.channel import multiplier
        m = np.exp(rng.uniform(np.log(0.3), np.log(3.0), n)) / (W_STD * np.sqrt(k))
        return multiplier(m, q.mult_bits, "tb_compute")

    # buffers (unpadded golden state)
    bufs = {}
    pix = q.act.quantize(rng.random((P, PK)))
    pix[-1] = q.act.max_int
    bufs["patches"] = pix
    h = act((N, D), 1.0)
    h[-1], h[-2] = q.act.max_int, q.act.min_int
    bufs["h"] = h
    bufs["o"] = act((N, D), 0.5)
    x = act((N, D), 2.0)
    x[0] = q.act.max_int - rng.integers(0, 1 << 8, D)
    x[1] = q.act.min_int + rng.integers(0, 1 << 8, D)
    bufs["x"] = x

    widths = {}
    layers = []

    def run(name, kind, mode, src, dst, w, b, rows, tokens=None, gate=None, out_rows=None):
        md = get_mode(mode)
        n, k = w.shape
        kp, npd = padw(k, Ti), padw(n, To)
        widths[src] = max(widths.get(src, 0), kp)
        widths[dst] = max(widths.get(dst, 0), npd)
        if dst not in bufs:
            bufs[dst] = np.zeros((out_rows, n), dtype=np.int64)
        pre = {src: pad_to(bufs[src], kp), dst: pad_to(bufs[dst], npd)}
        M = S = scale = None
        if chan:      # pad channels: multiplier 0 (as the stream's zero header lanes)
            M, S = scales(n, k)
            scale = (np.pad(M, (0, npd - n)), np.pad(S, (0, npd - n)))
        res = linear_golden(pad_to(bufs[src], kp), np.pad(w, ((0, npd - n), (0, kp - k))),
                            None if b is None else np.pad(b, (0, npd - n)), q, md,
                            tokens=tokens, gate_w=gate, resid=pre[dst] if md.resid else None,
                            rows=rows, sat=sat, name=name, scale=scale)
        if md.resid:
            bufs[dst] = res.resid[:, :n]
        else:
            bufs[dst][res.dest] = res.y[:, :n]
        if kinds is not None and kind not in kinds:
            return res
        exp = []
        for j in range(npd // To):
            for r in range(len(res.dest)):
                lanes = res.y[r, j * To:(j + 1) * To]
                exp.append((int(res.dest[r]), j, tuple(int(v) for v in lanes),
                            int(res.sat[r, j * To:(j + 1) * To].sum())))
        beats = pack_weight_stream(w, b, lay, M, S)
        layers.append(Layer(name, kind, md, len(res.dest), k, n, src, dst, beats,
                            None if tokens is None else np.asarray(tokens),
                            None if gate is None else np.asarray(gate), pre, exp, Ti, To,
                            int(res.sat.sum())))
        return res

    run("patch_embed", "patch_embed", "patch_embed", "patches", "tok",
        weights(D, PK, q.patch_w), bias(D), P, out_rows=P)
    run("qkv", "qkv", "qkv", "h", "qkv", weights(3 * D, D, q.linear_w), bias(3 * D), N, out_rows=N)
    run("proj", "proj", "proj", "o", "x", weights(D, D, q.linear_w), bias(D), N)
    run("fc1", "fc1", "fc1", "h", "mid", weights(H, D, q.linear_w), bias(H), N, out_rows=N)
    run("fc2", "fc2", "fc2", "mid", "x", weights(D, H, q.linear_w), bias(D), N)
    # router: the logits of the LayerNorm-like rows (no extreme weight channel: real routing)
    wr = q.linear_w.quantize(rng.normal(0.0, 2.0 / np.sqrt(D), (E, D)))
    logits = run("router", "router", "router", "h", "logits", wr, None, N, out_rows=N).y[:, :E]
    idx, wts, _ = approx.gate_fixed(logits, q, cfg.top_k)
    queues = build_expert_queues(idx, wts, E)
    experts = active_experts(queues)
    if max_experts is not None and max_experts >= 0:
        experts = experts[:max_experts]
    elif max_experts is not None:      # -n: the n shortest queues (fast small-simulator runs)
        keep = sorted(experts, key=lambda e: (len(queues[e].tokens), e))[:-max_experts]
        experts = [e for e in experts if e in keep]
    forced = False
    for e in experts:
        toks, g = queues[e].tokens, np.array(queues[e].weights, dtype=np.int64)
        if not forced and (N - 1) in toks:     # the extreme row's gate at the largest code
            g[list(toks).index(N - 1)] = q.gate_prob.max_int
            forced = True
        run(f"expert{e}_fc1", "expert_fc1", "expert_fc1", "h", f"hid{e}",
            weights(EH, D, q.linear_w), bias(EH), len(toks), tokens=toks, out_rows=len(toks))
        run(f"expert{e}_fc2", "expert_fc2", "expert_fc2", f"hid{e}", "x",
            weights(D, EH, q.linear_w), bias(D), len(toks), tokens=toks, gate=g)
    # corner cases: one row (the next pass would re-read row 0 before it is written), one
    # input chunk (K = T_in: every pass is a column's first and last), padded output lanes,
    # and a one-token expert scatter with the largest gate weight on the extreme row
    nk = 2 * To + 3
    bufs["hc"] = h[:, :Ti] if Ti <= D else np.pad(h, ((0, 0), (0, Ti - D)))
    run("corner_fc1", "corner", "fc1", "hc", "cmid", weights(nk, Ti, q.linear_w), bias(nk), 1,
        out_rows=1)
    run("corner_fc2", "corner", "expert_fc2", "cmid", "x", weights(D, nk, q.linear_w), bias(D), 1,
        tokens=np.array([N - 1]), gate=np.array([q.gate_prob.max_int]))
    return layers, widths


def expected_cycles(layers, qcfg, hwcfg):
    from edgemoe.sim.perf import linear_cycles
    return [linear_cycles(L.rows, L.k, L.n, hwcfg, qcfg, L.mode) for L in layers]


try:
    import cocotb
except ImportError:  # importable without cocotb for build_program
    cocotb = None

if cocotb is not None:
    from cocotb.triggers import ReadOnly, RisingEdge

    from edgemoe.hw.config import HWConfig
    from edgemoe.quant.config import QuantConfig
    from edgemoe.sim.tb_common import pack_lanes, read_uint, tb_config, unpack_lanes, write_result

    class _Port:
        """A DUT input written only when its value changes (writes are the costly part)."""

        def __init__(self, handle, init=0):
            self.h, self.v = handle, None
            self.set(init)

        def set(self, v):
            if v != self.v:
                self.h.value = v
                self.v = v

    async def run_phase(dut, layers, q, hw, gap, stall, seed, noop, max_cycles, q_gap):
        """One pass over the program; cycle k = the k-th iteration (one per clock edge)."""
        rng = random.Random(seed)
        A, To, Ti = q.act.bits, hw.t_out, hw.t_in
        YB = max(q.act.bits, q.gate_logit.bits)
        P = {n: _Port(getattr(dut, n)) for n in (
            "cmd__valid", "cmd__payload__rows", "cmd__payload__kc", "cmd__payload__nc",
            "cmd__payload__bias", "cmd__payload__gelu", "cmd__payload__gate", "cmd__payload__resid",
            "cmd__payload__logit", "cmd__payload__gather", "cmd__payload__scatter",
            "w__valid", "w__payload", "q__valid", "q__payload__token", "q__payload__gate",
            "xr__ready", "x__valid", "x__payload", "rr__ready", "r__valid", "r__payload", "y__ready")}
        R = {n: getattr(dut, n) for n in (
            "cmd__ready", "w__ready", "q__ready", "xr__valid", "xr__payload__row", "xr__payload__chunk",
            "x__ready", "rr__valid", "rr__payload__row", "rr__payload__tile", "r__ready", "y__valid",
            "y__payload__row", "y__payload__tile", "y__payload__data", "y__payload__sat_count", "busy")}
        bufs = {}
        cmds = []
        for L in layers:
            if noop:
                cmds.append((None, {"rows": 0, "kc": 1, "nc": 1}))
            cmds.append((L, L.cmd))
        w_beats = [(li, b) for li, L in enumerate(layers) for b in L.beats]
        q_items = [(int(t), int(gw) if L.gate is not None else 0)
                   for L in layers if L.mode.queue
                   for t, gw in zip(L.tokens, L.gate if L.gate is not None else [0] * len(L.tokens))]
        ci = wi = qi = 0
        x_layer = r_layer = y_layer = 0     # layer each stream is serving
        x_cnt = r_cnt = y_cnt = 0
        x_pend, r_pend = [], []             # (ready cycle, packed data)
        res = [{"name": L.name, "kind": L.kind, "rows": L.rows, "k": L.k, "n": L.n,
                "cmd_cycle": None, "last_cycle": None, "beats": 0} for L in layers]
        sat_total = 0
        lanes_cmp = 0
        noops_done = 0
        cyc = -1

        def counts(L):
            c = L.cmd
            return c["nc"] * c["kc"] * L.rows, c["nc"] * L.rows, c["nc"] * L.rows

        def buf_slice(name, row, col0, n, L):
            a = bufs[name]
            if row >= a.shape[0]:
                raise AssertionError(f"layer {L.name}: request for row {row} beyond buffer "
                                     f"'{name}' of {a.shape[0]} rows")
            return pack_lanes(a[row, col0:col0 + n], A)

        while True:
            cyc += 1
            if cyc > max_cycles:
                raise AssertionError(
                    f"timeout after {cyc} cycles: commands {ci}/{len(cmds)}, weight beats {wi}/"
                    f"{len(w_beats)}, queue {qi}/{len(q_items)}, x layer {x_layer} ({x_cnt}), "
                    f"y layer {y_layer} ({y_cnt} beats)")
            # ---- drive this cycle's inputs
            cmd_v = ci < len(cmds) and not (gap and rng.random() < gap)
            if cmd_v:
                L, c = cmds[ci]
                md = L.mode if L is not None else get_mode("qkv")
                P["cmd__payload__rows"].set(c["rows"])
                P["cmd__payload__kc"].set(c["kc"])
                P["cmd__payload__nc"].set(c["nc"])
                for f in ("bias", "gelu", "gate", "resid", "logit", "gather", "scatter"):
                    P[f"cmd__payload__{f}"].set(int(getattr(md, f)))
            P["cmd__valid"].set(int(cmd_v))
            w_v = wi < len(w_beats) and not (gap and rng.random() < gap)
            if w_v:
                P["w__payload"].set(w_beats[wi][1])
            P["w__valid"].set(int(w_v))
            q_v = qi < len(q_items) and not (q_gap and rng.random() < q_gap)
            if q_v:
                P["q__payload__token"].set(q_items[qi][0])
                P["q__payload__gate"].set(q_items[qi][1])
            P["q__valid"].set(int(q_v))
            xr_rdy = len(x_pend) < 4 and not (stall and rng.random() < stall)
            P["xr__ready"].set(int(xr_rdy))
            x_v = bool(x_pend) and x_pend[0][0] <= cyc and not (gap and rng.random() < gap)
            if x_v:
                P["x__payload"].set(x_pend[0][1])
            P["x__valid"].set(int(x_v))
            rr_rdy = len(r_pend) < 4 and not (stall and rng.random() < stall)
            P["rr__ready"].set(int(rr_rdy))
            r_v = bool(r_pend) and r_pend[0][0] <= cyc and not (gap and rng.random() < gap)
            if r_v:
                P["r__payload"].set(r_pend[0][1])
            P["r__valid"].set(int(r_v))
            y_rdy = not (stall and rng.random() < stall)
            P["y__ready"].set(int(y_rdy))
            await ReadOnly()
            # ---- sample handshakes
            lat = (lambda: 1 + rng.randrange(3)) if (gap or stall) else (lambda: 1)
            if cmd_v and read_uint(R["cmd__ready"]):
                L, c = cmds[ci]
                ci += 1
                if L is None:
                    noops_done += 1
                else:
                    li = layers.index(L)
                    res[li]["cmd_cycle"] = cyc
                    for name, arr in L.pre.items():
                        bufs[name] = arr.copy()
            if w_v and read_uint(R["w__ready"]):
                wi += 1
            if q_v and read_uint(R["q__ready"]):
                qi += 1
            if xr_rdy and read_uint(R["xr__valid"]):
                L = layers[x_layer]
                row, ch = read_uint(R["xr__payload__row"]), read_uint(R["xr__payload__chunk"])
                x_pend.append((cyc + lat(), buf_slice(L.src, row, ch * Ti, Ti, L)))
                x_cnt += 1
                if x_cnt == counts(L)[0]:
                    x_layer, x_cnt = x_layer + 1, 0
            if x_v and read_uint(R["x__ready"]):
                x_pend.pop(0)
            if rr_rdy and read_uint(R["rr__valid"]):
                while not layers[r_layer].mode.resid:
                    r_layer += 1
                L = layers[r_layer]
                row, tl = read_uint(R["rr__payload__row"]), read_uint(R["rr__payload__tile"])
                r_pend.append((cyc + lat(), buf_slice(L.dst, row, tl * To, To, L)))
                r_cnt += 1
                if r_cnt == counts(L)[1]:
                    r_layer, r_cnt = r_layer + 1, 0
            if r_v and read_uint(R["r__ready"]):
                r_pend.pop(0)
            if y_rdy and read_uint(R["y__valid"]):
                if y_layer >= len(layers):
                    raise AssertionError(f"unexpected extra y beat at cycle {cyc}")
                L = layers[y_layer]
                row, tl = read_uint(R["y__payload__row"]), read_uint(R["y__payload__tile"])
                data = unpack_lanes(read_uint(R["y__payload__data"]), YB, To)
                sat = read_uint(R["y__payload__sat_count"])
                e_row, e_tl, e_lanes, e_sat = L.expected[y_cnt]
                r_idx = y_cnt % L.rows
                if (row, tl) != (e_row, e_tl):
                    raise AssertionError(
                        f"first mismatch in layer {L.name}, output beat {y_cnt} (row {r_idx}, tile "
                        f"{e_tl}) at cycle {cyc}: destination expected (row {e_row}, tile {e_tl}), "
                        f"got (row {row}, tile {tl})")
                for k in range(To):
                    if data[k] != e_lanes[k]:
                        raise AssertionError(
                            f"first mismatch in layer {L.name}: row {r_idx} (buffer row {e_row}), "
                            f"lane {k} (channel {e_tl * To + k}), cycle {cyc}: expected "
                            f"{e_lanes[k]}, got {data[k]}")
                if sat != e_sat:
                    raise AssertionError(
                        f"first mismatch in layer {L.name}: row {r_idx} tile {e_tl}, sat_count at "
                        f"cycle {cyc}: expected {e_sat}, got {sat}")
                lanes_cmp += To
                sat_total += sat
                a = bufs[L.dst]
                a[row, tl * To:(tl + 1) * To] = data
                y_cnt += 1
                res[y_layer]["beats"] += 1
                if y_cnt == len(L.expected):
                    res[y_layer]["last_cycle"] = cyc
                    y_layer, y_cnt = y_layer + 1, 0
            await RisingEdge(dut.clk)
            if y_layer == len(layers) and ci == len(cmds):
                break
        # nothing may follow
        for _ in range(4):
            await ReadOnly()
            if read_uint(R["y__valid"]) or read_uint(R["busy"]):
                raise AssertionError("the unit is busy or emits beats after the last layer")
            await RisingEdge(dut.clk)
        assert wi == len(w_beats) and qi == len(q_items), "weight or queue beats left unread"
        for r in res:
            r["cycles"] = r["last_cycle"] - r["cmd_cycle"] + 1
        return {"layers": res, "cycles": cyc + 1, "lanes": lanes_cmp,
                "sat": sat_total, "noops": noops_done,
                "beats": sum(r["beats"] for r in res)}

    @cocotb.test()
    async def compute_program(dut):
        cfg = tb_config()
        q = QuantConfig.from_dict(cfg["qcfg"])
        hw = HWConfig(**cfg["hwcfg"])
        layers, _ = build_program(cfg["shape"], q, hw, int(cfg.get("stim_seed", 0)),
                                       cfg.get("layers"), cfg.get("max_experts"))
        model = expected_cycles(layers, q, hw)
        idle = {"cmd__valid": 0, "w__valid": 0, "q__valid": 0, "x__valid": 0, "r__valid": 0,
                "xr__ready": 0, "rr__ready": 0, "y__ready": 0}
        from edgemoe.sim.tb_common import start_clock_and_reset
        counter = await start_clock_and_reset(dut, idle_inputs=idle)
        out = {"phases": [], "model_cycles": model, "layer_names": [L.name for L in layers]}
        t0 = time.perf_counter()
        c0 = counter.cycle
        for ph in cfg["phases"]:
            gap, stall = float(ph.get("gap", 0)), float(ph.get("stall", 0))
            budget = int(cfg.get("max_cycles_factor", 4) * (sum(model) + 200) * (1 + 4 * (gap + stall)))
            q_gap = float(ph.get("q_gap", gap))
            budget = int(budget * (1 + 10 * q_gap))
            r = await run_phase(dut, layers, q, hw, gap, stall, int(ph.get("seed", 1)),
                                bool(ph.get("noop", False)), budget, q_gap)
            r.update(gap=gap, stall=stall, q_gap=q_gap)
            out["phases"].append(r)
        wall = time.perf_counter() - t0
        out["sim_cycles"] = counter.cycle - c0
        out["wall_s"] = wall
        out["sim_cycles_per_s"] = out["sim_cycles"] / wall if wall > 0 else None
        write_result(out)
