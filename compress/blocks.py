"""Structural edits of a decoder stack: remove blocks, share blocks, count parameters.

A folded model stays a plain transformers model. Depth i is its own decoder-layer
module (it owns KV-cache slot `layer_idx = i`), and depths in one group hold the
*same* nn.Parameter objects for every large tensor, so sharing is Parameter identity,
as tied embeddings are. Norm weights stay per depth. The schedule (depth -> physical
block) is read back from that identity, so it cannot drift from the weights.

Each function that changes the stack restores the invariants it touches
(`layer_idx`, `config.num_hidden_layers`, `config.layer_types`, `config.fold`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from compress.adapter import get_adapter

FOLD_FORMAT_VERSION = 2  # 2: per-depth low-rank deltas (compress.delta); 1 still loads
READABLE_FORMAT_VERSIONS = (1, 2)


def fold_info(model: nn.Module) -> dict:
    """The `fold` section of the config, created for a dense model on first use."""
    info = getattr(model.config, "fold", None)
    if not info:
        n = model.config.num_hidden_layers
        info = {
            "format_version": FOLD_FORMAT_VERSION,
            "schedule": list(range(n)),
            "provenance": {"source_num_layers": n, "source_depths": list(range(n)), "removed_blocks": []},
        }
        model.config.fold = info
    return info


def _set_param(module: nn.Module, dotted: str, param: nn.Parameter) -> None:
    parent, _, leaf = dotted.rpartition(".")
    owner = module.get_submodule(parent) if parent else module
    owner.register_parameter(leaf, param)


def schedule_of(model: nn.Module) -> list[int]:
    """Depth -> physical block, numbered by first appearance, read from Parameter identity.

    Raises ValueError if two depths share some but not all of their large tensors:
    that is not a folded model, and saving it would silently untie or mis-tie weights.
    """
    adapter = get_adapter(model)
    layers = adapter.get_layers(model)
    keys: dict[tuple[int, ...], int] = {}
    schedule = []
    owner_of: dict[int, int] = {}
    for depth, layer in enumerate(layers):
        ids = tuple(id(layer.get_parameter(n)) for n in adapter.shared_param_names(layer))
        if ids not in keys:
            for pid in ids:
                if pid in owner_of:
                    raise ValueError(
                        f"depth {depth} shares only part of its weights with block {owner_of[pid]}; "
                        "a folded group must share every large tensor"
                    )
            keys[ids] = len(keys)
            owner_of.update({pid: keys[ids] for pid in ids})
        schedule.append(keys[ids])
    return schedule


def validate_schedule(schedule: list[int], num_layers: int | None = None) -> None:
    """Raises ValueError quoting the bad value."""
    if num_layers is not None and len(schedule) != num_layers:
        raise ValueError(f"schedule has {len(schedule)} entries but the model has {num_layers} layers")
    if not schedule:
        raise ValueError("schedule is empty: a folded model needs at least one block")
    blocks = set(schedule)
    for b in schedule:
        if not isinstance(b, int) or b < 0:
            raise ValueError(f"schedule entry {b!r} is not a block index")
    missing = set(range(max(blocks) + 1)) - blocks
    if missing:
        raise ValueError(
            f"schedule points at block {max(blocks)} but blocks {sorted(missing)} are never used; "
            f"blocks must be numbered 0..{len(blocks) - 1}"
        )


def share_blocks(model: nn.Module, schedule: list[int], sources: dict[int, int] | None = None) -> nn.Module:
    """Make depths with equal `schedule` values share one set of large weights.

    `sources[b]` is the depth whose current weights become block b (default: the
    block's first depth). Norms are never shared. Returns the model, edited in place.
    """
    adapter = get_adapter(model)
    layers = adapter.get_layers(model)
    validate_schedule(schedule, len(layers))
    members: dict[int, list[int]] = {}
    for depth, block in enumerate(schedule):
        members.setdefault(block, []).append(depth)
    sources = sources or {}
    for block, depths in members.items():
        src = sources.get(block, depths[0])
        if src not in depths:
            raise ValueError(f"source depth {src} for block {block} is not one of its depths {depths}")
        src_layer = layers[src]
        for name in adapter.shared_param_names(src_layer):
            param = src_layer.get_parameter(name)
            for d in depths:
                _set_param(layers[d], name, param)
    fold_info(model)["schedule"] = schedule_of(model)
    return model


def remove_blocks(model: nn.Module, depths: list[int]) -> nn.Module:
    """Delete decoder blocks at `depths` (current numbering) and renumber the rest."""
    adapter = get_adapter(model)
    layers = list(adapter.get_layers(model))
    bad = [d for d in depths if not 0 <= d < len(layers)]
    if bad:
        raise ValueError(f"cannot remove blocks {bad}: the model has blocks 0..{len(layers) - 1}")
    if len(set(depths)) >= len(layers):
        raise ValueError(f"removing {len(set(depths))} of {len(layers)} blocks would leave no block")
    info = fold_info(model)
    prov = info["provenance"]
    keep = [d for d in range(len(layers)) if d not in set(depths)]
    prov["removed_blocks"] = sorted(prov["removed_blocks"] + [prov["source_depths"][d] for d in set(depths)])
    prov["source_depths"] = [prov["source_depths"][d] for d in keep]
    adapter.set_layers(model, [layers[d] for d in keep])
    for new_idx, layer in enumerate(adapter.get_layers(model)):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[d] for d in keep]
    info["schedule"] = schedule_of(model)
    return model


@dataclass
class ParamCount:
    """Effective parameters run per token vs unique parameters stored."""

    effective: int  # every depth counted, tied embedding once: what the forward pass uses
    unique: int  # each tensor once: what is stored on disk and in memory
    unique_bytes: int
    embedding: int
    per_block: list[int] = field(default_factory=list)  # unique params of each physical block


def count_parameters(model: nn.Module) -> ParamCount:
    adapter = get_adapter(model)
    layers = adapter.get_layers(model)
    unique = {id(p): p for p in model.parameters()}  # parameters() already drops duplicates
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    outside = sum(p.numel() for i, p in unique.items() if i not in in_layers)
    effective = outside + sum(p.numel() for layer in layers for p in layer.parameters())
    schedule = schedule_of(model)
    per_block = [0] * (max(schedule) + 1)
    seen: set[int] = set()
    for depth, layer in enumerate(layers):
        for p in layer.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                per_block[schedule[depth]] += p.numel()
    return ParamCount(
        effective=effective,
        unique=sum(p.numel() for p in unique.values()),
        unique_bytes=sum(p.numel() * p.element_size() for p in unique.values()),
        embedding=adapter.get_embed(model).weight.numel(),
        per_block=per_block,
    )
