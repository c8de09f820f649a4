"""Per-layer tracing and timing hooks on the packed runtime's forward pass (``infer/profile.py``
sets the engine's ``tracer`` / ``timer``; the fused C step bypasses them, so a traced or timed
engine runs the torch forward)."""

from __future__ import annotations

import torch


def install_hooks(eng) -> None:
    """Per-layer tracing (``eng.tracer``) and timing (``eng.timer``) as module hooks on the one
    forward; the final norm's output becomes ``eng.last_hidden``."""
    m, stack = eng.model, []

    def trace(name: str, layer: int):
        def hook(_mod, _inp, out):
            if eng.tracer is not None:
                eng.tracer(name, layer, out.reshape(-1, out.shape[-1]))
        return hook

    def timed(name: str, mod: torch.nn.Module) -> None:
        def pre(_mod, _inp):
            if eng.timer is not None:
                cm = eng.timer(name)
                cm.__enter__()
                stack.append(cm)

        def post(_mod, _inp, _out):
            if eng.timer is not None and stack:
                stack.pop().__exit__(None, None, None)
        mod.register_forward_pre_hook(pre)
        mod.register_forward_hook(post)

    def hidden(_mod, _inp, out):
        eng.last_hidden = out.reshape(-1, out.shape[-1])

    m.embed_tokens.register_forward_hook(trace("embed", -1))
    for i, blk in enumerate(m.layers):
        blk.self_attn.register_forward_hook(trace("attn_out", i))
        blk.mlp.register_forward_hook(trace("mlp_out", i))
        blk.register_forward_hook(trace("resid", i))
        timed(f"layer{i}.attn", blk.self_attn)
        timed(f"layer{i}.mlp", blk.mlp)
    m.norm.register_forward_hook(hidden)
    timed("head", m.lm_head)
    m.lm_head.register_forward_hook(trace("logits", eng.cfg.n_layers))
