"""Cut repair (compress/repair.py): the fitted map, its fold into down_proj, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from compress.adapter import get_adapter
from compress.blocks import remove_blocks, share_blocks
from compress.format import load_folded, save_folded
from compress.repair import RepairConfig, RepairFit, find_cuts, fold_map, repair_cuts
from tests.conftest import tiny_model, tiny_tokenizer
from tests.test_compress import identity_blocks, tokens


def down(model, depth):
    return get_adapter(model).get_layers(model)[depth].mlp.down_proj


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def scrambled(seed=0):
    """(dense, pruned, S): dense block 2 is the identity, the pruned model removes it, and
    the pruned block 1's MLP output is multiplied by a known S. The exact repair is S^-1."""
    dense = tiny_model(layers=4)
    identity_blocks(dense, [2])
    pruned = remove_blocks(copy.deepcopy(dense), [2])
    s = torch.eye(32) + 0.3 * torch.randn(32, 32, generator=torch.Generator().manual_seed(seed))
    fold_map(down(pruned, 1), s.double())
    return dense, pruned, s


def test_fit_recovers_a_known_linear_map():
    dense, pruned, s = scrambled()
    before = down(pruned, 1).weight.clone()
    model, report = repair_cuts(pruned, dense, tokens(n=8, seq=32), RepairConfig(ridge=0.0))
    # the fitted T is S^-1, so the folded weight is the dense block's again
    assert torch.allclose(down(model, 1).weight, down(dense, 1).weight, atol=1e-4)
    assert not torch.allclose(before, down(dense, 1).weight, atol=1e-2)
    ids = tokens(n=2, seq=12, seed=1)
    assert torch.allclose(logits(model, ids), logits(dense, ids), atol=1e-4)
    (cut,) = report.cuts
    assert cut["depth"] == 1 and cut["removed"] == [2] and cut["mse_after"] < 1e-8 < cut["mse_before"]


def test_dense_fit_measures_the_dense_blocks_not_the_pruned_ones():
    """The scrambled block's dense twin needs no map (T = I), so a dense fit leaves S in place."""
    dense, pruned, _ = scrambled()
    before = down(pruned, 1).weight.clone()
    model, report = repair_cuts(pruned, dense, tokens(n=8, seq=32), RepairConfig(fit="dense", ridge=0.0))
    assert torch.allclose(down(model, 1).weight, before, atol=1e-4)
    assert report.cuts[0]["mse_after"] < 1e-8


def test_a_large_ridge_leaves_the_block_as_it_is():
    dense, pruned, _ = scrambled()
    before = down(pruned, 1).weight.clone()
    model, _ = repair_cuts(pruned, dense, tokens(n=8, seq=32), RepairConfig(ridge=1e9))
    assert torch.allclose(down(model, 1).weight, before, atol=1e-5)


def test_folding_equals_applying_the_map_explicitly():
    model = tiny_model(layers=3)
    t = torch.randn(32, 32, generator=torch.Generator().manual_seed(3))
    ids = tokens(n=2, seq=12)
    handle = down(model, 1).register_forward_hook(lambda _m, _a, out: out @ t)
    explicit = logits(model, ids)
    handle.remove()
    fold_map(down(model, 1), t.double())
    assert torch.allclose(logits(model, ids), explicit, atol=1e-4)


def test_cuts_are_found_from_the_source_depths():
    model = remove_blocks(tiny_model(layers=8), [0, 3, 4, 7])
    cuts = [(c.depth, c.removed, c.target) for c in find_cuts(model)]
    # kept source blocks 1, 2, 5, 6 sit at depths 0..3
    assert cuts == [(-1, [0], 0), (1, [3, 4], 4), (3, [7], 7)]


@pytest.mark.parametrize("fit", list(RepairFit))
def test_repair_lowers_every_cuts_error_and_the_kl_to_dense(fit):
    """On held-out text of the model's own; with 384 tokens for 64 x 64 maps instead of 1536
    the maps overfit and the KL rises (a random model is no LLM: the real one is benchmarked)."""
    from tests.test_peers import own_text

    dense = tiny_model(layers=6, hidden=64)
    calib, held = own_text(dense, n=64, seq=24), own_text(dense, n=8, seq=24, seed=1)
    pruned = remove_blocks(copy.deepcopy(dense), [2, 4])

    def kl(model):
        ref = torch.log_softmax(logits(dense, held), -1)
        return torch.nn.functional.kl_div(torch.log_softmax(logits(model, held), -1), ref, log_target=True,
                                          reduction="batchmean").item()

    before = kl(pruned)
    model, report = repair_cuts(pruned, dense, calib, RepairConfig(fit=fit))
    assert [c["depth"] for c in report.cuts] == [1, 2]
    assert all(c["mse_after"] < c["mse_before"] for c in report.cuts)
    assert kl(model) < before


def test_a_cut_before_every_block_is_skipped_and_said():
    dense = tiny_model(layers=4)
    pruned = remove_blocks(copy.deepcopy(dense), [0, 1])
    before = logits(pruned, tokens(n=2, seq=8))
    model, report = repair_cuts(pruned, dense, tokens(n=4, seq=16), RepairConfig())
    assert report.cuts == [] and report.skipped == [{"removed": [0, 1], "why": "no kept block before the cut"}]
    assert torch.equal(logits(model, tokens(n=2, seq=8)), before)


def test_repaired_model_saves_and_loads_with_identical_logits(tmp_path):
    dense, pruned, _ = scrambled()
    model, _ = repair_cuts(pruned, dense, tokens(n=8, seq=32), RepairConfig())
    loaded, _ = load_folded(save_folded(model, tmp_path / "m", tiny_tokenizer()))
    ids = tokens(n=2, seq=12, seed=2)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


# --- bad input ----------------------------------------------------------------------

def test_nothing_removed_is_one_line():
    model = tiny_model(layers=3)
    with pytest.raises(ValueError, match="nothing was removed"):
        repair_cuts(copy.deepcopy(model), model, tokens(n=4, seq=16), RepairConfig())


def test_too_few_tokens_is_rejected_before_any_forward():
    dense, pruned, _ = scrambled()
    with pytest.raises(ValueError, match="at least hidden_size=32 calibration tokens, got 16"):
        repair_cuts(pruned, dense, tokens(n=2, seq=8), RepairConfig())


def test_a_shared_block_before_a_cut_is_refused():
    dense = tiny_model(layers=5)
    pruned = share_blocks(remove_blocks(copy.deepcopy(dense), [3]), [0, 1, 1, 2])
    with pytest.raises(ValueError, match="depth 2 .* is shared"):
        repair_cuts(pruned, dense, tokens(n=4, seq=16), RepairConfig())


def test_a_family_with_a_norm_after_its_mlp_is_refused():
    from transformers import AutoModelForCausalLM, Gemma2Config

    cfg = Gemma2Config(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8)
    dense = AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(ValueError, match="does not apply to gemma2"):
        repair_cuts(remove_blocks(copy.deepcopy(dense), [1]), dense, tokens(n=4, seq=16), RepairConfig())


def test_unknown_fit_names_the_choices():
    with pytest.raises(ValueError, match="choose one of sequential, dense"):
        RepairConfig(fit="sideways")


@pytest.fixture(scope="module")
def repaired_dir(tmp_path_factory):
    from tests.test_peers import own_text

    dense = tiny_model(layers=6, hidden=64)
    model, _ = repair_cuts(remove_blocks(copy.deepcopy(dense), [2, 4]), dense, own_text(dense, n=32, seq=24), RepairConfig())
    return save_folded(model, tmp_path_factory.mktemp("repaired") / "model", tiny_tokenizer())


def test_repaired_model_exports_to_onnx_and_passes_the_gate(repaired_dir, tmp_path):
    from export.onnx import export_onnx
    from export.registry import ExportConfig

    report = export_onnx(repaired_dir, tmp_path / "onnx", ExportConfig(), measure=False)
    assert report["parity"]["passed"] and report["parity"]["details"]["tokens_identical"], report["parity"]


def test_repaired_model_exports_to_executorch_and_passes_the_gate(repaired_dir, tmp_path):
    from export.executorch import export_executorch
    from export.registry import ExportConfig

    report = export_executorch(repaired_dir, tmp_path / "model.pte", ExportConfig(max_context=128), measure=False)
    assert report["parity"]["passed"], report["parity"]
