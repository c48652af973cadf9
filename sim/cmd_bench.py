"""`edgemoe bench`: CPU/GPU baseline of the float backbone (batch N), latency, throughput and
energy where the machine exposes a counter (NVIDIA: NVML total-energy counter; CPU: Linux
powercap RAPL). Where no counter exists the JSON says so and no figure is invented.

Eager mode runs the real sparse MoE (only routed tokens per expert, which synchronises on the
host to size each expert's queue); --cuda-graph captures a sync-free formulation (every expert
on every token, masked by the gate), the only form a CUDA graph can hold.
"""
from __future__ import annotations

import glob
import json
import os
import platform
import statistics
import time


def add_arguments(p):
    p.add_argument("--preset", default="edge-moe")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--task", default=None, help="task name or index (default: the first)")
    p.add_argument("--cuda-graph", action="store_true", help="capture a sync-free forward in a CUDA graph")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--energy-seconds", type=float, default=2.0, help="minimum energy-loop duration")
    p.add_argument("--json", default=None, help="write the result JSON here")


class _Rapl:
    """Package energy from powercap (microjoules, wraps at max_energy_range_uj)."""

    def __init__(self):
        # package domains only ("intel-rapl:0"), not their sub-domains ("intel-rapl:0:1")
        self.files = [f for f in glob.glob("/sys/class/powercap/intel-rapl:*/energy_uj")
                      if os.access(f, os.R_OK) and ":" not in os.path.basename(os.path.dirname(f))[11:]]

    def available(self):
        return bool(self.files)

    def read(self):
        return sum(int(open(f).read()) for f in self.files)

    def delta_j(self, a, b):
        d = b - a
        if d < 0:  # one wrap
            d += int(open(os.path.join(os.path.dirname(self.files[0]), "max_energy_range_uj")).read())
        return d / 1e6


class _Nvml:
    def __init__(self, index):
        self.h = None
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nv = pynvml
            self.h = pynvml.nvmlDeviceGetHandleByIndex(index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.h)
        except Exception as e:  # no driver, no counter on this GPU, or no package
            self.h, self.why = None, f"{type(e).__name__}: {e}"

    def available(self):
        return self.h is not None

    def read(self):
        return self.nv.nvmlDeviceGetTotalEnergyConsumption(self.h)  # millijoules

    def delta_j(self, a, b):
        return (b - a) / 1e3


def build_forward(model, x, task, device, cuda_graph):
    import torch
    if not cuda_graph:
        return lambda: model.forward_features(x, task)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            model.forward_features(x, task, dense_moe=True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = model.forward_features(x, task, dense_moe=True)
    return lambda: (g.replay(), out)[1]


def measure(preset="edge-moe", device="cpu", dtype="fp32", batch=1, task=None, cuda_graph=False,
            threads=None, warmup=5, iters=30, energy_seconds=2.0, seed=0) -> dict:
    import torch
    from edgemoe.model.config import get_preset
    from edgemoe.model.m3vit import M3ViT

    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible to PyTorch here")
    if cuda_graph and device != "cuda":
        raise ValueError("--cuda-graph needs --device cuda")
    if dtype == "fp16" and device == "cpu":
        raise ValueError("--dtype fp16 is only supported on --device cuda (CPU half matmuls are emulated)")
    if threads:
        torch.set_num_threads(threads)
    cfg = get_preset(preset)
    t = cfg.task_index(task if task is not None else 0)
    tdtype = torch.float16 if dtype == "fp16" else torch.float32
    model = M3ViT(cfg, seed=seed).eval().to(device=device, dtype=tdtype)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, cfg.in_chans, cfg.img_h, cfg.img_w, generator=gen).to(device=device, dtype=tdtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    with torch.inference_mode():
        fwd = build_forward(model, x, t, device, cuda_graph)
        for _ in range(warmup):
            fwd()
        sync()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fwd()
            sync()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)

        counter = _Nvml(torch.cuda.current_device()) if device == "cuda" else _Rapl()
        energy = {"measured": False}
        if counter.available():
            n = max(1, int(energy_seconds / med) + 1)
            sync()
            e0, t0 = counter.read(), time.perf_counter()
            done = 0
            while done < n or time.perf_counter() - t0 < energy_seconds:
                fwd()
                done += 1
            sync()
            e1, dt = counter.read(), time.perf_counter() - t0
            joules = counter.delta_j(e0, e1)
            energy = {"measured": True, "source": "NVML total energy" if device == "cuda" else "RAPL package",
                      "loop_seconds": dt, "images": done * batch, "joules_per_image": joules / (done * batch),
                      "avg_watts": joules / dt}
        else:
            energy["note"] = "not measurable here (no readable " + \
                ("NVML energy counter: " + getattr(counter, "why", "") if device == "cuda"
                 else "RAPL powercap counter") + ")"

    dev_name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    return {
        "measured": True, "where": f"{device}: {dev_name}", "preset": preset, "task": cfg.tasks[t],
        "device": device, "dtype": dtype, "batch": batch, "cuda_graph": cuda_graph,
        "moe": "dense-masked (sync-free)" if cuda_graph else "sparse (routed tokens only)",
        "threads": torch.get_num_threads() if device == "cpu" else None, "torch": torch.__version__,
        "latency_ms_median": med * 1e3, "latency_ms_min": min(times) * 1e3, "iters": iters,
        "images_per_s": batch / med, "ms_per_image": med * 1e3 / batch, "energy": energy,
        "host": platform.node(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def format_result(r: dict) -> str:
    e = r["energy"]
    en = (f"{e['joules_per_image']:.4f} J/image ({e['avg_watts']:.1f} W, {e['source']})" if e["measured"]
          else e["note"])
    return (f"{r['preset']} on {r['where']} {r['dtype']} batch {r['batch']}"
            f"{' cuda-graph' if r['cuda_graph'] else ''}: {r['latency_ms_median']:.2f} ms/batch (median), "
            f"{r['images_per_s']:.1f} images/s\n  energy: {en}")


def run(args) -> int:
    r = measure(args.preset, args.device, args.dtype, args.batch, args.task, args.cuda_graph,
                args.threads, args.warmup, args.iters, args.energy_seconds)
    print(format_result(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
        print(f"wrote {args.json}")
    return 0
