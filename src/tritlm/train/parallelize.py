"""FSDP2 for the trainer: ``fully_shard`` applied from outside the model (torchtitan's shape).

The model code knows nothing of sharding: this module wraps every transformer block in its own
FSDP group (its weights are all-gathered just before the block runs and freed after it), then the
root, whose group holds what is left: the embedding, the final norm and ``lm_head``. A tied
``lm_head.weight`` is the embedding's Parameter; both modules stay in the root group so the one
Parameter is sharded once and both uses see the same gathered tensor (FSDP2 requires a shared
Parameter to live in a single group, which is why torchtitan does not shard a tied embedding
on its own either).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from tritlm.errors import ConfigError
from tritlm.train.config import TrainConfig
from tritlm.train.distributed import DistInfo

log = logging.getLogger(__name__)


def data_parallel_mesh(dist: DistInfo):
    """A 1-D device mesh over every process (pure data parallelism)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(dist.device.type, (dist.world_size,), mesh_dim_names=("dp",))


def mixed_precision(cfg: TrainConfig, device: torch.device):
    """bf16 weights for the all-gathers and compute, fp32 gradient reduction, on CUDA with bf16.

    On the CPU (gloo) weights stay fp32: the trainer's autocast alone gives the bf16 compute there.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    if device.type == "cuda" and bf16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def parallelize(model: nn.Module, mesh, cfg: TrainConfig) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over ``mesh`` (None: the default process group) and return it.

    ``cfg.fsdp_reshard_after_forward``: free each block's gathered weights after its forward and
    gather them again for the backward (less memory), or keep them (one all-gather fewer per block).
    """
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # FSDP2 became public (and CPU-capable) in torch 2.6
        raise ConfigError(f"fsdp needs torch >= 2.6 (FSDP2's fully_shard); this is torch {torch.__version__}") from None

    device = next(model.parameters()).device
    kw = {"mesh": mesh, "mp_policy": mixed_precision(cfg, device)}
    blocks = getattr(model, "layers", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no .layers: cannot shard it block by block")
    for block in blocks:
        fully_shard(block, reshard_after_forward=cfg.fsdp_reshard_after_forward, **kw)
    # The root's weights are needed again at once by the backward, so FSDP keeps them gathered
    # after the forward whatever the flag says.
    fully_shard(model, **kw)
    log.info("FSDP2: %d blocks + root sharded over %d processes", len(blocks), mesh.size() if mesh else -1)
    return model


def grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """The global gradient norm of a sharded model as a plain tensor, clipping to ``max_norm`` if > 0.

    With FSDP the gradients are DTensor shards: torch's norm reduces over the mesh and returns a
    replicated DTensor, whose local value is the same on every process.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    elif params:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    else:
        return torch.zeros(())
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
