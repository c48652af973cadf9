"""edgemoe.Design: the toolkit in a few calls (in the spirit of hls4ml's convert -> compile/predict
-> build -> report), each a thin layer over the module that does the work:

    d = edgemoe.Design("checkpoints/tiny.pt", quant="edge-moe-fixed", hw="small-8x8")
    d.golden(x, "depth")      quant.golden.GoldenModel: the bit-exact integer model (the spec)
    d.run(x, "depth")         the compiled program on the Python model of the accelerator
                              (sim.driver.PythonBackend, the same driver code as the board's)
    d.verilog("out/rtl")      hw.accel.Accelerator through hw.export: edgemoe_accel.v
    d.simulate(x)             sim.rtl_sim.simulate: cocotb + Verilator, bit-exact vs golden, cycles
    d.synth()                 hw.synth_accel.synth_accel: Yosys synth_xilinx resources
    d.export("out/zcu102", board="zcu102")   hw.vendor.export_design: the vendor-flow folder
    d.report("out/report")    cycle-model latency, resource estimate, and the results of the
                              calls above (report.json, report.md, PNGs)

The model is a ModelConfig, a preset name (model.config PRESETS) or an edgemoe checkpoint
(`edgemoe train`'s .pt: its config and trained weights). quant / hw: presets or config objects.
Weights of a config or preset: "seeded" (M3ViT's seeded init), "synthetic" (fast numpy init), a
float state dict or quant.qweights.QWeights. Everything is computed on first use and kept (program, Verilog text).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _as_image(x, cfg) -> np.ndarray:
    """float [C,H,W] numpy from numpy or torch, with or without a batch dimension of 1."""
    a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    want = (cfg.in_chans, cfg.img_h, cfg.img_w)
    if a.shape != want:
        raise ValueError(f"image shape {a.shape}: model '{cfg.name}' takes {want} (or [1, ...])")
    return a


class Design:
    def __init__(self, model="tiny", quant="edge-moe-fixed", hw="small-8x8", weights="seeded",
                 seed: int = 0):
        from edgemoe.hw.config import HWConfig, get_hw_preset
        from edgemoe.model.config import ModelConfig, get_preset
        from edgemoe.quant.config import QuantConfig, get_quant_preset
        self.source = "config"
        self._sd = None
        if isinstance(model, ModelConfig):
            self.cfg = model
        elif isinstance(model, (str, Path)) and (str(model).endswith(".pt") or Path(model).is_file()):
            from edgemoe.model.checkpoint import load_checkpoint
            self.cfg, sd, _meta = load_checkpoint(model)
            # the backbone is what the accelerator runs; the task heads stay on the host
            self._sd = {k: v for k, v in sd.items() if not k.startswith("heads.")}
            self.source = f"checkpoint {model}"
        else:
            self.cfg = get_preset(model)
        self.qcfg = quant if isinstance(quant, QuantConfig) else get_quant_preset(quant)
        self.hwcfg = hw if isinstance(hw, HWConfig) else get_hw_preset(hw)
        if self._sd is None:
            from edgemoe.quant.qweights import QWeights
            if isinstance(weights, (dict, QWeights)):
                self._sd, self.source = weights, type(weights).__name__
            elif weights not in ("seeded", "synthetic"):
                raise ValueError(f"weights {weights!r}: use 'seeded', 'synthetic', a state dict or QWeights")
            else:
                self.source = f"{weights} (seed {seed})"
        self.weights, self.seed = weights, seed
        self._program = self._verilog = self._golden = self._qweights = None
        self.results: dict = {}       # what simulate / synth / export returned, for report()

    def __repr__(self):
        return (f"Design(model='{self.cfg.name}', quant='{self.qcfg.name}', hw='{self.hwcfg.name}', "
                f"weights={self.source!r})")

    # --- convert -------------------------------------------------------------------------------
    @property
    def state_dict(self) -> dict:
        if self._sd is None:
            if self.weights == "synthetic":
                from edgemoe.quant.compiler import synthetic_state_dict
                self._sd = synthetic_state_dict(self.cfg, self.seed)
            else:
                from edgemoe.quant.report import load_weights
                self._sd = load_weights(self.cfg, "seeded", self.seed).state_dict
        return self._sd

    @property
    def qweights(self):
        """The integer weights (quant.qweights), quantised once: the golden model and the
        program must see the same ones."""
        if self._qweights is None:
            from edgemoe.quant.qweights import QWeights, quantize_weights
            sd = self.state_dict
            self._qweights = sd if isinstance(sd, QWeights) else quantize_weights(self.cfg, self.qcfg, sd)
        return self._qweights

    @property
    def program(self):
        """The compiled program + memory image (quant.compiler; FitError if it does not fit)."""
        if self._program is None:
            from edgemoe.quant.compiler import compile_program
            self._program = compile_program(self.cfg, self.qcfg, self.hwcfg, self.qweights)
        return self._program

    # --- predict -------------------------------------------------------------------------------
    def golden(self, x, task=0) -> np.ndarray:
        """Output features [tokens, D] as integer act codes from the golden model."""
        if self._golden is None:
            from edgemoe.quant.golden import GoldenModel
            self._golden = GoldenModel(self.cfg, self.qcfg, self.qweights, self.hwcfg.attn_p)
        return self._golden.forward(_as_image(x, self.cfg), task).features

    def run(self, x, task=0):
        """sim.driver.RunResult of the program on the Python model of the accelerator."""
        from edgemoe.sim.driver import PythonBackend
        drv = PythonBackend.for_program(self.program).driver()
        drv.load(self.program)
        return drv.run(_as_image(x, self.cfg), task)

    # --- build ---------------------------------------------------------------------------------
    def verilog_text(self) -> str:
        if self._verilog is None:
            from edgemoe.hw.accel import Accelerator
            from edgemoe.hw.export import to_verilog
            from edgemoe.hw.vendor import TOP
            self._verilog = to_verilog(Accelerator(self.cfg, self.qcfg, self.hwcfg), TOP)
        return self._verilog

    def verilog(self, out) -> Path:
        """Write <out>/edgemoe_accel.v; returns its path."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        p = out / "edgemoe_accel.v"
        p.write_text(self.verilog_text())
        return p

    def simulate(self, x=None, tasks=None, out_dir=None, **kw) -> dict:
        """sim.rtl_sim.simulate's report (per task: bit_exact, cycles, ms, DRAM bytes, ...)."""
        from edgemoe.sim.rtl_sim import simulate
        image = None if x is None else _as_image(x, self.cfg)
        r = simulate(self.program, tasks, image, out_dir, progress=kw.pop("progress", False),
                     verilog=self.verilog_text(), **kw)
        self.results["simulate"] = r
        return r

    def synth(self, workdir=None, timeout_s: float = 3600, progress=None) -> dict:
        """hw.synth_accel.synth_accel's result (Yosys resources against the part)."""
        from edgemoe.hw.synth_accel import synth_accel
        r = synth_accel(self.cfg, self.qcfg, self.hwcfg, workdir=workdir, timeout_s=timeout_s,
                        progress=progress)
        self.results["synth"] = r
        return r

    def export(self, out, board: str = "zcu102", force: bool = False, image=None) -> dict:
        """hw.vendor.export_design: the hand-off folder for `board`; returns its manifest."""
        from edgemoe.hw.vendor import check_design, export_design
        from edgemoe.hw.boards import get_board
        # the board decides the part; reuse the Verilog only when the hardware is unchanged
        hw_board, _ = check_design(self.cfg, self.qcfg, self.hwcfg, get_board(board))
        verilog = self.verilog_text() if hw_board == self.hwcfg else None
        m = export_design(self.cfg, self.qcfg, self.hwcfg, self.qweights, board, out, force,
                          verilog=verilog, image=None if image is None else _as_image(image, self.cfg),
                          progress=lambda s: None)
        self.results["export"] = {"out": m["out"], "board": m["board"], "files": m["files"]}
        return m

    # --- report --------------------------------------------------------------------------------
    def report(self, out) -> dict:
        """report.json / report.md / PNGs: cycle-model latency and resource estimate (labelled
        ESTIMATE), fit, and every result of simulate / synth / export run on this Design."""
        from edgemoe.quant.compiler import check_fit
        from edgemoe.sim.perf_model import format_breakdown, inference_cycles
        from edgemoe.sim.report import plot_breakdown, plot_resources
        from edgemoe.sim.resources import estimate_resources
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        perf = inference_cycles(self.cfg, self.qcfg, self.hwcfg)
        res = estimate_resources(self.cfg, self.qcfg, self.hwcfg)
        plot_breakdown(perf, out / "latency_breakdown.png")
        plot_resources(res, out / "resources.png", f"\n{self.cfg.name} / {self.qcfg.name} / {self.hwcfg.name}")
        fit = check_fit(self.cfg, self.qcfg, self.hwcfg, raise_error=False)
        rep = {"design": repr(self), "model": self.cfg.name, "quant": self.qcfg.name, "hw": self.hwcfg.to_dict(),
               "fit": {"ok": fit.ok, "text": str(fit)},
               "latency_estimate": {"label": "ESTIMATE: cycle model sim/perf_model.py (uniform routing)",
                                    **perf["totals"]},
               "resources_estimate": {"label": "ESTIMATE: sim/resources.py", "total": res["total"],
                                      "budget": res["budget"], "utilisation": res["utilisation"]},
               "results": {k: v for k, v in self.results.items()}}
        (out / "report.json").write_text(json.dumps(rep, indent=1, default=str))
        md = [f"# {rep['design']}", "", "```", str(fit), "", format_breakdown(perf), "```", "",
              "Resources (ESTIMATE): " + ", ".join(f"{k} {res['total'][k]:,.0f} / {res['budget'][k]:,}"
                                                    for k in res["total"]), ""]
        sim = self.results.get("simulate")
        if sim:
            md += ["## RTL simulation (measured in simulation)", ""]
            md += [f"- {t}: bit-exact {r['bit_exact']}, {r['cycles']:,} cycles = {r['ms']:.3f} ms at "
                   f"{sim['clock_mhz']:g} MHz, cycle model error {r['model_error']:+.2%}"
                   for t, r in sim["tasks"].items()]
        syn = self.results.get("synth")
        if syn:
            md += ["", "## Yosys synthesis", "", "- " + ", ".join(f"{k} {syn[k]:,}" for k in ("lut", "ff", "dsp", "bram36"))]
        if "export" in self.results:
            md += ["", f"## Export ({self.results['export']['board']})", "", f"- {self.results['export']['out']}"]
        (out / "report.md").write_text("\n".join(md) + "\n")
        rep["files"] = ["report.json", "report.md", "latency_breakdown.png", "resources.png"]
        return rep
