"""Removal chosen by measurement (compress/select.py)."""

from __future__ import annotations

import copy

import pytest
import torch

import compress.select as select
from compress.blocks import remove_blocks
from compress.fold import FoldConfig, fold
from compress.importance import GateConfig, GateResult, learn_gates
from compress.repair import RepairConfig
from compress.select import Candidate, SelectConfig, choose_removal, held_back_kl
from tests.conftest import tiny_model
from tests.test_compress import identity_blocks, tokens


def gates_closing(blocks):
    return lambda model, data, cfg: GateResult(gates=[], closed=list(blocks), separated=True)


def test_the_lowest_held_back_kl_wins_where_the_gates_choose_otherwise(monkeypatch):
    model = tiny_model(layers=6, hidden=64)
    identity_blocks(model, [2, 3])  # removing these changes nothing
    monkeypatch.setattr(select, "learn_gates", gates_closing([0, 5]))
    calib = tokens(n=12, seq=16)
    chosen = choose_removal(model, calib, 2, SelectConfig(candidates="gates,block_influence", held_back=4))
    assert chosen.winner == "block_influence" and chosen.removed == [2, 3]
    assert chosen.table["block_influence"]["kl"] == pytest.approx(0, abs=1e-9)
    assert chosen.table["gates"]["removed"] == [0, 5] and chosen.table["gates"]["kl"] > 1e-4
    # the score is the KL on the held-back windows, recomputed here from scratch
    held = [calib[-4:]]
    assert chosen.table["gates"]["kl"] == pytest.approx(
        held_back_kl(model, remove_blocks(copy.deepcopy(model), [0, 5]), held), rel=1e-4)


def test_proposals_never_see_the_held_back_windows(monkeypatch):
    seen = []

    def spy(model, data, cfg):
        seen.append(data)
        return GateResult(gates=[], closed=[1], separated=True)

    monkeypatch.setattr(select, "learn_gates", spy)
    calib = tokens(n=10, seq=16)
    choose_removal(tiny_model(layers=4), calib, 1, SelectConfig(candidates="gates,span", held_back=3))
    assert torch.equal(seen[0], calib[:7])


def test_every_candidate_proposes_a_set_of_the_right_size():
    model = tiny_model(layers=6, hidden=64)
    chosen = choose_removal(model, tokens(n=12, seq=16), 2,
                            SelectConfig(held_back=4, sleb_sequences=4), GateConfig(steps=5),
                            RepairConfig())
    assert set(chosen.table) == {c.value for c in Candidate}
    for row in chosen.table.values():
        assert len(row["removed"]) == 2 and row["kl"] >= 0 and row["propose_s"] >= 0
    assert chosen.table["span"]["removed"][1] == chosen.table["span"]["removed"][0] + 1
    assert chosen.removed == chosen.table[chosen.winner]["removed"]


def test_gates_start_from_the_given_logits():
    model = tiny_model(layers=5)
    init = (3.0, -3.0, 3.0, 3.0, 3.0)
    result = learn_gates(model, tokens(n=4, seq=16), GateConfig(num_remove=1, steps=1, lr=1e-3, init=init))
    assert result.closed == [1]
    with pytest.raises(ValueError, match="gate init has 2 logits for 5 blocks"):
        learn_gates(model, tokens(n=4, seq=16), GateConfig(num_remove=1, steps=1, init=(1.0, 2.0)))


def test_fold_records_the_selection_and_the_repair(monkeypatch):
    from tests.test_peers import own_text

    model = tiny_model(layers=6, hidden=64)
    monkeypatch.setattr(select, "learn_gates", gates_closing([2, 4]))
    _, report = fold(model, own_text(model, n=72, seq=24), FoldConfig(
        removal_rate=1 / 3, group_size=None, select=SelectConfig(candidates="gates"), repair=RepairConfig()))
    row = report.selection["candidates"]["gates"]
    assert report.selection["winner"] == "gates" and report.removed == [2, 4]
    assert report.selection["repaired"] and row["kl_repaired"] < row["kl"]
    assert [c["depth"] for c in report.repair["cuts"]] == [1, 2]


def test_one_candidate_is_still_scored_unless_nothing_is_held_back(monkeypatch):
    monkeypatch.setattr(select, "learn_gates", gates_closing([1]))
    model, calib = tiny_model(layers=4), tokens(n=10, seq=16)
    chosen = choose_removal(model, calib, 1, SelectConfig(candidates="gates", held_back=3))
    assert chosen.table["gates"]["kl"] > 0
    fit, held = SelectConfig(candidates="sleb", held_back=0).split(calib)
    assert fit is calib and held is None
    assert "kl" not in choose_removal(model, calib, 1, SelectConfig(candidates="gates", held_back=0)).table["gates"]


@pytest.mark.parametrize("kw, match", [
    (dict(candidates="gates,oracle"), "unknown removal candidate 'oracle'"),
    (dict(candidates=""), "at least one removal candidate"),
    (dict(held_back=0), "held_back must be >= 1 to choose among candidates"),
    (dict(candidates="gates", held_back=-1), "held_back must be >= 1"),
])
def test_bad_selection_settings_are_one_line(kw, match):
    with pytest.raises(ValueError, match=match):
        SelectConfig(**kw)


def test_a_repair_that_raises_the_held_back_kl_is_not_kept(monkeypatch):
    import compress.fold as fold_module

    def damaging_repair(pruned, dense, fit, cfg):
        with torch.no_grad():
            pruned.model.layers[0].mlp.down_proj.weight.mul_(50)
        return pruned, None

    monkeypatch.setattr(select, "repair_cuts", damaging_repair)
    monkeypatch.setattr(fold_module, "repair_cuts", lambda *a, **k: pytest.fail("a repair that scored worse was applied"))
    monkeypatch.setattr(select, "learn_gates", gates_closing([2]))
    model = tiny_model(layers=4)
    _, report = fold(model, tokens(n=12, seq=16), FoldConfig(
        removal_rate=0.25, group_size=None, select=SelectConfig(candidates="gates", held_back=4), repair=RepairConfig()))
    row = report.selection["candidates"]["gates"]
    assert row["kl_repaired"] > row["kl"] and report.selection["repaired"] is False and report.repair is None


def test_the_repaired_variant_wins_when_it_scores_lower():
    from tests.test_peers import own_text

    model = tiny_model(layers=6, hidden=64)
    chosen = choose_removal(model, own_text(model, n=72, seq=24), 2, SelectConfig(candidates="block_influence"),
                            repair=RepairConfig())
    row = chosen.table["block_influence"]
    assert chosen.repaired == (row["kl_repaired"] < row["kl"])
