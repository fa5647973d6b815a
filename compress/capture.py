"""Hidden states at decoder-block boundaries, one calibration batch at a time.

ShortGPT scores a block by how far it turns its input; LLM-Streamline looks for the
span whose input and output agree and trains a replacement to map one to the other.
Both need the states entering and leaving blocks, and neither may keep them for the
whole data set, so `block_io` runs one batch, keeps only the depths asked for, and
stops the forward pass after the deepest of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from compress.adapter import get_adapter

# what the model passes a block that a replayed call must not receive: the cache is not used
_DROP_KWARGS = ("hidden_states", "past_key_values", "use_cache")


@dataclass
class BlockIO:
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # depth -> state entering it (B, T, H)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # depth -> state leaving it (B, T, H)
    kwargs: dict[int, dict] = field(default_factory=dict)  # depth -> mask, rotary embeddings... as the model passed them


class _Stop(Exception):
    """Raised by the hook of the deepest depth asked for: the rest of the forward is not needed."""


@torch.no_grad()
def block_io(model: nn.Module, batch: torch.Tensor, inputs: Iterable[int] = (), outputs: Iterable[int] = (),
             kwargs: Iterable[int] = ()) -> BlockIO:
    """Run `batch` (LongTensor (B, T)) and return the hidden states entering the `inputs`
    depths and leaving the `outputs` depths, plus the call arguments of the `kwargs` depths
    (for replaying a block on its own). Nothing past the deepest depth asked for is run."""
    inputs, outputs, kwargs = set(inputs), set(outputs), set(kwargs)
    layers = get_adapter(model).get_layers(model)
    last = max(inputs | outputs | kwargs)
    io = BlockIO()

    def before(depth):
        def hook(module, args, kw):
            if depth in inputs:
                io.inputs[depth] = args[0] if args else kw["hidden_states"]
            if depth in kwargs:
                io.kwargs[depth] = {k: v for k, v in kw.items() if k not in _DROP_KWARGS}
        return hook

    def after(depth):
        def hook(module, args, kw, output):
            if depth in outputs:
                io.outputs[depth] = output[0] if isinstance(output, tuple) else output
            if depth == last:
                raise _Stop
        return hook

    handles = []
    for d in range(last + 1):
        handles.append(layers[d].register_forward_pre_hook(before(d), with_kwargs=True))
        handles.append(layers[d].register_forward_hook(after(d), with_kwargs=True))
    try:
        model(batch, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return io


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each token's two states: (B, T, H) x2 -> (B * T,), in fp32."""
    return torch.nn.functional.cosine_similarity(a.float().flatten(0, -2), b.float().flatten(0, -2), dim=-1)


def batches(data: torch.Tensor, batch_size: int, max_sequences: int | None = None) -> list[torch.Tensor]:
    """Consecutive batches of the first `max_sequences` rows of `data` (n, seq)."""
    if data.ndim != 2 or len(data) == 0:
        raise ValueError(f"calibration data must be a non-empty (n, seq) token tensor, got shape {tuple(data.shape)}")
    n = len(data) if max_sequences is None else min(len(data), max_sequences)
    return [data[i : i + batch_size] for i in range(0, n, batch_size)]


class Replay:
    """The input of every depth (hidden state and the layer's own keyword arguments: mask,
    rotary embeddings) captured once per batch, so the model's tail can be rerun from any
    depth: a measurement that changes depth d onward costs the depths from d on, the final
    norm and the head, about half a forward on average instead of a whole one."""

    def __init__(self, model: nn.Module, data: list[torch.Tensor]):
        self.model, self.adapter = model, get_adapter(model)
        self.layers = self.adapter.get_layers(model)
        self.inputs: list[list[tuple[tuple, dict]]] = []  # batch -> depth -> (args, kwargs)
        self.logits: list[torch.Tensor] = []  # batch -> the full model's logits
        for batch in data:
            seen: list[tuple[tuple, dict]] = []
            hooks = [layer.register_forward_pre_hook(lambda _m, a, k: seen.append((a, dict(k))), with_kwargs=True)
                     for layer in self.layers]
            try:
                with torch.no_grad():
                    self.logits.append(model(batch, use_cache=False).logits)
            finally:
                for h in hooks:
                    h.remove()
            self.inputs.append(seen)

    def hidden(self, batch: int, depth: int) -> torch.Tensor:
        args, kwargs = self.inputs[batch][depth]
        return args[0] if args else kwargs["hidden_states"]

    @torch.no_grad()
    def tail_logits(self, batch: int, start: int, hidden: torch.Tensor | None = None, skip: int | None = None) -> torch.Tensor:
        """Logits of depths start..n-1 (leaving out depth `skip`) run on `hidden`, by default
        the state captured entering depth `start`."""
        h = self.hidden(batch, start) if hidden is None else hidden
        for depth in range(start, len(self.layers)):
            if depth == skip:
                continue
            a, k = self.inputs[batch][depth]
            k = {key: v for key, v in k.items() if key != "hidden_states"}
            out = self.layers[depth](h, *a[1:], **k)
            h = out[0] if isinstance(out, tuple) else out
        logits = self.adapter.get_lm_head(self.model)(self.adapter.get_final_norm(self.model)(h))
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / softcap) * softcap if softcap else logits
