"""Fast paths compute what the plain path computes."""

import torch

from lorakit.ops import _DropoutLinear, dropout_linear, keep_mask


def test_dropout_linear_equals_plain_path_for_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    w = torch.randn(4, 16, requires_grad=True)
    mask = torch.rand(3, 5, 16) > 0.3
    out = _DropoutLinear.apply(x, w, mask, 1 / 0.7)
    g = torch.randn_like(out)
    out.backward(g)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.nn.functional.linear(x2 * mask / 0.7, w2)
    ref.backward(g)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_gradcheck_in_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 3, 6) > 0.4
    assert torch.autograd.gradcheck(lambda a, b: _DropoutLinear.apply(a, b, mask, 1 / 0.6), (x, w))


def test_mask_is_a_valid_dropout():
    """Each element is kept with probability 1 - p and scaled by 1/(1 - p): E[out] = x·Wᵀ."""
    torch.manual_seed(0)
    x = torch.ones(200_000, 1)
    kept = dropout_linear(x, torch.ones(1, 1), 0.25).squeeze(1)
    assert all(min(abs(v), abs(v - 1 / 0.75)) < 1e-6 for v in kept.unique().tolist())
    assert abs((kept > 0).float().mean().item() - 0.75) < 0.005
    assert abs(kept.mean().item() - 1.0) < 0.01


def test_siblings_share_one_mask_of_their_common_input():
    torch.manual_seed(0)
    x = torch.ones(64, 8)
    q, k = dropout_linear(x, torch.eye(8), 0.5), dropout_linear(x, 2 * torch.eye(8), 0.5)
    assert torch.equal(2 * q, k)  # same input object → same mask
    other = dropout_linear(x.clone(), torch.eye(8), 0.5)
    assert not torch.equal(other, q)  # another input → a fresh draw
    x.add_(0)  # an in-place change bumps the version: a fresh draw too
    assert not torch.equal(dropout_linear(x, torch.eye(8), 0.5), q)


def test_masks_follow_the_global_seed():
    x = torch.ones(64, 8)
    torch.manual_seed(5)
    a = keep_mask(x, 0.5)
    torch.manual_seed(5)
    assert torch.equal(a, keep_mask(x.clone(), 0.5))
