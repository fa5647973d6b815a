"""Layer-pruning methods behind one interface: `foldgpt compress --method NAME`.

A method is a function `(model, calib, cfg) -> (model, report)` that edits the dense
model in place through `compress.blocks` (so depth, `layer_idx` and `config.fold` stay
consistent) and returns a JSON-able report. Its output is therefore a folded-format
model that every export backend reads. Each method registers itself here with its
config class and its healing:

    foldgpt     gates, removal, shared groups (compress/fold.py)     heal: distillation, 20 min
    shortgpt    lowest Block Influence removed (compress/shortgpt.py)  none
    streamline  most similar span -> one trained block (compress/streamline.py)  none beyond its own training
    layerchop   fixed placement removed (compress/layerchop.py)      heal: LM loss, every weight, 20 min
    sleb        greedy removal by calibration perplexity (compress/sleb.py)  none

A peer's config carries its own count (`num_remove`, or Streamline's `span`); left
None it is filled from FoldConfig.removal_rate by `resolved(num_remove)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Callable

from compress.heal import HealConfig
from compress.registry import Registry

DEFAULT_HEAL_MINUTES = 20.0


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable  # (model, calib: LongTensor (n, seq), cfg) -> (model, report: dict)
    config: type
    heal_minutes: float | None  # default healing budget; None: none unless one is asked for
    heal_style: dict = field(default_factory=dict)  # HealConfig fields that make the method's healing
    configured_by_fold: bool = False  # FoldGPT reads CompressConfig.fold; peers their own config


# Modules that register methods when imported, so `get_method` can name them all cheaply.
_METHODS: Registry[Method] = Registry("method", {
    "foldgpt": "compress.fold", "shortgpt": "compress.shortgpt", "streamline": "compress.streamline",
    "layerchop": "compress.layerchop", "sleb": "compress.sleb"})


def register_method(name: str, config: type, heal_minutes: float | None = None, heal_style: dict | None = None,
                    configured_by_fold: bool = False) -> Callable:
    def wrap(fn: Callable) -> Callable:
        _METHODS.add(name, Method(name, fn, config, heal_minutes, heal_style or {}, configured_by_fold))
        return fn

    return wrap


def known_methods() -> list[str]:
    return _METHODS.known()


def get_method(name: str) -> Method:
    """Raises ValueError listing the known names."""
    return _METHODS.get(name)


def given(**options) -> dict:
    """The options that are set: None leaves a config field at its own default, so a CLI
    flag nobody passed never overrides what the config's dataclass says."""
    return {k: v for k, v in options.items() if v is not None}


def method_config(name: str, **options):
    """The peer method's config from options (None = the method's default); None for a
    method configured by FoldConfig. Raises ValueError for an option the method lacks."""
    method = get_method(name)
    chosen = given(**options)
    accepted = set() if method.configured_by_fold else {f.name for f in fields(method.config)}
    unknown = sorted(set(chosen) - accepted)
    if unknown:
        raise ValueError(f"method {name} has no option {', '.join(unknown)}"
                         + (f" (its options: {', '.join(sorted(accepted))})" if accepted else ""))
    return None if method.configured_by_fold else method.config(**chosen)


def heal_config(name: str, budget: dict | None = None, **options) -> HealConfig | None:
    """Healing for method `name`: its default when `budget` (max_steps / max_tokens /
    max_minutes) is None, else the method's kind of healing with that budget. `options`
    (None = the method's choice) override HealConfig fields such as distill or lora_rank."""
    method = get_method(name)
    budget = given(**(budget or {}))
    if not budget:
        if method.heal_minutes is None:
            return None
        budget = {"max_minutes": method.heal_minutes}
    return HealConfig(**{**method.heal_style, **budget, **given(**options)})


@dataclass
class RemovalCount:
    """The block count of a method that deletes whole blocks (ShortGPT, SLEB, LayerChop);
    a method's config extends it with its own fields."""

    num_remove: int | None = None  # None: from the recipe's removal_rate

    def __post_init__(self):
        if self.num_remove is not None and self.num_remove < 0:
            raise ValueError(f"num_remove must be >= 0, got {self.num_remove}")

    def resolved(self, num_remove: int):
        return self if self.num_remove is not None else replace(self, num_remove=num_remove)

    def check(self, num_layers: int) -> None:
        check_removal(self.num_remove, num_layers)


def check_removal(num_remove: int | None, num_layers: int) -> None:
    """For the methods that delete `num_remove` whole blocks: rejects a count that leaves none."""
    if num_remove is None:
        raise ValueError("num_remove is not set (give it, or a removal_rate)")
    if num_remove >= num_layers:
        raise ValueError(f"removing {num_remove} of {num_layers} blocks would leave no block")


def param_summary(before, after, removed: int, num_layers: int) -> dict:
    """Parameter counts before/after (compress.blocks.ParamCount), as FoldGPT's report has them."""
    return {
        "source_effective": before.effective, "source_unique": before.unique,
        "effective": after.effective, "unique": after.unique,
        "removed_blocks": removed, "removed_fraction_blocks": removed / num_layers,
        "unique_reduction": 1 - after.unique / before.unique,
        "effective_reduction": 1 - after.effective / before.effective,
    }
