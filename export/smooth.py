"""Activation smoothing (SmoothQuant, Xiao et al., arXiv 2211.10438) for exports whose
activations are quantized to int8 at run time (ExecuTorch int8 = 8da8w and 8da4w).

A few input channels of a decoder Linear carry most of the activation range, so a per-token
int8 scale spends its levels on them. Smoothing moves that range into the weights:
    x W^T = (x / s) (W diag(s))^T,    s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)
and folds the 1/s into whatever produced x, so the fp32 model computes exactly the same:
    q/k/v   read the input norm       -> that depth's norm weight / s
    gate/up read the post-attention norm -> that depth's norm weight / s
    down    reads act(gate) * up      -> up_proj's rows / s
Shared blocks: q/k/v (gate/up, down) are one weight at several depths and each depth keeps its
own norm, so one s is chosen per shared weight (activation maxima over every depth that reads
it) and divided out of each of those depths' norms. Weights still on a 4-bit source grid are
left alone at 4 bits (scaling their columns would move them off the grid `export.grid` keeps).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

OFFSET_NORMS = ("gemma",)  # norms computing x * (1 + w): dividing w does not divide the output


def calibrate(model: nn.Module, modules: Sequence[nn.Module], windows: Sequence[Sequence[int]],
              update: Callable[[nn.Module, torch.Tensor], None], desc: str) -> None:
    """Run `windows` through `model`, calling update(module, inputs as (tokens, features))
    for every module in `modules` on each forward (GPTQ's Hessians and smoothing's maxima)."""
    handles = [m.register_forward_hook(lambda m, args, _out: update(m, args[0].detach().reshape(-1, args[0].shape[-1])))
               for m in modules]
    try:
        with torch.no_grad():
            for w in tqdm(windows, desc=desc, unit="window", leave=False):
                model(torch.tensor([list(w)]))
    finally:
        for h in handles:
            h.remove()


def _plain(*modules) -> bool:
    return all(type(m) is nn.Linear for m in modules)


def smoothing_groups(model: nn.Module) -> list[dict]:
    """One entry per shared input: {"linears": readers (one per distinct weight), "producers":
    [(module, "norm" | "rows")] one per depth, "depths": the layers}. Layers that do not have a
    Llama-style block (input/post norms, q/k/v, gate/up/down) are left out."""
    text = model.config.get_text_config(decoder=True)
    if any(text.model_type.startswith(p) for p in OFFSET_NORMS):
        return []
    groups: dict[tuple, dict] = {}
    for layer in model.model.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        try:
            qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
            gate_up, down = [mlp.gate_proj, mlp.up_proj], mlp.down_proj
            norms = [layer.input_layernorm, layer.post_attention_layernorm]
        except AttributeError:
            continue
        for readers, producer, kind in ((qkv, norms[0], "norm"), (gate_up, norms[1], "norm"), ([down], mlp.up_proj, "rows")):
            if not _plain(*readers) or getattr(producer, "weight", None) is None:
                continue
            key = tuple(id(r.weight) for r in readers)
            g = groups.setdefault(key, {"linears": readers, "producers": [], "kind": kind})
            if all(p is not producer for p, _ in g["producers"]):
                g["producers"].append((producer, kind))
    # down's producer is up_proj's rows: valid only if every depth reading this down reads one up weight
    return [g for g in groups.values()
            if g["kind"] == "norm" or len({id(p.weight) for p, _ in g["producers"]}) == 1]


def smooth_(model: nn.Module, windows: Sequence[Sequence[int]], alpha: float = 0.5, skip: set[int] = frozenset()) -> int:
    """Smooth every group (`smoothing_groups`) in place; groups with a weight id in `skip` are
    left alone. Returns the number of groups smoothed. fp32 outputs are unchanged (up to rounding)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"smoothing alpha must lie in [0, 1], got {alpha}")
    groups = [g for g in smoothing_groups(model) if not any(id(m.weight) in skip for m in g["linears"])]
    if not groups:
        return 0
    readers = [m for m in model.modules() if isinstance(m, nn.Linear) and any(
        m.weight is g["linears"][0].weight for g in groups)]
    amax: dict[int, torch.Tensor] = {}

    def update(m, x):
        key = id(m.weight)
        a = x.abs().amax(0).float()
        amax[key] = a if key not in amax else torch.maximum(amax[key], a)

    calibrate(model, readers, windows, update, "smoothing: calibration")
    with torch.no_grad():
        for g in groups:
            x = amax[id(g["linears"][0].weight)].clamp_min(1e-5)
            w = torch.stack([m.weight.abs().amax(0) for m in g["linears"]]).amax(0).float().clamp_min(1e-5)
            s = (x.pow(alpha) / w.pow(1 - alpha)).clamp_min(1e-5)
            for m in g["linears"]:
                m.weight.mul_(s.to(m.weight.dtype))
            for producer, kind in ({id(p.weight): (p, k) for p, k in g["producers"]}).values():
                if kind == "norm":
                    producer.weight.div_(s.to(producer.weight.dtype))
                else:  # up_proj: its output rows feed down's input columns
                    producer.weight.div_(s.to(producer.weight.dtype)[:, None])
                    if producer.bias is not None:
                        producer.bias.div_(s.to(producer.bias.dtype))
    return len(groups)


def fake_8da8w(model: nn.Module, head: bool = True) -> nn.Module:
    """A copy of `model` computing as ExecuTorch's 8da8w does, in fp32 torch: every decoder Linear
    (and with `head`, the head) sees per-token symmetric int8 inputs and per-channel int8 weights
    (each shared weight rounded once). For measuring what smoothing buys without an export."""
    import copy

    q = copy.deepcopy(model)

    def fake(x, dim):
        s = x.abs().amax(dim, keepdim=True).clamp_min(1e-8) / 127
        return (x / s).round().clamp(-127, 127) * s

    out = q.get_output_embeddings()
    linears = [m for m in q.modules() if isinstance(m, nn.Linear) and (head or m is not out)]
    with torch.no_grad():
        for m in {id(m.weight): m for m in linears}.values():
            m.weight.copy_(fake(m.weight, 1))  # a tied head rounds the embedding too, as +emb8 stores it
    for m in linears:
        m.register_forward_pre_hook(lambda _m, args: (fake(args[0], -1),))
    return q
