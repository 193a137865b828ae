"""Fast paths compute what the plain path computes."""

import pytest
import torch
import torch.nn.functional as F

from lorakit.lora.ops import _LoraDown, keep_mask, keep_probability, lora_down


def _plain(x, w, mask, scale):
    return F.linear(x.float() * mask * scale if mask is not None else x.float() * scale, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_mask", [True, False])
def test_lora_down_equals_plain_path_for_the_same_mask(dtype, with_mask):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16).to(dtype).requires_grad_()
    w = torch.randn(4, 16, requires_grad=True)
    mask = torch.rand(3, 5, 16) > 0.3 if with_mask else None
    out = _LoraDown.apply(x, mask, 1 / 0.7, w)
    g = torch.randn_like(out)
    out.backward(g)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = _plain(x2, w2, mask, 1 / 0.7)
    ref.backward(g)
    assert out.dtype == torch.float32 and x.grad.dtype == dtype
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_gradcheck_in_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 3, 6) > 0.4
    assert torch.autograd.gradcheck(lambda a, b: _LoraDown.apply(a, mask, 1 / 0.6, b), (x, w))


def test_a_half_input_is_saved_as_it_came_not_as_an_fp32_copy():
    """The plain path (x.float() then linear) keeps a 4-byte copy of a 2-byte input for backward."""
    x = torch.randn(8, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4, 32, requires_grad=True)

    def saved_bytes(fn) -> int:
        seen = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
            fn()
        return sum(t.numel() * t.element_size() for t in seen if t.shape == x.shape)

    assert saved_bytes(lambda: lora_down(x, w, p=0.1)) == x.numel() * (2 + 1)  # bf16 x + bool mask
    assert saved_bytes(lambda: F.linear(F.dropout(x.float(), 0.1), w)) >= x.numel() * 4 * 2


def test_mask_is_a_valid_dropout():
    """Each element is kept with probability 1 - p and scaled by 1/(1 - p): E[out] = x·Wᵀ."""
    torch.manual_seed(0)
    x = torch.ones(200_000, 1)
    kept = lora_down(x, torch.ones(1, 1), p=0.25).squeeze(1)
    assert all(min(abs(v), abs(v - 1 / 0.75)) < 1e-6 for v in kept.unique().tolist())
    assert abs((kept > 0).float().mean().item() - 0.75) < 0.005
    assert abs(kept.mean().item() - 1.0) < 0.01


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3])
def test_keep_rate_and_scale_are_unbiased(p):
    """16-bit draws: P(keep) is 1 - p to 2⁻¹⁶, and the 1/keep scale uses the realised probability."""
    assert abs(keep_probability(p) - (1 - p)) <= 2**-17
    torch.manual_seed(2)
    x = torch.ones(1_000_000, 1)
    kept = lora_down(x, torch.ones(1, 1), p=p)
    sigma = (p * (1 - p) / x.numel()) ** 0.5
    assert abs((kept > 0).float().mean().item() - (1 - p)) < 5 * sigma
    assert abs(kept.mean().item() - 1.0) < 5 * sigma / (1 - p)
    assert kept.max().item() == pytest.approx(1 / keep_probability(p))


def test_mask_elements_are_independent():
    """Neighbouring elements are uncorrelated: P(both kept) = (1 - p)², within sampling error."""
    torch.manual_seed(1)
    m = keep_mask(torch.empty(400, 500), 0.3).float()
    both = (m[:, 1:] * m[:, :-1]).mean().item()
    assert abs(both - 0.49) < 0.005
    assert abs((m[1:] * m[:-1]).mean().item() - 0.49) < 0.005


def test_siblings_share_one_mask_of_their_common_input():
    torch.manual_seed(0)
    x = torch.ones(64, 8)
    q, k = lora_down(x, torch.eye(8), p=0.5), lora_down(x, 2 * torch.eye(8), p=0.5)
    assert torch.equal(2 * q, k)  # same input object → same mask
    other = lora_down(x.clone(), torch.eye(8), p=0.5)
    assert not torch.equal(other, q)  # another input → a fresh draw
    x.add_(0)  # an in-place change bumps the version: a fresh draw too
    assert not torch.equal(lora_down(x, torch.eye(8), p=0.5), q)


def test_masks_follow_the_global_seed():
    x = torch.ones(64, 8)
    torch.manual_seed(5)
    a = keep_mask(x, 0.5)
    torch.manual_seed(5)
    assert torch.equal(a, keep_mask(x.clone(), 0.5))


def test_without_dropout_a_float32_input_takes_autograd_own_path():
    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(2, 8, requires_grad=True)
    out = lora_down(x, w)
    assert out.grad_fn.name() != "_LoraDownBackward"
    torch.testing.assert_close(out, x @ w.T)


def test_stacked_weights_equal_one_call_each():
    """Siblings' A's in one call: the same outputs and gradients as separate calls on one mask."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16, requires_grad=True)
    ws = [torch.randn(r, 16, requires_grad=True) for r in (4, 2, 4)]
    mask = torch.rand(2, 6, 16) > 0.2
    out = _LoraDown.apply(x, mask, 1.25, *ws)
    g = torch.randn_like(out)
    out.backward(g)
    x2 = x.detach().clone().requires_grad_()
    ws2 = [w.detach().clone().requires_grad_() for w in ws]
    ref = torch.cat([_plain(x2, w, mask, 1.25) for w in ws2], dim=-1)
    ref.backward(g)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)
    for w, w2 in zip(ws, ws2, strict=True):
        torch.testing.assert_close(w.grad, w2.grad)
