"""GPTQ (export.gptq): lower output error than round to nearest on its calibration batch, and
weights on a symmetric 4-bit grid that both exporters then store exactly."""

from __future__ import annotations

import copy

import torch
from torch import nn

from compress.blocks import share_blocks
from export.gptq import gptq_, gptq_weight, hessians
from export.grid import centered_grid
from export.quantize import int4_rounded, int4_weights
from tests.conftest import tiny_model


def rtn(w: torch.Tensor) -> torch.Tensor:
    return int4_rounded(w, 32)


def calibration(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 99, (8, 24), generator=g).tolist()


def test_one_weight_output_error_below_round_to_nearest():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs: where GPTQ gains
    w = torch.randn(48, 64, generator=g)
    q = gptq_weight(w, 2 * x.T @ x / len(x))
    err_gptq, err_rtn = (x @ (w - q).T).norm(), (x @ (w - rtn(w)).T).norm()
    assert err_gptq < 0.8 * err_rtn
    grid = centered_grid(q)
    assert grid is not None and torch.allclose(grid[0].float().reshape(48, 2, 32) * grid[1][..., None], q.reshape(48, 2, 32))
    q4, s = int4_weights(q, 32)  # the exporters' 4-bit values: GPTQ's own, no second rounding
    torch.testing.assert_close((q4.float().reshape(48, 2, 32) * s[..., None]).reshape(48, 64), q, rtol=0, atol=1e-6)


def test_model_logits_closer_than_round_to_nearest_and_shared_weights_once():
    model = tiny_model("llama", hidden=64)
    share_blocks(model, [0, 0, 1, 1])
    batch = calibration()
    ids = torch.tensor(batch)
    with torch.no_grad():
        ref = model(ids).logits
    naive = copy.deepcopy(model)
    with torch.no_grad():
        for m in {id(m.weight): m for m in naive.modules() if isinstance(m, nn.Linear) and m is not naive.lm_head}.values():
            m.weight.copy_(rtn(m.weight))
    rounded = copy.deepcopy(model)
    assert gptq_(rounded, batch) == 2 * 7  # one rounding per unique weight: 2 shared blocks x 7 Linears
    assert rounded.model.layers[0].mlp.up_proj.weight is rounded.model.layers[1].mlp.up_proj.weight
    with torch.no_grad():
        err_gptq = (rounded(ids).logits - ref).pow(2).mean()
        err_rtn = (naive(ids).logits - ref).pow(2).mean()
    assert err_gptq < err_rtn
    assert torch.equal(rounded.lm_head.weight, model.lm_head.weight)  # the tied head / embedding is left to the export
    for m in rounded.model.layers[0].modules():
        if isinstance(m, nn.Linear):
            assert centered_grid(m.weight) is not None
    assert gptq_(rounded, batch) == 0  # already on the grid: nothing left to round


def test_shared_weight_hessian_sums_every_depth():
    model = tiny_model("llama", hidden=64)
    share_blocks(model, [0, 0, 1, 1])
    up = [model.model.layers[i].mlp.up_proj for i in range(4)]
    seen = []
    handles = [m.register_forward_hook(lambda mod, a, o: seen.append(a[0].reshape(-1, 64).double())) for m in up[:2]]
    batch = calibration()
    with torch.no_grad():
        for w in batch:
            model(torch.tensor([w]))
    for h in handles:
        h.remove()
    x = torch.cat(seen)
    hs = hessians(model, up, batch)
    torch.testing.assert_close(hs[id(up[0].weight)], (2 * x.T @ x / len(x)).float(), rtol=1e-5, atol=1e-6)


def test_onnx_int4_stores_gptqs_grid(tmp_path):
    """weight_method gptq through the ONNX exporter: every unique decoder weight rounded once
    against the calibration file, and the MatMulNBits hold exactly those values."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from compress.format import save_folded
    from export.onnx import export_onnx
    from export.parity import text_windows
    from export.registry import ExportConfig
    from tests.conftest import tiny_tokenizer

    model = tiny_model("llama", hidden=64)
    share_blocks(model, [0, 0, 1, 1])
    src = save_folded(model, tmp_path / "m", tiny_tokenizer(), provenance={"method": "test"})
    calib = tmp_path / "calib.txt"
    calib.write_text("a calibration text about boats, tides and clocks. " * 40)
    cfg = ExportConfig(precision="int4", weight_method="gptq", calibration=str(calib), calibration_tokens=256, max_ppl_ratio=2.0)
    report = export_onnx(src, tmp_path / "onnx", cfg, measure=False)
    assert report["gptq_weights"] == 14
    expected = copy.deepcopy(model)
    gptq_(expected, text_windows(tiny_tokenizer(), None, str(calib), 256), 32)
    weights = {id(m.weight): m.weight.detach() for layer in expected.model.layers for m in layer.modules() if isinstance(m, nn.Linear)}
    proto = onnx.load(tmp_path / "onnx" / "model.onnx")
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    stored = set()
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits" and "layers" in node.input[1] and node.input[1] not in stored:
            packed, scales = inits[node.input[1]], inits[node.input[2]]
            q = np.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], -1, 32).astype(np.float32) - 8
            w = torch.from_numpy((q * scales.reshape(q.shape[0], -1, 1)).reshape(q.shape[0], -1))
            assert any(v.shape == w.shape and torch.allclose(v, w, atol=1e-6) for v in weights.values())
            stored.add(node.input[1])
    assert len(stored) == 14
