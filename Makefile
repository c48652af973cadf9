# edgemoe: `make demo` and `make test` do all set-up on a fresh machine (Python 3.11, a C++
# compiler, make). Everything installs into the project virtualenv $(VENV).
PYTHON ?= python3
VENV ?= .venv
# Pinned here, not in pyproject: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?= -n 2
# One BLAS/OpenMP thread per pytest worker: two workers on two cores, no oversubscription.
TEST_ENV := OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgemoe-installed
OUT ?= out
# the 8-bit-weight design of sim-full-w8: zcu102-w8-32x32, zcu102-w8-64x16 (64x16 MACs) or
# zcu102-w8-64x16-stream (64x16 with expert-weight streaming)
W8_HW ?= zcu102-w8-32x32
# its weights: w8a16-channel (round to nearest), or w8a16-gptq (the same datapath, GPTQ codes)
# or a QuantConfig .json (make quant-fit writes one: the preset refitted to W8_WEIGHTS)
W8_QUANT ?= w8a16-channel
# the weights simulated: empty = the simulator's default (synthetic), or seeded / edge-moe-bin
W8_WEIGHTS ?=
W8_OUT = $(OUT)/sim-full-w8$(if $(filter zcu102-w8-32x32,$(W8_HW)),,-$(W8_HW))$(if $(filter w8a16-channel,$(W8_QUANT)),,-$(basename $(notdir $(W8_QUANT))))
# make quant-fit: FIT_BASE refitted to FIT_WEIGHTS (edgemoe calibrate --fit)
FIT_BASE ?= w8a16-gptq
FIT_WEIGHTS ?= seeded
FIT_OUT = $(OUT)/quant/$(FIT_BASE)-fit-$(FIT_WEIGHTS).json

.PHONY: venv demo test test-full test-slow sim-full sim-full-fast sim-full-w8 quant-fit bench clean help

help:
	@echo "make demo       end-to-end run on the built-in preset (outputs under $(OUT)/)"
	@echo "make test       default test suite (fast; full-size RTL runs are in test-full)"
	@echo "make test-full  full-size RTL and long runs (pytest -m full)"
	@echo "make test-slow  slower checks kept out of the default suite (e.g. ECP5 Fmax)"
	@echo "make sim-full   edge-moe preset, all 12 blocks, both tasks, through the RTL top (cocotb + Verilator)"
	@echo "make sim-full-fast  the same through the Verilator C++ harness (sim/fast_sim.py, ~1 min after its build)"
	@echo "make sim-full-w8  the 8-bit-weight design: edge-moe, $(W8_QUANT) on $(W8_HW), fast path (W8_HW=zcu102-w8-64x16: the 64x16 array, zcu102-w8-64x16-stream: with weight streaming; W8_QUANT=w8a16-gptq: GPTQ codes)"
	@echo "make quant-fit  refit $(FIT_BASE) to the $(FIT_WEIGHTS) weights -> $(FIT_OUT) (then: make sim-full-w8 W8_QUANT=$(FIT_OUT) W8_WEIGHTS=$(FIT_WEIGHTS))"
	@echo "make bench      benchmarks that print figures"

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m edgemoe.sim.demo --out $(OUT)/demo

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q $(PYTEST_ARGS)

test-full: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -m full $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

sim-full: $(STAMP)
	$(PY) -m edgemoe.sim.cli simulate --preset edge-moe --hw zcu102-16x16 --quant edge-moe-fixed --out $(OUT)/sim-full

sim-full-fast: $(STAMP)
	$(PY) -m edgemoe.sim.cli simulate --preset edge-moe --hw zcu102-16x16 --quant edge-moe-fixed --fast --out $(OUT)/sim-full-fast

sim-full-w8: $(STAMP)
	$(PY) -m edgemoe.sim.cli simulate --preset edge-moe --hw $(W8_HW) --quant $(W8_QUANT) $(if $(W8_WEIGHTS),--weights $(W8_WEIGHTS)) --fast --out $(W8_OUT)

quant-fit: $(STAMP)
	$(PY) -m edgemoe.sim.cli calibrate --preset edge-moe --base $(FIT_BASE) --fit --weights $(FIT_WEIGHTS) --out-quant $(FIT_OUT) --json $(basename $(FIT_OUT))-report.json

bench: $(STAMP)
	$(PY) -m edgemoe.sim.bench

clean:
	rm -rf $(OUT) sim_build build .pytest_cache
