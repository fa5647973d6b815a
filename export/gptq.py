"""GPTQ (Frantar et al., arXiv 2210.17323): 4-bit weights chosen against calibration inputs.

Round to nearest minimises each weight's own error; GPTQ minimises the layer's output error
||X W^T - X Q^T|| on calibration activations X, rounding one input column at a time and
moving the error it made onto the columns not yet rounded (through the inverse Hessian
H = X^T X). Groups of `group_size` take the symmetric round-to-nearest scale of their
(already updated) columns, max|w| / 7.5, as the exporters' rtn does, so the result is a
weight *on* a symmetric 4-bit grid: `export.grid.centered_grid` reads it back, and both
exporters then store it exactly, with no second rounding.

A shared weight (one block at several depths) gets one Hessian summed over every depth that
reads it, so it is rounded once for all of them. The Hessians come from the fp32 model
(torchao's GPTQ default too); torchao's own GPTQ runs only on CUDA, hence this one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm import tqdm

BLOCK = 128  # columns rounded together before the lazy update of the rest (the paper's B)


def hessians(model: nn.Module, linears: list[nn.Linear], windows: Sequence[Sequence[int]]) -> dict[int, torch.Tensor]:
    """2 X^T X / n per weight (by id), X: the inputs every Linear sharing it saw on `windows`."""
    from export.smooth import calibrate

    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def update(module, x):
        key, x = id(module.weight), x.double()
        sums[key] = sums.get(key, 0) + x.T @ x
        counts[key] = counts.get(key, 0) + x.shape[0]

    calibrate(model, linears, windows, update, "gptq: calibration")
    return {k: (2 * v / counts[k]).float() for k, v in sums.items()}


def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, group_size: int = 32, damp: float = 0.01) -> torch.Tensor:
    """The GPTQ-rounded weight (N, K), dequantized: every group of `group_size` is scale * q,
    q in [-8, 7]. `damp` (a fraction of the mean diagonal) keeps H invertible."""
    w = weight.detach().float().clone()
    n, k = w.shape
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(k)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q_all = torch.zeros_like(w)
    scale = None
    block = max(BLOCK, group_size)  # a multiple of the (power-of-two) group: no group straddles two blocks
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:  # the group's scale, from its columns as updated so far
                scale = (w1[:, i:i + group_size].abs().amax(1) / 7.5).clamp_min(1e-12)
            q = torch.clamp(torch.round(w1[:, i] / scale), -8, 7) * scale
            q_all[:, col] = q
            e = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q_all


def gptq_(model: nn.Module, windows: Sequence[Sequence[int]], group_size: int = 32, skip: set[int] = frozenset()) -> int:
    """Put every decoder Linear weight (once per shared weight; not the head, not ids in `skip`,
    not a weight already on a symmetric grid) on its GPTQ 4-bit grid, in place. Returns the
    number of weights rounded."""
    from export.grid import centered_grid

    head = model.get_output_embeddings()
    groups: dict[int, nn.Linear] = {}
    for m in model.modules():
        if isinstance(m, nn.Linear) and m is not head and id(m.weight) not in skip and m.in_features % group_size == 0:
            groups.setdefault(id(m.weight), m)
    todo = {key: m for key, m in groups.items() if centered_grid(m.weight, group_size) is None}
    if not todo:  # e.g. a model still on its source grid: no calibration pass at all
        return 0
    readers = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) in todo]
    hs = hessians(model, readers, windows)
    with torch.no_grad():
        for key, m in tqdm(todo.items(), desc="gptq: rounding", unit="weight", leave=False):
            m.weight.copy_(gptq_weight(m.weight, hs.pop(key), group_size))
    return len(todo)
