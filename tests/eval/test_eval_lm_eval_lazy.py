"""lm-eval is an optional extra: only tritlm.eval.lm_eval imports it, and importing tritlm does not."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tritlm

SRC = Path(tritlm.__file__).parent


def test_only_the_lm_eval_module_imports_lm_eval():
    users = []
    for f in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n == "lm_eval" or n.startswith("lm_eval.") for n in names):
                users.append(f.relative_to(SRC).as_posix())
    assert sorted(set(users)) == ["eval/lm_eval.py"]


def test_importing_tritlm_does_not_import_lm_eval():
    code = ("import sys, tritlm, tritlm.api, tritlm.cli, tritlm.eval, tritlm.eval.compare; "
            "print('lm_eval' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
