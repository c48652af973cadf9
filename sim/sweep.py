"""Design-space sweep: tile sizes (T_in x T_out), attention parallelism P, quant presets, DRAM
bandwidth and AXI width; per point the cycle model (sim.perf_model), the analytic resource
model (sim.resources) and the calibrated energy model (sim.energy): all ESTIMATES.

Points run in parallel through Dask: a local cluster (dask.distributed.LocalCluster, threads in
this process) by default, or an existing scheduler (address). The Pareto front minimises
(latency ms, DSP48E2, J/image) over the points that fit the part (every resource <= the part's
budget and the program's buffers fit): a point is on the front when no other fitting point is
at least as good in all three and better in one. The best design is the fitting point with the
lowest latency (ties: lower J/image, then fewer DSP). With synth=True the big units of
SYNTH_UNITS (compute unit, attention engine, LayerNorm, gate) are synthesised (yosys
synth_xilinx) for the front's points and replace their estimates (slow: minutes per point;
`edgemoe synth --top` synthesises one whole design).
"""
from __future__ import annotations

import itertools
import time

OBJECTIVES = ("ms", "dsp", "j_per_image")
# hw.units registry name -> sim.resources unit it measures
# registered unit -> resource-model entry it replaces when synthesised (--synth); the attention
# engine holds its SoftmaxStats / SoftmaxNorm (sim.resources zeroes those entries then)
SYNTH_UNITS = {"compute": "mac_array", "attention": "attention_qk", "layernorm": "layernorm", "gate": "gate"}
# what hw/accel.py can build: t_out and the LayerNorm lanes t_in / 2^j, an AXI port of 32..256
# bits. lanes 0 means lanes = t_in (the LayerNorm reads one buffer word per cycle); a lanes value
# above a point's t_in is skipped for it
DEFAULT_GRID = {"tiles": ["8x8", "16x16", "32x32", "64x16", "64x32"], "attn_p": [2, 4, 8],
                "quant": ["edge-moe-fixed", "w8a16"], "dram_gbps": [9.6, 19.2], "axi_bits": [256],
                "lanes": [0, 32]}
OPTIONAL = {"lanes": [0]}


class SweepError(ValueError):
    pass


def parse_tiles(spec) -> list[tuple[int, int]]:
    out = []
    for t in (spec.split(",") if isinstance(spec, str) else spec):
        t = str(t).strip().lower()
        try:
            a, b = t.split("x")
            out.append((int(a), int(b)))
        except ValueError:
            raise SweepError(f"tile size {t!r}: expected T_INxT_OUT, e.g. 16x16") from None
    return out


def grid_points(grid: dict, hw_base: str = "zcu102-16x16") -> list[dict]:
    """The cartesian product of the grid as point dicts."""
    grid = {**OPTIONAL, **grid}
    for k in DEFAULT_GRID:
        if k not in grid or not len(grid[k]):
            raise SweepError(f"sweep grid: '{k}' needs at least one value")
    pts, seen = [], set()
    for (ti, to), p, q, bw, axi, ln in itertools.product(parse_tiles(grid["tiles"]), grid["attn_p"],
                                                         grid["quant"], grid["dram_gbps"], grid["axi_bits"],
                                                         grid["lanes"]):
        if int(ln) > ti:             # a LayerNorm wider than the buffer word: not a design point
            continue
        pt = {"t_in": ti, "t_out": to, "attn_p": int(p), "quant": q, "dram_gbps": float(bw),
              "axi_data_bits": int(axi), "lanes": int(ln) or ti, "hw_base": hw_base}
        key = tuple(sorted(pt.items()))
        if key not in seen:          # lanes 0 and lanes = t_in are one point
            seen.add(key)
            pts.append(pt)
    return pts


def point_hw(pt: dict):
    from edgemoe.hw.config import get_hw_preset
    base = get_hw_preset(pt["hw_base"])
    lanes = pt.get("lanes", pt["t_in"])
    name = (f"{pt['t_in']}x{pt['t_out']}-p{pt['attn_p']}" + (f"-l{lanes}" if lanes != pt["t_in"] else "")
            + f"-axi{pt['axi_data_bits']}-{pt['dram_gbps']:g}GBs")
    return base.replace(name=name, t_in=pt["t_in"], t_out=pt["t_out"], attn_p=pt["attn_p"],
                        lanes=lanes, dram_gbps=pt["dram_gbps"], axi_data_bits=pt["axi_data_bits"])


def evaluate_point(pt: dict, preset: str, routing=None, measured: dict | None = None) -> dict:
    """Cycles, resources and energy of one point; an unbuildable point gets 'error'."""
    from edgemoe.hw.accel import check_buildable
    from edgemoe.model.config import get_preset
    from edgemoe.quant.config import get_quant_preset

    from .energy import power_from
    from .perf_model import inference_cycles
    from .resources import estimate_resources
    out = dict(pt)
    t0 = time.perf_counter()
    try:
        cfg, q, hw = get_preset(preset), get_quant_preset(pt["quant"]), point_hw(pt)
        check_buildable(cfg, q, hw)        # what hw/accel.py can generate
        perf = inference_cycles(cfg, q, hw, routing)
        res = estimate_resources(cfg, q, hw, measured=measured)
        e = power_from(res, perf, hw.clock_mhz)
    except Exception as ex:    # a point the configs reject (fit, formats): reported, not fatal
        out.update(ok=False, fits=False, error=f"{type(ex).__name__}: {ex}")
        return out
    tot = perf["totals"]
    out.update(ok=True, error=None, hw=hw.name, cycles=tot["cycles"], ms=tot["ms"],
               mac_utilisation=tot["mac_utilisation"], dram_mb=tot["dram_bytes"] / 1e6,
               compute_cycles=tot["compute"], dram_wait_cycles=tot["dram_wait"],
               **{k: res["total"][k] for k in ("lut", "ff", "dsp", "bram36")},
               utilisation=res["utilisation"], fits=res["fits"], watts=e["watts"],
               j_per_image=e["j_per_image"], images_per_j=e["images_per_j"],
               resources_measured=sorted(measured or {}), seconds=time.perf_counter() - t0)
    return out


def _evaluate_measured(pt_meas, preset, routing=None) -> dict:
    pt, meas = pt_meas
    return evaluate_point(pt, preset, routing, measured=meas)


def dominates(a: dict, b: dict, keys=OBJECTIVES) -> bool:
    return all(a[k] <= b[k] for k in keys) and any(a[k] < b[k] for k in keys)


def pareto_front(points: list[dict], keys=OBJECTIVES) -> list[int]:
    """Indices of the fitting points no other fitting point dominates."""
    cand = [i for i, p in enumerate(points) if p.get("ok") and p.get("fits")]
    return [i for i in cand if not any(dominates(points[j], points[i], keys) for j in cand if j != i)]


def best_point(points: list[dict]) -> int | None:
    cand = [i for i, p in enumerate(points) if p.get("ok") and p.get("fits")]
    if not cand:
        return None
    return min(cand, key=lambda i: (points[i]["ms"], points[i]["j_per_image"], points[i]["dsp"]))


def synth_units(pt: dict, preset: str, timeout_s: float = 900) -> dict:
    """Yosys synth_xilinx of the registered units for one point: {resources unit: result}."""
    from edgemoe.hw.export import module_name, to_rtlil
    from edgemoe.hw.synth import synth_xilinx
    from edgemoe.hw.units import UNITS, build_unit
    from edgemoe.model.config import get_preset
    from edgemoe.quant.config import get_quant_preset
    cfg, q, hw = get_preset(preset), get_quant_preset(pt["quant"]), point_hw(pt)
    out = {}
    for reg_name, unit in SYNTH_UNITS.items():
        if reg_name not in UNITS:
            continue
        top = module_name(reg_name)
        out[unit] = synth_xilinx(to_rtlil(build_unit(reg_name, q, hw, cfg), top), top, timeout_s=timeout_s)
    return out


def _client(scheduler: str | None, workers: int):
    from dask.distributed import Client, LocalCluster
    if scheduler:
        return Client(scheduler), None
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=False,
                           dashboard_address=None)
    return Client(cluster), cluster


def run_sweep(preset: str, grid: dict | None = None, hw_base: str = "zcu102-16x16", routing=None,
              routing_source: str | None = None, scheduler: str | None = None, workers: int = 2,
              synth: bool = False, synth_timeout_s: float = 900) -> dict:
    """Evaluate the grid through Dask; returns points, front, best (module docstring)."""
    from .energy import calibrate
    grid = {**DEFAULT_GRID, **(grid or {})}
    pts = grid_points(grid, hw_base)
    if routing is not None:    # plain arrays only: the points travel to the workers (pickled)
        import numpy as np
        routing = {int(b): {"topk_idx": np.asarray(r["topk_idx"])} for b, r in routing.items()}
    calibrate()                # once here: the in-process workers share the cached fit
    t0 = time.perf_counter()
    client, cluster = _client(scheduler, workers)
    try:
        futs = client.map(evaluate_point, pts, preset=preset, routing=routing, pure=False)
        results = client.gather(futs)
        front = pareto_front(results)
        synth_info = None
        if synth and front:
            meas = client.gather(client.map(synth_units, [results[i] for i in front], preset=preset,
                                            timeout_s=synth_timeout_s, pure=False))
            redo = client.gather(client.map(_evaluate_measured, [(pts[i], m) for i, m in zip(front, meas)],
                                            preset=preset, routing=routing, pure=False))
            for i, r, m in zip(front, redo, meas):
                r["synth"] = {u: {k: v[k] for k in ("lut", "ff", "dsp", "bram36", "seconds")}
                              for u, v in m.items()}
                results[i] = r
            synth_info = f"synthesised units {sorted(SYNTH_UNITS)} (those registered) for the front"
            front = pareto_front(results)
        workers_desc = (f"existing scheduler {scheduler}" if scheduler else
                        f"dask LocalCluster, {workers} thread workers (processes=False)")
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    best = best_point(results)
    return {"estimate": True,
            "label": ("ESTIMATE: cycle model (sim/perf_model.py), analytic resources (sim/resources.py)"
                      + (", some units synthesised" if synth_info else ", nothing synthesised")
                      + ", energy model calibrated on Edge-MoE (sim/energy.py)"),
            "model": preset, "hw_base": hw_base, "grid": grid, "objectives": list(OBJECTIVES),
            "routing": routing_source or "uniform (stated default, sim.perf_model.uniform_routing)",
            "workers": workers_desc, "seconds": time.perf_counter() - t0, "synth": synth_info,
            "points": results, "front": front, "best": best,
            "best_energy": (min((i for i in front), key=lambda i: results[i]["j_per_image"])
                            if front else None)}


def plot_sweep(res: dict, path) -> str:
    """PNG: latency vs DSP (colour: J/image) and latency vs J/image, front and best marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = res["points"]
    ok = [p for p in pts if p.get("ok")]
    fit = [p for p in ok if p["fits"]]
    nofit = [p for p in ok if not p["fits"]]
    front = sorted((pts[i] for i in res["front"]), key=lambda p: p["ms"])
    fig, ax = plt.subplots(1, 2, figsize=(14, 5.5))
    if fit:
        sc = ax[0].scatter([p["dsp"] for p in fit], [p["ms"] for p in fit],
                           c=[p["j_per_image"] for p in fit], cmap="viridis", s=28, label="fits the part")
        fig.colorbar(sc, ax=ax[0], label="J/image (estimate)")
        ax[1].scatter([p["j_per_image"] for p in fit], [p["ms"] for p in fit], s=20, c="tab:gray",
                      label="fits the part")
    if nofit:
        for a, x in ((ax[0], "dsp"), (ax[1], "j_per_image")):
            a.scatter([p[x] for p in nofit], [p["ms"] for p in nofit], marker="x", c="tab:red", s=24,
                      label="exceeds the part")
    for a, x in ((ax[0], "dsp"), (ax[1], "j_per_image")):
        a.scatter([p[x] for p in front], [p["ms"] for p in front], facecolors="none", edgecolors="k",
                  s=90, label="Pareto front (ms, DSP, J)")
        if res["best"] is not None:
            b = pts[res["best"]]
            a.scatter([b[x]], [b["ms"]], marker="*", s=260, c="gold", edgecolors="k",
                      label=f"best fitting: {b['hw']} {b['quant']} ({b['ms']:.2f} ms)")
        a.set_yscale("log")
        a.legend(fontsize=7, loc="best", framealpha=0.6)
    budget = pts[res["best"]]["utilisation"]["dsp"] if res["best"] is not None else None
    ax[0].set(xlabel="DSP48E2 (estimate)", ylabel="latency ms/image (estimate)",
              title="latency vs DSP" + (f" (best uses {budget:.0%} of the part's DSP)" if budget else ""))
    ax[1].set(xlabel="J/image (estimate)", ylabel="latency ms/image (estimate)", title="latency vs energy")
    fig.suptitle(f"{res['model']}: design-space sweep, {len(ok)} points. {res['label']}", fontsize=9)
    fig.tight_layout()
    from pathlib import Path
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def format_sweep(res: dict, top: int = 12) -> str:
    pts = res["points"]
    lines = [f"{res['model']}: {len(pts)} points ({sum(1 for p in pts if p.get('ok'))} buildable, "
             f"{sum(1 for p in pts if p.get('fits'))} fit), {res['workers']}, {res['seconds']:.1f} s",
             res["label"],
             f"{'':2}{'hw':<30}{'quant':<16}{'ms':>9}{'DSP':>7}{'LUT':>8}{'BRAM':>6}{'W':>7}{'J/img':>9}{'util':>6}"]
    for i in sorted(res["front"], key=lambda i: pts[i]["ms"])[:top]:
        p = pts[i]
        mark = "*" if i == res["best"] else " "
        lines.append(f"{mark} {p['hw']:<30}{p['quant']:<16}{p['ms']:>9.3f}{p['dsp']:>7}{p['lut']:>8}"
                     f"{p['bram36']:>6}{p['watts']:>7.2f}{p['j_per_image']:>9.4f}{p['mac_utilisation']:>6.2f}")
    errs = [p for p in pts if not p.get("ok")]
    if errs:
        lines.append(f"{len(errs)} points not buildable, e.g. {errs[0]['error'][:150]}")
    if res["best"] is None:
        lines.append("no point fits the part")
    return "\n".join(lines)
