"""ShortGPT (Men et al., arXiv 2403.03853): remove the blocks that change their input least.

Block Influence of block i on calibration data,

    BI_i = 1 - mean over tokens of cos(x_i, x_{i+1})     x_i: hidden state entering block i

and the `num_remove` blocks of lowest BI are deleted in one shot. No training: the
paper reports the pruned model as is (a healing run can still be asked for in the recipe).
All blocks are scored on the dense model once; scores are not refreshed after removal,
as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.adapter import get_adapter
from compress.blocks import count_parameters, remove_blocks
from compress.capture import batches, block_io, token_cosine
from compress.methods import RemovalCount, param_summary, register_method


@dataclass
class ShortGPTConfig(RemovalCount):
    batch_size: int = 4
    max_sequences: int | None = None  # calibration sequences scored (None: all)

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")


def block_influence(model: nn.Module, calib: torch.Tensor, batch_size: int = 4,
                    max_sequences: int | None = None) -> list[float]:
    """BI of every block, averaged over all calibration tokens."""
    n = len(get_adapter(model).get_layers(model))
    depths = range(n)
    total, count = torch.zeros(n, dtype=torch.float64), 0
    for batch in tqdm(batches(calib, batch_size, max_sequences), desc="block influence", leave=False):
        io = block_io(model, batch, inputs=depths, outputs=depths)
        for d in depths:
            total[d] += token_cosine(io.inputs[d], io.outputs[d]).double().sum()
        count += batch.numel()
    return (1 - total / count).tolist()


@register_method("shortgpt", ShortGPTConfig)
def shortgpt(model: nn.Module, calib: torch.Tensor, cfg: ShortGPTConfig) -> tuple[nn.Module, dict]:
    """Delete the `cfg.num_remove` blocks of lowest Block Influence; edits `model` in place."""
    n = len(get_adapter(model).get_layers(model))
    cfg.check(n)
    before = count_parameters(model)
    bi = block_influence(model, calib, cfg.batch_size, cfg.max_sequences)
    removed = sorted(sorted(range(n), key=lambda d: bi[d])[: cfg.num_remove])
    if removed:
        remove_blocks(model, removed)
    report = {"block_influence": [round(b, 6) for b in bi], "removed": removed,
              "params": param_summary(before, count_parameters(model), len(removed), n)}
    return model, report
