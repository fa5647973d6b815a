"""Training a folded model on several processes without breaking its one invariant: every
depth of a shared block holds the same Parameter object.

DDP replicates the model, so sharing survives as it is. FSDP shards parameters by unit, and
the usual policy (one unit per decoder layer) would put one shared Parameter into two units:
`fully_shard` then fails ("shared with a parameter already managed by another FSDP group").
`shard_folded` makes one unit per physical block, holding all of its depths, plus the root
(embedding, tied head, final norm). accelerate does not offer FSDP on the CPU (its
`ACCELERATE_USE_FSDP` is ignored for a gloo process group), so healing calls torch's
`fully_shard` itself, on any device.

The fold's own training (block gates, block-local healing) runs under the same launch without
a wrapper: every process draws the same global batch, trains on its rows (`own_rows`), and
gradients are averaged (`average_gradients`), so the fold does not depend on how many
processes made it.

Checkpoints are full state dicts keyed by parameter name (torch.distributed.checkpoint's
state_dict API, which knows shared parameters): gathered from every rank, written once by
the main process, and loadable under any process count and either parallelism.
"""

from __future__ import annotations

import copy
from enum import Enum

import torch
from torch import nn

from compress.adapter import get_adapter
from compress.blocks import schedule_of, share_blocks


class Parallel(str, Enum):
    DDP = "ddp"  # replicate the model on every process (accelerate's default)
    FSDP = "fsdp"  # shard it: one unit per physical block (all its depths), and the root


def block_units(model: nn.Module) -> list[list[int]]:
    """The depths of each physical block, in order: [[0], [1], [2, 3], ...] for schedule 0 1 2 2."""
    units: dict[int, list[int]] = {}
    for depth, block in enumerate(schedule_of(model)):
        units.setdefault(block, []).append(depth)
    return list(units.values())


def wrap_policy(plugin) -> str | None:
    """accelerate's FSDP plugin's auto-wrap policy by its config name; None for NO_WRAP."""
    fn = getattr(plugin, "auto_wrap_policy", None)
    if fn is None:
        return None
    fn = getattr(fn, "func", fn)  # a functools.partial
    names = {"transformer_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "size_based_auto_wrap_policy": "SIZE_BASED_WRAP"}
    return names.get(getattr(fn, "__name__", ""), str(fn))


def check_wrap(model: nn.Module, policy: str | None) -> None:
    """One line, before training, if an FSDP wrap policy would split a shared block: any policy
    but NO_WRAP (healing's own one unit per physical block) may make a unit of one depth."""
    shared = [u for u in block_units(model) if len(u) > 1]
    if policy is not None and shared:
        raise ValueError(f"FSDP wrap policy {policy} would put the depths {shared[0]} of one shared block into separate "
                         "units; set fsdp_auto_wrap_policy: NO_WRAP (healing wraps one unit per shared block itself)")


def shard_folded(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2 in place: one `fully_shard` unit per physical block, then the root."""
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    layers = get_adapter(model).get_layers(model)
    for unit in block_units(model):
        fully_shard([layers[d] for d in unit] if len(unit) > 1 else layers[unit[0]])
    fully_shard(model)
    return model


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of the model's structure on the meta device, to hold the gathered weights after a
    sharded healing run (fully_shard changes the model in place). The copy is made in host memory and
    then emptied, so a second copy of the weights exists for a moment."""
    return copy.deepcopy(model).to("meta")


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
               main_only: bool = True) -> tuple[dict, dict | None]:
    """The model's (and optimizer's) full state, keyed by parameter name: the same under any
    process count and either parallelism. Every rank must call it (FSDP gathers); with
    `main_only` the other ranks get empty dicts and the main one gets CPU tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=main_only and _distributed())
    weights = get_model_state_dict(model, options=opts)
    return weights, None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=opts)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim: dict) -> None:
    """Inverse of `full_state`; every rank passes the same full dicts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=opts)
    set_optimizer_state_dict(model, optimizer, optim, options=opts)


def gather(model: nn.Module, shell: nn.Module) -> nn.Module:
    """The sharded model gathered into `shell` (from `skeleton`) on the CPU, on every rank."""
    weights, _ = full_state(model, main_only=False)
    shell.to_empty(device="cpu")
    share_blocks(shell, schedule_of(model))  # moving to and from meta made a Parameter per depth: tie again
    if getattr(shell.config, "tie_word_embeddings", False):
        shell.tie_weights()
    shell.load_state_dict(weights)
    with torch.no_grad():  # buffers (rotary frequencies) are not in a state dict: copy them
        for name, buf in model.named_buffers():
            shell.get_buffer(name).copy_(buf)
    return shell


def world() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) outside a distributed launch."""
    if not _distributed():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def own_rows(batch: int, what: str) -> slice:
    """This process's rows of a global batch of `batch`; ValueError (one line) unless the
    processes split it evenly, which keeps their averaged gradient that of the whole batch."""
    rank, size = world()
    if batch % size:
        raise ValueError(f"{what}'s batch of {batch} does not split evenly over {size} processes: "
                         f"use a batch that is a multiple of {size}")
    per = batch // size
    return slice(rank * per, (rank + 1) * per)


def average_gradients(params: list[nn.Parameter]) -> None:
    """All-reduce the mean of every gradient across processes, in one flat buffer; a no-op in a
    single process."""
    if not _distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).to(_comm_device(), torch.float32) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any (a time budget ends everywhere at the same step)."""
    if not _distributed():
        return flag
    t = torch.tensor([float(flag)], device=_comm_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _comm_device() -> torch.device:
    """Where collectives take their tensors: NCCL only the current GPU's, gloo the host's."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
