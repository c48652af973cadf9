"""The whole accelerator (hw/accel.py) under cocotb + Verilator: a tiny-preset inference driven
through AXI4-Lite by sim/driver.py, DRAM modelled by sim/dram.py, features compared as integers
with the Python executor (= golden model); error codes of corrupted programs."""
import numpy as np
import pytest

from edgemoe.hw.config import get_hw_preset
from edgemoe.model.config import get_preset
from edgemoe.quant.config import get_quant_preset

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def tiny_program(tmp_path, hw="small-8x8", quant="edge-moe-fixed", tokens=16, seed=0, axi_bits=None,
                 **hw_kw):
    from edgemoe.quant.compiler import compile_program, synthetic_state_dict
    from edgemoe.quant.qweights import quantize_weights
    cfg = get_preset("tiny")
    q = get_quant_preset(quant)
    h = get_hw_preset(hw).replace(act_buffer_tokens=tokens)
    if axi_bits is not None:
        h = h.replace(axi_data_bits=axi_bits)
    h = h.replace(**hw_kw)
    prog = compile_program(cfg, q, h, quantize_weights(cfg, q, synthetic_state_dict(cfg, seed)))
    path = prog.save(tmp_path / "prog")
    return cfg, q, h, prog, path


def test_accel_tiny_bit_exact(tmp_path):
    from edgemoe.hw.accel import Accelerator
    from edgemoe.sim.runner import run_cocotb
    cfg, q, h, prog, path = tiny_program(tmp_path)
    res = run_cocotb(Accelerator(cfg, q, h), "edgemoe_accel", "edgemoe.sim.tb_accel",
                     tb_config={"program": str(path), "tasks": list(cfg.tasks)}, timeout_s=1200)
    for task, r in res["tasks"].items():
        assert r["mismatches"] == 0, f"{task}: {r['first_mismatch']}"
        assert r["instructions"] == r["golden_instructions"]
        assert r["dram_bytes_read"] == r["golden_read"]
        assert r["dram_bytes_written"] == r["golden_written"]
        assert r["sat_count"] == r["golden_sat"]
        print(task, r["cycles"], "cycles", r["wall_s"], "s")


def _patched_words(prog, pc, **fields):
    """The 8 words of instruction pc with fields (quant.program.FIELDS) overwritten."""
    from edgemoe.quant.program import FIELDS
    words = [int(w) for w in np.frombuffer(prog.instrs[pc].to_bytes(), "<u4")]
    for f, v in fields.items():
        w, lo, width = FIELDS[f]
        words[w] = (words[w] & ~(((1 << width) - 1) << lo)) | ((v & ((1 << width) - 1)) << lo)
    return words


def _interpreter_error(prog, pc, words, image, at_end=False):
    """(code, pc) the Python executor stops with on the patched program. at_end: in the
    testbench's memory (image_bytes + 64 KiB), PROGRAM_BASE moved so that instruction pc is
    its last 32 bytes (sim/tb_accel.py)."""
    from edgemoe.quant.interpreter import FlatMemory, Machine, Registers, image_codes
    from edgemoe.quant.program import ProgramError, encode_values, image_patch_codes
    base = 0x1000_0000
    size = prog.image_bytes + (1 << 16)
    mem = FlatMemory(size, base)
    mem.write(base, prog.image)
    reg = {n: base + r.offset for n, r in prog.regions.items()}
    if at_end:
        reg["program"] = base + size - 32 * (pc + 1)
    mem.write(reg["program"] + 32 * pc, np.asarray(words, "<u4").tobytes())
    mem.write(reg["image"], encode_values(image_patch_codes(prog.cfg, image_codes(prog, image)), prog.qcfg.act))
    try:
        Machine.for_program(prog, mem).run(Registers(reg["program"], reg["weights"], reg["image"], reg["output"], 0))
    except ProgramError as e:
        return e.code, e.pc
    return 0, None


# the 64-bit port (4 beats per instruction) is its own 2.5-minute build: make test-slow
@pytest.mark.parametrize("axi_bits", [256, pytest.param(64, marks=pytest.mark.slow)])
def test_accel_errors_match_interpreter(tmp_path, axi_bits):
    """Corrupted programs stop the RTL with the executor's ERROR_CODE and ERROR_PC, and the
    accelerator runs a clean program bit-exact right after (START resets every unit). At 64
    bits an instruction is 4 beats of the port: fetch, prefetch and a mid-stream SLVERR with
    instructions that span beats."""
    from conftest import cached_accel_verilog
    from edgemoe.quant.program import ERR_ADDRESS, ERR_BUFFER, ERR_ILLEGAL, ERR_LOOP, Op
    from edgemoe.sim.runner import run_cocotb
    cfg, q, h, prog, path = tiny_program(tmp_path, axi_bits=axi_bits)
    names = prog.names
    pc_of = {n: i for i, n in enumerate(names)}
    cases = [
        (0, _patched_words(prog, 0, op=0x3F), ERR_ILLEGAL),                       # bad opcode
        (1, _patched_words(prog, 1, op=int(Op.EXPERT_LOOP), flags=0, dst=0, addr=0, rows=0,
                           row_off=0, k=0, arg=2), ERR_LOOP),                      # loop before GATE
        (2, _patched_words(prog, 2, addr=prog.instrs[2].addr + 4), ERR_ADDRESS),   # unaligned
        (pc_of["blocks.0.norm1"], _patched_words(prog, pc_of["blocks.0.norm1"], rows=h.act_buffer_tokens + 1),
         ERR_BUFFER),
        (pc_of["blocks.0.qkv"], _patched_words(prog, pc_of["blocks.0.qkv"], flags=prog.instrs[pc_of["blocks.0.qkv"]].flags | 64),
         ERR_LOOP),                                                                # GATHER outside a loop
        (pc_of["blocks.1.mlp.expert_fc2"], _patched_words(prog, pc_of["blocks.1.mlp.expert_fc2"], op=int(Op.END),
         flags=0, dst=0, src=0, index=0, addr=0, stride=0, k=0, n=0), ERR_LOOP),   # END in a loop body
        # weights outside the memory: the DRAM answers SLVERR mid-stream; the next START waits
        # until the aborted transfer has drained
        (pc_of["blocks.0.proj"], _patched_words(prog, pc_of["blocks.0.proj"], addr=0x0F00_0000), ERR_ADDRESS),
        # the program runs off the end of the memory: instruction 0 (the embedding's LOAD_ROWS)
        # is the memory's last 32 bytes, so the prefetch of instruction 1 gets an AXI error
        # while 0 runs; it stops in DECODE of pc 1, after 0 has run
        (0, _patched_words(prog, 0), ERR_ADDRESS, True),
    ]
    cases = [c if len(c) == 4 else (*c, False) for c in cases]
    rng = np.random.default_rng(1)
    image = rng.normal(0, 1, size=(cfg.in_chans, cfg.img_h, cfg.img_w)).astype(np.float32)
    expected = [_interpreter_error(prog, pc, w, image, end) for pc, w, _, end in cases]
    assert [e[0] for e in expected] == [c for _, _, c, _ in cases]       # the cases test what they say
    assert expected[-1] == (ERR_ADDRESS, 1)
    res = run_cocotb(cached_accel_verilog(cfg, q, h), "edgemoe_accel", "edgemoe.sim.tb_accel",
                     tb_config={"program": str(path), "tasks": [cfg.tasks[0]],
                                "errors": [{"pc": pc, "words": w, "at_end": end} for pc, w, _, end in cases]},
                     timeout_s=1200)
    got = [(e["code"], e["error_pc"]) for e in res["errors"]]
    assert got == expected, res["errors"]
    r = res["tasks"][cfg.tasks[0]]
    assert r["mismatches"] == 0 and r["instructions"] == r["golden_instructions"]


# its own top build (~2.5 min); the fast-path streaming tests keep bit-exactness in the default suite
@pytest.mark.slow
@pytest.mark.parametrize("quant,intake", [("edge-moe-fixed", 1), ("w8a16-channel", 2)], ids=["beat", "intake2"])
def test_accel_streaming_errors_match_interpreter(tmp_path, quant, intake):
    """Errors inside a streamed expert loop (HWConfig.weight_fifo_beats): the weights of a later
    expert outside the memory (SLVERR on beats the streamer fetched ahead into the FIFO) and a
    later expert's unaligned weights (the streamer stops before it) stop the RTL with the
    executor's ERROR_CODE and ERROR_PC; a clean run follows bit-exact with the executor's bytes.
    intake2: FIFO words of two beats (weight_intake_beats = 2; the error bit of a word is either
    beat's)."""
    from conftest import cached_accel_verilog
    from edgemoe.quant.program import ERR_ADDRESS
    from edgemoe.sim.runner import run_cocotb
    cfg, q, h, prog, path = tiny_program(tmp_path, quant=quant, weight_fifo_beats=2048,
                                         weight_intake_beats=intake)
    pc1, pc2 = prog.names.index("blocks.1.mlp.expert_fc1"), prog.names.index("blocks.3.mlp.expert_fc2")
    i1, i2 = prog.instrs[pc1], prog.instrs[pc2]
    cases = [(pc1, _patched_words(prog, pc1, stride=0x0800_0000)),     # expert >= 1 beyond the memory
             (pc2, _patched_words(prog, pc2, stride=i2.stride + 4))]    # expert >= 1 unaligned
    assert i1.stride and i2.stride
    rng = np.random.default_rng(1)
    image = rng.normal(0, 1, size=(cfg.in_chans, cfg.img_h, cfg.img_w)).astype(np.float32)
    expected = [_interpreter_error(prog, pc, w, image) for pc, w in cases]
    assert [e[0] for e in expected] == [ERR_ADDRESS, ERR_ADDRESS] and [e[1] for e in expected] == [pc1, pc2]
    res = run_cocotb(cached_accel_verilog(cfg, q, h), "edgemoe_accel", "edgemoe.sim.tb_accel",
                     tb_config={"program": str(path), "tasks": [cfg.tasks[0]],
                                "errors": [{"pc": pc, "words": w} for pc, w in cases]},
                     timeout_s=1200)
    assert [(e["code"], e["error_pc"]) for e in res["errors"]] == expected, res["errors"]
    r = res["tasks"][cfg.tasks[0]]
    assert r["mismatches"] == 0 and r["instructions"] == r["golden_instructions"]
    assert r["dram_bytes_read"] == r["golden_read"]


def test_eval_rtl_equals_golden():
    """Issue 8 (c): task metrics through the RTL accelerator equal the golden model's exactly
    (trained tiny checkpoint, 2 test scenes, both tasks)."""
    from pathlib import Path
    from edgemoe.model.evaluate import evaluate_checkpoint
    ck = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny.pt"
    rep = evaluate_checkpoint(ck, quant=("edge-moe-fixed",), n=2, rtl=True)
    assert rep["rtl"]["images_differing_from_executor"] == {"semseg": 0, "depth": 0}
    assert rep["rtl"]["metrics_equal_golden"]
    a, b = rep["backends"]["rtl-edge-moe-fixed"], rep["backends"]["edge-moe-fixed"]
    assert a["semseg"] == b["semseg"] and a["depth"] == b["depth"]


def test_accel_intermediates_bit_exact(tmp_path):
    """`edgemoe simulate --intermediates`: a STORE after every layer (quant.compiler.debug_program);
    every stored intermediate tensor of the RTL equals the executor's."""
    from edgemoe.sim.rtl_sim import simulate
    cfg, q, h, prog, path = tiny_program(tmp_path, seed=3)
    rep = simulate(prog, [cfg.tasks[1]], out_dir=tmp_path / "sim", intermediates=True, progress=False)
    r = rep["tasks"][cfg.tasks[1]]
    names = [t["name"] for t in r["intermediates"]]
    assert "blocks.0.attn" in names and "blocks.1.mlp.experts" in names and "patch_embed" in names
    assert all(t["mismatches"] == 0 for t in r["intermediates"]), [t for t in r["intermediates"] if t["mismatches"]]
    assert r["bit_exact"] and (tmp_path / "sim" / "simulate.png").exists()


@pytest.mark.full
def test_accel_edge_moe_full(tmp_path):
    """`make sim-full`'s check for one task: the edge-moe preset, all 12 blocks, on the
    zcu102-16x16 top, bit-exact, cycle model within 5 % of the RTL (about 15 min here)."""
    from edgemoe.quant.compiler import compile_program, synthetic_state_dict
    from edgemoe.quant.qweights import quantize_weights
    from edgemoe.sim.rtl_sim import simulate
    cfg, q, h = get_preset("edge-moe"), get_quant_preset("edge-moe-fixed"), get_hw_preset("zcu102-16x16")
    prog = compile_program(cfg, q, h, quantize_weights(cfg, q, synthetic_state_dict(cfg, 0)))
    rep = simulate(prog, ["semseg"], out_dir=tmp_path / "sim", progress=False)
    r = rep["tasks"]["semseg"]
    assert r["bit_exact"], r["first_mismatch"]
    assert abs(r["model_error"]) < 0.05
    assert r["ms"] <= 17.0           # the target: half of Edge-MoE's 34.64 ms


def test_simulate_cli_tiny(tmp_path, capsys):
    """`edgemoe simulate --preset tiny`: trained checkpoint, one task, bit-exact, JSON + PNG."""
    import json
    from edgemoe.sim.cli import main
    out = tmp_path / "sim"
    assert main(["simulate", "--preset", "tiny", "--act-buffer-tokens", "16", "--task", "depth",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "BIT-EXACT" in text and "cycle model" in text and "expert_fc2" in text
    rep = json.loads((out / "simulate.json").read_text())
    r = rep["tasks"]["depth"]
    assert r["bit_exact"] and r["cycles"] > 0 and abs(r["model_error"]) < 0.05
    assert (out / "simulate.png").stat().st_size > 5000


def test_simulate_cli_bad_inputs(capsys):
    """Bad configs fail before any build with the reason named (no simulation runs)."""
    from edgemoe.sim.cli import main
    cases = [(["--task", "normals"], "unknown task 'normals'"),
             (["--act-buffer-tokens", "4"], "act_buffer_tokens"),
             (["--beats-per-cycle", "1.5"], "--beats-per-cycle 1.5 must be in (0, 1]"),
             (["--hw", "zcu102-16x16", "--quant", "w8a16", "--weights", "synthetic",
               "--act-buffer-tokens", "16", "--latency", "-1"], "--latency -1 must be >= 0")]
    for extra, msg in cases:
        assert main(["simulate", "--preset", "tiny", *extra]) == 2, extra
        out = capsys.readouterr().out
        assert "edgemoe simulate: error:" in out and msg in out, (extra, out)
