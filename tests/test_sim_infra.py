"""The RTL flow's helpers without a simulator: lane packing, the mismatch reporter, the
Verilator environment, the Yosys cell grouping and the resource-baseline check."""
from __future__ import annotations

import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgemoe.hw.synth import check_synth_baseline, xilinx_summary
from edgemoe.sim.tb_common import first_mismatch, pack_lanes, unpack_lanes
from edgemoe.sim.verilator_env import setup_verilator_env


@given(bits=st.integers(2, 64), data=st.data())
def test_pack_unpack_roundtrip(bits, data):
    lanes = data.draw(st.lists(st.integers(-(1 << (bits - 1)), (1 << (bits - 1)) - 1),
                               min_size=1, max_size=17))
    word = pack_lanes(lanes, bits)
    assert 0 <= word < 1 << (bits * len(lanes))
    assert unpack_lanes(word, bits, len(lanes)) == lanes
    # lane 0 sits at the LSB
    assert word & ((1 << bits) - 1) == lanes[0] & ((1 << bits) - 1)


def test_pack_rejects_overflowing_lane():
    with pytest.raises(ValueError, match="lane 1 value 16"):
        pack_lanes([0, 16], 4)
    with pytest.raises(ValueError, match="lane 0 value -9"):
        pack_lanes([-9], 4)
    assert unpack_lanes(0b1111_0111, 4, 2) == [7, -1]
    assert unpack_lanes(0b1111_0111, 4, 2, signed=False) == [7, 15]


def test_first_mismatch_message():
    first_mismatch([1, 2, 3], [1, 2, 3])
    with pytest.raises(AssertionError, match=r"first mismatch at element 1 \(cycle 12\): "
                                             r"inputs x=5, expected 2, got 7"):
        first_mismatch([1, 2, 3], [1, 7, 4], ["x=4", "x=5", "x=6"], [11, 12, 13])
    with pytest.raises(AssertionError, match="count mismatch: expected 3, got 2"):
        first_mismatch([1, 2, 3], [1, 2])


def test_verilator_env_idempotent():
    a = setup_verilator_env()
    b = setup_verilator_env()
    assert a == b
    assert os.path.isdir(a["VERILATOR_ROOT"])
    assert os.environ["PATH"].split(os.pathsep).count(os.path.join(a["VERILATOR_ROOT"], "bin")) <= 1
    assert os.environ["MAKEFLAGS"].split().count("CFG_CXXFLAGS_PCH_I=-include") == 1


def test_xilinx_summary_groups_cells():
    s = xilinx_summary({"LUT1": 1, "LUT6": 5, "LUT6_2": 2, "FDRE": 3, "FDCE": 1, "FDPE": 1,
                        "FDSE": 1, "DSP48E2": 4, "RAMB36E2": 2, "RAMB18E2": 3, "CARRY8": 7,
                        "RAM64M": 1, "SRLC32E": 2, "BUFG": 1})
    assert (s["lut"], s["ff"], s["dsp"], s["bram36"], s["carry"], s["lutram"], s["srl"]) == \
        (8, 6, 4, 3.5, 7, 1, 2)


def test_check_synth_baseline(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEMOE_UPDATE_BASELINES", raising=False)
    (tmp_path / "synth_u.json").write_text(json.dumps({"lut": 100, "ff": 200, "dsp": 0, "bram36": 1}))
    ok = {"lut": 110, "ff": 150, "dsp": 0, "bram36": 1}
    assert check_synth_baseline("u", ok, baseline_dir=tmp_path)["new"]["lut"] == 110
    with pytest.raises(AssertionError, match=r"lut grew .*lut 100 -> 111.*EDGEMOE_UPDATE_BASELINES=1"):
        check_synth_baseline("u", {**ok, "lut": 111}, baseline_dir=tmp_path)
    with pytest.raises(AssertionError, match=r"dsp grew"):
        check_synth_baseline("u", {**ok, "dsp": 1}, baseline_dir=tmp_path)
    with pytest.raises(AssertionError, match="no synthesis baseline"):
        check_synth_baseline("missing", ok, baseline_dir=tmp_path)
    monkeypatch.setenv("EDGEMOE_UPDATE_BASELINES", "1")
    check_synth_baseline("u", {**ok, "lut": 500}, baseline_dir=tmp_path)
    assert json.loads((tmp_path / "synth_u.json").read_text())["lut"] == 500
