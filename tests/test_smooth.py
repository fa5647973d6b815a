"""Activation smoothing (export.smooth): the fp32 model computes the same, shared weights are
scaled once with every depth's norm divided, and int8 dynamic activations lose less."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compress.blocks import share_blocks
from export.registry import ExportConfig
from export.smooth import fake_8da8w, smooth_, smoothing_groups
from tests.conftest import tiny_model


def calibration(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 99, (8, 24), generator=g).tolist()


def outlier_model():
    """A tiny Llama with two shared pairs and a few large activation channels, as real LLMs have."""
    model = tiny_model("llama", hidden=64)
    share_blocks(model, [0, 0, 1, 1])
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] *= 40
            layer.post_attention_layernorm.weight[[5]] *= 40
    return model


def test_fp32_logits_unchanged_and_shared_weights_scaled_once():
    model = outlier_model()
    ids = torch.tensor(calibration(2))
    with torch.no_grad():
        ref = model(ids).logits
    before = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    assert smooth_(model, calibration(), alpha=0.5) == 2 * 3  # per shared block: q/k/v, gate/up, down
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    layers = model.model.layers
    assert layers[0].self_attn.q_proj.weight is layers[1].self_attn.q_proj.weight  # sharing kept
    # one s per shared weight: q's columns scaled by s and both depths' norms divided by the same s
    s = layers[0].self_attn.q_proj.weight[0] / before["model.layers.0.self_attn.q_proj.weight"][0]
    for d in (0, 1):
        norm = layers[d].input_layernorm.weight
        torch.testing.assert_close(norm * s, before[f"model.layers.{d}.input_layernorm.weight"], rtol=1e-5, atol=1e-6)
    assert s[3] > 3 * s.median()  # the outlier channel's range moved into the weight


def test_int8_dynamic_activations_lose_less_after_smoothing():
    model = outlier_model()
    ids = torch.tensor(calibration(2))
    smoothed = copy.deepcopy(model)
    smooth_(smoothed, calibration(), alpha=0.5)
    with torch.no_grad():
        ref = model(ids).logits
        err_plain = (fake_8da8w(model, head=False)(ids).logits - ref).pow(2).mean()
        err_smooth = (fake_8da8w(smoothed, head=False)(ids).logits - ref).pow(2).mean()
    assert err_smooth < 0.5 * err_plain


def test_groups_skip_weights_asked_and_offset_norms():
    model = outlier_model()
    q = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        q_before = q.clone()
    assert smooth_(model, calibration(), skip={id(q)}) == 2 * 3 - 1
    assert torch.equal(q, q_before)
    assert smoothing_groups(tiny_model("gemma", hidden=64)) == []  # its norms compute x * (1 + w)
    assert len(smoothing_groups(tiny_model("qwen2", hidden=64))) == 4 * 3  # unshared: three per depth


def test_config_refuses_bad_smoothing(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("some calibration text")
    for kwargs, msg in (({"precision": "int8", "smooth_alpha": 1.5, "calibration": str(text)}, "smooth_alpha must lie in"),
                        ({"precision": "fp32", "smooth_alpha": 0.5, "calibration": str(text)}, "fp32 has none"),
                        ({"precision": "int8", "smooth_alpha": 0.5}, "pass calibration")):
        with pytest.raises(ValueError, match=msg):
            ExportConfig(**kwargs)
    with pytest.raises(ValueError, match="alpha must lie"):
        smooth_(tiny_model("llama", hidden=64), calibration(), alpha=-0.1)


def test_onnx_int8_export_smooths_and_keeps_sharing(tmp_path):
    """The exporter's own path: a smoothed int8 export stores each shared weight once and passes its gate."""
    import onnx_ir as ir

    from compress.format import save_folded
    from export.onnx import export_onnx
    from tests.conftest import tiny_tokenizer

    model_dir = save_folded(outlier_model(), tmp_path / "folded", tiny_tokenizer(), provenance={"method": "test"})
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"word{i % 37} and more text" for i in range(400)))
    report = export_onnx(model_dir, tmp_path / "out", ExportConfig(precision="int8", smooth_alpha=0.5,
                                                                   calibration=str(calib)), measure=False)
    assert report["smoothed_groups"] == 2 * 3
    nbits = [n for n in ir.load(tmp_path / "out" / "model.onnx").graph if n.op_type == "MatMulNBits"]
    assert len({n.inputs[1].name for n in nbits}) == 2 * 7 + 1 < len(nbits)  # 2 shared blocks x 7 Linears + the tied head
    assert report["parity"]["passed"]
