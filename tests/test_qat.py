"""The quantization-aware cure on tiny models: the exporters' grid, sharing kept, and what it buys."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compress.blocks import share_blocks
from compress.heal import HealConfig, _step, heal
from compress.qat import add_fake_quant, remove_fake_quant
from export.quantize import int4_weights
from tests.conftest import tiny_model


def tokens(n=16, seq=32, vocab=99, seed=0):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def rounded(w: torch.Tensor, group: int = 32) -> torch.Tensor:
    """What an 8da4w / ONNX int4 export stores for `w`, dequantized."""
    q, s = int4_weights(w, group)
    return (q.float().reshape(q.shape[0], -1, group) * s[..., None]).reshape(q.shape)


def decoder_linears(model) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)}


def test_fake_quant_is_the_exporters_grid_and_keeps_sharing():
    model = tiny_model(layers=4, hidden=64)
    share_blocks(model, [0, 0, 1, 1])
    originals = {n: m.weight for n, m in decoder_linears(model).items()}
    assert add_fake_quant(model, 4, 32) == len({id(w) for w in originals.values()}) == 14
    for name, m in decoder_linears(model).items():
        torch.testing.assert_close(m.weight, rounded(originals[name]), rtol=0, atol=1e-7)
    remove_fake_quant(model)
    layers = model.model.layers
    for name, m in decoder_linears(model).items():
        assert m.weight is originals[name]  # the un-rounded fp32 Parameter, not a copy
    assert layers[0].mlp.up_proj.weight is layers[1].mlp.up_proj.weight


def test_qat_cure_leaves_less_to_lose_at_export(tmp_path):
    """Student = the teacher, so an fp32 cure has nothing to learn and everything an export
    loses is the rounding: the cure through the rounded weights cuts that loss (distance to
    the teacher's final hidden state, every decoder weight rounded as the exporters do)."""
    teacher = tiny_model(layers=4, hidden=64)
    data = tokens()
    cfg = HealConfig(max_steps=30, lr=1e-4, warmup_steps=1, ce_weight=0.0, qat_bits=4, teacher_cache_mb=0)

    def exported_loss(model) -> float:
        model = copy.deepcopy(model)
        with torch.no_grad():
            for m in {id(m.weight): m for m in decoder_linears(model).values()}.values():
                m.weight.copy_(rounded(m.weight))
            return _step(model, teacher, data, cfg)["loss"].item()

    student, _ = heal(copy.deepcopy(teacher), teacher, data, cfg, tmp_path)
    assert not any(hasattr(m, "parametrizations") for m in student.modules())
    assert exported_loss(student) < 0.5 * exported_loss(teacher)


@pytest.mark.parametrize("kwargs, match", [
    (dict(qat_bits=3), "qat_bits must be one of"),
    (dict(qat_bits=4, lora_rank=4), "qat_bits with lora_rank"),
    (dict(qat_bits=4, qat_group_size=0), "qat_group_size must be positive"),
])
def test_qat_bad_settings_are_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HealConfig(max_steps=1, **kwargs)


def test_qat_width_not_in_groups_fails_before_training(tmp_path):
    teacher = tiny_model(layers=2, hidden=48)  # 48 does not split into groups of 32
    with pytest.raises(ValueError, match="not a multiple of group size 32"):
        heal(copy.deepcopy(teacher), teacher, tokens(), HealConfig(max_steps=1, qat_bits=4), tmp_path)
    assert not (tmp_path / "checkpoint").exists()
