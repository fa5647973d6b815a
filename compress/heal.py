"""FoldGPT step 4, healing: a short fine-tune of the shared block weights and the
per-depth norms, with loss

    ce_weight * cross-entropy(next token) + distill_weight * tail-layer distillation from the dense model

where the tail distillation matches the final hidden state (MSE), the logits
(KL at a temperature), both, or nothing (`distill="none"`: plain continued pretraining,
as LayerChop heals; no teacher is needed then). `ce_weight=0` with logit distillation at
temperature 1 is Minitron's recipe (arXiv 2407.14679: the teacher's whole distribution
carries more per token than the one sampled next token). `qat_bits=4` runs the forward
through the exporters' 4-bit weights (compress.qat); `compute_dtype="bfloat16"` autocasts
the forward passes (student and teacher) to bf16 for more steps per minute. Norm weights get their own, larger learning rate:
they are the only per-depth knobs a shared block has ("layernorm re-adaptation").

Runs on accelerate: `accelerate launch --num_processes N` (or torchrun) runs the same loop
data-parallel, each process on its shard of every global batch: replicated (`parallel="ddp"`)
or sharded with FSDP2, one unit per physical block so shared weights stay shared
(`parallel="fsdp"`, compress.parallel; tested with 2 CPU processes over gloo). The budget is
steps, tokens and/or minutes (whichever ends first). Checkpoints are full state dicts keyed by
parameter name plus a JSON of progress, written once by the main process and swapped in
atomically; `resume=True` continues from the last one under any process count and either
parallelism, skipping the batches already seen, so an interrupted run loses at most
`checkpoint_every` steps. A step draws no random numbers: batches are a function of the step.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from compress.adapter import get_adapter
from compress.blocks import schedule_of, share_blocks
from compress.outputs import Kind, replace_path
from compress.parallel import Parallel, any_process, check_wrap, full_state, gather, load_full_state, shard_folded, skeleton, wrap_policy
from compress.qat import add_fake_quant, remove_fake_quant
from compress.registry import enum_choice


class Distill(str, Enum):
    HIDDEN = "hidden"
    LOGITS = "logits"
    BOTH = "both"
    NONE = "none"  # next-token loss only


@dataclass
class HealConfig:
    max_steps: int | None = None
    max_tokens: int | None = None
    max_minutes: float | None = None
    batch_size: int = 4
    lr: float = 1e-4
    norm_lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0
    distill: Distill = Distill.HIDDEN
    distill_weight: float = 1.0
    ce_weight: float = 1.0  # 0 with distill="logits": distillation alone (Minitron)
    temperature: float = 2.0  # for logit distillation
    lora_rank: int = 0  # 0: full fine-tune of the blocks; >0: LoRA on each shared Linear
    lora_alpha: float = 16.0
    train_embeddings: bool = False  # also train the (tied) embedding / head: every weight, as LayerChop does
    last_blocks: int | None = None  # train only the last k depths (weights, deltas, norms) + final norm (arXiv 2411.15558)
    compute_dtype: str = "float32"  # "bfloat16": forward matmuls autocast to bf16 (weights, grads, optimizer stay fp32)
    qat_bits: int | None = None  # 4: forward through the exporters' 4-bit grid (compress.qat), export with rtn scales
    qat_group_size: int = 32
    teacher_cache_mb: float = 2048.0  # keep the teacher's final hidden states up to this size (0: recompute every step)
    checkpoint_every: int = 25
    seed: int = 0
    parallel: Parallel = Parallel.DDP  # under several processes: replicate, or shard (FSDP2)

    def __post_init__(self):
        self.distill = enum_choice(Distill, self.distill, "distillation target")
        self.parallel = enum_choice(Parallel, self.parallel, "parallelism")
        if self.parallel is Parallel.FSDP and (self.lora_rank or self.qat_bits):
            raise ValueError("parallel='fsdp' with LoRA or QAT is not supported: their parametrizations are not sharded")
        budgets = {"max_steps": self.max_steps, "max_tokens": self.max_tokens, "max_minutes": self.max_minutes}
        if all(v is None for v in budgets.values()):
            raise ValueError("healing needs a budget: max_steps, max_tokens or max_minutes")
        for name, v in budgets.items():
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
        if self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("batch_size and checkpoint_every must be positive")
        if self.ce_weight < 0 or self.distill_weight < 0:
            raise ValueError("ce_weight and distill_weight must be >= 0")
        if self.ce_weight == 0 and self.distill is Distill.NONE:
            raise ValueError("ce_weight=0 with distill='none' leaves healing no loss")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if self.last_blocks is not None and self.last_blocks < 1:
            raise ValueError(f"last_blocks must be >= 1 (None: every block), got {self.last_blocks}")
        if self.teacher_cache_mb < 0:
            raise ValueError(f"teacher_cache_mb must be >= 0, got {self.teacher_cache_mb}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be float32 or bfloat16, got {self.compute_dtype!r}")
        if self.qat_bits is not None:
            from compress.qat import check_bits

            check_bits(self.qat_bits)
            if self.lora_rank:
                raise ValueError("qat_bits with lora_rank: the rounding would be merged into the weights; use one of them")
            if self.qat_group_size < 1:
                raise ValueError(f"qat_group_size must be positive, got {self.qat_group_size}")


@dataclass
class HealState:
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[dict] = field(default_factory=list)
    processes: int = 1  # of the run that made the last step
    parallel: str = "ddp"  # "fsdp": sharded, one unit per physical block


def heal(model: nn.Module, teacher: nn.Module | None, data: torch.Tensor, cfg: HealConfig, work_dir: str | os.PathLike,
         resume: bool = False) -> tuple[nn.Module, HealState]:
    """Fine-tune `model` (folded) towards `teacher` (dense) on `data` (LongTensor [n, seq]).

    Returns the healed model (sharing intact, LoRA merged) and the final progress state.
    `teacher` may be None when `cfg.distill` is "none".
    Raises ValueError for empty data, a missing teacher, or a teacher whose vocabulary differs.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if data.ndim != 2 or len(data) == 0:
        raise ValueError(f"healing data must be a non-empty (n, seq) tensor, got shape {tuple(data.shape)}")
    if teacher is None and cfg.distill is not Distill.NONE:
        raise ValueError(f"distill={cfg.distill.value} needs a teacher model")
    if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
        raise ValueError("teacher and student vocabularies differ")
    work = Path(work_dir)
    ckpt = work / "checkpoint"
    set_seed(cfg.seed)
    schedule = schedule_of(model)
    lora = _add_lora(model, cfg.lora_rank, cfg.lora_alpha) if cfg.lora_rank else []
    if cfg.qat_bits:
        add_fake_quant(model, cfg.qat_bits, cfg.qat_group_size)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.num_processes > len(data):
        raise ValueError(f"{accelerator.num_processes} processes but only {len(data)} healing windows: "
                         "use fewer processes or more data")
    plugin = getattr(accelerator.state, "fsdp_plugin", None) if accelerator.distributed_type == "FSDP" else None
    sharded = cfg.parallel is Parallel.FSDP or plugin is not None  # an accelerate FSDP config asks for it too
    if plugin is not None:
        check_wrap(model, wrap_policy(plugin))
    if sharded:
        shell = skeleton(model)
        model = shard_folded(model, accelerator.device)
    groups = _param_groups(model, cfg, lora)  # after sharding: fully_shard replaces the Parameters
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    if not sharded:
        model, optimizer = accelerator.prepare(model, optimizer)
    for g in optimizer.param_groups:
        g["base_lr"] = g["lr"]
    if teacher is not None:
        teacher = teacher.to(accelerator.device).eval()
    cache = None if cfg.distill is Distill.NONE else TeacherCache(teacher, data, cfg.teacher_cache_mb)
    state = HealState()
    if resume and (ckpt / "state.pt").is_file():
        saved = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        load_full_state(model, optimizer, saved["model"], saved["optimizer"])
        state = HealState(**json.loads((ckpt / "progress.json").read_text()))
    elif resume:
        kind = "a checkpoint of an older foldgpt (no state.pt)" if (ckpt / "progress.json").is_file() else "no checkpoint"
        print(f"{kind} under {ckpt}; starting healing from step 0")

    model.train()
    tokens_per_step = cfg.batch_size * data.shape[1]
    bar = tqdm(total=_estimate_total(cfg, state, tokens_per_step), initial=state.step, desc="heal", unit="step",
               disable=not accelerator.is_local_main_process)
    start = time.monotonic() - state.seconds
    try:
        while not _done_everywhere(cfg, state):
            idx = _batch(len(data), state.step, cfg, accelerator)
            batch = data[idx].to(accelerator.device)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * _lr_scale(cfg, state)
            # torch's autocast, not accelerate's mixed_precision: that one is fixed per process
            with torch.autocast(accelerator.device.type, torch.bfloat16, enabled=cfg.compute_dtype == "bfloat16"):
                terms = _step(model, teacher, batch, cfg, cache(idx, batch) if cache else None)
            accelerator.backward(terms["loss"])
            if cfg.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad()
            state.step += 1
            state.processes, state.parallel = accelerator.num_processes, (Parallel.FSDP if sharded else Parallel.DDP).value
            state.tokens += tokens_per_step * accelerator.num_processes
            state.seconds = time.monotonic() - start
            state.losses.append({k: round(v.item(), 5) for k, v in terms.items()} | {"step": state.step})
            bar.total = _estimate_total(cfg, state, tokens_per_step)
            bar.set_postfix(loss=f"{terms['loss'].item():.3f}", ce=f"{terms['ce'].item():.3f}")
            bar.update(1)
            if state.step % cfg.checkpoint_every == 0 or _done_everywhere(cfg, state):
                _save_checkpoint(accelerator, model, optimizer, ckpt, state)
    finally:
        bar.close()
    model = gather(model, shell) if sharded else accelerator.unwrap_model(model)
    model.eval()
    if lora:
        _merge_lora(model, lora)
    if cfg.qat_bits:
        remove_fake_quant(model)  # the fp32 weights whose export rounding healing trained through
    share_blocks(model, schedule)  # re-assert sharing; a no-op unless something untied it
    return model, state


def teacher_hidden(teacher: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The teacher's final hidden state (after its final norm, as `hidden_states[-1]`),
    without running its head: the head is a fifth of the model and hidden distillation
    does not need it."""
    with torch.no_grad():
        return get_adapter(teacher).get_base(teacher)(input_ids=batch).last_hidden_state


def teacher_logits(teacher: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The teacher's logits from its final hidden state, as its *ForCausalLM computes them."""
    with torch.no_grad():
        logits = get_adapter(teacher).get_lm_head(teacher)(hidden)
        cap = getattr(teacher.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits


class TeacherCache:
    """The teacher's final hidden state of each healing sequence, computed the first time the
    sequence is drawn and kept. The teacher's forward is a quarter of a healing step on the default
    model (benchmarks/results/cure_step.md), and a budget in minutes runs several epochs over
    a small healing set: later epochs skip it. When all sequences' states (in the teacher's
    dtype) exceed `max_mb`, nothing is kept and every step recomputes."""

    def __init__(self, teacher: nn.Module, data: torch.Tensor, max_mb: float):
        n, seq = data.shape
        width = teacher.config.hidden_size
        dtype = next(teacher.parameters()).dtype
        keep = n * seq * width * torch.finfo(dtype).bits // 8 <= max_mb * 2**20
        self.teacher = teacher
        self.store = torch.empty(n, seq, width, dtype=dtype) if keep else None
        self.known = torch.zeros(n, dtype=torch.bool)

    def __call__(self, idx: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        if self.store is None:
            return teacher_hidden(self.teacher, batch)
        new = ~self.known[idx]
        if new.any():  # a batch may draw a sequence twice (wrap-around): compute each once
            rows = torch.unique(idx[new])
            first = torch.stack([(idx == r).nonzero()[0, 0] for r in rows])
            self.store[rows] = teacher_hidden(self.teacher, batch[first]).cpu()
            self.known[rows] = True
        return self.store[idx].to(batch.device)


def _step(model, teacher, batch, cfg: HealConfig, ref_hidden: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One healing loss. `ref_hidden` is the teacher's final hidden state of `batch` when the
    caller has it (TeacherCache); otherwise the teacher runs here."""
    hidden = cfg.distill in (Distill.HIDDEN, Distill.BOTH)
    out = model(input_ids=batch, labels=batch, output_hidden_states=hidden)
    if cfg.distill is Distill.NONE:
        return {"ce": out.loss, "loss": out.loss}
    if ref_hidden is None:
        ref_hidden = teacher_hidden(teacher, batch)
    terms = {"ce": out.loss}
    distill = torch.zeros((), device=batch.device)
    if hidden:
        terms["hidden_mse"] = F.mse_loss(out.hidden_states[-1], ref_hidden)
        distill = distill + terms["hidden_mse"]
    if cfg.distill in (Distill.LOGITS, Distill.BOTH):
        t = cfg.temperature
        terms["logit_kl"] = F.kl_div(F.log_softmax(out.logits.float() / t, -1).flatten(0, 1),
                                     F.log_softmax(teacher_logits(teacher, ref_hidden).float() / t, -1).flatten(0, 1),
                                     log_target=True, reduction="batchmean") * t * t
        distill = distill + terms["logit_kl"]
    terms["loss"] = cfg.ce_weight * terms["ce"] + cfg.distill_weight * distill
    return terms


def _batch(n: int, step: int, cfg: HealConfig, accelerator) -> torch.Tensor:
    """Indices (into n sequences) of global batch `step` of a seeded per-epoch permutation,
    this process's shard of it. A pure function of the step, so a resumed run sees exactly
    the batches it would have."""
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = cfg.batch_size * world
    per_epoch = max(1, n // per_step)
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
    idx = order[(i * per_step + rank * cfg.batch_size) % n:][: cfg.batch_size]
    if len(idx) < cfg.batch_size:  # fewer sequences than a batch: wrap around
        idx = order.repeat(cfg.batch_size)[: cfg.batch_size]
    return idx


def _progress(cfg: HealConfig, s: HealState) -> float:
    """Fraction of the budget used: the largest over the budgets that are set."""
    used = []
    if cfg.max_steps is not None:
        used.append(s.step / cfg.max_steps)
    if cfg.max_tokens is not None:
        used.append(s.tokens / cfg.max_tokens)
    if cfg.max_minutes is not None:
        used.append(s.seconds / (cfg.max_minutes * 60))
    return min(1.0, max(used))


def _lr_scale(cfg: HealConfig, s: HealState) -> float:
    """Linear warm-up, then cosine decay over the budget (whichever budget ends first)."""
    warm = min(1.0, (s.step + 1) / max(1, cfg.warmup_steps))
    return warm * 0.5 * (1 + math.cos(math.pi * _progress(cfg, s)))


def _done(cfg: HealConfig, s: HealState) -> bool:
    return _progress(cfg, s) >= 1.0


def _estimate_total(cfg: HealConfig, s: HealState, tokens_per_step: int) -> int:
    """Steps until the first budget runs out, for the progress bar's ETA."""
    limits = []
    if cfg.max_steps is not None:
        limits.append(cfg.max_steps)
    if cfg.max_tokens is not None:
        limits.append(math.ceil(cfg.max_tokens / tokens_per_step))
    if cfg.max_minutes is not None and s.step and s.seconds:
        limits.append(int(s.step * cfg.max_minutes * 60 / s.seconds))
    return max(min(limits), s.step) if limits else s.step + 1


def _save_checkpoint(accelerator, model, optimizer, ckpt: Path, state: HealState) -> None:
    """Every process takes part in gathering the full state; the main process alone writes it
    and swaps it in."""
    weights, optim = full_state(model, optimizer)
    if accelerator.is_main_process:
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save({"model": weights, "optimizer": optim}, tmp / "state.pt")  # keeps shared storages shared
        (tmp / "progress.json").write_text(json.dumps(asdict(state)))  # last: a checkpoint without it is unfinished
        replace_path(tmp, ckpt, Kind.CHECKPOINT)  # one swap: a kill leaves the old checkpoint or the new one
    accelerator.wait_for_everyone()


def _done_everywhere(cfg: HealConfig, state: HealState) -> bool:
    """A minutes budget can end on one process a step before another: stop when any has."""
    return any_process(_done(cfg, state))


def _param_groups(model: nn.Module, cfg: HealConfig, lora: list[nn.Module]) -> list[dict]:
    """Trainable: every decoder block (shared weights + per-depth norms and deltas; the last
    `last_blocks` only, if set) and the final norm; LoRA factors instead of the block weights when lora_rank > 0. The tied
    embedding/head stays frozen unless `train_embeddings`: it is a fifth of the model and
    shared with the dense teacher's vocabulary."""
    adapter = get_adapter(model)
    for p in model.parameters():
        p.requires_grad_(False)
    norms, weights, seen = [], [], set()
    layers = adapter.get_layers(model)
    if cfg.last_blocks is not None and cfg.last_blocks > len(layers):
        raise ValueError(f"last_blocks {cfg.last_blocks} exceeds the model's {len(layers)} depths")
    # the last k only: the backward pass then stops at depth n - k (a shared weight still
    # gets the gradient of its earlier uses)
    for layer in layers[len(layers) - (cfg.last_blocks or len(layers)):]:
        norm_names = set(adapter.norm_param_names(layer))
        for name in adapter.per_depth_param_names(layer):  # norms, and deltas (compress.delta) at the weights' rate
            (norms if name in norm_names else weights).append(layer.get_parameter(name))
        if not lora:
            for name in adapter.shared_param_names(layer):
                p = layer.get_parameter(name)
                if id(p) not in seen:
                    seen.add(id(p))
                    weights.append(p)
    norms += list(adapter.get_final_norm(model).parameters())
    weights += [p for m in lora for p in m.parameters()]
    if cfg.train_embeddings:
        head = [adapter.get_embed(model).weight, adapter.get_lm_head(model).weight]
        weights += list({id(p): p for p in head}.values())  # a tied embedding and head: once
    for p in norms + weights:
        p.requires_grad_(True)
    return [{"params": weights, "lr": cfg.lr}, {"params": norms, "lr": cfg.norm_lr, "weight_decay": 0.0}]


class LoRA(nn.Module):
    """W + (alpha / r) * B @ A as a parametrization; one instance per unique weight, so
    every depth that shares W also shares its low-rank update."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_features) / math.sqrt(in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.B @ self.A).to(weight.dtype)


def _add_lora(model: nn.Module, rank: int, alpha: float) -> list[LoRA]:
    adapter = get_adapter(model)
    by_weight: dict[int, LoRA] = {}
    for layer in adapter.get_layers(model):
        for mod in layer.modules():
            if isinstance(mod, nn.Linear):
                w = mod.weight
                if id(w) not in by_weight:
                    by_weight[id(w)] = LoRA(w.shape[0], w.shape[1], rank, alpha).to(w.device)
                parametrize.register_parametrization(mod, "weight", by_weight[id(w)])
    return list(by_weight.values())


def _merge_lora(model: nn.Module, lora: list[LoRA]) -> None:
    """Fold each LoRA update into its shared weight exactly once, then drop the parametrizations."""
    adapter = get_adapter(model)
    merged: set[int] = set()
    with torch.no_grad():
        for layer in adapter.get_layers(model):
            for mod in layer.modules():
                if isinstance(mod, nn.Linear) and parametrize.is_parametrized(mod, "weight"):
                    original = mod.parametrizations.weight.original
                    if id(original) not in merged:
                        merged.add(id(original))
                        original.copy_(mod.weight)
                    parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
