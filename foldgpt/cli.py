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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foldgpt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="layers, schedule, total vs unique parameters, bytes on disk")
    p.add_argument("source", help="folded or HF model directory, .gguf file, hub id, or 'default'")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: as stored; GGUF: float32)")
    p.set_defaults(func=cmd_inspect)

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
