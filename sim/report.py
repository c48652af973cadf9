"""`edgemoe report`: one folder with JSON, matplotlib PNGs and a Markdown summary (report.md):

  latency_breakdown.png / perf.json      cycles per layer type, compute / DRAM wait / overhead
                                         (ESTIMATE: sim.perf_model)
  energy.png / energy.json               ms and J per image: accelerator (ESTIMATE), CPU
                                         (MEASURED here), GPU bench JSONs (MEASURED elsewhere),
                                         DESIGN.md rows (REPORTED), Edge-MoE (PUBLISHED)
  resources.png / resources.json         per-unit resources vs the part's budget (ESTIMATE:
                                         sim.resources)
  quant_report.png / quant_report.json   approximator error curves and per-layer SQNR (COMPUTED
                                         here: golden vs float, quant/report.py)
  pareto.png / sweep.json                design-space sweep (ESTIMATE: sim.sweep)
  report.json                            the index: every artefact with its label
Every figure title and every entry of report.md says whether it is measured (where, when),
computed, or estimated (from what).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

KIND_COLOURS = {"estimate": "tab:blue", "measured": "tab:green", "reported": "tab:gray",
                "published": "tab:orange"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_breakdown(perf: dict, path) -> str:
    plt = _plt()
    bt = perf["by_type"]
    types = list(bt)
    fig, ax = plt.subplots(1, 2, figsize=(14, 5.5))
    left = [0.0] * len(types)
    scale, unit = (1e6, "Mcycles") if perf["totals"]["cycles"] >= 1e6 else (1e3, "kcycles")
    for cls, col in (("compute", "tab:blue"), ("dram_wait", "tab:red"), ("overhead", "tab:gray")):
        vals = [bt[t][cls] / scale for t in types]
        ax[0].barh(types, vals, left=left, color=col, label=cls)
        left = [a + b for a, b in zip(left, vals)]
    for i, t in enumerate(types):
        ax[0].text(left[i], i, f" {bt[t]['share']:.1%}", va="center", fontsize=7)
    ax[0].invert_yaxis()
    ax[0].set(xlabel=f"{unit} per image", title="cycles per layer type")
    ax[0].legend()
    mb = [(bt[t]["dram_read_bytes"] + bt[t]["dram_write_bytes"] + bt[t]["fetch_bytes"]) / 1e6 for t in types]
    ax[1].barh(types, mb, color="tab:purple")
    ax[1].invert_yaxis()
    ax[1].set(xlabel="DRAM MB per image", title="DRAM traffic per layer type")
    t = perf["totals"]
    fig.suptitle(f"ESTIMATE (cycle model sim/perf_model.py, not measured): {perf['model']} / "
                 f"{perf['quant']} / {perf['hw']}: {t['cycles']:,} cycles = {t['ms']:.3f} ms at "
                 f"{perf['clock_mhz']:g} MHz, MAC util {t['mac_utilisation']:.2f}, DRAM "
                 f"{t['dram_bytes'] / 1e6:.2f} MB\nrouting: {perf['routing']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_energy(comp: dict, path) -> str:
    plt = _plt()
    rows = comp["rows"]
    names = [r["name"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(15, 0.55 * len(rows) + 2.5))
    for a, key, unit in ((ax[0], "ms_per_image", "ms per image"), (ax[1], "j_per_image", "J per image")):
        for i, r in enumerate(rows):
            v = r[key]
            col = KIND_COLOURS.get(r["kind"], "k")
            if v is None:
                a.text(0.01, i, "  " + (r.get("energy_note") or "not measured")[:70], va="center",
                       fontsize=7, color=col, transform=a.get_yaxis_transform())
                continue
            lo, hi = v
            a.barh(i, hi, color=col, alpha=0.35 if lo != hi else 0.9)
            a.barh(i, lo, color=col)
            band = r.get("j_band") if key == "j_per_image" else None
            if band:
                a.errorbar([lo], [i], xerr=[[lo - band[0]], [band[1] - lo]], fmt="none", ecolor="k",
                           capsize=3)
            a.text(hi, i, f" {lo:.3g}" + (f"-{hi:.3g}" if hi != lo else ""), va="center", fontsize=7)
        a.set_yticks(range(len(rows)))
        a.set_yticklabels(names if a is ax[0] else [r["kind"] for r in rows], fontsize=8)
        a.invert_yaxis()
        a.set_xscale("log")
        a.set(xlabel=unit + " (log)")
    ax[0].set_title("latency")
    ax[1].set_title("energy (accelerator: +-30% band)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in KIND_COLOURS.values()]
    ax[1].legend(handles, ["estimate (model)", "measured", "reported (DESIGN.md)", "published (Edge-MoE)"],
                 fontsize=7, loc="lower right")
    fig.suptitle(f"{comp['model']} per image. Blue = ESTIMATE (cycle model + resource model + power "
                 f"model calibrated on Edge-MoE's 14.54 W),\ngreen = MEASURED (where/when in energy.json "
                 f"and report.md), grey = REPORTED in DESIGN.md (not re-measured), orange = PUBLISHED "
                 f"(Edge-MoE paper)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_resources(res: dict, path, title_extra: str = "") -> str:
    plt = _plt()
    keys = ("lut", "ff", "dsp", "bram36")
    units = list(res["units"])
    fig, ax = plt.subplots(figsize=(11, 5.5))
    bottom = [0.0] * len(keys)
    cmap = plt.get_cmap("tab10")
    for n, u in enumerate(units):
        vals = [100 * res["units"][u][k] / res["budget"][k] for k in keys]
        ax.bar(keys, vals, bottom=bottom, color=cmap(n % 10), label=u)
        bottom = [a + b for a, b in zip(bottom, vals)]
    for i, k in enumerate(keys):
        ax.text(i, bottom[i], f"{res['total'][k]:,} / {res['budget'][k]:,}", ha="center", va="bottom",
                fontsize=8)
    ax.axhline(100, color="r", ls="--", label=f"{res['part']} budget")
    ax.set(ylabel="% of the part", title=f"ESTIMATE (analytic resource model sim/resources.py, not a "
           f"synthesis of the whole design){title_extra}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _strip_kind(r) -> str:
    lab = r["label"]
    return lab[len(r["kind"]) + 1:].strip() if lab.lower().startswith(r["kind"] + ":") else lab


def _md_row(r):
    def f(v):
        if v is None:
            return "not measured"
        lo, hi = v
        return f"{lo:.3g}" if abs(hi - lo) < 1e-12 * max(1, abs(hi)) else f"{lo:.3g}-{hi:.3g}"
    return (f"| {r['name']} | {f(r['ms_per_image'])} | {f(r['images_per_s'])} | {f(r['j_per_image'])} | "
            f"{f(r['images_per_j'])} | {f(r['ratio_j_vs_accel']) if r['ratio_j_vs_accel'] else '-'} | "
            f"**{r['kind']}**: {_strip_kind(r)}" + (f"; energy {r['energy_note']}" if r.get("energy_note") else "")
            + " |")


def build_report(preset: str, out, quants=("edge-moe-fixed",), hw_name: str = "zcu102-16x16",
                 task=None, routing: str = "uniform", cpu: bool = True, cpu_iters: int = 20,
                 threads: int = 1, gpu_jsons=(), sweep_grid: dict | None = None,
                 quant_report: bool = True, workers: int = 2, scheduler: str | None = None) -> dict:
    from edgemoe.hw.config import get_hw_preset
    from edgemoe.model.config import get_preset
    from edgemoe.quant.config import get_quant_preset

    from .cmd_energy import comparison
    from .perf_model import format_breakdown, golden_routing, inference_cycles
    from .resources import estimate_resources
    from .sweep import format_sweep, plot_sweep, run_sweep

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, hw = get_preset(preset), get_hw_preset(hw_name)
    qcfgs = [get_quant_preset(x) for x in quants]
    q = qcfgs[0]
    idx = {"model": preset, "quant": [x.name for x in qcfgs], "hw": hw.name,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "artefacts": {}}

    def note(name, label, files):
        idx["artefacts"][name] = {"label": label, "files": files}

    # 1. cycles
    rt, rsrc = (golden_routing(cfg, q, hw, task if task is not None else 0) if routing == "golden"
                else (None, None))
    perf = inference_cycles(cfg, q, hw, rt, routing_source=rsrc)
    (out / "perf.json").write_text(json.dumps(perf, indent=1, default=str))
    plot_breakdown(perf, out / "latency_breakdown.png")
    note("latency", "ESTIMATE: cycle model sim/perf_model.py", ["perf.json", "latency_breakdown.png"])

    # 2. energy comparison
    comp = comparison(cfg, q, hw, task, routing, None, gpu_jsons, cpu, cpu_iters, threads, True)
    (out / "energy.json").write_text(json.dumps(comp, indent=1, default=str))
    plot_energy(comp, out / "energy.png")
    note("energy", "accelerator ESTIMATE (cycle + resource + calibrated power model); CPU MEASURED "
         "here; GPU rows MEASURED where their bench JSON says; DESIGN.md REPORTED; Edge-MoE PUBLISHED",
         ["energy.json", "energy.png"])

    # 3. resources
    res = estimate_resources(cfg, q, hw)
    (out / "resources.json").write_text(json.dumps(res, indent=1))
    plot_resources(res, out / "resources.png", f"\n{preset} / {q.name} / {hw.name}")
    note("resources", "ESTIMATE: analytic resource model sim/resources.py (per-unit sources inside)",
         ["resources.json", "resources.png"])

    # 4. quantisation fidelity
    qrep = None
    if quant_report:
        from edgemoe.model.images import load_image
        from edgemoe.quant.report import load_weights, plot_report
        from edgemoe.quant.report import quant_report as qr
        x, desc = load_image(cfg)
        w = load_weights(cfg, "auto")
        qrep = qr(cfg, w, qcfgs, x[0].numpy(), desc, None, hw.attn_p)
        (out / "quant_report.json").write_text(json.dumps(qrep, indent=1, default=str))
        plot_report(qrep, qcfgs, out / "quant_report.png")
        note("quant", f"COMPUTED on this machine: golden fixed-point vs float model, {w.banner}, "
             f"image {desc}; approximator error curves on dense grids", ["quant_report.json",
                                                                         "quant_report.png"])

    # 5. sweep
    grid = sweep_grid or {"tiles": ["8x8", "16x16", "32x32"], "attn_p": [4, 8],
                          "quant": [x.name for x in qcfgs], "dram_gbps": [hw.dram_gbps],
                          "axi_bits": [256, 512]}
    sw = run_sweep(preset, grid, hw_name, rt, rsrc, scheduler, workers)
    (out / "sweep.json").write_text(json.dumps(sw, indent=1, default=str))
    plot_sweep(sw, out / "pareto.png")
    note("sweep", sw["label"], ["sweep.json", "pareto.png"])

    idx["seconds"] = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps(idx, indent=1))
    (out / "report.md").write_text(_markdown(cfg, q, hw, perf, comp, res, qrep, sw, idx))
    idx["text"] = {"breakdown": format_breakdown(perf), "sweep": format_sweep(sw)}
    return idx


def _markdown(cfg, q, hw, perf, comp, res, qrep, sw, idx) -> str:
    t, a = perf["totals"], comp["accelerator"]
    cal = a["calibration"]
    L = [f"# edgemoe report: {cfg.name} / {q.name} / {hw.name}", "",
         f"Generated {idx['time']} by `edgemoe report`. Labels: **ESTIMATE** = computed by a model "
         "(named), **MEASURED** = run on a machine (named, with time), **COMPUTED** = exact "
         "computation here (golden vs float), **REPORTED** / **PUBLISHED** = figures from DESIGN.md "
         "/ the Edge-MoE paper, not re-measured.", "",
         "## Headline (ESTIMATE)", "",
         f"- Latency: {t['cycles']:,} cycles = **{t['ms']:.3f} ms/image** at {hw.clock_mhz:g} MHz "
         f"({t['images_per_s']:.1f} images/s), MAC utilisation {t['mac_utilisation']:.2f} "
         f"(cycle model; routing: {perf['routing']}).",
         f"- DRAM: {t['dram_bytes'] / 1e6:.2f} MB/image.",
         f"- Power/energy: **{a['watts']:.2f} W, {a['j_per_image']:.4f} J/image** (+-30%: "
         f"{a['j_per_image_band'][0]:.4f}-{a['j_per_image_band'][1]:.4f} J); static {a['static_w']:.2f} W "
         f"fitted so that Edge-MoE's configuration gives its published {cal['published']['watts']} W "
         f"(residual {cal['residual_w']:.2g} W by construction), dynamic {a['dynamic_w']:.2f} W, "
         f"DRAM {a['dram_w']:.2f} W.",
         f"- Resources: DSP {res['total']['dsp']:,}/{res['budget']['dsp']:,}, LUT "
         f"{res['total']['lut']:,}/{res['budget']['lut']:,}, FF {res['total']['ff']:,}/{res['budget']['ff']:,}, "
         f"BRAM36 {res['total']['bram36']:,}/{res['budget']['bram36']:,} "
         f"({'fits' if res['fits'] else 'does NOT fit'} {res['part']}).", "",
         "## Where the cycles go (ESTIMATE, cycle model)", "", "![latency](latency_breakdown.png)", "",
         "| type | executions | cycles | share | compute | DRAM wait | overhead | util | DRAM MB |",
         "|---|---|---|---|---|---|---|---|---|"]
    for k, d in perf["by_type"].items():
        L.append(f"| {k} | {d['executions']} | {d['cycles']:,} | {d['share']:.1%} | {d['compute']:,} | "
                 f"{d['dram_wait']:,} | {d['overhead']:,} | {d['utilisation']:.2f} | "
                 f"{(d['dram_read_bytes'] + d['dram_write_bytes'] + d['fetch_bytes']) / 1e6:.3f} |")
    L += ["", "Files: [perf.json](perf.json).", "",
          "## Energy per image vs CPU / GPU / Edge-MoE", "", "![energy](energy.png)", "",
          "| row | ms/image | images/s | J/image | images/J | J ratio vs accelerator | what it is |",
          "|---|---|---|---|---|---|---|"]
    L += [_md_row(r) for r in comp["rows"]]
    L += ["", "J ratio > 1: the accelerator estimate needs that many times less energy per image.",
          "Files: [energy.json](energy.json).", "",
          "## Resources vs the part (ESTIMATE, analytic resource model)", "", "![resources](resources.png)", "",
          "| unit | LUT | FF | DSP | BRAM36 | source |", "|---|---|---|---|---|---|"]
    for u, d in res["units"].items():
        L.append(f"| {u} | {d['lut']:,} | {d['ff']:,} | {d['dsp']:,} | {d['bram36']:,} | {d['source']} |")
    L += ["", "Files: [resources.json](resources.json).", ""]
    if qrep is not None:
        L += ["## Quantisation fidelity (COMPUTED here: golden vs float)", "",
              f"{qrep['weights']['banner']}; image: {qrep['image']}.", "", "![quant](quant_report.png)", "",
              "| quant | task | final cosine | final SQNR dB | saturated |", "|---|---|---|---|---|"]
        for qn, p in qrep["presets"].items():
            for r in p["runs"]:
                s = r["final"]["sqnr_db"]
                L.append(f"| {qn} | {r['task']} | {r['final']['cosine']:.6f} | "
                         f"{'exact' if s is None else f'{s:.1f}'} | {r['saturated_total']} |")
        L += ["", "Files: [quant_report.json](quant_report.json).", ""]
    pts = sw["points"]
    L += ["## Design-space sweep (ESTIMATE)", "", "![pareto](pareto.png)", "",
          f"{len(pts)} points, grid {json.dumps(sw['grid'])}, {sw['workers']}. {sw['label']}.", "",
          "| Pareto point | quant | ms | DSP | LUT | BRAM36 | W | J/image |", "|---|---|---|---|---|---|---|---|"]
    for i in sorted(sw["front"], key=lambda i: pts[i]["ms"]):
        p = pts[i]
        L.append(f"| {p['hw']}{' (best)' if i == sw['best'] else ''} | {p['quant']} | {p['ms']:.3f} | "
                 f"{p['dsp']:,} | {p['lut']:,} | {p['bram36']} | {p['watts']:.2f} | {p['j_per_image']:.4f} |")
    if sw["best"] is None:
        L.append("\nNo point of the grid fits the part.")
    L += ["", "Files: [sweep.json](sweep.json).", "", "## Index", ""]
    for name, d in idx["artefacts"].items():
        L.append(f"- {name}: {', '.join(f'[{f}]({f})' for f in d['files'])} ({d['label']})")
    L.append(f"\nReport built in {idx['seconds']:.0f} s.")
    return "\n".join(L) + "\n"
