import pytest
import torch

from compress.adapter import get_adapter
from compress.blocks import count_parameters, remove_blocks, schedule_of, share_blocks
from tests.conftest import tiny_model


def test_share_blocks_ties_large_weights_and_keeps_norms_per_depth(llama):
    before = count_parameters(llama)
    share_blocks(llama, [0, 0, 1, 1])
    layers = get_adapter(llama).get_layers(llama)
    assert layers[0].self_attn.q_proj.weight is layers[1].self_attn.q_proj.weight
    assert layers[0].mlp.down_proj.weight is layers[1].mlp.down_proj.weight
    assert layers[1].mlp.down_proj.weight is not layers[2].mlp.down_proj.weight
    assert layers[0].input_layernorm.weight is not layers[1].input_layernorm.weight
    assert not torch.equal(layers[0].input_layernorm.weight, layers[1].input_layernorm.weight)
    assert schedule_of(llama) == [0, 0, 1, 1]
    after = count_parameters(llama)
    norm = 2 * 32  # two RMSNorm weights per block stay per depth
    block = before.per_block[0]
    assert after.effective == before.effective
    assert after.unique == before.unique - 2 * (block - norm)
    assert after.per_block == [block + norm, block + norm]


def test_share_blocks_uses_requested_source_depth(llama):
    layers = get_adapter(llama).get_layers(llama)
    w1 = layers[1].mlp.up_proj.weight.detach().clone()
    share_blocks(llama, [0, 0, 1, 2], sources={0: 1})
    assert torch.equal(layers[0].mlp.up_proj.weight, w1)


def test_shared_depths_keep_own_cache_slot(llama):
    share_blocks(llama, [0, 0, 0, 0])
    idx = [layer.self_attn.layer_idx for layer in get_adapter(llama).get_layers(llama)]
    assert idx == [0, 1, 2, 3]


def test_remove_blocks_restores_invariants():
    types = ["full_attention", "sliding_attention"] * 3
    model = tiny_model("qwen2", layers=6, layer_types=types, use_sliding_window=True, sliding_window=2)
    remove_blocks(model, [1, 4])
    layers = get_adapter(model).get_layers(model)
    assert len(layers) == 4 and model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]
    assert model.config.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    remove_blocks(model, [0])  # numbering of a second removal is in current depths
    assert model.config.fold["provenance"]["removed_blocks"] == [0, 1, 4]
    assert model.config.fold["provenance"]["source_depths"] == [2, 3, 5]
    out = model(torch.tensor([[3, 4, 5]]))
    assert out.logits.shape == (1, 3, 99)


@pytest.mark.parametrize("bad", [[4], [-1], [0, 1, 2, 3]])
def test_remove_blocks_rejects_bad_depths(llama, bad):
    with pytest.raises(ValueError):
        remove_blocks(llama, bad)


def test_partial_sharing_is_not_a_folded_model(llama):
    layers = get_adapter(llama).get_layers(llama)
    layers[1].self_attn.q_proj.weight = layers[0].self_attn.q_proj.weight
    with pytest.raises(ValueError, match="shares only part"):
        schedule_of(llama)


@pytest.mark.parametrize("schedule", [[0, 0, 2, 2], [0, 1, 1], [0, -1, 1, 1]])
def test_bad_schedule(llama, schedule):
    with pytest.raises(ValueError):
        share_blocks(llama, schedule)
