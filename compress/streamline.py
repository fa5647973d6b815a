"""LLM-Streamline (Chen et al., arXiv 2403.19135): replace the most redundant run of
blocks by one trained block.

1. choose   for every run of `span` consecutive blocks, the mean over calibration
            tokens of cos(state entering its first block, state leaving its last);
            the run with the highest similarity is the one the model least needs
2. train    a replacement initialised from the run's first block learns to map the
            run's input state to its output state (MSE), with the rest of the model
            frozen; both states come from the dense model, batch by batch
            (`compress.capture.block_io` runs it only up to the run's end), so no
            hidden state of the data set is ever held in memory
3. replace  the run's first block takes the trained weights and the other span - 1
            blocks are removed, so the result is an ordinary shallower model

The replacement is a full decoder block (the paper's "layer" replacement). Not
implemented: the paper's FFN replacement (a depth without attention, which the folded
format and the exporters do not model) and its optional LM-loss training; step 2
trains the MSE objective only.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from compress.adapter import get_adapter
from compress.blocks import count_parameters, remove_blocks
from compress.capture import batches, block_io, token_cosine
from compress.methods import param_summary, register_method
from compress.parallel import any_process, average_gradients, own_rows, world
from compress.registry import enum_choice


class Replacement(str, Enum):
    LAYER = "layer"  # one decoder block, initialised from the span's first


@dataclass
class StreamlineConfig:
    span: int | None = None  # blocks replaced; None: the recipe's removal count + 1 (that many blocks go)
    replacement: Replacement = Replacement.LAYER
    batch_size: int = 4
    max_sequences: int | None = None  # calibration sequences for choosing the span (None: all)
    train_steps: int | None = 200  # replacement training budget: steps and/or minutes, whichever ends first
    train_minutes: float | None = None
    lr: float = 1e-4
    eval_batches: int = 2  # batches the report's before/after MSE is measured on
    seed: int = 0

    def __post_init__(self):
        self.replacement = enum_choice(Replacement, self.replacement, "replacement")
        if self.span is not None and self.span < 1:
            raise ValueError(f"span must be >= 1, got {self.span}")
        if self.train_steps is None and self.train_minutes is None:
            raise ValueError("the replacement needs a training budget: train_steps or train_minutes")
        for name in ("train_steps", "train_minutes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.batch_size < 1 or self.eval_batches < 1:
            raise ValueError("batch_size and eval_batches must be positive")

    def resolved(self, num_remove: int) -> "StreamlineConfig":
        return self if self.span is not None else replace(self, span=num_remove + 1)

    def check(self, num_layers: int) -> None:
        if self.span is None:
            raise ValueError("span is not set (give it, or a removal_rate)")
        if self.span > num_layers:
            raise ValueError(f"span {self.span} is longer than the model's {num_layers} blocks")


def span_similarity(model: nn.Module, calib: torch.Tensor, span: int, batch_size: int = 4,
                    max_sequences: int | None = None) -> list[float]:
    """Mean token cosine between the state entering block s and the state leaving
    block s + span - 1, for every start s."""
    n = len(get_adapter(model).get_layers(model))
    starts = range(n - span + 1)
    total, count = torch.zeros(len(starts), dtype=torch.float64), 0
    for batch in tqdm(batches(calib, batch_size, max_sequences), desc="span similarity", leave=False):
        io = block_io(model, batch, inputs=starts, outputs=[s + span - 1 for s in starts])
        for s in starts:
            total[s] += token_cosine(io.inputs[s], io.outputs[s + span - 1]).double().sum()
        count += batch.numel()
    return (total / count).tolist()


def _call(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def span_mse(model: nn.Module, block: nn.Module | None, data: list[torch.Tensor], start: int, span: int) -> float:
    """MSE between the span's output and `block` applied to its input (None: the input itself)."""
    total = 0.0
    with torch.no_grad():
        for batch in data:
            io = block_io(model, batch, inputs=[start], outputs=[start + span - 1], kwargs=[start])
            x = io.inputs[start]
            pred = x if block is None else _call(block, x, io.kwargs[start])
            total += F.mse_loss(pred.float(), io.outputs[start + span - 1].float()).item()
    return total / len(data)


def train_replacement(model: nn.Module, calib: torch.Tensor, start: int, cfg: StreamlineConfig) -> tuple[nn.Module, dict]:
    """A copy of block `start` trained to map the span's input state to its output state
    (MSE); `model` is only read. Under several processes each trains on its rows of every
    batch, gradients averaged (compress.parallel). Returns (trained block, training log)."""
    block = copy.deepcopy(get_adapter(model).get_layers(model)[start]).train()
    for p in block.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(block.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    end, losses, t0, step = start + cfg.span - 1, [], time.monotonic(), 0
    rows = own_rows(min(cfg.batch_size, len(calib)), "Streamline's replacement training")

    def budget_left() -> bool:
        return ((cfg.train_steps is None or step < cfg.train_steps)
                and not any_process(cfg.train_minutes is not None and time.monotonic() - t0 >= cfg.train_minutes * 60))

    bar = tqdm(total=cfg.train_steps, desc="training the replacement", unit="step", disable=world()[0] != 0)
    while budget_left():
        idx = torch.randint(len(calib), (min(cfg.batch_size, len(calib)),), generator=gen)[rows]
        io = block_io(model, calib[idx], inputs=[start], outputs=[end], kwargs=[start])
        loss = F.mse_loss(_call(block, io.inputs[start], io.kwargs[start]).float(), io.outputs[end].float())
        if cfg.train_steps:  # cosine decay over the step budget
            for g in opt.param_groups:
                g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.train_steps))
        opt.zero_grad()
        loss.backward()
        average_gradients(list(block.parameters()))
        opt.step()
        step += 1
        losses.append(round(loss.item(), 6))
        bar.update(1)
        bar.set_postfix(mse=f"{loss.item():.4g}")
    bar.close()
    block.eval().requires_grad_(False)
    return block, {"steps": step, "seconds": round(time.monotonic() - t0, 1), "losses": losses}


@register_method("streamline", StreamlineConfig)
def streamline(model: nn.Module, calib: torch.Tensor, cfg: StreamlineConfig) -> tuple[nn.Module, dict]:
    """Replace the most similar span of `cfg.span` blocks by one trained block; edits `model` in place."""
    layers = get_adapter(model).get_layers(model)
    n = len(layers)
    cfg.check(n)
    before = count_parameters(model)
    similarity = span_similarity(model, calib, cfg.span, cfg.batch_size, cfg.max_sequences)
    start = max(range(len(similarity)), key=lambda s: similarity[s])
    held = batches(calib, cfg.batch_size)[: cfg.eval_batches]
    mse = {"identity": span_mse(model, None, held, start, cfg.span),
           "init": span_mse(model, layers[start], held, start, cfg.span)}
    block, log = train_replacement(model, calib, start, cfg)
    mse["trained"] = span_mse(model, block, held, start, cfg.span)
    with torch.no_grad():
        for name, p in layers[start].named_parameters():
            p.copy_(block.get_parameter(name))
    removed = list(range(start + 1, start + cfg.span))
    if removed:
        remove_blocks(model, removed)
    report = {"span": [start, start + cfg.span - 1], "removed": removed, "replacement": cfg.replacement.value,
              "similarity": [round(s, 6) for s in similarity], "mse": mse, "training": log,
              "params": param_summary(before, count_parameters(model), len(removed), n)}
    return model, report
