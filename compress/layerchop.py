"""LayerChop (Jha et al., arXiv 2305.14864): delete a fixed set of blocks, then continue
pretraining every remaining weight with the plain language-modelling loss.

The blocks are chosen by position alone, never by measurement, keeping the first and
the last block:

    last    the `num_remove` blocks just before the final block (the paper's default)
    middle  a run centred between the first and the last block
    first   the run right after the first block

The continued pretraining is the recipe's heal stage with this method's healing:
`compress.heal` with distill="none" and train_embeddings=True (no teacher, no LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from compress.adapter import get_adapter
from compress.blocks import count_parameters, remove_blocks
from compress.methods import DEFAULT_HEAL_MINUTES, RemovalCount, param_summary, register_method
from compress.registry import enum_choice


class Placement(str, Enum):
    LAST = "last"
    MIDDLE = "middle"
    FIRST = "first"


@dataclass
class LayerChopConfig(RemovalCount):
    placement: Placement = Placement.LAST

    def __post_init__(self):
        self.placement = enum_choice(Placement, self.placement, "placement")
        super().__post_init__()

    def check(self, num_layers: int) -> None:
        if self.num_remove is None:
            raise ValueError("num_remove is not set (give it, or a removal_rate)")
        if self.num_remove > max(0, num_layers - 2):
            raise ValueError(f"layerchop keeps the first and last of {num_layers} blocks, "
                             f"so it removes at most {max(0, num_layers - 2)}, not {self.num_remove}")


def chosen_depths(num_layers: int, num_remove: int, placement: Placement) -> list[int]:
    """The depths LayerChop removes; the first (0) and last (num_layers - 1) never are."""
    if placement is Placement.LAST:
        start = num_layers - 1 - num_remove
    elif placement is Placement.MIDDLE:
        start = 1 + (num_layers - 2 - num_remove) // 2
    else:
        start = 1
    return list(range(start, start + num_remove))


@register_method("layerchop", LayerChopConfig, heal_minutes=DEFAULT_HEAL_MINUTES,
                 heal_style={"distill": "none", "train_embeddings": True})
def layerchop(model: nn.Module, calib: torch.Tensor, cfg: LayerChopConfig) -> tuple[nn.Module, dict]:
    """Delete the blocks `cfg.placement` names; edits `model` in place. `calib` is unused:
    the choice is positional."""
    n = len(get_adapter(model).get_layers(model))
    cfg.check(n)
    before = count_parameters(model)
    removed = chosen_depths(n, cfg.num_remove, cfg.placement)
    if removed:
        remove_blocks(model, removed)
    return model, {"placement": cfg.placement.value, "removed": removed,
                   "params": param_summary(before, count_parameters(model), len(removed), n)}
