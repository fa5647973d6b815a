"""`foldgpt run`: the main job, as its stages in order.

Stage 1 (load) is all that exists so far; compression, export and the runtime
harnesses join here as they land, each one a function call on a typed config.
"""

from __future__ import annotations

from dataclasses import dataclass

from compress.format import format_summary, summarize
from compress.load import DEFAULT_MODEL, load_model


@dataclass
class RunConfig:
    model: str = DEFAULT_MODEL
    dtype: str = "float32"


def run(cfg: RunConfig) -> dict:
    """Load the model, fold nothing, and return its summary."""
    model, _ = load_model(cfg.model, cfg.dtype)
    summary = summarize(model)
    print(format_summary(summary))
    return summary
