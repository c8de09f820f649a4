"""Autotune: a tiny smoke run, the JSON cache, and its use by new kernel objects."""

import json
import time

import numpy as np
import pytest

from tritlm.kernels import TernaryLinearKernel, autotune
from tritlm.kernels.cpu import build
from tritlm.kernels.cpu.tuning import tune

pytestmark = pytest.mark.skipif(build.load_library() is None, reason="no compiled kernels")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITLM_CACHE_DIR", str(tmp_path))
    autotune.clear_memo()
    yield tmp_path
    autotune.clear_memo()


def test_tune_smoke_and_reuse(cache):
    cands = {0: [{"prefetch": 0}, {"prefetch": 1024, "nta": 0}], 1: [{"panel_rows": 8}],
             2: [{"panel_rows": 16}, {"panel_rows": 32}]}
    best = tune(12, 256, ms=(1, 3, 20), threads=1, candidates=cands, repeats=1, flush_bytes=0)
    assert set(best) == {0, 1, 2}
    kern = TernaryLinearKernel(np.zeros((12, 256), dtype=np.int8), threads=1)
    default = {b: dict(p) for b, p in kern.params.items()}  # the route's built-in values compete too
    assert best[0]["prefetch"] in (0, 1024, default[0]["prefetch"])
    assert best[1]["panel_rows"] in (8, default[1]["panel_rows"])
    data = json.loads((cache / "autotune.json").read_text())
    assert data["version"] == autotune.FORMAT_VERSION and len(data["entries"]) == 3
    kern = TernaryLinearKernel(np.zeros((12, 256), dtype=np.int8), threads=1)
    assert autotune.lookup(12, 256, 1, kern.backend) == best  # tuned on the backend "auto" runs here
    assert kern.params[1]["panel_rows"] == best[1]["panel_rows"]
    assert kern.params[0]["prefetch"] == best[0]["prefetch"]
    assert autotune.lookup(12, 256, 2, kern.backend) is None  # other thread count: not tuned


def test_corrupt_cache_is_ignored(cache):
    (cache / "autotune.json").write_text("{not json")
    assert autotune.lookup(4, 4, 1, "avx2") is None
    from tritlm.kernels.cpu.ops import DEFAULT_PARAMS, VNNI_DEFAULT_PARAMS

    kern = TernaryLinearKernel(np.zeros((4, 4), dtype=np.int8))
    want = VNNI_DEFAULT_PARAMS if kern.backend in ("avx512", "amx") else DEFAULT_PARAMS
    assert kern.params[0] == want  # the route's built-in defaults


class _Timed:
    """A stand-in kernel whose calls take a time set by its prefetch parameter."""

    k, n, backend, kind, _ctx, threads, effective_threads = 8, 8, "fake", "ternary", 1, None, 1
    COST = {2048: 0.040, 0: 0.0392, 1024: 0.0404, 4096: 0.024}  # long enough that sleep's jitter is ~1%

    def __init__(self):
        self.params = {b: {"prefetch": 2048, "nta": 1, "panel_rows": 32, "chunks": 8} for b in range(3)}

    def set_params(self, p):
        for b, q in p.items():
            self.params[int(b)].update(q)

    def __call__(self, x, out=None):
        time.sleep(self.COST[self.params[0]["prefetch"]])
        return out


def test_tuning_keeps_the_default_unless_a_candidate_is_clearly_faster():
    from tritlm.kernels.cpu.tuning import MARGIN, tune_kernel

    assert 0.03 < MARGIN < 0.4  # 2% faster is noise here, 40% is not
    close = {0: [{"prefetch": 0}, {"prefetch": 1024}]}  # 2% faster, 1% slower: the default stays
    assert tune_kernel(_Timed(), ms=(1,), save=False, candidates=close, repeats=3, flush_bytes=0) == {
        0: {"prefetch": 2048}}
    far = {0: [{"prefetch": 0}, {"prefetch": 4096}]}  # 40% faster: taken
    assert tune_kernel(_Timed(), ms=(1,), save=False, candidates=far, repeats=3, flush_bytes=0) == {
        0: {"prefetch": 4096}}
