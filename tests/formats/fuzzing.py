"""Shared loader fuzzing: mutated real files must give a model or a one-line FormatError, nothing else."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tritlm.errors import FormatError

# the same 300 inputs on every CI run; no time bound: timing belongs in benchmarks, not tests
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                    derandomize=True)


def try_load(load: Callable[[], object], tried: dict) -> None:
    tried["n"] += 1
    try:
        load()
        tried["loaded"] += 1
    except FormatError as e:
        assert "\n" not in str(e)
        tried["errors"] += 1


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
