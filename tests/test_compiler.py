"""Compiler, program format and interpreter: encoding, layout, fit checks, bit-exact vs golden."""
from collections import defaultdict

import numpy as np
import pytest

from edgemoe.hw.config import get_hw_preset
from edgemoe.model import get_preset
from edgemoe.quant.compiler import (FitError, bram36, buffer_plan, check_fit, compile_program, dram_traffic,
                            program_length, synthetic_state_dict)
from edgemoe.quant.config import get_quant_preset
from edgemoe.quant.golden import GoldenModel
from edgemoe.quant.interpreter import FlatMemory, Machine, Registers, run_program
from edgemoe.quant.fixed import FormatError
from edgemoe.quant.linear import MODES, TileLayout, pack_weight_stream
from edgemoe.quant.program import (ERR_ADDRESS, ERR_BUFFER, ERR_ILLEGAL, ERR_LOOP, ERR_RUNAWAY, FIELDS,
                           INSTR_BYTES, USED, Base, Buf, Flag, Index, Instr, Op, ProgramError,
                           linear_flags, linear_mode, load_program, unpack_weight_stream,
                           weight_stream)
from edgemoe.quant.qweights import quantize_weights

Q = get_quant_preset("edge-moe-fixed")
HW = get_hw_preset("zcu102-16x16")


def _build(cfg, seed=0, hw=HW, q=Q):
    qw = quantize_weights(cfg, q, synthetic_state_dict(cfg, seed))
    return qw, compile_program(cfg, q, hw, qw)


def _image(cfg, seed=1):
    return np.random.default_rng(seed).random((cfg.in_chans, cfg.img_h, cfg.img_w))


@pytest.fixture(scope="module")
def tiny():
    cfg = get_preset("tiny")
    qw, prog = _build(cfg)
    return cfg, qw, prog, GoldenModel(cfg, Q, qw, attn_p=HW.attn_p)


def _check_against_golden(prog, gres, ires):
    """Features bit-exact; experts fetched = active experts; bytes = dram_traffic."""
    np.testing.assert_array_equal(ires.features, gres.features)
    fetched = defaultdict(set)
    for ex in ires.stats.trace:
        if ex.expert is not None:
            name = prog.names[ex.pc]
            fetched[(int(name.split(".")[1]), name.rsplit(".", 1)[1])].add(ex.expert)
    for b, r in gres.routing.items():
        active = set(np.asarray(r["topk_idx"]).ravel().tolist())
        assert fetched[(b, "expert_fc1")] == active and fetched[(b, "expert_fc2")] == active, b
    assert len(fetched) == 2 * len(gres.routing)
    tr = dram_traffic(prog, gres.routing)
    read, execs = defaultdict(int), defaultdict(int)
    for ex in ires.stats.trace:
        read[ex.pc] += ex.read_bytes
        execs[ex.pc] += 1
    for t in tr.per_instr:
        if t.op not in ("EXPERT_LOOP", "END"):
            assert (read[t.pc], execs[t.pc]) == (t.read_bytes, t.executions), t
    assert ires.stats.dram_read == tr.total_read and ires.stats.write_bytes == tr.write
    assert ires.stats.retired == sum(t.executions for t in tr.per_instr)
    return tr


# ------------------------------------------------------------------------------- encoding
def test_encoding_field_layout_by_hand():
    ins = Instr(Op.LINEAR, flags=int(Flag.BIAS | Flag.GELU), dst=Buf.W, src=Buf.H, index=Index.EXPERT,
                addr=0x1234, stride=0x4100, k=64, n=128)
    assert ins.encode() == [0x08230303, 0x1234, 0x4100, 0, 0x00800040, 0, 0, 0]
    assert Instr.from_bytes(ins.to_bytes()) == ins
    st = Instr(Op.STORE, src=Buf.X, base=Base.OUTPUT, addr=0x40, rows=129, k=192)
    assert st.encode() == [7 | 1 << 20 | 2 << 24, 0x40, 0, 129, 192, 0, 0, 0]


def test_every_opcode_round_trips_with_random_fields():
    rng = np.random.default_rng(0)
    enums = {"dst": Buf, "src": Buf, "base": Base, "index": Index}
    for op in Op:
        for _ in range(50):
            kw = {}
            for f in USED[op]:
                if f in enums:
                    kw[f] = enums[f](int(rng.integers(len(enums[f]))))
                elif f == "flags":
                    kw[f] = int(rng.integers(2)) if op is Op.LOAD_ROWS else int(rng.integers(256))
                else:
                    kw[f] = int(rng.integers(1 << FIELDS[f][2], dtype=np.uint64))
            ins = Instr(op, **kw)
            words = ins.encode()
            assert len(words) == 8 and all(0 <= w < 1 << 32 for w in words)
            assert Instr.decode(words) == ins
            assert Instr.from_dict(ins.to_dict()) == ins


def test_decoder_rejects_bad_words():
    good = Instr(Op.GATE, src=Buf.L, rows=9, n=4, arg=2).encode()
    Instr.decode(good)
    bad_cases = {
        "opcode 0": [0] * 8,
        "opcode 99": [99] + good[1:],
        "reserved w0": [good[0] | 1 << 30] + good[1:],
        "reserved w6": good[:6] + [1, 0],
        "unused addr": [good[0], 0x100] + good[2:],
        "buffer 9": [good[0] | 9 << 20] + good[1:],
    }
    for what, words in bad_cases.items():
        with pytest.raises(ProgramError) as e:
            Instr.decode(words, pc=7)
        assert e.value.code == ERR_ILLEGAL and e.value.pc == 7, what
    with pytest.raises(ProgramError, match="'rows' = 65536 does not fit 16 bits"):
        Instr(Op.GATE, src=Buf.L, rows=1 << 16, n=4, arg=2).encode()
    with pytest.raises(ProgramError, match="LOAD_ROWS: flags"):
        Instr(Op.LOAD_ROWS, flags=2, dst=Buf.X, rows=1, k=1).encode()


def test_linear_flags_are_the_linear_modes():
    for name, mode in MODES.items():
        f = linear_flags(mode)
        back = linear_mode(f)
        for fl in Flag:
            assert getattr(back, fl.name.lower()) == getattr(mode, fl.name.lower()), (name, fl)


# ------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("lay,k,n", [(TileLayout(16, 16, 16, 16, 256), 40, 20),
                                     (TileLayout(4, 8, 12, 10, 64), 13, 11),
                                     (TileLayout(8, 8, 8, 16, 128), 64, 16)])
def test_weight_stream_equals_quant_linear_layout(lay, k, n):
    rng = np.random.default_rng(k)
    wmax, bmax = 1 << (lay.w_bits - 1), 1 << (lay.bias_bits - 1)
    w = rng.integers(-wmax, wmax, (n, k))
    b = rng.integers(-bmax, bmax, n)
    for bias in (b, None):
        ref = b"".join(x.to_bytes(lay.axi_bits // 8, "little") for x in pack_weight_stream(w, bias, lay))
        got = weight_stream(w, bias, lay)
        assert got.tobytes() == ref
        w2, b2 = unpack_weight_stream(got, k, n, bias is not None, lay)
        np.testing.assert_array_equal(w2, w)
        if bias is not None:
            np.testing.assert_array_equal(b2, b)


@pytest.mark.parametrize("lay,k,n", [(TileLayout(16, 16, 8, 32, 256, 16, 6), 40, 20),
                                     (TileLayout(4, 8, 8, 12, 64, 8, 6), 13, 11)])
def test_channel_weight_stream_headers(lay, k, n):
    """Channel layout: every column header carries bias, multiplier and shift per lane, also for
    a bias-less mode (bias 0); both packers agree and the stream unpacks to the same integers."""
    rng = np.random.default_rng(n)
    w = rng.integers(-127, 128, (n, k))
    b = rng.integers(-(1 << (lay.bias_bits - 1)), 1 << (lay.bias_bits - 1), n)
    M = rng.integers(1 << (lay.mult_bits - 1), 1 << lay.mult_bits, n)
    S = rng.integers(0, 64, n)
    assert lay.has_header(False) and lay.epi_bits == lay.bias_bits + lay.mult_bits + 6
    for bias in (b, None):
        ref = b"".join(x.to_bytes(lay.axi_bits // 8, "little") for x in pack_weight_stream(w, bias, lay, M, S))
        got = weight_stream(w, bias, lay, mult=M, shift=S)
        assert got.tobytes() == ref and got.size == lay.stream_beats(k, n, False) * lay.axi_bits // 8
        w2, b2, M2, S2 = unpack_weight_stream(got, k, n, bias is not None, lay, scales=True)
        np.testing.assert_array_equal(w2, w)
        np.testing.assert_array_equal(b2, b if bias is not None else np.zeros(n))
        np.testing.assert_array_equal(M2, M)
        np.testing.assert_array_equal(S2, S)
    with pytest.raises(FormatError, match="multiplier and shift"):
        weight_stream(w, b, lay)
    with pytest.raises(FormatError, match="outside"):
        weight_stream(w, b, lay, mult=M, shift=S + 64)
    with pytest.raises(FormatError, match="class-granularity"):
        weight_stream(w, b, TileLayout(16, 16, 8, 32, 256), mult=M, shift=S)


def test_program_shape_and_address_map(tiny):
    cfg, _, prog, _ = tiny
    assert len(prog.instrs) == program_length(cfg) == len(prog.names)
    assert prog.instrs[-1].op is Op.END and prog.instrs[-2].op is Op.STORE
    offs = [r.offset for r in prog.regions.values()]
    assert offs == sorted(offs) and all(o % 4096 == 0 for o in offs)
    assert sum(r.size for r in prog.regions.values()) == prog.image_bytes
    # the program region holds the encoded instructions
    raw = prog.region_bytes("program")[:len(prog.instrs) * INSTR_BYTES]
    assert [Instr.from_bytes(raw[i * 32:(i + 1) * 32]) for i in range(len(prog.instrs))] == prog.instrs
    # every weights address of the program stays inside its symbol, every symbol is used
    w = prog.regions["weights"].size
    starts = {s.offset: s for s in prog.symbols.values()}
    used = set()
    for ins in prog.instrs:
        if "addr" in USED[ins.op] and ins.base is Base.WEIGHTS:
            s = starts[ins.addr]
            used.add(s.name)
            assert s.total <= w and (ins.index is Index.NONE) == (s.count == 1)
    assert used == set(prog.symbols)


# ------------------------------------------------------------------------------- golden
def test_tiny_both_tasks_bit_exact_and_traffic(tiny):
    cfg, qw, prog, gm = tiny
    img = _image(cfg)
    outs = []
    for task in cfg.tasks:
        g = gm.forward(img, task)
        r = run_program(prog, img, task)
        _check_against_golden(prog, g, r)
        outs.append(r.features)
    assert not np.array_equal(*outs)      # the task register changes the result


def test_edge_moe_bit_exact_one_task():
    cfg = get_preset("edge-moe")
    qw, prog = _build(cfg, seed=3)
    img = _image(cfg, 4)
    g = GoldenModel(cfg, Q, qw, attn_p=HW.attn_p).forward(img, "depth")
    r = run_program(prog, img, "depth")
    tr = _check_against_golden(prog, g, r)
    assert prog.image_bytes < 40e6 and len(prog.instrs) == 108
    # inactive experts cost nothing: the traffic is below the all-experts bound
    assert tr.read < dram_traffic(prog).read
    assert g.sat.saturated() == 0 and r.stats.sat.saturated() == 0


def test_one_image_holds_every_task_router(tiny):
    """Corrupting task 1's router in block 1 changes only task 1's run."""
    cfg, _, prog, _ = tiny
    img = _image(cfg)
    base = {t: run_program(prog, img, t).features for t in (0, 1)}
    bad = _corrupt(prog, "blocks.1.mlp.routers", item=1)
    np.testing.assert_array_equal(run_program(bad, img, 0).features, base[0])
    assert not np.array_equal(run_program(bad, img, 1).features, base[1])


def _corrupt(prog, sym, item=0, byte=None):
    """A copy of prog with one 16-bit weight word of a symbol's item flipped (in its first tile)."""
    import copy
    p = copy.copy(prog)
    p.image = prog.image.copy()
    s = prog.symbols[sym]
    o = prog.regions["weights"].offset + s.offset + item * s.stride
    if byte is None:
        byte = (HW.axi_data_bits // 8) * (1 if s.bias else 0) + 6    # a weight, past the bias beat
    p.image[o + byte] ^= 0x7F
    p.image[o + byte + 1] ^= 0x01
    return p


def test_flipped_weight_word_changes_output_only_if_fetched():
    cfg = get_preset("tiny").replace(name="tiny16", num_experts=16)
    qw, prog = _build(cfg, seed=5)
    img = _image(cfg, 6)
    g = GoldenModel(cfg, Q, qw, attn_p=HW.attn_p).forward(img, 0)
    ref = run_program(prog, img, 0).features
    np.testing.assert_array_equal(ref, g.features)
    for sym in ("blocks.0.attn.qkv", "patch_embed.proj", "blocks.2.mlp.fc2"):
        assert not np.array_equal(run_program(_corrupt(prog, sym), img, 0).features, ref), sym
    active = set(g.routing[1]["topk_idx"].ravel().tolist())
    idle = sorted(set(range(16)) - active)
    assert idle, "test needs an inactive expert in block 1"
    on = run_program(_corrupt(prog, "blocks.1.mlp.experts.fc1", min(active)), img, 0).features
    assert not np.array_equal(on, ref)
    off = run_program(_corrupt(prog, "blocks.1.mlp.experts.fc1", idle[0]), img, 0)
    np.testing.assert_array_equal(off.features, ref)     # never fetched
    # a bias word is used too
    assert not np.array_equal(run_program(_corrupt(prog, "blocks.0.attn.proj", byte=2), img, 0).features, ref)


# ------------------------------------------------------------------------------- save / load
def test_save_load_round_trip(tiny, tmp_path):
    cfg, _, prog, _ = tiny
    prog.save(tmp_path / "p")
    back = load_program(tmp_path / "p")
    assert (back.cfg, back.qcfg, back.hwcfg) == (prog.cfg, prog.qcfg, prog.hwcfg)
    assert back.instrs == prog.instrs and back.names == prog.names
    assert back.regions == prog.regions and back.symbols == prog.symbols
    np.testing.assert_array_equal(back.image, prog.image)
    img = _image(cfg)
    np.testing.assert_array_equal(run_program(back, img, 1).features, run_program(prog, img, 1).features)
    raw = bytearray((tmp_path / "p" / "image.bin").read_bytes())
    raw[5000] ^= 1
    (tmp_path / "p" / "image.bin").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256"):
        load_program(tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="program.json"):
        load_program(tmp_path / "nothing")


# ------------------------------------------------------------------------------- fit
def test_fit_errors_name_what_and_by_how_much():
    vit = get_preset("vit-s-nyud")
    with pytest.raises(FitError) as e:
        compile_program(vit, Q, HW, None)
    assert "activation buffer: 1201 tokens > act_buffer_tokens 256 (by 945)" in str(e.value)
    assert [f.what for f in e.value.report.failures] == ["activation buffer"]
    with pytest.raises(FitError) as e:
        check_fit(vit, Q, HW.replace(act_buffer_tokens=1280))
    bram = e.value.report.plan.bram36
    assert f"on-chip buffers: {bram} BRAM36 > xczu9eg budget 912 (by {bram - 912})" in str(e.value)
    with pytest.raises(FitError, match="address space: .* > 2\\*\\*axi_addr_bits \\(24\\)"):
        check_fit(get_preset("edge-moe"), Q, HW.replace(axi_addr_bits=24))
    with pytest.raises(FitError, match="gating 'task_cond': only 'multi'"):
        check_fit(get_preset("tiny").replace(gating="task_cond"), Q, HW)
    assert check_fit(get_preset("edge-moe"), Q, HW).ok


def test_buffer_plan_bram_estimate():
    assert bram36(512, 3072) == 45          # 15 x 3 blocks of 36 x 1024
    assert bram36(36, 1024) == 1 and bram36(37, 1024) == 2 and bram36(1, 32769) == 2
    plan = buffer_plan(get_preset("edge-moe"), Q, HW)
    assert plan.width("X") == 192 and plan.width("W") == 768 and plan.width("L") == 16
    assert plan.get("S").rows == plan.get("S").width == HW.act_buffer_tokens
    for b in plan.buffers:     # never below the raw bits of a block RAM buffer
        assert b.distributed or b.bram36 * 36 * 1024 >= b.bits_total, b.name
    assert plan.bram36 == sum(b.bram36 for b in plan.buffers) < 912


# ------------------------------------------------------------------------------- machine errors
def _machine(tiny, instrs, size=1 << 16):
    cfg, _, prog, _ = tiny
    mem = FlatMemory(size, 0x2000)
    for pc, ins in enumerate(instrs):
        mem.write(0x2000 + pc * INSTR_BYTES, ins if isinstance(ins, bytes) else ins.to_bytes())
    m = Machine(Q, HW, buffer_plan(cfg, Q, HW), mem)
    return m, Registers(0x2000, 0x3000, 0x3000, 0x3000)


@pytest.mark.parametrize("instrs,code,pc", [
    ([Instr(Op.GATE, src=Buf.L, rows=2, n=4, arg=2), bytes(32)], ERR_ILLEGAL, 1),
    ([Instr(Op.EXPERT_LOOP, arg=1), Instr(Op.END)], ERR_LOOP, 0),
    ([Instr(Op.LOAD_ROWS, dst=Buf.X, rows=257, k=1), Instr(Op.END)], ERR_BUFFER, 0),
    ([Instr(Op.LOAD_ROWS, dst=Buf.X, addr=1 << 20, rows=1, k=1), Instr(Op.END)], ERR_ADDRESS, 0),
    ([Instr(Op.LOAD_ROWS, dst=Buf.X, addr=4, rows=1, k=1), Instr(Op.END)], ERR_ADDRESS, 0),
    ([Instr(Op.LINEAR, flags=int(Flag.LOGIT), src=Buf.H, dst=Buf.X, rows=1, k=16, n=4)], ERR_ILLEGAL, 0),
    ([Instr(Op.LINEAR, flags=int(Flag.GATHER | Flag.BIAS), src=Buf.H, dst=Buf.W, k=16, n=16)], ERR_LOOP, 0),
])
def test_machine_stops_with_error_code_and_pc(tiny, instrs, code, pc):
    m, regs = _machine(tiny, instrs)
    with pytest.raises(ProgramError) as e:
        m.run(regs)
    assert (e.value.code, e.value.pc) == (code, pc)


def test_machine_runaway_guard(tiny):
    m, regs = _machine(tiny, [Instr(Op.GATE, src=Buf.L, rows=1, n=4, arg=1)] * 8)
    with pytest.raises(ProgramError) as e:
        m.run(regs, max_instructions=5)
    assert e.value.code == ERR_RUNAWAY
