"""cocotb testbenches and runners, performance/energy models, reports and the edgemoe CLI."""
