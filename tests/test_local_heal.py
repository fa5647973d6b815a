"""Block-local healing at the cuts (compress/local_heal.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from compress.blocks import remove_blocks, share_blocks
from compress.local_heal import LocalHealConfig, local_heal
from tests.conftest import tiny_model
from tests.test_compress import tiny_dir, tokens  # noqa: F401  (tiny_dir: fixture)


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_local_healing_lowers_each_cuts_held_out_error(loss):
    dense = tiny_model(layers=6, hidden=64)
    pruned = remove_blocks(copy.deepcopy(dense), [2, 4])
    untouched = [p.clone() for p in pruned.model.layers[0].parameters()]
    model, report = local_heal(pruned, dense, tokens(n=24, seq=16),
                               LocalHealConfig(max_minutes=None, max_steps=60, pool=24, lr=3e-3, loss=loss))
    assert [c["depth"] for c in report.cuts] == [1, 2]
    for c in report.cuts:
        assert c["steps"] == 60 and c["eval_after"] < c["eval_before"]
    # only the blocks before the cuts train
    assert all(torch.equal(a, b) for a, b in zip(untouched, model.model.layers[0].parameters()))


def test_without_groups_shared_blocks_and_a_leading_cut_are_left_to_the_cure():
    dense = tiny_model(layers=6, hidden=64)
    pruned = share_blocks(remove_blocks(copy.deepcopy(dense), [0, 3]), [0, 1, 1, 2])
    _, report = local_heal(pruned, dense, tokens(n=16, seq=16), LocalHealConfig(max_steps=2, pool=16, groups=False))
    assert report.cuts == [] and report.groups == []
    assert [s["why"] for s in report.skipped] == ["no kept block before the cut", "depth 1 is shared"]


@pytest.mark.parametrize("rank", [None, 4])
def test_a_shared_group_trains_towards_each_depths_dense_block(rank):
    """Depths 1-2 share (source blocks 2 and 4, block 3 removed): the group's base, norms and
    deltas train so each depth reproduces its dense output; the cut after depth 1 is the group's."""
    from compress.delta import DeltaConfig, add_deltas

    dense = tiny_model(layers=6, hidden=64)
    model = remove_blocks(copy.deepcopy(dense), [0, 3])  # source depths [1, 2, 4, 5]
    own = {d: {n: p.detach().clone() for n, p in model.model.layers[d].named_parameters()} for d in (1, 2)}
    share_blocks(model, [0, 1, 1, 2])
    if rank:
        add_deltas(model, own, DeltaConfig(rank=rank))
    other = [p.clone() for p in model.model.layers[0].parameters()]
    _, report = local_heal(model, dense, tokens(n=24, seq=16),
                           LocalHealConfig(max_minutes=None, max_steps=40, pool=24, lr=3e-3))
    assert report.cuts == [] and [g["depths"] for g in report.groups] == [[1, 2]]
    group = report.groups[0]
    assert group["source_depths"] == [2, 4] and group["steps"] == 40
    assert group["eval_after"] < group["eval_before"]
    assert all(torch.equal(a, b) for a, b in zip(other, model.model.layers[0].parameters()))  # depth 0: neither
    layers = model.model.layers
    assert layers[1].mlp.up_proj.weight is layers[2].mlp.up_proj.weight  # still shared after training


def test_the_budget_bounds_the_whole_stage_captures_included():
    dense = tiny_model(layers=6, hidden=64)
    model = share_blocks(remove_blocks(copy.deepcopy(dense), [4]), [0, 1, 1, 2, 3])  # cut after depth 3
    _, report = local_heal(model, dense, tokens(n=24, seq=16), LocalHealConfig(max_minutes=0.04, pool=24))
    assert report.groups and report.cuts
    assert all(u["steps"] > 0 for u in report.groups + report.cuts)
    assert report.seconds <= 0.04 * 60 + 1.0  # a unit stops at its share of what is left; one step of slack


def test_bad_input_is_one_line():
    dense = tiny_model(layers=4)
    with pytest.raises(ValueError, match="nothing was removed or shared"):
        local_heal(copy.deepcopy(dense), dense, tokens(n=16, seq=16), LocalHealConfig(max_steps=1, pool=16))
    with pytest.raises(ValueError, match="needs at least 2 healing windows .*; got 1"):
        local_heal(remove_blocks(copy.deepcopy(dense), [1]), dense, tokens(n=1, seq=16), LocalHealConfig(max_steps=1))
    _, report = local_heal(remove_blocks(copy.deepcopy(dense), [1]), dense, tokens(n=8, seq=16), LocalHealConfig(max_steps=1))
    assert report.cuts[0]["steps"] == 1  # fewer windows than the pool: all of them, a quarter held back
    with pytest.raises(ValueError, match="unknown local healing loss 'l1'"):
        LocalHealConfig(loss="l1")
    with pytest.raises(ValueError, match="needs a budget"):
        LocalHealConfig(max_minutes=None)


def test_local_minutes_come_out_of_the_cures(tmp_path):
    from compress.heal import HealConfig
    from compress.recipe import CompressConfig

    cfg = CompressConfig(out=str(tmp_path / "o"), heal=HealConfig(max_minutes=20), local=LocalHealConfig(max_minutes=4))
    assert cfg.heal.max_minutes == 16
    with pytest.raises(ValueError, match="local healing's 4 min leave nothing of healing's 4 min"):
        CompressConfig(out=str(tmp_path / "o"), heal=HealConfig(max_minutes=4), local=LocalHealConfig(max_minutes=4))


def test_foldgpt_spends_a_fifth_of_a_timed_cure_on_local_healing_by_default(tmp_path):
    from compress.heal import HealConfig
    from compress.recipe import CompressConfig

    cfg = CompressConfig(out=str(tmp_path / "o"), heal=HealConfig(max_minutes=20))
    assert cfg.local.max_minutes == 4 and cfg.heal.max_minutes == 16
    assert CompressConfig(out=str(tmp_path / "o"), heal=HealConfig(max_minutes=20), local=None).local is None
    assert CompressConfig(out=str(tmp_path / "o"), heal=HealConfig(max_steps=5)).local is None  # no minutes to share
    assert CompressConfig(out=str(tmp_path / "o"), method="shortgpt").local is None


def test_nothing_to_heal_locally_is_said_and_the_minutes_go_back_to_the_cure(tmp_path, tiny_dir, capsys):
    import json

    from foldgpt.cli import main
    from tests.test_compress import compress_args

    args = compress_args(tmp_path, tiny_dir, "--removal-rate", "0", "--group-size", "1", "--heal-minutes", "0.05")
    i = args.index("--heal-steps")
    del args[i : i + 2]  # a cure in minutes, so the default local share applies
    assert main(args) == 0
    assert "nothing was removed or shared, so there is nothing to heal locally" in capsys.readouterr().out
    cure = json.loads((tmp_path / "folded.work" / "heal.json").read_text())["settings"]["heal"]
    assert cure["max_minutes"] == 0.05
    assert main(compress_args(tmp_path / "b", tiny_dir, "--local-loss", "cosine")) == 2  # needs --local-minutes


def test_compress_runs_the_local_stage_once_and_records_it(tmp_path, tiny_dir, monkeypatch):
    import json

    import compress.recipe as recipe
    from foldgpt.cli import main
    from tests.test_compress import compress_args

    args = compress_args(tmp_path, tiny_dir, "--group-size", "1", "--local-minutes", "0.02", "--heal-sequences", "64")
    assert main(args) == 0
    prov = json.loads((tmp_path / "folded" / "config.json").read_text())["fold"]["provenance"]
    assert prov["local_heal"]["cuts"] and all(c["steps"] > 0 for c in prov["local_heal"]["cuts"])
    assert (tmp_path / "folded.work" / "local" / "model.safetensors").is_file()
    monkeypatch.setattr(recipe, "local_heal", lambda *a, **k: pytest.fail("finished local stage was redone"))
    assert main(args + ["--resume", "--overwrite"]) == 0
