"""Where each model family keeps its decoder stack, norms, embedding and head.

This is the only module that knows architecture layouts; everything else asks it.
Families are keyed by `config.model_type`, never by a model name, so an unknown
family fails loudly here instead of silently doing the wrong thing downstream.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class ArchAdapter:
    """Attribute paths (dotted, from the *ForCausalLM module) for one model family."""

    model_type: str
    base: str = "model"  # the decoder stack without the head: returns last_hidden_state (after the final norm)
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    embed: str = "model.embed_tokens"
    lm_head: str = "lm_head"
    mlp_out: str | None = "mlp.down_proj"  # in a block; None where a norm follows the MLP (cut repair cannot fold there)

    def get_base(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.base)

    def get_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def set_layers(self, model: nn.Module, layers: list[nn.Module]) -> None:
        parent, _, leaf = self.layers.rpartition(".")
        setattr(model.get_submodule(parent), leaf, nn.ModuleList(layers))

    def get_embed(self, model: nn.Module) -> nn.Embedding:
        return model.get_submodule(self.embed)

    def get_lm_head(self, model: nn.Module) -> nn.Linear:
        return model.get_submodule(self.lm_head)

    def get_final_norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.final_norm)

    def block_norm_names(self, block: nn.Module) -> list[str]:
        """Names of the normalisation modules inside one decoder block.

        Norm weights are the per-depth tensors of a folded model: tiny, and the
        knob healing re-adapts for each depth ("layernorm re-adaptation").
        """
        return [name for name, mod in block.named_modules() if name and _is_norm(mod)]

    def norm_param_names(self, block: nn.Module) -> list[str]:
        norms = self.block_norm_names(block)
        return [n for n, _ in block.named_parameters() if any(n.startswith(p + ".") for p in norms)]

    def per_depth_param_names(self, block: nn.Module) -> list[str]:
        """Norm weights and low-rank deltas (compress.delta): each depth's own, even in a shared group."""
        deltas = [name for name, mod in block.named_modules() if type(mod).__name__ == "LowRankDelta"]
        return self.norm_param_names(block) + [
            n for n, _ in block.named_parameters() if any(n.startswith(p + ".") for p in deltas)]

    def shared_param_names(self, block: nn.Module) -> list[str]:
        per_depth = set(self.per_depth_param_names(block))
        return [n for n, _ in block.named_parameters() if n not in per_depth]


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


# Every family here lays out its *ForCausalLM the Llama way; the table exists so a
# family that does not (e.g. GPT-2's `transformer.h`) is added as data, not branches.
ADAPTERS: dict[str, ArchAdapter] = {
    t: ArchAdapter(t) for t in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma")
} | {t: ArchAdapter(t, mlp_out=None) for t in ("gemma2", "gemma3_text")}  # post_feedforward_layernorm


def get_adapter(model_or_config: PreTrainedModel | PretrainedConfig) -> ArchAdapter:
    """Raises ValueError naming the supported families when the architecture is unknown."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported architecture {model_type!r}; supported model_type values: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]
