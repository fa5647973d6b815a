"""Per-depth low-rank deltas on shared blocks (compress/delta.py) and their place in the format."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from compress.blocks import count_parameters, schedule_of, share_blocks
from compress.delta import DeltaConfig, DeltaLinear, add_deltas, delta_spec
from compress.fold import FoldConfig, fold
from compress.format import load_folded, save_folded
from tests.conftest import tiny_model, tiny_tokenizer
from tests.test_compress import tokens


def own_weights(model, depths):
    return {d: {n: p.detach().clone() for n, p in model.model.layers[d].named_parameters()} for d in depths}


def shared_with_deltas(rank, init="svd", schedule=(0, 0, 1, 1)):
    dense = tiny_model(layers=4, hidden=32, num_key_value_heads=4)  # every Linear has min(in, out) = 32
    model = copy.deepcopy(dense)
    own = own_weights(model, [d for d, b in enumerate(schedule) if list(schedule).count(b) > 1])
    with torch.no_grad():  # share the mean, so no member's own weights are the base
        layers = model.model.layers
        for a, b in ((0, 1), (2, 3)):
            for (_, pa), (_, pb) in zip(layers[a].mlp.named_parameters(), layers[b].mlp.named_parameters()):
                pa.copy_((pa + pb) / 2)
            for (_, pa), (_, pb) in zip(layers[a].self_attn.named_parameters(), layers[b].self_attn.named_parameters()):
                pa.copy_((pa + pb) / 2)
    share_blocks(model, list(schedule))
    errors = add_deltas(model, own, DeltaConfig(rank=rank, init=init))
    return dense, model, errors


def test_full_rank_svd_deltas_give_back_every_members_own_weights_and_error_falls_with_rank():
    dense, full, errors = shared_with_deltas(rank=32)  # 32 = min(in, out) of every Linear of the tiny block
    assert all(e < 1e-6 for depth in errors.values() for e in depth.values())
    x = tokens(n=2, seq=12)
    with torch.no_grad():
        torch.testing.assert_close(full(x).logits, dense(x).logits, atol=1e-4, rtol=1e-4)
    mean_error = {}
    for rank in (1, 4, 16):
        _, _, errors = shared_with_deltas(rank=rank)
        mean_error[rank] = sum(e for d in errors.values() for e in d.values()) / sum(len(d) for d in errors.values())
    assert mean_error[1] > mean_error[4] > mean_error[16] > 0


def test_deltas_are_per_depth_the_base_stays_shared_and_unique_count_includes_them():
    _, model, _ = shared_with_deltas(rank=4)
    layers = model.model.layers
    assert schedule_of(model) == [0, 0, 1, 1]
    q0, q1 = layers[0].self_attn.q_proj, layers[1].self_attn.q_proj
    assert isinstance(q0, DeltaLinear) and q0.weight is q1.weight and q0.delta.a is not q1.delta.a
    plain = copy.deepcopy(model)
    for layer in plain.model.layers:  # the same model without its deltas
        for name, m in list(layer.named_modules()):
            if isinstance(m, DeltaLinear):
                parent, _, leaf = name.rpartition(".")
                lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
                lin.weight = m.weight
                setattr(layer.get_submodule(parent), leaf, lin)
    per_depth = DeltaConfig(rank=4).params_per_depth(tiny_model(layers=1, hidden=32, num_key_value_heads=4).model.layers[0])
    assert per_depth == 4 * sum(m.in_features + m.out_features for m in layers[0].modules()
                                if isinstance(m, torch.nn.Linear)) and per_depth > 0
    assert count_parameters(model).unique == count_parameters(plain).unique + 4 * per_depth
    assert delta_spec(model) == {str(d): {n: 4 for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                         "mlp.down_proj")} for d in range(4)}


def test_zero_init_starts_as_pure_sharing():
    _, model, errors = shared_with_deltas(rank=4, init="zero")
    assert all(e == 1.0 for d in errors.values() for e in d.values())
    assert all(torch.count_nonzero(m.delta.b) == 0 and torch.count_nonzero(m.delta.a) > 0
               for m in model.modules() if isinstance(m, DeltaLinear))


def test_save_load_round_trip_is_exact_and_kv_cache_decode_equals_a_full_forward(tmp_path):
    _, model, _ = shared_with_deltas(rank=4)
    with torch.no_grad():
        for m in model.modules():  # trained-looking deltas, not just the SVD start
            if isinstance(m, DeltaLinear):
                m.delta.b.add_(0.01 * torch.randn_like(m.delta.b))
    path = save_folded(model, tmp_path / "m", tiny_tokenizer())
    fold = json.loads((path / "config.json").read_text())["fold"]
    assert fold["format_version"] == 2 and fold["deltas"]["1"]["mlp.up_proj"] == 4
    loaded, _ = load_folded(path)
    x = tokens(n=2, seq=10)
    with torch.no_grad():
        full = loaded(x).logits
        torch.testing.assert_close(full, model(x).logits, atol=0, rtol=0)
        out = loaded(x[:, :6], use_cache=True)
        past, steps = out.past_key_values, [out.logits]
        for t in range(6, 10):
            out = loaded(x[:, t : t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert count_parameters(loaded).unique == count_parameters(model).unique


def test_older_format_loads_and_a_newer_one_is_one_line(tmp_path):
    model = tiny_model(layers=4, hidden=32)
    share_blocks(model, [0, 0, 1, 2])
    path = save_folded(model, tmp_path / "m", tiny_tokenizer())
    config = json.loads((path / "config.json").read_text())
    config["fold"]["format_version"] = 1
    del config["fold"]["deltas"]  # what version 1 wrote
    (path / "config.json").write_text(json.dumps(config))
    loaded, _ = load_folded(path)
    assert schedule_of(loaded) == [0, 0, 1, 2]
    config["fold"]["format_version"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format_version 3 was written by a newer foldgpt; upgrade foldgpt"):
        load_folded(path)


def test_fold_with_deltas_shares_more_to_keep_the_unique_budget():
    dense = tiny_model(layers=8, hidden=32)
    block = dense.model.layers[0]
    share = DeltaConfig(rank=2).params_per_depth(block) / sum(p.numel() for p in block.parameters())
    model, report = fold(copy.deepcopy(dense), tokens(), FoldConfig(removal_rate=0.0, group_size=None, num_unique_blocks=6,
                                                                    delta=DeltaConfig(rank=2)))
    schedule = report.schedule
    shared_depths = sum(schedule.count(b) for b in set(schedule) if schedule.count(b) > 1)
    assert len(set(schedule)) + share * shared_depths <= 6 + 1e-9  # within the budget, deltas counted
    assert len(set(schedule)) < 6  # so more merges than the 2 that pure sharing needs
    assert set(report.deltas) == {d for d, b in enumerate(schedule) if schedule.count(b) > 1}
    assert count_parameters(model).unique <= count_parameters(dense).unique - 2 * sum(p.numel() for p in block.parameters())


@pytest.mark.parametrize("base", ["first", "mean"])
def test_a_forced_base_is_what_the_group_shares(base):
    dense = tiny_model(layers=4, hidden=32)
    model, report = fold(copy.deepcopy(dense), tokens(), FoldConfig(removal_rate=0.0, group_size=2,
                                                                    delta=DeltaConfig(rank=2, base=base)))
    assert report.sources == {0: "depth 0" if base == "first" else base, 1: "depth 2" if base == "first" else base}
    up = [layer.mlp.up_proj.weight for layer in dense.model.layers]
    expected = up[0] if base == "first" else (up[0] + up[1]) / 2
    torch.testing.assert_close(model.model.layers[1].mlp.up_proj.weight, expected)
    with pytest.raises(ValueError, match="unknown delta base 'median'"):
        DeltaConfig(base="median")


def test_bad_delta_input_is_one_line_before_heavy_work():
    with pytest.raises(ValueError, match="delta rank must be a positive integer, got 0"):
        DeltaConfig(rank=0)
    block = tiny_model(layers=1, hidden=32).model.layers[0]
    with pytest.raises(ValueError, match="delta rank 33 exceeds min\\(in, out\\) = 32 of self_attn.q_proj"):
        DeltaConfig(rank=33).targets(block)
    with pytest.raises(ValueError, match="no Linear 'mlp.nope' in a block"):
        DeltaConfig(rank=2, linears="mlp.nope").targets(block)
    with pytest.raises(ValueError, match="unknown delta init 'pca'"):
        DeltaConfig(init="pca")
    with pytest.raises(ValueError, match="deltas need shared groups: group_size 1 shares nothing"):
        FoldConfig(group_size=1, delta=DeltaConfig())
    with pytest.raises(ValueError, match="deltas need shared groups: 4 unique blocks for 4 retained blocks"):
        FoldConfig(removal_rate=0.0, group_size=None, num_unique_blocks=4, delta=DeltaConfig()).check(4)
    with pytest.raises(ValueError, match="cannot hold 8 retained blocks with rank 16 deltas"):
        fold(tiny_model(layers=8, hidden=32), tokens(), FoldConfig(removal_rate=0.0, group_size=None, num_unique_blocks=2,
                                                                    delta=DeltaConfig(rank=16)))


def test_exporting_a_delta_model_is_a_one_line_error(tmp_path):
    from export.registry import check_paths
    from compress.outputs import Kind

    _, model, _ = shared_with_deltas(rank=2)
    path = save_folded(model, tmp_path / "m", tiny_tokenizer())
    for kind in (Kind.ONNX, Kind.PTE):
        with pytest.raises(ValueError, match="per-depth low-rank deltas, which neither exporter stores yet"):
            check_paths(path, tmp_path / "out", kind)


def test_compress_cli_folds_with_deltas_cures_them_and_resumes(tmp_path):
    from foldgpt.cli import main
    from tests.test_compress import TEXT, compress_args

    src = save_folded(tiny_model(layers=6, hidden=64, vocab=99), tmp_path / "dense", tiny_tokenizer())
    text = tmp_path / "heal.txt"
    text.write_text(TEXT)
    args = compress_args(tmp_path, (src, text), "--remove", "0", "--delta-rank", "2", "--local-minutes", "0.02",
                         "--heal-sequences", "64")
    assert main(args) == 0
    folded, _ = load_folded(tmp_path / "folded")
    uncured, _ = load_folded(tmp_path / "folded.work" / "local")
    fold_section = folded.config.fold
    assert fold_section["provenance"]["removed_blocks"] == [0] and fold_section["deltas"]
    assert fold_section["provenance"]["local_heal"]["groups"]
    cured = dict(folded.named_parameters())
    moved = [n for n, p in uncured.named_parameters() if ".delta." in n and not torch.equal(p, cured[n])]
    assert moved  # the cure trains the deltas
    assert main(args + ["--resume", "--overwrite"]) == 0
