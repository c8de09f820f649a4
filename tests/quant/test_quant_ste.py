"""STE, soft (tanh) quantisers, lambda mixing and latent clamping."""

import itertools

import numpy as np
import pytest
import torch

from tritlm.quant import (
    absmean_ternary,
    clamp_latent_,
    mix,
    soft_binary,
    soft_ternary,
    ste,
)


def test_ste_forward_is_q_exactly_and_grad_is_scaled():
    torch.manual_seed(0)
    x = (torch.randn(7, 13) * 1e3).requires_grad_()
    q = torch.round(x.detach() * 3.7) / 3.7  # not representable as x + (q - x) without error
    y = ste(x, q)
    assert torch.equal(y, q)
    g = torch.randn(7, 13)
    y.backward(g)
    assert torch.equal(x.grad, g)
    x.grad = None
    ste(x, q, scale=0.25).backward(g)
    assert torch.allclose(x.grad, 0.25 * g)


def test_ste_q_gets_no_grad_and_no_grad_inputs():
    x = torch.randn(3, requires_grad=True)
    q = torch.randn(3, requires_grad=True)
    ste(x, q).sum().backward()
    assert q.grad is None and torch.equal(x.grad, torch.ones(3))
    out = ste(torch.randn(3), q)  # x without grad: just q, detached
    assert not out.requires_grad


def _np_soft_ternary(u, a):
    return 0.5 * (np.tanh(a * (u - 0.5)) + np.tanh(a * (u + 0.5)))


def test_soft_values_and_gradcheck():
    u = torch.linspace(-2.3, 2.1, 41, dtype=torch.float64)
    for a in [0.7, 3.0, 9.0]:
        np.testing.assert_allclose(soft_ternary(u, a).numpy(), _np_soft_ternary(u.numpy(), a), rtol=1e-12)
        np.testing.assert_allclose(soft_binary(u, a).numpy(), np.tanh(a * u.numpy()), rtol=1e-12)
        ui = u.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda t, a=a: soft_ternary(t, a), (ui,))
        assert torch.autograd.gradcheck(lambda t, a=a: soft_binary(t, a), (ui,))


def test_soft_tends_to_hard_as_alpha_grows():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2000, generator=g, dtype=torch.float64)
    q, gamma = absmean_ternary(w, eps=0.0)
    u = w / gamma
    # away from the steps the distance to round-clip shrinks monotonically and vanishes
    far = ((u.abs() - 0.5).abs() > 0.05)
    errs = [(soft_ternary(u, a) - q)[far].abs().max().item() for a in [1, 4, 16, 64, 256]]
    assert all(e2 < e1 for e1, e2 in itertools.pairwise(errs))
    assert errs[-1] < 1e-9
    sb = [(soft_binary(u, a) - torch.sign(u))[u.abs() > 0.05].abs().max().item() for a in [1, 16, 512]]
    assert sb[0] > sb[1] > sb[2] and sb[2] < 1e-9


def test_mix_endpoints_exact_and_gradient():
    x = torch.randn(4, 5, requires_grad=True)
    q = torch.randn(4, 5)
    assert mix(x, q, 0.0) is x
    assert mix(x, q, 1.0) is q
    y = mix(x, q, 0.3)
    assert torch.allclose(y, x + 0.3 * (q - x))
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full((4, 5), 0.7))
    # with an STE'd q, the gradient to x is (1 - lam) + lam * ste_scale
    x.grad = None
    mix(x, ste(x, q, 2.0), 0.25).sum().backward()
    assert torch.allclose(x.grad, torch.full((4, 5), 0.75 + 0.25 * 2.0))


def test_clamp_latent_in_place():
    w = torch.nn.Parameter(torch.linspace(-3, 3, 13))
    out = clamp_latent_(w, 1.5)
    assert out.data_ptr() == w.data_ptr()
    assert w.abs().max().item() == 1.5
    assert torch.equal(w.data[4:9], torch.linspace(-3, 3, 13)[4:9])
    for bad in [0.0, -1.0, float("inf")]:
        with pytest.raises(ValueError):
            clamp_latent_(w, bad)
