"""SLEB (Song et al., arXiv 2402.09025): greedy block removal by calibration perplexity.

At each of `num_remove` steps every remaining block is left out in turn, the perplexity
of the calibration tokens is measured without it, and the block whose absence raises
it least is removed for good; the next step measures again on the shrunken model, so
redundancy between neighbours is seen. No training. Cost: about num_layers * num_remove
forward passes over the calibration sequences used (`max_sequences` bounds it); the
inputs of every depth are captured once per step, so leaving out depth d reruns only the
depths after it (about half a forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from compress.adapter import get_adapter
from compress.blocks import count_parameters, remove_blocks
from compress.capture import Replay, batches
from compress.methods import RemovalCount, param_summary, register_method


@dataclass
class SLEBConfig(RemovalCount):
    batch_size: int = 4
    max_sequences: int | None = None  # calibration sequences per perplexity (None: all)

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")


@torch.no_grad()
def calib_perplexity(model: nn.Module, data: list[torch.Tensor]) -> float:
    """exp(mean next-token NLL) over every predicted token of the batches."""
    nll, n = 0.0, 0
    for batch in data:
        k = batch.shape[0] * (batch.shape[1] - 1)
        nll += model(batch, labels=batch, use_cache=False).loss.item() * k
        n += k
    return math.exp(nll / n)


@torch.no_grad()
def _perplexity_without(replay: Replay, data: list[torch.Tensor], depth: int) -> float:
    """calib_perplexity of the replayed model with block `depth` left out."""
    nll, n = 0.0, 0
    for b, batch in enumerate(data):
        logits = replay.tail_logits(b, depth, skip=depth)
        nll += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
        n += batch[:, 1:].numel()
    return math.exp(nll / n)


@register_method("sleb", SLEBConfig)
def sleb(model: nn.Module, calib: torch.Tensor, cfg: SLEBConfig) -> tuple[nn.Module, dict]:
    """Remove `cfg.num_remove` blocks greedily; edits `model` in place. The report gives
    the removal order in source depths and every step's perplexity per candidate."""
    n = len(get_adapter(model).get_layers(model))
    cfg.check(n)
    data = batches(calib, cfg.batch_size, cfg.max_sequences)
    before = count_parameters(model)
    source = list(range(n))  # current depth -> source depth
    order, steps = [], []
    for _ in tqdm(range(cfg.num_remove), desc="SLEB steps"):
        replay = Replay(model, data)  # each candidate reruns only the depths after it
        ppl = {d: _perplexity_without(replay, data, d) for d in range(len(source))}
        best = min(ppl, key=ppl.get)
        steps.append({"perplexity": {str(source[d]): round(v, 4) for d, v in ppl.items()}, "removed": source[best]})
        order.append(source.pop(best))
        remove_blocks(model, [best])
    report = {"order": order, "removed": sorted(order), "steps": steps,
              "final_perplexity": calib_perplexity(model, data),
              "params": param_summary(before, count_parameters(model), len(order), n)}
    return model, report
