"""Valid/ready control of a linear pipeline with back-pressure, shared by the streaming units.

Stage k holds a register bank and a valid bit v[k]. A stage loads when it is empty or when its
content moves on in the same cycle:  load[k] = ~v[k] | load[k+1],  load[last] = ~v[last] | out_ready.
This keeps one item per cycle at steady state and lets bubbles (valid gaps) collapse under
back-pressure. The ready path is combinational from the output to the input (in_ready = load[0]),
which the stream rules allow (ready may depend on ready/valid; valid never depends on ready).
"""
from __future__ import annotations

from amaranth.hdl import Module, Signal


class PipelineControl:
    """Creates the valid bits and load enables of `depth` stages. Usage:

        ctl = PipelineControl(m, depth=3, in_valid=i.valid, out_ready=o.ready, name="rq")
        m.d.comb += i.ready.eq(ctl.in_ready)
        with m.If(ctl.load[0]): m.d.sync += stage0_regs.eq(f(i.payload))
        with m.If(ctl.load[1]): m.d.sync += stage1_regs.eq(g(stage0_regs))
        ...
        m.d.comb += [o.valid.eq(ctl.out_valid), o.payload.eq(last_stage_regs)]
    Latency: `depth` cycles from an input handshake to the output being valid.
    """

    def __init__(self, m: Module, depth: int, in_valid, out_ready, name: str = "pipe"):
        if depth < 1:
            raise ValueError(f"pipeline depth {depth} must be >= 1")
        self.depth = depth
        self.valid = [Signal(name=f"{name}_v{k}") for k in range(depth)]
        self.load = [Signal(name=f"{name}_load{k}") for k in range(depth)]
        for k in range(depth):
            nxt = out_ready if k == depth - 1 else self.load[k + 1]
            m.d.comb += self.load[k].eq(~self.valid[k] | nxt)
            prev = in_valid if k == 0 else self.valid[k - 1]
            with m.If(self.load[k]):
                m.d.sync += self.valid[k].eq(prev)
        self.in_ready = self.load[0]
        self.out_valid = self.valid[-1]
