"""Compile-on-first-use: a build from scratch into an empty cache, cache keys, a fresh process."""

import os
import subprocess
import sys
import textwrap

import pytest

from tritlm.kernels.cpu import build

needs_cc = pytest.mark.skipif(build.find_compiler() is None, reason="no C compiler")


@needs_cc
def test_build_from_scratch(tmp_path):
    path = build.build_library(root=tmp_path)
    assert path.exists() and path.parent == tmp_path / "kernels"
    assert build.build_library(root=tmp_path) == path  # cached: no rebuild
    lib = build._open(path)
    assert lib.tt_abi_version() == build.ABI_VERSION
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [path.name]  # no temp files left


@needs_cc
def test_cache_key_follows_source(tmp_path, monkeypatch):
    a = build.library_path(root=tmp_path)
    src = tmp_path / "tritlm_cpu.c"
    src.write_text(build.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(build, "SOURCE", src)
    assert build.library_path(root=tmp_path) != a


@needs_cc
def test_build_failure_is_reported(tmp_path, monkeypatch):
    src = tmp_path / "broken.c"
    src.write_text("this is not C\n")
    monkeypatch.setattr(build, "SOURCE", src)
    with pytest.raises(RuntimeError, match="kernel build failed"):
        build.build_library(root=tmp_path)


@needs_cc
def test_fresh_process_first_use(tmp_path):
    """A new process with an empty cache compiles, loads and runs the kernels (no warnings)."""
    code = textwrap.dedent(
        """
        import numpy as np
        from tritlm.kernels import TernaryLinearKernel, ternary_matmul_int_ref, kernel_info
        w = np.random.default_rng(0).integers(-1, 2, size=(10, 300)).astype(np.int8)
        x = np.random.default_rng(1).integers(-128, 128, size=(2, 300)).astype(np.int8)
        k = TernaryLinearKernel(w, 1.0)
        assert np.array_equal(k.int_dots(x), ternary_matmul_int_ref(x, w))
        print("BACKEND", k.backend, kernel_info()["library"])
        """
    )
    env = dict(os.environ, TRITLM_CACHE_DIR=str(tmp_path))
    env.pop("TRITLM_KERNEL", None)
    res = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    from tritlm.kernels.cpu import resolve_backend

    assert f"BACKEND {resolve_backend('auto')} " in res.stdout  # the route CPUID picks here
    assert str(tmp_path) in res.stdout
    assert "fallback" not in res.stderr
