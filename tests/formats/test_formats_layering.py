"""Loading goes one way: tritlm.api -> tritlm.formats -> tritlm.model -> tritlm.nn -> tritlm.kernels."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tritlm

SRC = Path(tritlm.__file__).parent
ORDER = ["tritlm.api", "tritlm.formats", "tritlm.model", "tritlm.nn", "tritlm.kernels"]


def _imports(path: Path) -> set[str]:
    """Every module imported anywhere in the file (top level or inside functions), absolute names."""
    mod = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _rank(name: str) -> int | None:
    return next((i for i, p in enumerate(ORDER) if name == p or name.startswith(p + ".")), None)


def test_no_layer_imports_a_layer_above_it():
    bad = []
    for f in SRC.rglob("*.py"):
        mod = ".".join(f.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
        r = _rank(mod)
        if r is None:
            continue
        bad += [f"{mod} -> {d}" for d in _imports(f) if (rd := _rank(d)) is not None and rd < r]
    assert not bad


def test_api_imports_detect_and_both_import_cleanly_first():
    assert "tritlm.formats.detect" in _imports(SRC / "api.py")
    assert not any(_rank(d) == 0 for d in _imports(SRC / "formats" / "detect.py"))
    for first in ("tritlm.formats.detect", "tritlm.api", "tritlm.cli"):
        r = subprocess.run([sys.executable, "-c", f"import {first}"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
