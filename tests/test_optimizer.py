"""common/training.adamw: torch's fused AdamW is the per-tensor AdamW the reference scripts use, up to
float rounding, on parameter groups (train_emotion.py) and plain lists (train_dreambooth.py) alike."""
from __future__ import annotations

import torch

from common.training import adamw


def test_fused_adamw_follows_the_per_tensor_loop():
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32,), (3, 3, 8, 8), (7,)]
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) * 10 ** -k for s in shapes] for k in range(20)]   # small and large

    def train(make):
        params = [p.clone().requires_grad_() for p in start]
        optimizer = make(params)
        for step in grads:
            for p, grad in zip(params, step):
                p.grad = grad.clone()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return params, optimizer

    hyper = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=1e-2, eps=1e-8)
    plain, _ = train(lambda ps: torch.optim.AdamW(ps, foreach=False, **hyper))
    ours, optimizer = train(lambda ps: adamw(ps, **hyper))
    grouped, _ = train(lambda ps: adamw([{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}], **hyper))
    reference, _ = train(lambda ps: torch.optim.AdamW([{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}],
                                                      foreach=False, **hyper))
    assert optimizer.defaults["fused"]
    for a, b in [*zip(plain, ours), *zip(reference, grouped)]:
        assert (a - b).abs().max().item() <= 1e-6
    assert not torch.equal(plain[0], start[0])
