import json

import pytest
import torch

import compress.format as fmt
from compress.adapter import get_adapter
from compress.blocks import count_parameters, remove_blocks, share_blocks
from compress.format import WEIGHTS_NAME, load_folded, save_folded, summarize
from tests.conftest import FAMILIES, tiny_model

IDS = torch.tensor([[1, 7, 3, 9, 4, 2, 8, 5]])


def folded(family="llama", **kw):
    model = tiny_model(family, layers=6, **kw)
    remove_blocks(model, [4])
    share_blocks(model, [0, 0, 1, 1, 2])
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_exact_logits(tmp_path, family):
    model = folded(family)
    with torch.no_grad():
        ref = model(IDS).logits
    save_folded(model, tmp_path / "m", provenance={"method": "test"})
    loaded, _ = load_folded(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, ref)
    layers = get_adapter(loaded).get_layers(loaded)
    assert layers[0].mlp.down_proj.weight is layers[1].mlp.down_proj.weight
    assert layers[0].input_layernorm.weight is not layers[1].input_layernorm.weight
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3, 4]
    fold = loaded.config.fold
    assert fold["schedule"] == [0, 0, 1, 1, 2]
    assert fold["provenance"]["method"] == "test" and fold["provenance"]["removed_blocks"] == [4]
    assert count_parameters(loaded).unique == count_parameters(model).unique


def test_config_json_has_fold_section(tmp_path):
    save_folded(folded(), tmp_path / "m")
    fold = json.loads((tmp_path / "m" / "config.json").read_text())["fold"]
    assert fold["schedule"] == [0, 0, 1, 1, 2]
    assert "self_attn.q_proj.weight" in fold["shared"] and "input_layernorm.weight" in fold["per_depth"]
    assert fold["format_version"] == 2


def test_bytes_on_disk_within_one_percent_of_unique(tmp_path):
    model = tiny_model("llama", layers=6, hidden=128, vocab=4000)
    share_blocks(model, [0, 0, 1, 1, 2, 2])
    path = save_folded(model, tmp_path / "m")
    disk = (path / WEIGHTS_NAME).stat().st_size
    unique = count_parameters(model).unique_bytes
    assert unique <= disk <= 1.01 * unique
    assert summarize(model, path)["disk_over_unique"] <= 1.01
    # three blocks' large tensors are stored once instead of twice
    dense_model = tiny_model("llama", layers=6, hidden=128, vocab=4000)
    dense = save_folded(dense_model, tmp_path / "d")
    shared_bytes = 4 * (count_parameters(dense_model).per_block[0] - 2 * 128)
    saved = (dense / WEIGHTS_NAME).stat().st_size - disk
    assert saved == pytest.approx(3 * shared_bytes, rel=0.01)  # headers differ slightly


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma"])
def test_generate_with_kv_cache_matches_no_cache_forward(tmp_path, family):
    save_folded(folded(family), tmp_path / "m")
    model, _ = load_folded(tmp_path / "m")
    prompt = IDS[:, :4]
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(12):
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(out, ids)


def test_dense_save_is_a_plain_transformers_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    save_folded(model, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(plain(IDS).logits, model(IDS).logits)


def test_load_in_bfloat16(tmp_path):
    save_folded(folded(), tmp_path / "m")
    model, _ = load_folded(tmp_path / "m", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_interrupted_save_keeps_previous_artifact(tmp_path, monkeypatch):
    first = folded()
    save_folded(first, tmp_path / "m")
    before = (tmp_path / "m" / WEIGHTS_NAME).read_bytes()

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fmt, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_folded(tiny_model("llama", seed=1), tmp_path / "m")
    assert (tmp_path / "m" / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left behind
    load_folded(tmp_path / "m")


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        load_folded("/nonexistent/model")


def test_corrupt_safetensors(tmp_path):
    path = save_folded(folded(), tmp_path / "m")
    (path / WEIGHTS_NAME).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="model.safetensors: corrupt or truncated"):
        load_folded(path)


def test_truncated_safetensors(tmp_path):
    path = save_folded(folded(), tmp_path / "m")
    data = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_folded(path)


def test_schedule_pointing_at_missing_block(tmp_path):
    path = save_folded(folded(), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["fold"]["schedule"] = [0, 0, 1, 1, 3]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="block 3"):
        load_folded(path)


def test_weights_that_do_not_match_the_schedule(tmp_path):
    path = save_folded(folded(), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["fold"]["schedule"] = [0, 1, 2, 2, 2]  # claims block 1 lives at depth 1: not in the file
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match the schedule"):
        load_folded(path)


def test_load_depth_reads_the_config_not_the_weights(tmp_path):
    from compress.load import load_depth

    path = save_folded(folded(), tmp_path / "m")
    (path / WEIGHTS_NAME).write_bytes(b"\x00garbage")  # never read: the depth is in config.json
    assert load_depth(path) == json.loads((path / "config.json").read_text())["num_hidden_layers"] == 5
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_depth(tmp_path / "empty")
    with pytest.raises(ValueError, match="not a model"):
        load_depth(path / WEIGHTS_NAME)
