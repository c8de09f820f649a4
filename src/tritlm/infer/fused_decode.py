"""One C call per decoded token: the Python face of ``kernels/cpu/tritlm_decode.c``.

The engine's torch forward runs ~25 small ops per layer; at M = 1 on a 2-core CPU their dispatch
cost about as much as the ternary GEMVs themselves (measured on the 700M shape: ~12 ms of glue
next to ~12 ms of kernels per token). :class:`FusedDecoder` hands the C side pointers to the
engine's own buffers (packed weights via the kernel contexts, norms, KV cache, RoPE tables) once,
so a decode step is: one C call (from token ids: the C side gathers their embedding rows), the LM
head, sampling. Several sequences
(continuous batching) go through the same call as rows: each Linear kernel runs once over all of
them, so a step reads the weights once whatever the batch. A prompt is the same call with its
tokens as the rows (one slot, consecutive positions: every row's keys/values are written before
any row attends), in chunks of :data:`PREFILL_ROWS`; the torch path's glue cost ~40% of a
128-token prefill at 125M.

The torch path stays the reference: tests compare the two on random models of every
architecture option, and profiling / tracing (which need per-layer hooks) use the torch path.
"""

from __future__ import annotations

import ctypes
import weakref

import torch

from tritlm.kernels.cpu import build

# Rows per prefill call: every call unpacks each weight panel once for the AMX tiles, so more
# rows per call spread that over more tokens (700M, 2 threads, AMX: pp128 898 tok/s at 64 rows,
# 1078 at 128; pp512 655 / 711 / 811 at 64 / 128 / 256); scratch grows with it (attention
# scores: rows x heads x max_len floats, 32 MiB at 128 rows for 16 heads of a 4096 context).
PREFILL_ROWS = 128
# the C side's cache kinds (tritlm_decode.c TT_KV_*) by the cache tensors' dtype
KV_MODES = {torch.float32: 0, torch.float16: 1, torch.int8: 2}
# the embedding tables it reads (TT_EMB_*)
EMB_MODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class FusedDecoder:
    """Binds an :class:`~tritlm.infer.engine.Engine`'s buffers to a C decode context.

    Use :meth:`create`, which returns None when the compiled kernels are not available (numpy
    fallback) or the engine is not a packed one.
    """

    def __init__(self, lib, handle: int, keep: list, rows: int):
        self._lib = lib
        self.rows = rows
        self._h = handle
        self._keep = keep  # tensors and kernels whose memory the C side points into
        self._finalizer = weakref.finalize(self, lib.tt_dec_free, handle)

    @classmethod
    def create(cls, eng) -> FusedDecoder | None:
        lib = build.load_library()
        if lib is None or eng.backend != "packed":
            return None
        m = eng.model
        runners = [mod.runner for mod in eng.linear_modules()]
        if not all(getattr(r, "_fast", False) for r in runners):  # fp layers, mixed groups, numpy
            return None
        c = eng.cfg
        final_norm = m.norm.weight.detach().float().contiguous()
        keep: list = [eng.cos, eng.sin_signed, final_norm]
        if any(t.dtype != torch.float32 or not t.is_contiguous() for t in keep):
            return None
        emb = m.embed_tokens.w
        if emb.dtype not in EMB_MODES or not emb.is_contiguous() or emb.shape != (c.vocab_size, c.dim):
            return None
        kv = KV_MODES.get(eng.k_cache[0].dtype)
        if kv is None or not all(t.dtype == eng.k_cache[0].dtype and t.is_contiguous()
                                 for t in (*eng.k_cache, *eng.v_cache)):
            return None
        rows = max(eng.slots, min(PREFILL_ROWS, eng.cache_len))
        h = lib.tt_dec_new(c.n_layers, c.dim, eng.H, eng.KV, eng.hd, c.ffn_dim, eng.cache_len, eng.slots, rows,
                           float(c.norm_eps), float(c.residual_scale), int(c.mlp == "relu2"),
                           int(bool(c.quant.input_norm)), eng.cos.data_ptr(), eng.sin_signed.data_ptr(),
                           final_norm.data_ptr(), kv)
        if not h:
            return None
        dec = cls(lib, h, keep, rows)
        if lib.tt_dec_set_embed(h, emb.data_ptr(), EMB_MODES[emb.dtype], c.vocab_size) != 0:
            return None
        keep.append(emb)

        def ptr(norm) -> int | None:
            if norm is None:
                return None
            t = norm.weight.detach().float().contiguous()
            keep.append(t)
            return t.data_ptr()

        for i, blk in enumerate(m.layers):
            at, mlp = blk.self_attn, blk.mlp
            lins = (at.qkv_proj.runner, at.o_proj.runner, mlp.gate_up_proj.runner, mlp.down_proj.runner)
            rc = lib.tt_dec_set_layer(h, i, ptr(blk.input_layernorm), ptr(blk.post_attention_layernorm),
                                      ptr(at.q_norm), ptr(at.k_norm), ptr(at.attn_sub_norm), ptr(mlp.ffn_sub_norm),
                                      *(r._ctx for r in lins), eng.k_cache[i].data_ptr(), eng.v_cache[i].data_ptr())
            if rc != 0:
                return None
            keep += [*lins, eng.k_cache[i], eng.v_cache[i]]
        return dec

    def _check(self, rc: int, what: str) -> None:
        if rc == -1:
            raise MemoryError("tritlm kernel: workspace allocation failed")
        if rc == -3:
            raise ValueError(f"fused forward: a token id outside the vocabulary ({what})")
        if rc != 0:
            raise ValueError(f"fused forward rejected {what}")

    def step(self, tokens: list[int], slots: list[int], pos: list[int], out: torch.Tensor,
             threads: int = 0) -> torch.Tensor:
        """One token for each of ``len(slots)`` sequences (distinct slots), every Linear once over
        all rows: ``tokens[r]`` at position ``pos[r]`` of slot ``slots[r]``. Writes the
        final-normed hidden states to ``out`` [M, dim]."""
        m = len(slots)
        ids = (ctypes.c_int * m)(*tokens)
        sl = (ctypes.c_int * m)(*slots)
        ps = (ctypes.c_int * m)(*pos)
        rc = self._lib.tt_dec_step_ids(self._h, ids, m, sl, ps, out.data_ptr(), threads)
        self._check(rc, f"slots {slots} / positions {pos}")
        return out

    def forward_rows(self, tokens: list[int], slots: list[int], pos: list[int], out: torch.Tensor,
                     threads: int = 0) -> torch.Tensor:
        """Row ``r`` is the token ``tokens[r]`` at position ``pos[r]`` of slot ``slots[r]`` (no two
        rows share both): one prompt (a slot's consecutive positions: causal, as every row's
        keys/values are written before any row attends) or several, in chunks of :attr:`rows` rows,
        a slot's earlier positions in earlier rows. ``out`` [M, dim] the final-normed hidden states."""
        for a in range(0, len(slots), self.rows):
            b = min(a + self.rows, len(slots))
            ids = (ctypes.c_int * (b - a))(*tokens[a:b])
            sl = (ctypes.c_int * (b - a))(*slots[a:b])
            ps = (ctypes.c_int * (b - a))(*pos[a:b])
            rc = self._lib.tt_dec_forward_rows_ids(self._h, ids, b - a, sl, ps, out[a:b].data_ptr(), threads)
            self._check(rc, f"rows {a}..{b - 1}: slots {slots[a:b]} / positions {pos[a:b]}")
        return out

    def prefill(self, tokens: list[int], slot: int, start: int, out: torch.Tensor, threads: int = 0) -> torch.Tensor:
        """``len(tokens)`` tokens of one sequence at positions ``start..`` of ``slot`` (see :meth:`forward_rows`)."""
        t = len(tokens)
        return self.forward_rows(tokens, [slot] * t, list(range(start, start + t)), out, threads)

    # the C side's profile sections, in its order (tritlm_decode.c TT_PROF_*)
    SECTIONS = ("qkv", "o", "gate_up", "down", "attention", "norms+rope+act")

    def set_profile(self, on: bool) -> None:
        """Per-section timing of the C layers on or off; the counters restart at zero."""
        self._lib.tt_dec_set_profile(self._h, int(on))

    def read_profile(self) -> tuple[dict[str, float], int]:
        """Seconds per section summed since :meth:`set_profile`, and the number of calls."""
        n = len(self.SECTIONS) + 1
        buf = (ctypes.c_uint64 * n)()
        self._lib.tt_dec_get_profile(self._h, buf)
        return {name: buf[i] * 1e-9 for i, name in enumerate(self.SECTIONS)}, int(buf[n - 1])
