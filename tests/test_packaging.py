"""The project installs one import name, `edgemoe`: no bare model/quant/hw/sim in site-packages."""
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BARE = ("model", "quant", "hw", "sim")


def test_installed_names_resolve_to_edgemoe_only(tmp_path):
    # a child Python started away from the repo sees only what is installed
    code = ("import importlib.util, json, sys\n"
            f"bare = {{n: importlib.util.find_spec(n) is not None for n in {BARE!r}}}\n"
            "import edgemoe, edgemoe.sim.cli, edgemoe.quant.golden, edgemoe.hw.accel, edgemoe.model.m3vit\n"
            "print(json.dumps({'bare': bare, 'version': edgemoe.__version__}))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import json
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["bare"] == {n: False for n in BARE}, f"bare top-level names importable: {out['bare']}"
    assert out["version"]


def test_wheel_holds_only_the_edgemoe_package(tmp_path):
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed in this environment")
    src = tmp_path / "src"
    # build from a copy of the tracked tree: the repo's own build/ holds simulator caches
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True)
    if files.returncode != 0:
        pytest.skip("not a git checkout")
    for f in files.stdout.split():
        if (REPO / f).is_file() and not f.startswith("tests/"):
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            (src / f).write_bytes((REPO / f).read_bytes())
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = (tmp_path / "dist").glob("edgemoe-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    tops = {n.split("/")[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"edgemoe"}, f"wheel top-level entries: {sorted(tops)}"
    for sub in ("__init__.py", "model/m3vit.py", "quant/golden.py", "hw/accel.py", "sim/cli.py",
                "sim/hdl/edgemoe_dram_tb.v", "checkpoints/tiny.pt", "sim/regmap.rdl", "sim/regs.py",
                "sim/c/edgemoe_host.c"):
        assert f"edgemoe/{sub}" in names, f"edgemoe/{sub} missing from the wheel"
    assert not any(n.startswith("edgemoe/tests/") for n in names)
    (di,) = dist_info
    ep = zipfile.ZipFile(whl).read(f"{di}/entry_points.txt").decode()
    assert "edgemoe = edgemoe.sim.cli:main" in ep
