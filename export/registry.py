"""Export backends register themselves by name; nothing branches on backend names.

A backend is a `Backend` entry of two functions, registered by the module that defines them:
    export(model_dir: Path, out: Path, cfg: ExportConfig, measure=True) -> dict
        writes `out`, returns a report; measure=False skips the size/memory probes
        (a caller that runs the memory harness anyway)
    generate(artifact: Path, prompt: str, max_new_tokens: int, on_token=None) -> list[int]
with the precisions it exports (checked before any work, by the CLI and `foldgpt run` too)
and where its artifact lies in an export's folder (`artifact_path`). The runtimes that run
an artifact are runtime_tests.runtimes' entries, each naming the backend it reads.
Heavy dependencies are imported inside those functions, so importing the registry
(and the CLI) stays cheap and a missing package becomes an install hint.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable

from compress.registry import Registry, enum_choice


class Precision(str, Enum):
    FP32 = "fp32"
    INT8 = "int8"  # ONNX: dynamic int8; ExecuTorch: 8da8w (int8 dynamic activations, int8 per-channel weights)
    INT4 = "int4"  # ONNX: MatMulNBits weight-only, block 32
    INT8DA4W = "8da4w"  # ExecuTorch: int8 dynamic activations, int4 grouped weights


class WeightMethod(str, Enum):
    """How grouped 4-bit weights get their scales (both backends, export.quantize.int4_weights)."""
    RTN = "rtn"  # round to nearest, scale = max|w| / 7.5 per group (torchao's symmetric affine)
    HQQ = "hqq"  # half-quadratic scale search (torchao hqq_scale_only): lower weight error, same format
    GPTQ = "gptq"  # export.gptq: lower output error on calibration text (ExportConfig.calibration), same format


# Default bound of the quantized gate, quantized / fp32 perplexity on held-out text, by the
# narrowest weights: 8-bit rounding should cost next to nothing, 4-bit at most a tenth.
PPL_BOUNDS = {8: 1.02, 4: 1.10}


@dataclass
class ExportConfig:
    precision: Precision = Precision.FP32
    max_context: int = 512  # static KV-cache length where the backend needs one
    embedding_bits: int | None = None  # quantize the (tied) embedding to 4 or 8 bits, shared with the head
    group_size: int = 32  # int4 block / group size
    weight_method: WeightMethod = WeightMethod.RTN  # 4-bit scales; a fold healed with qat_bits=4 wants rtn
    parity: bool = True  # run the parity gate before anything is written to `out`
    max_ppl_ratio: float | None = None  # the quantized gate's bound; None: PPL_BOUNDS by the narrowest weights
    gate_text: str | None = None  # a text file held back from calibration (default: export.parity's prose)
    gate_tokens: int = 1024  # tokens of gate_text scored (in windows of up to 256)
    calibration: str | None = None  # gptq: a text file of the model's kind of input (never the gate's text)
    calibration_tokens: int = 8192
    smooth_alpha: float | None = None  # export.smooth: move activation outliers into the weights (needs calibration)
    num_threads: int | None = None
    overwrite: bool = False  # replace an existing `out` this tool did not write (never the model itself)

    def __post_init__(self):
        self.precision = enum_choice(Precision, self.precision, "precision")
        self.weight_method = enum_choice(WeightMethod, self.weight_method, "weight method")
        if self.weight_method is not WeightMethod.RTN and self.precision not in (Precision.INT4, Precision.INT8DA4W):
            raise ValueError(f"weight_method {self.weight_method.value} applies to 4-bit weights (int4, 8da4w), "
                             f"not {self.precision.value}")
        if self.max_context < 2:
            raise ValueError(f"max_context must be at least 2, got {self.max_context}")
        if self.embedding_bits not in (None, 4, 8):
            raise ValueError(f"embedding_bits must be 4 or 8, got {self.embedding_bits}")
        if self.max_ppl_ratio is not None and not self.max_ppl_ratio >= 1:
            raise ValueError(f"max_ppl_ratio bounds quantized / fp32 perplexity and must be at least 1, got {self.max_ppl_ratio}")
        if self.gate_text is not None and not Path(self.gate_text).is_file():
            raise ValueError(f"gate_text {self.gate_text}: no such file")
        if self.gate_tokens < 16:
            raise ValueError(f"gate_tokens must be at least 16, got {self.gate_tokens}")
        if self.weight_method is WeightMethod.GPTQ and self.calibration is None:
            raise ValueError("weight_method gptq rounds against calibration text: pass calibration (a text file)")
        if self.smooth_alpha is not None:
            if not 0 <= self.smooth_alpha <= 1:
                raise ValueError(f"smooth_alpha must lie in [0, 1], got {self.smooth_alpha}")
            if self.precision is Precision.FP32:
                raise ValueError("smoothing serves quantized activations; fp32 has none (pick int8, int4 or 8da4w)")
            if self.calibration is None:
                raise ValueError("smoothing measures activations on calibration text: pass calibration (a text file)")
        if self.calibration is not None and not Path(self.calibration).is_file():
            raise ValueError(f"calibration {self.calibration}: no such file")
        if self.calibration is not None and self.gate_text is not None and Path(self.calibration).resolve() == Path(self.gate_text).resolve():
            raise ValueError("calibration and gate_text are the same file: the gate must score text held back from calibration")

    def weight_bits(self) -> int | None:
        """The narrowest stored weights: 4, 8, or None (fp32)."""
        bits = [b for b in ({Precision.INT8: 8, Precision.INT4: 4, Precision.INT8DA4W: 4}.get(self.precision),
                            self.embedding_bits) if b is not None]
        return min(bits) if bits else None

    def ppl_bound(self) -> float | None:
        """The quantized gate's perplexity bound (None for fp32, which is gated on logits)."""
        bits = self.weight_bits()
        return None if bits is None else (self.max_ppl_ratio or PPL_BOUNDS[bits])

    @classmethod
    def from_spec(cls, spec: str, **kwargs) -> "ExportConfig":
        """'8da4w+emb8' -> precision 8da4w with the tied embedding (and head) in 8 bits: the one
        string a benchmark row, a pipeline export and a report key share."""
        name, bits = split_precision(spec)
        return cls(precision=name, embedding_bits=bits, **kwargs)


def split_precision(spec: str) -> tuple[str, int | None]:
    """'8da4w+emb8' -> ('8da4w', 8), 'fp32' -> ('fp32', None): the one parser of a precision
    string, for exports and for the runtime report (which also names runtimes' own, e.g. q4_1)."""
    name, _, emb = spec.partition("+")
    if emb and emb not in ("emb4", "emb8"):
        raise ValueError(f"precision {spec!r}: the only suffixes are +emb4 and +emb8")
    return name, int(emb[3:]) if emb else None


@dataclass(frozen=True)
class Backend:
    name: str
    export: Callable[..., dict]
    generate: Callable[..., list]
    precisions: tuple[Precision, ...]  # what it exports; anything else is refused before any work
    artifact: str | None = None  # the file an export writes inside its own folder (None: the folder is the artifact)

    def check(self, cfg: ExportConfig) -> None:
        """One-line ValueError for a precision this backend does not export."""
        if cfg.precision not in self.precisions:
            raise ValueError(f"the {self.name} backend exports {', '.join(p.value for p in self.precisions)}, "
                             f"not {cfg.precision.value}")

    def artifact_path(self, folder: Path) -> Path:
        """Where an export in `folder` (which also holds its report) writes its artifact."""
        return folder if self.artifact is None else folder / self.artifact


# The modules that register backends when imported, so `get_backend` can name every
# backend without importing onnxruntime or executorch up front.
_BACKENDS: Registry[Backend] = Registry("backend", {"onnx": "export.onnx", "executorch": "export.executorch"})


def register_backend(name: str, export: Callable[..., dict], generate: Callable[..., list],
                     precisions: tuple[Precision, ...], artifact: str | None = None) -> Backend:
    return _BACKENDS.add(name, Backend(name, export, generate, tuple(precisions), artifact))


def known_backends() -> list[str]:
    return _BACKENDS.known()


def get_backend(name: str) -> Backend:
    """The backend called `name`. Raises ValueError listing the known names."""
    return _BACKENDS.get(name)


def check_paths(model_dir: Path, out: Path, kind, overwrite: bool = False) -> Path:
    """Reject, before any work, a missing model and an output that would destroy the model
    or anything this tool did not write (`compress.outputs.check_output`); returns the path to write."""
    from compress.format import check_output  # here: importing the registry stays free of torch

    if not Path(model_dir).exists():
        raise FileNotFoundError(f"{Path(model_dir).resolve()}: no such model")
    refuse_deltas(model_dir)
    return check_output(out, kind, inputs=(model_dir,), overwrite=overwrite)


def refuse_deltas(model_dir: Path) -> None:
    """Per-depth deltas (compress.delta) have no export yet: the quality benchmark has not shown
    sharing + deltas beating removal at equal bytes on the default model (README, FoldGPT status)."""
    from compress.format import read_fold_section

    fold = read_fold_section(model_dir) if Path(model_dir).is_dir() else None  # its own one-line errors
    if (fold or {}).get("deltas"):
        raise ValueError(f"{model_dir}: has per-depth low-rank deltas, which neither exporter stores yet "
                         "(they did not beat removal at equal bytes; see the README's FoldGPT status)")


def load_model(model_dir: Path):
    """The folded model in fp32 (sharing kept: `.float()` converts each Parameter in place)."""
    from compress.format import load_folded  # the only compress module export/ reads

    model, tokenizer = load_folded(model_dir)
    return model.float().eval(), tokenizer
