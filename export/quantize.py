"""Weight quantization for the ExecuTorch backend: each shared weight quantized once.

torchao's `quantize_` walks modules and swaps each Linear's weight for a new tensor
subclass, so two depths sharing one Parameter would come out holding two quantized
copies (and a tied head would stop being the embedding). `quantize_shared` quantizes
one Linear per group of Linears that share a weight and points the others at the
result, so sharing survives into the exported program.

Schemes (what the XNNPACK delegate runs):
    int8   -> 8da8w: int8 dynamic activations, int8 per-output-channel symmetric weights.
              Not int8 *weight-only*: ExecuTorch 1.5.1 lowers torchao's weight-only int8
              to XNNPACK with fp32 weights and wrong logits, so int8 means 8da8w here.
    8da4w  -> int8 dynamic activations, int4 symmetric weights in groups of `group_size`,
              scales by `WeightMethod` (rtn: max|w| / 7.5; hqq: half-quadratic search).
              ONNX int4 packs the very same 4-bit values (`int4_weights`; XNNPACK then keeps
              the group scales in bf16), so a fold healed on this grid (compress.heal's
              qat_bits=4) exports with no rounding beyond what its healing trained through.
    embedding_bits (tied embedding + head, one tensor): 8 -> the head is 8da8w and the
              embedding gathers from the same int8 tensor (`embedding_byte`); 4 -> the head
              is 8da4w and the embedding gathers 4-bit rows (`embedding_4bit`).
The tied head stays fp32 (one tensor with the fp32 embedding) unless embedding_bits is set.
"""

from __future__ import annotations

from export.registry import Precision, WeightMethod

INSTALL_HINT = "pip install 'torchao>=0.18,<0.19'"


def linear_groups(model) -> list[list]:
    """Linears grouped by the identity of their weight Parameter (a shared block: one group)."""
    from torch import nn

    groups: dict[int, list] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            groups.setdefault(id(module.weight), []).append(module)
    return list(groups.values())


def _config(bits: int, group_size: int, method: WeightMethod = WeightMethod.RTN):
    try:
        import torch
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig
        from torchao.quantization.granularity import PerAxis, PerGroup
    except ImportError as e:
        raise ValueError(f"quantized executorch export needs {e.name}: {INSTALL_HINT}") from None
    if bits == 8:
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size),
                                                 intx_choose_qparams_algorithm=_algorithm(method))


def _algorithm(method: WeightMethod):
    from torchao.quantization.quantize_.workflows import IntxChooseQParamsAlgorithm

    # gptq puts weights on their grid before this (`prepare_weights`); what it leaves (the head) rounds to nearest
    return {WeightMethod.RTN: IntxChooseQParamsAlgorithm.AFFINE, WeightMethod.GPTQ: IntxChooseQParamsAlgorithm.AFFINE,
            WeightMethod.HQQ: IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY}[WeightMethod(method)]


def prepare_weights(model, tokenizer, cfg) -> dict:
    """What a quantized export does to the fp32 model first, in place, in both backends: with
    smooth_alpha, activation outliers move into the weights (`export.smooth`); at 4 bits, weights
    still on the source GGUF's grid are split to be stored exactly (`export.grid`), then with
    weight_method gptq the others are put on their GPTQ grid (`export.gptq`). Returns counts."""
    from torch import nn

    from export.grid import affine_grid, aux_weights, centered_grid, split_affine
    from export.parity import text_windows

    four = cfg.precision in (Precision.INT4, Precision.INT8DA4W)
    stats = {}
    windows = text_windows(tokenizer, None, cfg.calibration, cfg.calibration_tokens) if cfg.calibration else None
    if cfg.smooth_alpha is not None:
        from export.smooth import smooth_

        on_grid = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and four and (
            affine_grid(m.weight, cfg.group_size) is not None or centered_grid(m.weight, cfg.group_size) is not None)}
        stats["smoothed_groups"] = smooth_(model, windows, cfg.smooth_alpha, skip=on_grid)
    if four:
        stats["source_grid_weights"] = split_affine(model, cfg.group_size)
        if cfg.weight_method is WeightMethod.GPTQ:
            from export.gptq import gptq_

            stats["gptq_weights"] = gptq_(model, windows, cfg.group_size, skip=aux_weights(model))
    return stats


def _int4_tensor(weight, group_size: int, method: WeightMethod, activations: str | None = None):
    """torchao's 4-bit tensor of `weight`; a weight already on a symmetric 4-bit grid of this
    group size (a source grid, `export.grid`) keeps exactly its values and scales."""
    import torch
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    from export.grid import centered_grid

    w = weight.detach().float()
    grid = centered_grid(w, group_size)
    if grid is not None:
        d = grid[1]
        return IntxUnpackedToInt8Tensor.from_hp(w, [1, group_size], torch.int4, activation_quantization=activations,
                                                intx_choose_qparams_algorithm=None, custom_scale=d, custom_zero_point=torch.zeros_like(d, dtype=torch.int8))
    return IntxUnpackedToInt8Tensor.from_hp(w, [1, group_size], torch.int4, activation_quantization=activations,
                                            intx_choose_qparams_algorithm=_algorithm(method))


def int4_weights(weight, group_size: int = 32, method: WeightMethod = WeightMethod.RTN):
    """(q int8 in [-8, 7] of shape (N, K), scale fp32 (N, K / group_size)) with w ~ q * scale:
    the 4-bit grid torchao gives ExecuTorch's 8da4w, for the ONNX exporter to pack as well."""
    t = _int4_tensor(weight, group_size, method)
    return t.qdata, t.scale.float().reshape(weight.shape[0], -1)


def int4_rounded(weight, group_size: int = 32, method: WeightMethod = WeightMethod.RTN):
    """`weight` as the exporters store it at 4 bits, dequantized to fp32 (same shape)."""
    q, s = int4_weights(weight, group_size, method)
    return (q.float().reshape(q.shape[0], -1, group_size) * s[..., None]).reshape(q.shape)


def layer_bits(precision: Precision) -> int | None:
    """Weight bits of the decoder Linears: None (fp32), 8 or 4."""
    return {Precision.FP32: None, Precision.INT8: 8, Precision.INT8DA4W: 4}[Precision(precision)]


def check_shapes(model, precision: Precision, group_size: int, embedding_bits: int | None) -> None:
    """ValueError naming the first Linear whose input width does not split into groups."""
    lm_head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if embedding_bits is not None and (lm_head is None or lm_head.weight is not embed.weight):
        raise ValueError("embedding_bits quantizes the embedding shared with the head; this model's embedding is not tied")
    from export.grid import aux_weights

    aux = aux_weights(model)
    four_bit = [g[0] for g in linear_groups(model) if id(g[0].weight) not in aux
                and (embedding_bits if g[0] is lm_head else layer_bits(precision)) == 4]
    check_group_widths(four_bit, group_size, "8da4w")


def check_group_widths(linears, group_size: int, scheme: str) -> None:
    """One-line ValueError for the first Linear whose input width does not split into 4-bit groups."""
    for m in linears:
        if m.in_features % group_size:
            raise ValueError(f"{scheme} needs input widths divisible by group_size {group_size}; a Linear has {m.in_features}")


def quantize_shared(model, precision: Precision, group_size: int = 32, embedding_bits: int | None = None,
                    method: WeightMethod = WeightMethod.RTN):
    """Quantize `model` in place, one quantization per shared weight; returns it.

    The tied head (and with it the embedding) follows `embedding_bits`, every other
    Linear follows `precision`. Raises ValueError for shapes the scheme cannot split.
    """
    from torch import nn

    check_shapes(model, precision, group_size, embedding_bits)
    try:
        from torchao.quantization import quantize_
    except ImportError as e:
        raise ValueError(f"quantized executorch export needs {e.name}: {INSTALL_HINT}") from None
    lm_head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = lm_head is not None and lm_head.weight is embed.weight
    from export.grid import aux_weights, offset_weights

    aux, offsets = aux_weights(model), offset_weights(model)
    for group in linear_groups(model):
        leader = group[0]
        if id(leader.weight) in aux:
            if id(leader.weight) in offsets:  # a source grid's offsets (export.grid): 8da8w; its block sums: fp32
                quantize_(leader, _config(8, group_size), filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
            continue
        bits = embedding_bits if (tied and leader is lm_head) else layer_bits(precision)
        if bits is None:
            continue
        if bits == 4 and leader is not lm_head:  # via _int4_tensor: weights on a source grid stay exact
            leader.weight = nn.Parameter(_int4_tensor(leader.weight, group_size, method, "int8_asym_per_token"),
                                         requires_grad=False)
        else:
            quantize_(leader, _config(bits, group_size, method), filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
        for member in group[1:]:
            member.weight = leader.weight  # the same quantized Parameter, not a second quantization
    if tied and embedding_bits is not None:
        # The gather reads the head's quantized tensor: exported as dequantize + embedding,
        # which ExecuTorch's quant fusion turns into embedding_byte / embedding_4bit.
        embed.weight = lm_head.weight
        # padding_idx only changes gradients, but the fusion pattern matches embedding(w, ids) without it
        embed.padding_idx = None
    return model


def unique_weight_bytes(model, precision: Precision = Precision.FP32, group_size: int = 32,
                        embedding_bits: int | None = None) -> int:
    """The bound the exported files are measured against, from the fp32 model.

    Every unique Parameter counts once (by identity: a shared block once, the tied
    embedding once, as the head). A decoder Linear weight (out N, in K) at 8 bits is
    N*K bytes + one fp32 scale per output row (4N); at 4 bits N*K/2 bytes + one fp32
    scale per group of `group_size` (4*N*K/group_size). The tied embedding follows
    `embedding_bits` the same way (8: per row, 4: per group). Symmetric schemes: no
    zero points. Everything else (norms, biases, an untied embedding) is fp32.
    """
    from torch import nn

    lm_head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = lm_head is not None and lm_head.weight is embed.weight
    from export.grid import aux_weights, offset_weights

    aux = aux_weights(model)  # a source grid's block sums stay fp32, its offsets 8-bit in 8da4w
    bits_of = {id(m.weight): layer_bits(precision) for m in model.modules()
               if isinstance(m, nn.Linear) and id(m.weight) not in aux}
    bits_of.update({k: 8 for k in offset_weights(model)} if layer_bits(precision) == 4 else {})
    if tied:
        bits_of[id(lm_head.weight)] = embedding_bits
    elif lm_head is not None:
        bits_of[id(lm_head.weight)] = layer_bits(precision)
    total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        bits = bits_of.get(id(p))
        n, k = p.shape if p.ndim == 2 else (0, 0)
        if bits == 8:
            total += n * k + 4 * n
        elif bits == 4:
            total += n * k // 2 + 4 * n * -(-k // group_size)
        else:
            total += p.numel() * 4
    return total
