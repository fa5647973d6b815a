"""Peer layer-pruning methods on tiny models: ShortGPT, LLM-Streamline, LayerChop, SLEB.

Each choice is checked against a hand-made case (blocks made exactly identity by zeroing
their output projections) or an independent computation; each method's output saves,
loads and exports like a FoldGPT artifact.
"""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from compress.adapter import get_adapter
from compress.blocks import remove_blocks
from compress.capture import block_io
from compress.format import load_folded, save_folded
from compress.heal import _step, heal
from compress.layerchop import LayerChopConfig, Placement, chosen_depths
from compress.methods import get_method, heal_config, known_methods, method_config
from compress.recipe import CompressConfig
from compress.shortgpt import ShortGPTConfig, block_influence
from compress.sleb import SLEBConfig, calib_perplexity
from compress.streamline import StreamlineConfig, span_similarity
from tests.conftest import tiny_model, tiny_tokenizer
from tests.test_compress import compress_args, identity_blocks, tiny_dir, tokens  # noqa: F401  (tiny_dir: fixture)

PEERS = ("shortgpt", "streamline", "layerchop", "sleb")
QUICK = {"shortgpt": {}, "streamline": {"train_steps": 5}, "layerchop": {}, "sleb": {}}


def run(name, model, calib, **options):
    return get_method(name).run(model, calib, method_config(name, **options))


def own_text(model, n=8, seq=24, seed=0):
    """Sequences sampled from the model itself: text it predicts well, so leaving out a
    block that does something raises its perplexity."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.config.vocab_size, (n, 1), generator=g)
    with torch.no_grad():
        for _ in range(seq - 1):
            probs = torch.softmax(model(ids).logits[:, -1].float(), -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
    return ids


def peaked_model(layers, seed=0):
    """A tiny model whose blocks matter: at init the residual updates are small and the
    next-token distributions near uniform, so a removal barely moves the perplexity.
    A larger (tied) embedding sharpens the predictions and larger block weights make
    every block change them."""
    model = tiny_model(layers=layers, hidden=64, seed=seed)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20)
        for layer in get_adapter(model).get_layers(model):
            for mod in layer.modules():
                if isinstance(mod, torch.nn.Linear):
                    mod.weight.mul_(5)
    return model


def ppl(model, data):
    with torch.no_grad():
        return math.exp(sum(model(b[None], labels=b[None]).loss.item() for b in data) / len(data))


# --- shared capture -----------------------------------------------------------------

def test_block_io_stops_after_the_deepest_depth_asked_for():
    model = tiny_model(layers=4)
    layers = get_adapter(model).get_layers(model)
    calls = []
    layers[3].register_forward_hook(lambda *a: calls.append(3))
    io = block_io(model, tokens(n=2, seq=8), inputs=[1], outputs=[2])
    assert set(io.inputs) == {1} and set(io.outputs) == {2} and not calls
    with torch.no_grad():  # block 1 run on its own with the captured arguments gives block 1's output
        io = block_io(model, tokens(n=2, seq=8), inputs=[1], outputs=[1], kwargs=[1])
        torch.testing.assert_close(layers[1](io.inputs[1], **io.kwargs[1]), io.outputs[1])


# --- ShortGPT -----------------------------------------------------------------------

def test_shortgpt_block_influence_matches_hidden_states_and_removes_identity_blocks():
    model = tiny_model(layers=6, hidden=64)
    identity_blocks(model, [1, 4])
    calib = tokens(n=6, seq=16)
    bi = block_influence(model, calib, batch_size=4)
    with torch.no_grad():
        hs = model(calib, output_hidden_states=True).hidden_states  # hs[i]: entering block i
    by_hand = [1 - F.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean().item() for i in range(5)]
    assert bi[:5] == pytest.approx(by_hand, abs=1e-5)
    assert bi[1] == pytest.approx(0, abs=1e-6) and bi[4] == pytest.approx(0, abs=1e-6)
    assert min(b for i, b in enumerate(bi) if i not in (1, 4)) > 1e-3
    model, report = run("shortgpt", model, calib, num_remove=2)
    assert report["removed"] == [1, 4] and model.config.fold["provenance"]["removed_blocks"] == [1, 4]
    assert model.config.num_hidden_layers == 4


# --- SLEB ---------------------------------------------------------------------------

def brute_force_order(model, data, num_remove):
    """Greedy order recomputed independently: a real removal on a copy per candidate."""
    source, order = list(range(model.config.num_hidden_layers)), []
    for _ in range(num_remove):
        scores = {}
        for d in range(len(source)):
            trial = remove_blocks(copy.deepcopy(model), [d])
            scores[d] = ppl(trial, data)
        best = min(scores, key=scores.get)
        order.append(source.pop(best))
        model = remove_blocks(model, [best])
    return order


def test_sleb_greedy_order_matches_brute_force():
    model = peaked_model(layers=5)
    calib = own_text(model)
    _, report = run("sleb", copy.deepcopy(model), calib, num_remove=3, batch_size=1)
    assert report["order"] == brute_force_order(model, calib, 3)
    assert len(report["steps"]) == 3 and len(report["steps"][0]["perplexity"]) == 5


def test_sleb_removes_the_block_whose_absence_changes_nothing_first():
    model = peaked_model(layers=5, seed=1)
    identity_blocks(model, [2])
    calib = own_text(model)
    dense = calib_perplexity(model, [calib])
    _, report = run("sleb", model, calib, num_remove=2)
    assert report["order"][0] == 2
    assert report["steps"][0]["perplexity"]["2"] == pytest.approx(dense, abs=1e-4)  # rounded in the report


# --- LLM-Streamline -----------------------------------------------------------------

def test_streamline_chooses_the_identity_span():
    model = tiny_model(layers=6, hidden=64)
    identity_blocks(model, [2, 3])
    sim = span_similarity(model, tokens(n=4, seq=16), span=2)
    assert sim[2] == pytest.approx(1, abs=1e-6) and max(s for i, s in enumerate(sim) if i != 2) < 1 - 1e-3
    model, report = run("streamline", model, tokens(n=4, seq=16), span=2, train_steps=1)
    assert report["span"] == [2, 3] and report["removed"] == [3]
    assert model.config.fold["provenance"]["removed_blocks"] == [3] and model.config.num_hidden_layers == 5


def test_streamline_training_reduces_the_span_mse():
    model = tiny_model(layers=6, hidden=64)
    layers = get_adapter(model).get_layers(model)
    model, report = run("streamline", model, tokens(n=8, seq=16), span=3, train_steps=30, lr=3e-3)
    mse = report["mse"]
    assert mse["trained"] < 0.8 * mse["init"], mse
    assert report["training"]["steps"] == 30 and len(report["removed"]) == 2
    start = report["span"][0]
    assert get_adapter(model).get_layers(model)[start] is layers[start]  # the block keeps its depth and cache slot


# --- LayerChop ----------------------------------------------------------------------

@pytest.mark.parametrize("placement, expected", [("last", [4, 5, 6]), ("middle", [2, 3, 4]), ("first", [1, 2, 3])])
def test_layerchop_removes_the_placed_blocks(placement, expected):
    assert chosen_depths(8, 3, Placement(placement)) == expected
    model, report = run("layerchop", tiny_model(layers=8), tokens(n=2), num_remove=3, placement=placement)
    assert report["removed"] == expected == model.config.fold["provenance"]["removed_blocks"]


def test_layerchop_fine_tune_reduces_the_lm_loss_and_trains_every_weight(tmp_path):
    model, _ = run("layerchop", tiny_model(layers=4, hidden=64), tokens(n=2), num_remove=1)
    cfg = heal_config("layerchop", {"max_steps": 1}, lr=1e-3, warmup_steps=1)
    assert cfg.distill.value == "none" and cfg.train_embeddings and cfg.lora_rank == 0
    batch = tokens(n=4)
    embed = model.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        before = _step(model, None, batch, cfg)["loss"].item()
    model, state = heal(model, None, batch, cfg, tmp_path)  # no teacher: plain LM loss
    with torch.no_grad():
        after = _step(model, None, batch, cfg)["loss"].item()
    assert state.step == 1 and after < before
    assert not torch.equal(model.model.embed_tokens.weight, embed)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_default_cure_per_method():
    assert heal_config("foldgpt").max_minutes == 20 and heal_config("foldgpt").distill.value == "hidden"
    assert heal_config("layerchop").max_minutes == 20 and heal_config("layerchop").distill.value == "none"
    assert all(heal_config(m) is None for m in ("shortgpt", "sleb", "streamline"))
    assert heal_config("sleb", {"max_steps": 3}).max_steps == 3  # a budget given to any method is honoured
    assert CompressConfig(out="x", method="shortgpt").heal is None
    assert CompressConfig(out="x", method="layerchop").heal.train_embeddings


# --- every method: folded format, export ----------------------------------------------

@pytest.fixture(scope="module", params=PEERS)
def artifact(request, tmp_path_factory):
    name = request.param
    model, report = run(name, tiny_model(layers=6), tokens(n=4, seq=16), num_remove=None if name == "streamline" else 2,
                        **({"span": 3} if name == "streamline" else {}), **QUICK[name])
    path = save_folded(model, tmp_path_factory.mktemp(name) / "model", tiny_tokenizer(),
                       provenance={"method": name, "method_report": report})
    return name, path, model


def test_saved_method_output_loads_with_identical_logits(artifact):
    name, path, model = artifact
    loaded, tok = load_folded(path)
    ids = tokens(n=2, seq=12)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.config.num_hidden_layers == 4 and tok is not None
    prov = json.loads((path / "config.json").read_text())["fold"]["provenance"]
    assert prov["method"] == name and len(prov["removed_blocks"]) == 2


def test_method_output_exports_to_onnx_and_passes_the_gate(artifact, tmp_path):
    from export.onnx import export_onnx
    from export.registry import ExportConfig

    report = export_onnx(artifact[1], tmp_path / "onnx", ExportConfig(), measure=False)
    assert report["parity"]["passed"], report["parity"]
    assert report["parity"]["details"]["tokens_identical"]


def test_method_output_exports_to_executorch_and_passes_the_gate(artifact, tmp_path):
    from export.executorch import export_executorch
    from export.registry import ExportConfig

    report = export_executorch(artifact[1], tmp_path / "model.pte", ExportConfig(max_context=128), measure=False)
    assert report["parity"]["passed"], report["parity"]


# --- bad input ----------------------------------------------------------------------

def test_unknown_method_lists_the_known_names():
    with pytest.raises(ValueError, match="unknown method 'nope'; known methods: foldgpt, shortgpt, streamline, layerchop, sleb"):
        get_method("nope")
    with pytest.raises(ValueError, match="unknown method"):
        CompressConfig(out="x", method="nope")
    assert known_methods()[:5] == ["foldgpt", *PEERS[:3], "sleb"]


@pytest.mark.parametrize("cfg, match", [
    (ShortGPTConfig(num_remove=6), "would leave no block"),
    (SLEBConfig(num_remove=7), "would leave no block"),
    (LayerChopConfig(num_remove=5), "removes at most 4"),
    (StreamlineConfig(span=7), "longer than the model's 6 blocks"),
])
def test_counts_that_do_not_fit_are_rejected(cfg, match):
    with pytest.raises(ValueError, match=match):
        get_method({ShortGPTConfig: "shortgpt", SLEBConfig: "sleb", LayerChopConfig: "layerchop",
                    StreamlineConfig: "streamline"}[type(cfg)]).run(tiny_model(layers=6), tokens(n=2), cfg)


@pytest.mark.parametrize("make, match", [
    (lambda: LayerChopConfig(placement="end"), "unknown placement 'end'; choose one of last, middle, first"),
    (lambda: StreamlineConfig(replacement="mlp"), "unknown replacement 'mlp'"),
    (lambda: StreamlineConfig(span=0), "span must be >= 1"),
    (lambda: StreamlineConfig(train_steps=None), "needs a training budget"),
    (lambda: ShortGPTConfig(num_remove=-1), "num_remove must be >= 0"),
    (lambda: method_config("shortgpt", placement="last"), "method shortgpt has no option placement"),
    (lambda: method_config("foldgpt", num_remove=2), "method foldgpt has no option num_remove"),
    (lambda: CompressConfig(out="x", method="foldgpt", peer=SLEBConfig()), "configured by fold"),
    (lambda: CompressConfig(out="x", method="sleb", peer=SLEBConfig(), heal="nope"), "heal must be"),
])
def test_bad_method_options(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --- recipe and CLI -----------------------------------------------------------------

def test_cli_unknown_method_is_one_line(tmp_path, capsys):
    from foldgpt.cli import main

    assert main(["compress", "--out", str(tmp_path / "o"), "--method", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("foldgpt compress: error: unknown method 'nope'; "
                   "known methods: foldgpt, shortgpt, streamline, layerchop, sleb")


@pytest.mark.parametrize("extra, match", [
    (["--method", "shortgpt", "--num-remove", "6"], "would leave no block"),
    (["--method", "sleb", "--num-remove", "6"], "would leave no block"),
    (["--method", "layerchop", "--num-remove", "5"], "removes at most 4, not 5"),
    (["--method", "streamline", "--span", "7"], "longer than the model's 6 blocks"),
    (["--method", "streamline", "--removal-rate", "0.95"], "removal_rate 0.95 removes all 6 blocks"),
    (["--method", "layerchop", "--placement", "end"], "unknown placement"),
    (["--method", "sleb", "--span", "2"], "method sleb has no option span"),
])
def test_cli_bad_method_input_is_one_line_before_work(tmp_path, tiny_dir, capsys, monkeypatch, extra, match):  # noqa: F811
    import compress.recipe as recipe
    from foldgpt.cli import main

    monkeypatch.setattr(recipe, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    monkeypatch.setattr(recipe, "run_method", lambda *a, **k: pytest.fail("heavy work started before the check"))
    assert main(compress_args(tmp_path, tiny_dir, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err
    assert not (tmp_path / "folded.work").exists()


@pytest.mark.parametrize("method, extra, key", [
    ("shortgpt", [], "block_influence"),
    ("streamline", ["--train-steps", "3"], "similarity"),
    ("layerchop", ["--placement", "middle", "--heal-steps", "3"], "placement"),
    ("sleb", [], "order"),
])
def test_cli_compress_with_a_peer_method_records_its_report(tmp_path, tiny_dir, method, extra, key):  # noqa: F811
    from foldgpt.cli import main

    args = compress_args(tmp_path, tiny_dir, "--method", method)
    i = args.index("--heal-steps")
    del args[i : i + 2]  # each method's default cure, unless `extra` gives a budget
    assert main(args + extra) == 0
    model, _ = load_folded(tmp_path / "folded")
    prov = model.config.fold["provenance"]
    assert prov["method"] == method and model.config.num_hidden_layers == 4 and len(prov["removed_blocks"]) == 2
    assert key in prov["method_report"] and sorted(prov["method_report"]["removed"]) == prov["removed_blocks"]
    if method == "layerchop":  # its cure: LM loss only, every weight
        assert prov["heal"]["steps"] == 3 and set(prov["heal"]["final_loss"]) == {"ce", "loss", "step"}
    else:
        assert prov["heal"] is None
