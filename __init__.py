"""edgemoe: a multi-task MoE ViT (M3ViT) to a bit-exact, verified FPGA accelerator.

Subpackages: edgemoe.model (float PyTorch reference), edgemoe.quant (formats, golden model,
compiler), edgemoe.hw (Amaranth generators), edgemoe.sim (testbenches, models, CLI).
The public API is `edgemoe.Design` (see edgemoe.sim.api); it is imported on first use so that
`import edgemoe` stays cheap (no torch, no Amaranth)."""
__version__ = "0.1.0"
__all__ = ["Design", "__version__"]


def __getattr__(name):
    if name == "Design":
        from .sim.api import Design
        return Design
    raise AttributeError(f"module 'edgemoe' has no attribute {name!r}")
