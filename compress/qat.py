"""Quantization-aware healing: the decoder's weights trained through the exporters' 4-bit grid.

Both exporters round each shared Linear weight to symmetric 4-bit groups (ExecuTorch
8da4w, ONNX int4; `export.quantize.int4_weights`), and on the default model that rounding
alone costs about a third in perplexity (benchmarks/results/export_size_executorch.md).
A healing run that runs its forward pass on the rounded weights (straight-through gradients to
the fp32 ones, as in torchao's QAT and ExecuTorch's Llama QAT recipe) heals the fold and
its rounding together. The saved model stays fp32; at export, the same rounding of the
same weights gives the 4-bit values and scales healing's last forward used (`rtn` scales;
ExecuTorch's XNNPACK then stores the scales in bf16).

The fake quantizer is torchao's `IntxFakeQuantizer` with the scheme torchao's 8da4w
config uses (int4, symmetric, per group), attached as a parametrization of each unique
weight: a shared block is rounded once per step, its sharing untouched. The tied
embedding / head is not rounded (the head is frozen in healing; the exports keep it in
fp32 or 8 bits).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.adapter import get_adapter

QAT_BITS = (4,)


def check_bits(bits: int) -> None:
    if bits not in QAT_BITS:
        raise ValueError(f"qat_bits must be one of {QAT_BITS} (the exporters' grouped weights), got {bits}")


def fake_quantizer(bits: int, group_size: int) -> nn.Module:
    """w -> the weight its export holds (int4 symmetric groups of `group_size`), straight-through."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    check_bits(bits)
    return IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int4, group_size=group_size, is_symmetric=True))


def check_widths(model: nn.Module, group_size: int) -> None:
    """One-line ValueError, before any training, for a decoder Linear whose width does not split into groups."""
    for layer in get_adapter(model).get_layers(model):
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear) and mod.in_features % group_size:
                raise ValueError(f"qat: {name} has input width {mod.in_features}, not a multiple of group size {group_size}")


def add_fake_quant(model: nn.Module, bits: int, group_size: int) -> int:
    """Parametrize every decoder Linear's weight by the fake quantizer (one per unique weight);
    returns how many unique weights it rounds."""
    check_widths(model, group_size)
    by_weight: dict[int, nn.Module] = {}
    for layer in get_adapter(model).get_layers(model):
        for mod in layer.modules():
            if isinstance(mod, nn.Linear):
                w = mod.weight
                if id(w) not in by_weight:
                    by_weight[id(w)] = fake_quantizer(bits, group_size)
                parametrize.register_parametrization(mod, "weight", by_weight[id(w)], unsafe=True)
    return len(by_weight)


def remove_fake_quant(model: nn.Module) -> None:
    """Back to plain fp32 weights (the un-rounded originals, still shared)."""
    for layer in get_adapter(model).get_layers(model):
        for mod in layer.modules():
            if isinstance(mod, nn.Linear) and parametrize.is_parametrized(mod, "weight"):
                parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
