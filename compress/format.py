"""The folded-model format: the one bridge between compression and export.

A folded model is a directory:
  config.json        the Hugging Face config, plus a `fold` section
                     (format_version, schedule, shared / per_depth tensor names, provenance,
                     and since version 2 `deltas`: {depth: {linear: rank}}, compress.delta)
  model.safetensors  each unique tensor exactly once; a block's shared tensors are
                     stored under the name of its first depth
  tokenizer files, generation_config.json

With the identity schedule the directory is also a plain transformers checkpoint.
Saving is atomic: everything is written to a temporary sibling directory that is then
swapped in for the target, so an interrupted save leaves the previous artifact intact; an
existing target that is not a folded model is refused (compress.outputs).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compress.adapter import get_adapter
from compress.delta import attach_deltas, delta_spec
from compress.blocks import FOLD_FORMAT_VERSION, READABLE_FORMAT_VERSIONS, count_parameters, fold_info, schedule_of, share_blocks, validate_schedule
# export/ reads compress only through this module: the output rules come with the format
from compress.outputs import Kind, check_output, replace_path, sync_files  # noqa: F401

WEIGHTS_NAME = "model.safetensors"
# Config entry of a model dequantized from a GGUF: {"types": [its block types], "group_size": 32}.
# Exporters read it (export.grid) to store weights still on that 4-bit grid exactly.
SOURCE_GRID_KEY = "foldgpt_source_grid"


def _fold_section(model: nn.Module) -> dict:
    adapter = get_adapter(model)
    block = adapter.get_layers(model)[0]
    info = dict(fold_info(model))
    info.update(
        format_version=FOLD_FORMAT_VERSION,
        schedule=schedule_of(model),
        shared=adapter.shared_param_names(block),
        per_depth=adapter.per_depth_param_names(block),
        deltas=delta_spec(model),
    )
    return info


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """First name of each unique tensor -> tensor (persistent buffers included)."""
    state = {name: p.detach() for name, p in model.named_parameters()}  # drops duplicates
    all_params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for name, t in model.state_dict().items():
        if name not in all_params:
            state[name] = t
    return {k: v.contiguous() for k, v in state.items()}


def save_folded(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, provenance: dict | None = None,
                overwrite: bool = False) -> Path:
    """Write `model` (folded or dense) to `out_dir` atomically; returns the path.

    `provenance` is merged into `config.fold.provenance` (source, method, metrics...).
    Raises FileExistsError / ValueError (`check_output`) for an `out_dir` that holds
    something other than a folded model, unless `overwrite`.
    """
    out = check_output(out_dir, Kind.FOLDED, overwrite=overwrite).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    fold = _fold_section(model)
    if provenance:
        fold["provenance"] = {**fold["provenance"], **provenance}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        config = model.config
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config  # dequantized weights: the GGUF quantizer no longer applies
        config.fold = fold
        model.config.fold = fold
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_file(_unique_state(model), tmp / WEIGHTS_NAME, metadata={"format": "pt", "foldgpt_format": str(FOLD_FORMAT_VERSION)})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        replace_path(tmp, out, Kind.FOLDED, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_fold_section(path: str | os.PathLike) -> dict | None:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a model directory)")
    try:
        return json.loads(config_file.read_text()).get("fold")
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None


def load_folded(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """Rebuild a folded (or dense) model and its tokenizer from a directory.

    Returns (model, tokenizer or None). Each depth is its own module with its own
    `layer_idx`; depths of one block hold the same Parameters.
    Raises FileNotFoundError for a missing directory or weights file and ValueError for a
    corrupt file, a schedule pointing at a missing block, or missing/unexpected tensors.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model directory")
    fold = read_fold_section(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing weights file")
    config = AutoConfig.from_pretrained(path)
    get_adapter(config)
    if fold is not None:
        check_format_version(path, fold)
        validate_schedule(fold["schedule"], config.num_hidden_layers)
    tensors = _read_safetensors(weights)
    dtype = dtype or next(iter(tensors.values())).dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if fold is not None:
        share_blocks(model, fold["schedule"])
        attach_deltas(model, fold.get("deltas") or {})
    expected = _unique_state(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ValueError(f"{weights}: tensors do not match the schedule in config.json ({detail})")
    with torch.no_grad():
        for name, target in expected.items():
            src = tensors[name]
            if src.shape != target.shape:
                raise ValueError(f"{weights}: {name} has shape {tuple(src.shape)}, config implies {tuple(target.shape)}")
            target.copy_(src.to(target.dtype))
    model.eval()
    if fold is not None:
        model.config.fold = fold
    return model, _load_tokenizer(path)


def check_format_version(path: str | os.PathLike, fold: dict) -> None:
    """One line for a directory this foldgpt cannot read (a newer format, or no version)."""
    version = fold.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        newer = isinstance(version, int) and version > FOLD_FORMAT_VERSION
        raise ValueError(f"{path}: fold format_version {version!r} "
                         + ("was written by a newer foldgpt; upgrade foldgpt to read it" if newer
                            else f"is not one this foldgpt reads ({', '.join(map(str, READABLE_FORMAT_VERSIONS))})"))


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise ValueError(f"{file}: corrupt or truncated safetensors file ({type(e).__name__}: {e})") from None


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(path)


def weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + sorted(path.glob("*.gguf"))


def summarize(model: nn.Module, path: str | os.PathLike | None = None) -> dict:
    """What `foldgpt inspect` shows: depth, schedule, effective vs unique parameters, bytes."""
    adapter = get_adapter(model)
    counts = count_parameters(model)
    schedule = schedule_of(model)
    groups = []
    for block in range(max(schedule) + 1):
        depths = [d for d, b in enumerate(schedule) if b == block]
        groups.append({"block": block, "depths": depths, "unique_params": counts.per_block[block]})
    disk = sum(f.stat().st_size for f in weight_files(Path(path))) if path else None
    return {
        "model_type": model.config.model_type,
        "path": str(path) if path else None,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "num_layers": len(schedule),
        "num_unique_blocks": len(groups),
        "schedule": schedule,
        "hidden_size": model.config.hidden_size,
        "vocab_size": model.config.vocab_size,
        "tied_embeddings": adapter.get_lm_head(model).weight is adapter.get_embed(model).weight,
        "effective_params": counts.effective,
        "unique_params": counts.unique,
        "embedding_params": counts.embedding,
        "unique_bytes": counts.unique_bytes,
        "bytes_on_disk": disk,
        "disk_over_unique": round(disk / counts.unique_bytes, 4) if disk else None,
        "provenance": fold_info(model).get("provenance", {}),
        "groups": groups,
    }


def format_summary(s: dict) -> str:
    mb = 1024 * 1024
    lines = [
        f"{s['model_type']}  {s['num_layers']} layers over {s['num_unique_blocks']} unique blocks  "
        f"hidden {s['hidden_size']}  vocab {s['vocab_size']}  {s['dtype']}  tied embeddings: {s['tied_embeddings']}",
        f"parameters: effective {s['effective_params'] / 1e6:.2f}M, unique {s['unique_params'] / 1e6:.2f}M "
        f"(embedding {s['embedding_params'] / 1e6:.2f}M)",
        f"unique weight bytes {s['unique_bytes'] / mb:.1f} MiB"
        + (f", on disk {s['bytes_on_disk'] / mb:.1f} MiB (x{s['disk_over_unique']:.4f})" if s["bytes_on_disk"] else ""),
    ]
    removed = s["provenance"].get("removed_blocks")
    if removed:
        lines.append(f"removed source blocks: {removed}")
    lines.append(f"schedule: {s['schedule']}")
    lines.append(f"{'block':>5}  {'params':>9}  depths")
    for g in s["groups"]:
        lines.append(f"{g['block']:>5}  {g['unique_params'] / 1e6:>8.2f}M  {g['depths']}")
    return "\n".join(lines)
