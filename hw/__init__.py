"""Amaranth generators for the accelerator's units and top, Verilog/RTLIL export, synthesis."""
