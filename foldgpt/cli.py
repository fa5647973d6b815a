"""`foldgpt` command line: each subcommand parses into a config and calls one function.

Errors a user can fix (ValueError, FileNotFoundError) become one line on stderr and
exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _quiet() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("torchao", "torch._dynamo", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cmd_inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from compress.format import format_summary, summarize
    from compress.load import DEFAULT_MODEL, default_gguf, load_model

    model, _ = load_model(args.source, args.dtype)
    where = default_gguf() if args.source == DEFAULT_MODEL else Path(args.source)
    summary = summarize(model, where if where.exists() else None)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from foldgpt.pipeline import RunConfig, run

    run(RunConfig(model=args.model, dtype=args.dtype))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from export.registry import ExportConfig, check_paths, get_backend

    backend = get_backend(args.backend)
    cfg = ExportConfig(precision=args.precision, max_context=args.max_context, embedding_bits=args.embedding_bits,
                       parity=not args.no_parity)
    check_paths(args.model_dir, args.out)
    report = backend.export(args.model_dir, args.out, cfg)
    print(json.dumps(report, indent=2, default=str))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from export.registry import get_backend

    backend = get_backend(args.backend)
    backend.generate(args.artifact, args.prompt, args.max_new_tokens,
                     on_token=lambda text: print(text, end="", flush=True))
    print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foldgpt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="layers, schedule, total vs unique parameters, bytes on disk")
    p.add_argument("source", help="folded or HF model directory, .gguf file, hub id, or 'default'")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: as stored; GGUF: float32)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="export a folded or dense model directory to a runtime format")
    p.add_argument("backend", help="onnx or executorch")
    p.add_argument("model_dir")
    p.add_argument("--out", required=True, help="output directory (onnx) or .pte file (executorch)")
    p.add_argument("--precision", default="fp32", help="fp32, int8, int4 (onnx) or 8da4w (executorch)")
    p.add_argument("--max-context", type=int, default=512, help="KV-cache length for static-cache backends")
    p.add_argument("--embedding-bits", type=int, default=None, help="quantize the tied embedding to 4 or 8 bits")
    p.add_argument("--no-parity", action="store_true", help="skip the parity gate (not recommended)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="stream tokens from an exported model with its KV cache")
    p.add_argument("artifact", help="exported model (onnx directory or .pte file)")
    p.add_argument("--backend", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("run", help="the main job on a model (default: the embedded SmolLM2-135M)")
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"foldgpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"foldgpt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
