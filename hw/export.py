"""Verilog / RTLIL export of the accelerator's units with stable module and port names.

Port naming rule (the same for every unit, so testbenches and users can rely on it):
  * `clk`, `rst`: the `sync` clock domain (rising edge, synchronous active-high reset).
  * every member of the component's wiring signature becomes one port named by its path joined
    with "__": a `stream.Signature` member `i` gives `i__valid`, `i__ready`, `i__payload`;
  * a payload (or any member) whose shape is a `data.StructLayout` is split into one port per
    field, `<path>__<field>` (recursively): a struct payload {acc, bias} gives
    `i__payload__acc` and `i__payload__bias`;
  * an `ArrayLayout` field (L lanes) stays one flat port, lane k in bits [k*W, (k+1)*W)
    (lane 0 at the LSB), each lane in two's complement when its element shape is signed.
The top module is named `edgemoe_<unit>`; the unit itself is its submodule `edgemoe_<unit>.core`
(the thin top only renames ports, it holds no logic).
"""
from __future__ import annotations

from pathlib import Path

from amaranth.back import rtlil, verilog
from amaranth.hdl import Elaboratable, Module, Shape, Signal, Value
from amaranth.lib import data, wiring


def module_name(unit: str) -> str:
    return f"edgemoe_{unit}"


def _flat_members(component: wiring.Component):
    """Yield (port name, member value, "i" | "o") following the naming rule above."""
    if not isinstance(getattr(component, "signature", None), wiring.Signature):
        raise TypeError(f"{component!r} is not an amaranth.lib.wiring.Component")

    def walk(path, value, direction):
        shape = value.shape() if isinstance(value, data.View) else None
        if isinstance(shape, data.StructLayout):
            for field_name, _field in shape:
                yield from walk(path + (field_name,), value[field_name], direction)
        else:
            yield "__".join(path), value, direction

    for path, member, value in component.signature.flatten(component):
        yield from walk(tuple(str(p) for p in path), value,
                        "i" if member.flow == wiring.In else "o")


class _FlatPorts(Elaboratable):
    """Wraps a component so that struct-shaped members become one port per field."""

    def __init__(self, component: wiring.Component):
        self.core = component
        self.ports: dict[str, tuple[Signal, str]] = {}   # name -> (signal, "i" | "o")
        self._links = []
        for name, value, direction in _flat_members(component):
            inner = Value.cast(value)
            sig = Signal(Shape(len(inner), inner.shape().signed), name=name)
            self.ports[name] = (sig, direction)
            self._links.append((sig, value, direction))

    def elaborate(self, platform):
        m = Module()
        m.submodules.core = self.core
        for sig, value, direction in self._links:
            if direction == "i":
                m.d.comb += Value.cast(value).eq(sig)
            else:
                m.d.comb += sig.eq(Value.cast(value))
        return m

    def port_dict(self):
        from amaranth.hdl import _ir
        return {name: (sig, _ir.PortDirection.Input if d == "i" else _ir.PortDirection.Output)
                for name, (sig, d) in self.ports.items()}


def port_list(component: wiring.Component) -> dict[str, tuple[int, str]]:
    """{port name: (width, "i" | "o")} of the exported module, without clk/rst."""
    return {n: (len(Value.cast(v)), d) for n, v, d in _flat_members(component)}


def to_verilog(component: wiring.Component, name: str) -> str:
    top = _FlatPorts(component)
    # emit_src=False: no source paths in the output, so the text (and the simulator build cache
    # keyed by its hash) does not depend on where the checkout lives.
    return verilog.convert(top, name=name, ports=top.port_dict(), emit_src=False,
                           strip_internal_attrs=True)


def to_rtlil(component: wiring.Component, name: str) -> str:
    top = _FlatPorts(component)
    return rtlil.convert(top, name=name, ports=top.port_dict(), emit_src=False)


def write_unit(unit_name: str, qcfg, hwcfg, outdir, mcfg=None) -> dict[str, Path]:
    """Write <outdir>/edgemoe_<unit>.v, .il and .ports.json ({port: [width, "i"|"o"]}, without
    clk/rst) for one registered unit; returns their paths."""
    import json

    from .units import build_unit
    name = module_name(unit_name)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = {"verilog": outdir / f"{name}.v", "rtlil": outdir / f"{name}.il",
             "ports": outdir / f"{name}.ports.json"}
    component = build_unit(unit_name, qcfg, hwcfg, mcfg)
    paths["ports"].write_text(json.dumps(port_list(component), indent=1) + "\n")
    paths["verilog"].write_text(to_verilog(component, name))
    paths["rtlil"].write_text(to_rtlil(component, name))
    return paths
