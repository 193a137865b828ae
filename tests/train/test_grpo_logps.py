"""GRPO's completion log-probs against a plain computation: the chunked head with a temperature equals
log_softmax(logits / T) and its autograd gradient (fp32 and bf16)."""

from __future__ import annotations

import pytest
import torch

from lorakit.train.objectives.logps import head_logps


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_head_logps_with_a_temperature_equals_log_softmax_and_autograd(dtype, tol, temperature):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g).to(dtype)
    w = torch.randn(50, 16, generator=g).to(dtype)
    y = torch.randint(0, 50, (37,), generator=g)
    up = torch.randn(37, generator=g)
    h1 = h.clone().requires_grad_()
    got = head_logps(h1, w, y, chunk_bytes=16 * 4 * 50, temperature=temperature)  # 16 rows a chunk: 3 chunks
    (got * up).sum().backward()
    h2 = h.clone().requires_grad_()
    ref = torch.log_softmax((h2 @ w.T).float() / temperature, dim=-1).gather(1, y[:, None]).squeeze(1)
    (ref * up).sum().backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(h1.grad.float(), h2.grad.float(), rtol=tol, atol=tol)
    with torch.no_grad():  # no gradient pass: the same values
        torch.testing.assert_close(head_logps(h, w, y, temperature=temperature), got.detach())
