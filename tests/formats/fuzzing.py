"""Shared loader fuzzing: mutated real files must give a model or a one-line FormatError, nothing else
- no other exception, no hang (:data:`HANG_S`), no model built far larger than the test files
(:func:`guard_builds`)."""

from __future__ import annotations

import json
import math
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tritlm.errors import FormatError

# the same 300 inputs on every CI run; no time bound: timing belongs in benchmarks, not tests
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                    derandomize=True)


HANG_S = 30  # one load of a test file takes milliseconds; this long is a hang (a FIFO opened, a loop)
BUILD_LIMIT = 5_000_000  # parameters (or RoPE entries) of the largest model a test file may hold


class Hang(Exception):
    """A load that did not finish within HANG_S."""


def _hang(*_):
    raise Hang(f"a load ran for more than {HANG_S} s")


def try_load(load: Callable[[], object], tried: dict) -> None:
    tried["n"] += 1
    old = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(HANG_S)
    try:
        load()
        tried["loaded"] += 1
    except FormatError as e:
        assert "\n" not in str(e)
        tried["errors"] += 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def guard_builds(monkeypatch, limit: int = BUILD_LIMIT) -> None:
    """Fail any Transformer build beyond ``limit`` parameters or RoPE entries (an "oversized
    allocation": the test files hold models of thousands of weights) before it allocates."""
    from tritlm.model.transformer import Transformer

    orig = Transformer.__init__

    def guarded(self, cfg):
        params = cfg.vocab_size * cfg.dim * 2 + cfg.n_layers * (4 * cfg.dim * cfg.dim + 3 * cfg.dim * cfg.ffn_dim)
        rope = cfg.max_seq_len * cfg.head_dim
        assert params <= limit and rope <= limit, f"built a model of {params} params / {rope} RoPE entries"
        orig(self, cfg)

    monkeypatch.setattr(Transformer, "__init__", guarded)


# ---- metadata mutations ------------------------------------------------------------------------
# sizes and counts a corrupt or hostile header might hold: limits of every integer width, the
# sizes that tempt a loader into allocating, zero and negatives
EDGE_INTS = [0, 1, -1, 2, 3, 255, 256, 1 << 16, 1 << 20, 1 << 24, 1 << 30, 1 << 31, 1 << 32, 1 << 40,
             (1 << 63) - 1, 1 << 63, 1 << 64, -(1 << 63), 10 ** 6, 10 ** 9]
EDGE_FLOATS = [0.0, -0.0, 1e-30, 0.5, 2.5, 1e300, math.nan, math.inf, -math.inf]


def scalars(gguf: bool = False):
    """Values of every JSON (or GGUF metadata) type, edge sizes first."""
    # GGUF: what its writer can store (64-bit integers, float32)
    ints = st.sampled_from([i for i in EDGE_INTS if not gguf or -(1 << 63) <= i < 1 << 63])
    floats = st.sampled_from([f for f in EDGE_FLOATS if not gguf or not abs(f) < math.inf or abs(f) < 1e38])
    return st.one_of(ints, st.integers(-(1 << 63), (1 << 63) - 1), floats, st.booleans(),
                     st.text(max_size=8), *(() if gguf else (st.none(),)))


def values():
    """Scalars and small nested lists / objects (the wrong type for almost any key)."""
    return st.recursive(scalars(), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                       max_size=3), max_leaves=8)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if len(prefix) > 12:  # inside a deep nest drawn earlier: nothing new to reach
        return out
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node[:16]):
            out += _paths(v, prefix + (i,))
    return out


def mutate_json(data, doc: Any, n_max: int = 3) -> Any:
    """Up to ``n_max`` mutations of a JSON document, drawn with hypothesis ``data``: a value
    replaced (by an edge value, a wrong type, or a near miss: x2, x1000, +1, -1), a key deleted, an
    unknown key added, or a value nested deep."""
    doc = json.loads(json.dumps(doc))
    for _ in range(data.draw(st.integers(1, n_max))):
        paths = _paths(doc)
        path = paths[data.draw(st.integers(0, len(paths) - 1))]
        op = data.draw(st.sampled_from(["set", "set", "near", "delete", "add", "nest"]))
        old = _get(doc, path)
        if op == "near" and isinstance(old, int) and not isinstance(old, bool):
            new = data.draw(st.sampled_from([old * 2, old * 1000, old + 1, old - 1, -old, old * (1 << 20)]))
        elif op == "delete" and path:
            _parent(doc, path).pop(path[-1])
            continue
        elif op == "add" and isinstance(old, dict):
            old[data.draw(st.text(min_size=1, max_size=8))] = data.draw(values())
            continue
        elif op == "nest":  # written out by dumps(): too deep for json.dumps itself
            new = f"{NEST}{data.draw(st.sampled_from([50, 1000, 100_000]))}"
        else:
            new = data.draw(values())
        if not path:
            doc = new
        else:
            _parent(doc, path)[path[-1]] = new
    return doc


def _get(doc, path):
    for k in path:
        doc = doc[k]
    return doc


def _parent(doc, path):
    return _get(doc, path[:-1])


NEST = "\u0000nest:"


def dumps(doc: Any) -> str:
    """JSON as a careless writer makes it: NaN / Infinity literals, and the nests drawn by
    :func:`mutate_json` written out as that many nested arrays."""
    import re

    return re.sub(r'"\\u0000nest:(\d+)"', lambda m: "[" * int(m.group(1)) + "0" + "]" * int(m.group(1)),
                  json.dumps(doc))


def fuzz_single_file(data: bytes, header: int, target: Path, load: Callable[[Path], object],
                     truncate_below: int) -> dict:
    """Up to 4 byte mutations, mostly inside the first ``header`` bytes (where parsing happens),
    some anywhere; a drawn cut below ``truncate_below`` truncates the file there as well."""
    tried = {"n": 0, "loaded": 0, "errors": 0}
    pos = st.one_of(st.integers(0, header - 1), st.integers(0, header - 1), st.integers(0, len(data) - 1))

    @SETTINGS
    @given(st.lists(st.tuples(pos, st.integers(0, 255)), min_size=1, max_size=4), st.integers(0, len(data)))
    def run(muts, cut):
        b = bytearray(data)
        for p, v in muts:
            b[p] = v
        target.write_bytes(bytes(b[:cut]) if cut < truncate_below else bytes(b))
        try_load(lambda: load(target), tried)

    run()
    assert tried["n"] >= 300
    return tried
