"""FSDP units that keep a folded model's shared weights in one unit (compress.parallel), in one
process over gloo; the 2-process cures are in test_distributed.py."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin

from compress.blocks import share_blocks
from compress.heal import HealConfig
from compress.parallel import block_units, check_wrap, full_state, gather, shard_folded, skeleton, wrap_policy
from tests.conftest import tiny_model


@pytest.fixture
def one_process_group():
    store = dist.HashStore()
    dist.init_process_group("gloo", rank=0, world_size=1, store=store)
    yield
    dist.destroy_process_group()


def folded():
    model = tiny_model(layers=4, hidden=64, vocab=99)  # tied embedding and head
    return share_blocks(model, [0, 1, 1, 2])


def test_units_are_physical_blocks():
    assert block_units(folded()) == [[0], [1, 2], [3]]


def test_a_wrap_policy_that_splits_a_shared_block_is_one_line():
    splitting = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                               transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
    assert wrap_policy(splitting) == "TRANSFORMER_BASED_WRAP"
    assert wrap_policy(FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="no_wrap")) is None
    with pytest.raises(ValueError, match=r"depths \[1, 2\] of one shared block .* NO_WRAP") as err:
        check_wrap(folded(), wrap_policy(splitting))
    assert "\n" not in str(err.value)
    check_wrap(folded(), None)
    check_wrap(tiny_model(layers=4, hidden=64, vocab=99), "TRANSFORMER_BASED_WRAP")  # nothing shared: nothing split


def test_fsdp_settings_are_checked():
    with pytest.raises(ValueError, match="parallelism"):
        HealConfig(max_steps=1, parallel="zero3")
    with pytest.raises(ValueError, match="fsdp"):
        HealConfig(max_steps=1, parallel="fsdp", lora_rank=4)


def test_one_unit_per_block_then_gathered_back_unchanged(one_process_group):
    from torch.distributed.fsdp import fully_shard

    model = folded()
    ref = copy.deepcopy(model)
    x = torch.randint(3, 99, (2, 8))
    shell = skeleton(model)
    shard_folded(model, torch.device("cpu"))
    layers = model.model.layers
    unit = [layers[d]._get_fsdp_state()._fsdp_param_group for d in range(4)]
    assert unit[1] is unit[2] and len({id(u) for u in unit}) == 3
    assert layers[1].mlp.up_proj.weight is layers[2].mlp.up_proj.weight  # one sharded Parameter, two depths
    weights, _ = full_state(model)
    assert torch.equal(weights["model.layers.2.mlp.up_proj.weight"], ref.model.layers[2].mlp.up_proj.weight)
    back = gather(model, shell)
    assert back.model.layers[1].mlp.up_proj.weight is back.model.layers[2].mlp.up_proj.weight
    assert back.model.layers[1].input_layernorm.weight is not back.model.layers[2].input_layernorm.weight
    assert back.lm_head.weight is back.model.embed_tokens.weight
    torch.testing.assert_close(back(x).logits, ref(x).logits, rtol=0, atol=0)
    # what the units avoid: a unit per depth puts the shared Parameter into two
    per_depth = folded()
    for layer in per_depth.model.layers:
        fully_shard(layer)
    fully_shard(per_depth)
    with pytest.raises(ValueError, match="already managed by another FSDP group"):
        per_depth(x)  # FSDP checks at its lazy init, in the first forward


def test_the_shipped_fsdp_config_is_accepted_and_a_per_layer_one_refused():
    import yaml

    from compress import parallel

    configs = Path(parallel.__file__).parent / "accelerate_configs"
    fsdp = yaml.safe_load((configs / "gpu_fsdp.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy=fsdp["fsdp_config"]["fsdp_auto_wrap_policy"].lower())
    check_wrap(folded(), wrap_policy(plugin))
    assert yaml.safe_load((configs / "gpu_ddp.yaml").read_text())["distributed_type"] == "MULTI_GPU"
