"""End-to-end checks on the real default model (SmolLM2-135M-Instruct from its GGUF)."""

import copy
import pytest
import torch

from compress.blocks import count_parameters, remove_blocks, share_blocks
from compress.format import WEIGHTS_NAME, load_folded, save_folded
from compress.load import default_gguf, load_depth, load_model

pytestmark = pytest.mark.slow


def test_default_model_loads_from_gguf(default_model):
    model, tok = default_model
    counts = count_parameters(model)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30 == load_depth("default")
    assert counts.unique == pytest.approx(134.5e6, rel=0.002)
    assert counts.embedding == 49152 * 576
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(model.config, "quantization_config", None) is None
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_folded_default_model_bytes_and_round_trip(default_model, tmp_path):
    model, tok = default_model
    model = copy.deepcopy(model)  # deepcopy keeps Parameter sharing; the fixture stays dense
    remove_blocks(model, list(range(20, 26)))
    share_blocks(model, [d // 2 for d in range(24)])
    path = save_folded(model, tmp_path / "folded", tok, provenance={"source": "default"})
    disk = (path / WEIGHTS_NAME).stat().st_size
    counts = count_parameters(model)
    block, norms = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536, 2 * 576  # q, o; k, v (3 of 9 heads); gate, up, down
    assert counts.effective == 49152 * 576 + 24 * (block + norms) + 576  # README: 113.27M
    assert counts.unique == 49152 * 576 + 12 * block + 24 * norms + 576  # README: 70.81M
    assert counts.unique_bytes <= disk <= 1.001 * counts.unique_bytes  # README: 1.0001x
    loaded, tok2 = load_folded(path)
    ids = tok2("Folding shares weights between", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_truncated_gguf_is_one_clear_error(tmp_path):
    bad = tmp_path / "cut.gguf"
    with open(default_gguf(), "rb") as src, open(bad, "wb") as dst:
        dst.write(src.read(2 << 20))  # the header and the first tensors of a 98 MB file
    with pytest.raises(ValueError, match="cut.gguf: corrupt or truncated GGUF"):
        load_model(bad)


def test_bfloat16_on_request():
    model, _ = load_model("default", dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
