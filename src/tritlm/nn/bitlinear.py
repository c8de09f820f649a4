"""BitLinear: a drop-in ``nn.Linear`` that trains latent full-precision weights through quantisation.

Forward quantises the weights (ternary / binary, per tensor, per ``QuantConfig``) and the input
(per-token absmax int8) and multiplies the dequantised values; backward is straight-through.

The common case (lambda = 1, no annealing) runs through ``_BitLinearFn``, a fused autograd Function
that quantises once, folds both scales into the operands and saves only the two dequantised
operands, so backward is two plain matmuls (the same work as ``nn.Linear``). The schedule phases
(lambda mixing, tanh annealing) take the slower, composable path built from ``tritlm.quant``.

``kernel`` picks what runs that common case: "torch" (the default, above), "triton" (int8 tensor
cores, ``tritlm.kernels.triton.bitlinear``) or "auto" (Triton for CUDA inputs when it is installed).
Configs the Triton kernels do not implement keep the torch path whatever ``kernel`` says; the
Triton module is imported only when a layer asks for it, so CPU-only installs never load it.
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from tritlm.nn.rmsnorm import RMSNorm
from tritlm.quant.activations import absmax_int8
from tritlm.quant.config import TERNARY, QuantConfig
from tritlm.quant.ste import clamp_latent_, mix, soft_binary, soft_ternary, ste
from tritlm.quant.weights import expand_scale, quantize_weight, threshold_ternary

log = logging.getLogger(__name__)

_LOW_PRECISION = (torch.float16, torch.bfloat16)
KERNELS = ("auto", "torch", "triton")


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type``, or None (works on torch 2.3 and newer)."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: per-device functions
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def _dequant_weight(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Hard-quantised weight times its scale, as a fresh tensor (``w`` itself in fp mode).

    Call it with autograd off (no_grad or inside an autograd Function).
    """
    if cfg.weight == "fp":
        return w
    wf = w.float() if w.dtype in _LOW_PRECISION else w
    if cfg.weight == "ternary" and cfg.dynamic_threshold is None and cfg.scale == "tensor":
        # absmean_ternary with the scale folded in: 1 reduction + 4 in-place passes, no temporaries.
        gamma = wf.abs().mean()
        return torch.div(wf, gamma.add(cfg.eps)).round_().clamp_(-1, 1).mul_(gamma)
    q, scale = quantize_weight(wf, cfg)
    return q.mul_(expand_scale(scale, tuple(q.shape), cfg.group_size))


def _dequant_act(x: torch.Tensor, bits: int, eps: float) -> torch.Tensor:
    """absmax_int8 followed by q / s, as one fresh tensor (call with autograd off).

    No clamp is needed: s = Qp / max(max|x|, eps) bounds |x * s| by Qp (to within one ulp), so
    round(x * s) already lies in [-Qp, Qp] (the tests check the range).
    """
    xf = x.float() if x.dtype in _LOW_PRECISION else x
    # == Qp / max(max|x|, eps) bit for bit (Tensor.__rtruediv__ is reciprocal() * Qp), in place
    s = xf.abs().amax(dim=-1, keepdim=True).clamp_(min=eps).reciprocal_().mul_(2 ** (bits - 1) - 1)
    return (xf * s).round_().div_(s)


class ActSlot:
    """One-slot cache of the last quantised input, keyed by tensor identity and version.

    Layers that read the same tensor (q/k/v, gate/up) share one slot (their Attention / MLP sets
    it, see :func:`share_act_slot`), so the input is quantised once per block instead of three
    times and their backward passes share one saved copy. State of the modules that hold it, not
    of the process: two models (or two server workers) never evict each other's entries. The
    weakref callback frees the copy as soon as the input itself is gone.
    """

    __slots__ = ("_entry", "__weakref__")

    def __init__(self) -> None:
        self._entry: tuple | None = None

    def _drop(self, ref: weakref.ref) -> None:
        e = self._entry
        if e is not None and e[0] is ref:
            self._entry = None

    def get(self, x: torch.Tensor, key: tuple) -> torch.Tensor | None:
        e = self._entry
        if e is not None and e[0]() is x and e[1] == key:
            return e[2]
        return None

    def put(self, x: torch.Tensor, key: tuple, xd: torch.Tensor) -> None:
        self._entry = (weakref.ref(x, self._callback()), key, xd)

    def _callback(self):
        me = weakref.ref(self)  # the callback must not keep the slot alive

        def cb(ref: weakref.ref) -> None:
            slot = me()
            if slot is not None:
                slot._drop(ref)
        return cb


def share_act_slot(*mods: nn.Module) -> None:
    """Give the BitLinears among ``mods`` (layers that read one input) a common :class:`ActSlot`."""
    bl = [m for m in mods if isinstance(m, BitLinear)]
    if len(bl) > 1:
        slot = ActSlot()
        for m in bl:
            m.act_slot = slot


def _quant_input(x: torch.Tensor, cfg: QuantConfig, cd: torch.dtype, slot: ActSlot) -> torch.Tensor:
    """Dequantised per-token input as a 2-D tensor in ``cd``, reused when ``x`` was just quantised."""
    # inference-mode tensors have no version counter, so in-place changes are invisible: no cache
    key = None if x.is_inference() else (x._version, cfg.act_bits, cfg.eps, cd)
    if key is not None:
        hit = slot.get(x, key)
        if hit is not None:
            return hit
    x2 = x.detach()  # cheaper than a no_grad context; nothing here needs a graph
    if x2.dim() != 2:
        x2 = x2.reshape(-1, x2.shape[-1])
    if cfg.act_bits is None:
        return x2 if x2.dtype == cd else x2.to(cd)
    xd = _dequant_act(x2, cfg.act_bits, cfg.eps)
    if xd.dtype != cd:
        xd = xd.to(cd)
    if key is not None:
        slot.put(x, key, xd)
    return xd


def _hard_forward(xd: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: QuantConfig,
                  cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, deq(W)) for the 2-D dequantised input ``xd``, the weight cast to the compute dtype ``cd``."""
    wd = _dequant_weight(weight, cfg)
    if wd.dtype != cd:
        wd = wd.to(cd)
    y = torch.addmm(bias.to(cd), xd, wd.t()) if bias is not None else torch.mm(xd, wd.t())
    return y, wd


class _BitLinearFn(torch.autograd.Function):
    """y = deq(x) @ deq(W)^T + b; straight-through backward with two matmuls.

    ``x`` (2-D) only connects the graph; ``xd`` is its dequantised value, computed outside so that it
    can be shared. Saves ``xd`` (in the compute dtype, the same size as what ``nn.Linear`` keeps) and
    the dequantised weight; grad_x = g @ deq(W), grad_W = ste_scale * g^T @ xd.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, xd: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                cfg: QuantConfig, cd: torch.dtype) -> torch.Tensor:
        y, wd = _hard_forward(xd, weight, bias, cfg, cd)
        ctx.save_for_backward(xd, wd)
        ctx.scale = cfg.ste_scale if cfg.weight != "fp" else 1.0
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        xd, wd = ctx.saved_tensors
        x_dt, w_dt, b_dt = ctx.dtypes
        if g.dtype != xd.dtype:
            g = g.to(xd.dtype)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = g.mm(wd)
            if gx.dtype != x_dt:
                gx = gx.to(x_dt)
        if ctx.needs_input_grad[2]:
            gw = g.t().mm(xd)
            if ctx.scale != 1.0:
                gw.mul_(ctx.scale)
            if gw.dtype != w_dt:
                gw = gw.to(w_dt)
        if ctx.needs_input_grad[3]:
            gb = g.sum(0).to(b_dt)
        return gx, None, gw, gb, None, None


def set_kernel(model: nn.Module, kind: str) -> int:
    """Set ``kernel`` ("torch", "triton" or "auto") on every BitLinear of ``model``; returns how many."""
    if kind not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kind!r}")
    n = 0
    for m in model.modules():
        if isinstance(m, BitLinear):
            m.kernel = kind
            n += 1
    return n


class BitLinear(nn.Linear):
    """``nn.Linear`` with quantisation-aware forward; its parameters are the latent fp weights.

    Runtime schedule state, set by the trainer every step (see ``tritlm.nn.set_quant_state``) and
    deliberately not saved (it is a function of the step):

    - ``lam``: quantisation strength in [0, 1] (0 = full precision, 1 = fully quantised);
    - ``anneal_alpha``: sharpness of the tanh soft quantiser, None = hard quantisation with STE;
    - ``residual_coef``: coefficient of a full-precision residual branch F.linear(x, W) added to the
      output, annealed to 0 to ease the switch to ternary.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 config: QuantConfig = TERNARY, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if config.act_bits is not None and config.act_bits < 2:
            raise ValueError(f"act_bits must be >= 2 or None, got {config.act_bits}")
        self.config = config
        # Parameter-free RMSNorm of the input (BitNet FAQ); it has no state, so checkpoints do not change.
        self.norm = RMSNorm(in_features, affine=False) if config.input_norm else None
        self.lam: float = 1.0
        self.anneal_alpha: float | None = None
        self.residual_coef: float = 0.0
        self.act_slot = ActSlot()  # shared with the sibling layers that read the same input
        self.kernel: str = "torch"  # runtime choice, not saved: see the module docstring

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if self.norm is not None:
            x = self.norm(x)
        if not cfg.quantised and cfg.act_bits is None:
            y = F.linear(x, self.weight, self.bias)  # the FP twin: exactly nn.Linear
        elif self.lam == 1.0 and (self.anneal_alpha is None or not cfg.quantised):
            y = self._hard(x)
        else:
            y = F.linear(self._act(x), self._weight(), self.bias)
        if self.residual_coef != 0.0:
            y = y + self.residual_coef * F.linear(x, self.weight)
        return y

    def _hard(self, x: torch.Tensor) -> torch.Tensor:
        cd = _autocast_dtype(x.device.type) or x.dtype
        if getattr(self, "kernel", "torch") != "torch" and self._triton_ok(x):  # old pickles lack it
            from tritlm.kernels.triton.bitlinear import bitlinear_triton
            return bitlinear_triton(x, self.weight, self.bias, self.config, cd, self.act_slot)
        xd = _quant_input(x, self.config, cd, self.act_slot)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad
                                        or (self.bias is not None and self.bias.requires_grad)):
            x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
            y = _BitLinearFn.apply(x2, xd, self.weight, self.bias, self.config, cd)
        else:  # inference: the same math without the autograd bookkeeping
            with torch.no_grad():
                y = _hard_forward(xd, self.weight, self.bias, self.config, cd)[0]
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def _triton_ok(self, x: torch.Tensor) -> bool:
        """Whether ``kernel`` sends this input to the Triton kernels (raises when "triton" cannot run)."""
        from tritlm.kernels import triton as tk

        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.kernel == "auto" and not (x.is_cuda and tk.available()):
            return False
        tk.require(x.device.type)
        from tritlm.kernels.triton.bitlinear import supported
        return supported(self.config)

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token absmax activations with STE, mixed with the fp input by ``lam``."""
        bits = self.config.act_bits
        if bits is None:
            return x
        with torch.no_grad():
            q, s = absmax_int8(x, bits, self.config.eps)
            xd = (q / s).to(x.dtype)
        return mix(x, ste(x, xd), self.lam)

    def _weight(self) -> torch.Tensor:
        """Dequantised weight (hard with STE, or soft during annealing), mixed with W by ``lam``."""
        w, cfg = self.weight, self.config
        if not cfg.quantised:
            return w
        if self.anneal_alpha is None:
            with torch.no_grad():
                wd = _dequant_weight(w, cfg)
            wq = ste(w, wd, cfg.ste_scale)
        else:
            wq = self._soft_weight(w, float(self.anneal_alpha))
        return mix(w, wq, self.lam)

    def _soft_weight(self, w: torch.Tensor, alpha: float) -> torch.Tensor:
        """tanh staircase of W / scale, times the scale; the scale is treated as a constant (as in STE).

        int8 / int4 layers have no soft form: with 255 / 15 levels the hard grid plus STE is
        already fine-grained, so annealing leaves them hard.
        """
        cfg = self.config
        if cfg.weight in ("int8", "int4"):
            with torch.no_grad():
                wd = _dequant_weight(w, cfg)
            return ste(w, wd, cfg.ste_scale)
        ch = dict(dim=-1, keepdim=True) if cfg.scale == "channel" else {}
        with torch.no_grad():
            a = w.abs()
            if cfg.weight == "binary":
                scale = a.mean(**ch)
                inv = 1.0 / (scale + cfg.eps)
            elif cfg.dynamic_threshold is not None:
                _, scale = threshold_ternary(w, cfg.dynamic_threshold, cfg.eps, per_channel=bool(ch))
                # put the TWN threshold delta at the staircase's step u = 1/2
                inv = 0.5 / (cfg.dynamic_threshold * a.mean(**ch) + cfg.eps)
            else:
                scale = a.mean(**ch)
                inv = 1.0 / (scale + cfg.eps)
        soft = soft_binary if cfg.weight == "binary" else soft_ternary
        return soft(w * inv, alpha) * scale

    # ---- export / maintenance ----------------------------------------------------------------
    @torch.no_grad()
    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Hard-quantised weight for packing/export: int8 levels ``[out, in]`` and the float32 scale
        (0-dim per tensor, ``[out, 1]`` per channel, ``[out, groups]`` for int4; see
        :func:`tritlm.quant.weights.quantize_weight`)."""
        if not self.config.quantised:
            raise ValueError("a BitLinear with weight='fp' has no quantised weight")
        q, scale = quantize_weight(self.weight.detach().float(), self.config)
        return q.to(torch.int8), scale.float()

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """float32 ``[out, in]``: the weight the hard forward multiplies by (dequantised levels)."""
        return _dequant_weight(self.weight.detach().float(), self.config).clone()

    def clamp_latent_(self) -> None:
        """Clamp the latent weights to [-c, c] when ``config.latent_clamp`` is set (after opt.step)."""
        if self.config.latent_clamp is not None:
            clamp_latent_(self.weight, self.config.latent_clamp)

    def extra_repr(self) -> str:
        c = self.config
        s = f"{super().extra_repr()}, weight={c.kind}, act_bits={c.act_bits}"
        if c.dynamic_threshold is not None:
            s += f", dynamic_threshold={c.dynamic_threshold}"
        if c.ste_scale != 1.0:
            s += f", ste_scale={c.ste_scale}"
        if c.latent_clamp is not None:
            s += f", latent_clamp={c.latent_clamp}"
        return s

