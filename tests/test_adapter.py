import pytest
import torch

from compress.adapter import ADAPTERS, get_adapter
from tests.conftest import FAMILIES, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_stack_norms_embedding_and_head(family):
    model = tiny_model(family, layers=3)
    adapter = get_adapter(model)
    layers = adapter.get_layers(model)
    assert len(layers) == 3
    assert adapter.get_embed(model).weight.shape == (99, 32)
    assert adapter.get_lm_head(model).weight.shape == (99, 32)
    assert adapter.get_final_norm(model).weight.shape == (32,)
    per_depth = adapter.per_depth_param_names(layers[0])
    shared = adapter.shared_param_names(layers[0])
    assert "input_layernorm.weight" in per_depth and "post_attention_layernorm.weight" in per_depth
    assert all("norm" in n for n in per_depth)
    assert not any("norm" in n for n in shared)
    # every parameter of the block is either shared or per-depth, never both
    names = {n for n, _ in layers[0].named_parameters()}
    assert names == set(per_depth) | set(shared) and not set(per_depth) & set(shared)
    # the large tensors are shared: the per-depth ones are a tiny fraction of the block
    numel = dict((n, p.numel()) for n, p in layers[0].named_parameters())
    assert sum(numel[n] for n in per_depth) < 0.05 * sum(numel.values())


def test_qwen3_head_norms_are_per_depth():
    layer = get_adapter(tiny_model("qwen3")).get_layers(tiny_model("qwen3"))[0]
    assert {"self_attn.q_norm.weight", "self_attn.k_norm.weight"} <= set(get_adapter(tiny_model("qwen3")).per_depth_param_names(layer))


def test_unknown_architecture_names_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'") as err:
        get_adapter(model)
    for family in ADAPTERS:
        assert family in str(err.value)


def test_families_run_forward():
    for family in FAMILIES:
        out = tiny_model(family)(torch.tensor([[1, 5, 7]])).logits
        assert out.shape == (1, 3, 99) and torch.isfinite(out).all()
