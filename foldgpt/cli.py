"""`foldgpt` command line: each subcommand parses into a config and calls one function.

Errors a user can fix (ValueError, FileNotFoundError, FileExistsError) become one line on
stderr and exit code 2; anything else is a bug and keeps its traceback. A command that
writes refuses, before any work, to replace what this tool did not write, unless
--overwrite (compress.outputs).
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
    from dataclasses import replace

    from foldgpt.pipeline import RunConfig, parse_exports, run

    d = RunConfig()  # the defaults; the flags change only what they name
    run(replace(d, model=args.model, dtype=args.dtype, out=args.out,
                fold=replace(d.fold, removal_rate=args.removal_rate, num_unique_blocks=args.unique_blocks),
                heal=replace(d.heal, max_minutes=args.heal_minutes, qat_bits=args.qat_bits or None),
                calib=replace(d.calib, source=args.data), heal_data=replace(d.heal_data, source=args.data),
                exports=parse_exports(args.exports) if args.exports else d.exports,
                weight_method=args.weight_method, max_ppl_ratio=args.max_ppl_ratio, export_workers=args.export_workers,
                cache_dense_exports=not args.no_export_cache, bench=not args.no_bench, profile=args.profile, overwrite=args.overwrite))
    return 0


def _eval_config(args: argparse.Namespace):
    from compress.evaluate import EvalConfig

    tasks = dict(_name_path(t) for t in args.task or [])
    texts = dict(_name_path(t) for t in args.text or [])
    if not tasks and not texts:
        return None
    return EvalConfig(ppl_files=texts, tasks=tasks, limit=args.limit, ppl_max_tokens=args.ppl_max_tokens)


def _name_path(spec: str) -> tuple[str, str]:
    from pathlib import Path

    name, sep, path = spec.partition("=")
    return (name, path) if sep else (Path(spec).stem, spec)


def _local_config(args: argparse.Namespace):
    """--local-minutes: unset = the method's default (FoldGPT: a fifth of healing's minutes), 0 = off."""
    from compress.local_heal import LocalHealConfig
    from compress.recipe import METHOD_DEFAULT

    if args.local_minutes is None:
        if args.local_loss:
            raise ValueError("--local-loss needs --local-minutes")
        return METHOD_DEFAULT
    if args.local_minutes == 0:
        return None
    from compress.methods import given

    return LocalHealConfig(max_minutes=args.local_minutes, **given(loss=args.local_loss))


def _block_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"--remove: expected a comma list of block numbers, got {text!r}") from None


def cmd_compress(args: argparse.Namespace) -> int:
    from compress.data import DataConfig
    from compress.delta import DeltaConfig
    from compress.fold import FoldConfig
    from compress.importance import GateConfig
    from compress.methods import given, heal_config, method_config
    from compress.recipe import CompressConfig, compress
    from compress.repair import RepairConfig
    from compress.select import SelectConfig

    if args.delta_rank is None and (args.delta_init or args.delta_linears or args.delta_base):
        raise ValueError("--delta-init, --delta-base and --delta-linears need --delta-rank")
    budget = dict(max_minutes=args.heal_minutes, max_steps=args.heal_steps, max_tokens=args.heal_tokens)
    peer = method_config(args.method, num_remove=args.num_remove, span=args.span, replacement=args.replacement,
                         placement=args.placement, train_steps=args.train_steps, train_minutes=args.train_minutes)
    cfg = CompressConfig(
        out=args.out, model=args.model, dtype=args.dtype, resume=args.resume, work_dir=args.work_dir, overwrite=args.overwrite,
        method=args.method, peer=peer,
        calib=DataConfig(source=args.data, seq_len=args.seq_len, num_sequences=args.calib_sequences, seed=args.seed,
                         gen_dtype=args.self_text_dtype),
        heal_data=DataConfig(source=args.data, seq_len=args.seq_len, num_sequences=args.heal_sequences, seed=args.seed + 1,
                             gen_dtype=args.self_text_dtype),
        fold=FoldConfig(removal_rate=args.removal_rate,
                        group_size=None if args.unique_blocks else args.group_size,
                        num_unique_blocks=args.unique_blocks,
                        gate=GateConfig(seed=args.seed, **given(steps=args.gate_steps)),
                        select=SelectConfig(**given(candidates=args.removal_candidates, held_back=args.held_back)),
                        repair=None if args.repair == "none" else RepairConfig(fit=args.repair),
                        remove=_block_list(args.remove),
                        delta=DeltaConfig(args.delta_rank, **given(init=args.delta_init, linears=args.delta_linears,
                                                                   base=args.delta_base))
                        if args.delta_rank is not None else None),
        local=_local_config(args),
        heal=None if args.no_heal else heal_config(args.method, budget, lora_rank=args.lora_rank, distill=args.distill, last_blocks=args.last_blocks,
                                                   ce_weight=args.ce_weight, temperature=args.temperature,
                                                   qat_bits=args.qat_bits, compute_dtype=args.heal_dtype,
                                                   batch_size=args.batch_size, seed=args.seed, parallel=args.parallel),
        eval=_eval_config(args),
    )
    out = compress(cfg)
    print(f"folded model written to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from compress.evaluate import evaluate
    from compress.format import weight_files
    from compress.load import load_model
    from compress.outputs import Kind, check_output, write_atomic

    cfg = _eval_config(args)
    if cfg is None:
        raise ValueError("nothing to evaluate: give --text FILE and/or --task NAME=FILE")
    source = Path(args.model_dir)
    out = Path(args.out) if args.out else (source / "eval.json" if source.is_dir() else Path("eval.json"))
    reads = [*weight_files(source), source / "config.json", *cfg.ppl_files.values(), *cfg.tasks.values()]
    out = check_output(out, Kind.EVAL, inputs=reads, overwrite=args.overwrite)
    model, tok = load_model(args.model_dir)
    reference = None
    if args.reference:
        ref_model, ref_tok = load_model(args.reference)
        reference = evaluate(ref_model, ref_tok, cfg)
        del ref_model
    metrics = evaluate(model, tok, cfg, reference=reference)
    result = {"model": str(args.model_dir), "metrics": metrics, "reference": reference}
    write_atomic(out, json.dumps(result, indent=1, default=str))
    from compress.recipe import summary_metrics

    print(json.dumps(summary_metrics(metrics), indent=2))
    print(f"written to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from export.registry import ExportConfig, get_backend, split_precision

    backend = get_backend(args.backend)
    precision, spec_bits = split_precision(args.precision)  # "int4+emb8" = --precision int4 --embedding-bits 8
    cfg = ExportConfig(precision=precision, max_context=args.max_context, embedding_bits=args.embedding_bits or spec_bits,
                       weight_method=args.weight_method, parity=not args.no_parity, overwrite=args.overwrite,
                       max_ppl_ratio=args.max_ppl_ratio, gate_text=args.gate_text, calibration=args.calibration,
                       smooth_alpha=args.smooth)
    report = backend.export(args.model_dir, args.out, cfg)
    print(json.dumps(report, indent=2, default=str))
    return 0


def add_export_args(p: argparse.ArgumentParser) -> None:
    """`foldgpt export`'s arguments; `optimum-cli export foldgpt` (export/optimum_cli.py) takes the same."""
    p.add_argument("backend", help="onnx or executorch")
    p.add_argument("model_dir")
    p.add_argument("--out", required=True, help="output directory (onnx) or .pte file (executorch)")
    p.add_argument("--precision", default="fp32",
                   help="fp32, int8, int4 or int4+emb8 (onnx: 8-bit tied head/embedding), or 8da4w[+emb8] (executorch)")
    p.add_argument("--max-context", type=int, default=512, help="KV-cache length for static-cache backends")
    p.add_argument("--embedding-bits", type=int, default=None, help="executorch: quantize the tied embedding and head to 8 bits (one tensor; 4 is refused: stored twice)")
    p.add_argument("--weight-method", default="rtn",
                   help="4-bit weights: rtn (round to nearest; use it for a fold healed with --qat-bits 4), hqq, "
                        "or gptq (needs --calibration)")
    p.add_argument("--calibration", default=None, help="gptq, --smooth: a text file like the model's input (not the gate's text)")
    p.add_argument("--smooth", type=float, default=None, metavar="ALPHA",
                   help="SmoothQuant: move int8 activations' outliers into the weights, folded into the norms "
                        "(0.5 is the paper's default; needs --calibration)")
    p.add_argument("--no-parity", action="store_true", help="skip the parity gate (not recommended)")
    p.add_argument("--max-ppl-ratio", type=float, default=None,
                   help="quantized gate: refuse an export above this perplexity ratio to fp32 (default 1.02 for 8-bit, 1.10 for 4-bit)")
    p.add_argument("--gate-text", default=None, help="quantized gate: a text file held back from calibration (default: built-in prose)")
    _overwrite_arg(p)


def cmd_generate(args: argparse.Namespace) -> int:
    from export.registry import get_backend

    backend = get_backend(args.backend)
    backend.generate(args.artifact, args.prompt, args.max_new_tokens,
                     on_token=lambda text: print(text, end="", flush=True))
    print()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from runtime_tests.bench import BenchConfig, bench

    artifacts: dict[str, dict[str, str]] = {}
    for spec in args.artifact or []:  # NAME:BACKEND[:PRECISION]=PATH
        key, sep, path = spec.partition("=")
        name, _, runtime = key.partition(":")
        if not sep or not runtime:
            raise ValueError(f"--artifact {spec!r}: expected NAME:BACKEND[:PRECISION]=PATH, e.g. folded:onnx:int4=runs/onnx")
        artifacts.setdefault(name, {})[runtime] = path
    cfg = BenchConfig(models=dict(_name_path(m) for m in args.models), artifacts=artifacts, out=args.out,
                      profile=args.profile, cores=args.cores, torch_eager=not args.no_torch,
                      prompt_lengths=tuple(int(n) for n in args.prompt_lengths.split(",")),
                      decode_tokens=args.decode_tokens, warmup=args.warmup, repeats=args.repeats,
                      rounds=args.rounds, memory_cap=not args.no_memory_cap, overwrite=args.overwrite)
    result = bench(cfg)
    print(f"report written to {result['files']['markdown']}")
    return 0


def _overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output this tool did not write (never one that is, holds or lies in an input)")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", action="append", help="[NAME=]FILE for windowed perplexity (repeatable)")
    p.add_argument("--task", action="append", help="[NAME=]FILE.jsonl multiple-choice task, ARC schema (repeatable)")
    p.add_argument("--limit", type=int, default=None, help="items per task (seeded subset)")
    p.add_argument("--ppl-max-tokens", type=int, default=None, help="tokens read per perplexity file")


def cmd_chat(args: argparse.Namespace) -> int:
    from foldgpt.chat import chat

    chat(args.pte, prompts=args.prompt, max_new_tokens=args.max_new_tokens)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foldgpt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="layers, schedule, total vs unique parameters, bytes on disk")
    p.add_argument("source", help="folded or HF model directory, .gguf file, hub id, or 'default'")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: as stored; GGUF: float32)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("compress", help="fold a model: gates, removal, shared groups, heal (or a peer method)")
    p.add_argument("--model", default="default", help="source model (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="output directory for the folded model")
    p.add_argument("--method", default="foldgpt", help="foldgpt, shortgpt, streamline, layerchop or sleb")
    p.add_argument("--removal-rate", type=float, default=0.2, help="fraction of decoder blocks to remove, in [0, 1)")
    p.add_argument("--num-remove", type=int, default=None, help="shortgpt, layerchop, sleb: blocks to remove, instead of --removal-rate")
    p.add_argument("--span", type=int, default=None, help="streamline: consecutive blocks replaced by one (default: removed + 1)")
    p.add_argument("--replacement", default=None, help="streamline: what replaces the span (layer)")
    p.add_argument("--train-steps", type=int, default=None, help="streamline: replacement training steps (default 200)")
    p.add_argument("--train-minutes", type=float, default=None, help="streamline: replacement training budget in minutes")
    p.add_argument("--placement", default=None, help="layerchop: which blocks go: last (default), middle or first")
    p.add_argument("--group-size", type=int, default=1,
                   help="adjacent retained blocks per shared group (default 1: removal only, which measured better "
                        "than sharing on the default model, benchmarks/results/quality.md)")
    p.add_argument("--unique-blocks", type=int, default=None, help="instead of --group-size: unique blocks to keep")
    p.add_argument("--heal-minutes", type=float, default=None,
                   help="healing budget in minutes (default: foldgpt and layerchop 20, the others none)")
    p.add_argument("--heal-steps", type=int, default=None, help="healing budget in optimizer steps")
    p.add_argument("--heal-tokens", type=int, default=None, help="healing budget in training tokens")
    p.add_argument("--no-heal", action="store_true", help="skip healing")
    p.add_argument("--distill", default=None,
                   help="healing's distillation target: hidden, logits, both or none (default: hidden; layerchop none)")
    p.add_argument("--ce-weight", type=float, default=None,
                   help="weight of healing's next-token loss (default 1; 0 with --distill logits: distillation "
                        "alone, Minitron's recipe)")
    p.add_argument("--temperature", type=float, default=None, help="logit distillation temperature (default 2)")
    p.add_argument("--lora-rank", type=int, default=0, help="heal with LoRA of this rank instead of full fine-tune")
    p.add_argument("--heal-dtype", default=None, choices=("float32", "bfloat16"),
                   help="healing's forward passes in bfloat16 (autocast; weights stay fp32): more steps per minute "
                        "on CPUs with AVX-512 BF16 or AMX")
    p.add_argument("--qat-bits", type=int, default=None,
                   help="4: healing runs through the exporters' 4-bit weights (8da4w, ONNX int4), so they lose little")
    p.add_argument("--last-blocks", type=int, default=None,
                   help="heal only the last K depths (weights, deltas, norms) and the final norm: a shorter backward")
    p.add_argument("--batch-size", type=int, default=4, help="healing sequences per step, per process")
    p.add_argument("--parallel", default=None,
                   help="under accelerate launch with several processes: ddp (replicate the model, default) or fsdp "
                        "(shard it; one unit per shared block)")
    p.add_argument("--data", default="self", help="'self' (text generated by the model), or a .txt/.jsonl/.parquet file, or a dataset name")
    p.add_argument("--self-text-dtype", default="bfloat16", choices=("float32", "bfloat16"),
                   help="dtype the dense model samples the default self text in (bfloat16: 1.5x faster on this CPU "
                        "with AVX-512 BF16; float32: another text, cached apart)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-sequences", type=int, default=40, help="calibration windows (foldgpt holds --held-back of them out)")
    p.add_argument("--removal-candidates", default=None,
                   help="foldgpt: comma list of gates, sleb, block_influence, span, gates_from_sleb (default: all); "
                        "the set with the lowest held-back KL is removed")
    p.add_argument("--held-back", type=int, default=None, help="foldgpt: calibration windows kept for scoring candidates (default 8)")
    p.add_argument("--repair", default="none",
                   help="foldgpt: closed-form map at each cut: sequential, dense or none (default: measured worse after healing)")
    p.add_argument("--local-minutes", type=float, default=None,
                   help="train the block before each cut, and each shared group, towards the dense states for this "
                        "long, taken from healing's --heal-minutes (default foldgpt: a fifth of them; 0: off)")
    p.add_argument("--local-loss", default=None, help="local healing loss: mse (default) or cosine")
    p.add_argument("--remove", default=None, help="foldgpt: comma list of source blocks to remove, skipping the selection "
                   "(e.g. a set an earlier run's provenance chose); overrides --removal-rate")
    p.add_argument("--delta-rank", type=int, default=None,
                   help="foldgpt: each depth of a shared group gets a low-rank delta of this rank on every shared Linear "
                        "(counted in the unique parameters; --unique-blocks shares more to pay for them)")
    p.add_argument("--delta-init", default=None, help="delta start: svd of (own - shared) weights (default) or zero")
    p.add_argument("--delta-base", default=None,
                   help="shared weights the deltas correct: scored (default: as without deltas), first, mean or regmean")
    p.add_argument("--delta-linears", default=None, help="comma list of Linears in a block that get deltas (default: all)")
    p.add_argument("--heal-sequences", type=int, default=192)
    p.add_argument("--gate-steps", type=int, default=None, help="gate training steps (default: GateConfig's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--work-dir", default=None, help="stage artifacts and checkpoints (default: OUT.work)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its work dir")
    _overwrite_arg(p)
    _eval_args(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", help="perplexity, zero-shot accuracy and stability of a model")
    p.add_argument("model_dir", help="folded or dense model directory, .gguf, or 'default'")
    p.add_argument("--reference", default=None, help="dense model for stability (e.g. 'default')")
    p.add_argument("--out", default=None, help="metrics JSON (default: MODEL_DIR/eval.json)")
    _overwrite_arg(p)
    _eval_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export a folded or dense model directory to a runtime format")
    add_export_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="stream tokens from an exported model with its KV cache")
    p.add_argument("artifact", help="exported model (onnx directory or .pte file)")
    p.add_argument("--backend", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="the Android demo's chat loop on the host (ExecuTorch's C++ LLM runner)")
    p.add_argument("pte", help="exported .pte with tokenizer.json beside it")
    p.add_argument("--prompt", action="append", help="send this message (repeatable); default: read stdin")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("bench", help="latency and memory under an emulated phone CPU; JSON + Markdown report")
    p.add_argument("models", nargs="+", help="[NAME=]MODEL_DIR (folded or dense); name a dense one 'dense' for ratios")
    p.add_argument("--artifact", action="append", help="NAME:BACKEND[:PRECISION]=PATH exported artifact (repeatable)")
    p.add_argument("--profile", default="apple_a17_pro", help="target profile name or .json file")
    p.add_argument("--cores", type=int, default=None, help="cores to pin to (default: the profile's performance cores)")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--prompt-lengths", default="32,128,512")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed TTFT runs per prompt length")
    p.add_argument("--rounds", type=int, default=5, help="timed decode rounds (compared runs side by side, alternating)")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch eager on the model directories")
    p.add_argument("--no-memory-cap", action="store_true", help="do not cap address space at the profile's app budget")
    _overwrite_arg(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("run", help="the main job on a model (default: the embedded SmolLM2-135M)")
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default="runs/main", help="everything the run makes; rerun to resume")
    p.add_argument("--heal-minutes", type=float, default=12.5, help="local healing (a fifth) and the cure")
    p.add_argument("--removal-rate", type=float, default=1 / 3, help="fraction of blocks removed (default 10 of 30)")
    p.add_argument("--unique-blocks", type=int, default=20,
                   help="unique blocks kept; fewer than the kept depths shares adjacent ones (e.g. --removal-rate 0.2)")
    p.add_argument("--data", default="self",
                   help="calibration and healing text: 'self' (generated by the model), a .txt/.jsonl/.parquet file or a dataset name")
    p.add_argument("--qat-bits", type=int, default=4,
                   help="heal through the 4-bit exports' rounding (compress/qat.py; the fold ships in 4 bits); 0: a plain cure")
    p.add_argument("--profile", default=None, help="phone profile for the harnesses")
    p.add_argument("--exports", default=None,
                   help="BACKEND:PRECISION list (default: onnx:fp32,onnx:int4+emb8,executorch:8da4w+emb8), e.g. executorch:fp32")
    p.add_argument("--weight-method", default="rtn",
                   help="the 4-bit exports' rounding: rtn (the grid the cure trained through), gptq (on the calibration text) or hqq")
    p.add_argument("--max-ppl-ratio", type=float, default=1.5,
                   help="the exports' gate: refuse one above this perplexity ratio to fp32 on held-out self text")
    p.add_argument("--export-workers", type=int, default=2,
                   help="exports run at once, each in its own process (tracing and lowering use one core each)")
    p.add_argument("--no-export-cache", action="store_true",
                   help="export the dense model again rather than copy this machine's earlier export of it")
    p.add_argument("--no-bench", action="store_true", help="stop after the exports")
    _overwrite_arg(p)
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet()
    args = build_parser().parse_args(argv)
    return run_command(args.func, args, f"foldgpt {args.command}")


def run_command(func, args: argparse.Namespace, name: str) -> int:
    """Run a command function; bad input becomes one line on stderr and exit code 2."""
    try:
        return func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
