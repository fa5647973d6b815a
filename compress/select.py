"""Which blocks to remove, chosen by measurement.

Every method of ranking blocks is a guess at one quantity: how far the model moves when
the blocks go. The gates optimise a relaxed KL over sampled sub-networks, SLEB the
calibration perplexity greedily, Block Influence a per-block cosine, and the most
self-similar span a run's cosine; at 10 of 30 blocks on the default model the gates
picked a removal worse than SLEB's (benchmarks/results/gate_seqlen.md). So each
proposes a set, and the set is chosen by the quantity itself: KL(dense || pruned) on
held-back calibration windows that no proposal was fitted on, with the cuts repaired
first when the fold repairs them (compress.repair), since that is the model that ships.

    gates            FoldGPT's learned gates (compress.importance)
    sleb             SLEB's greedy perplexity removal (compress.sleb)
    block_influence  ShortGPT's lowest Block Influence (compress.shortgpt)
    span             the most self-similar run of contiguous blocks (compress.streamline)
    gates_from_sleb  the gates, started from SLEB's set instead of all equal
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, replace
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from compress.adapter import get_adapter
from compress.blocks import remove_blocks
from compress.capture import batches
from compress.importance import GateConfig, GateResult, learn_gates
from compress.repair import RepairConfig, repair_cuts
from compress.registry import enum_choice


class Candidate(str, Enum):
    GATES = "gates"
    SLEB = "sleb"
    BLOCK_INFLUENCE = "block_influence"
    SPAN = "span"
    GATES_FROM_SLEB = "gates_from_sleb"


@dataclass
class SelectConfig:
    candidates: tuple[Candidate, ...] = tuple(Candidate)
    held_back: int = 8  # calibration windows kept out of every proposal and fit, for the score (0: one candidate, unscored)
    batch_size: int = 4
    sleb_sequences: int | None = 8  # SLEB's perplexity on this many windows (cost ~ blocks x removals forwards)
    init_margin: float = 1.0  # gates_from_sleb: starting logit +m for SLEB's kept blocks, -m for its removed ones

    def __post_init__(self):
        if isinstance(self.candidates, str):
            self.candidates = tuple(c for c in self.candidates.split(",") if c)
        self.candidates = tuple(dict.fromkeys(enum_choice(Candidate, c, "removal candidate") for c in self.candidates))
        if not self.candidates:
            raise ValueError("give at least one removal candidate")
        if self.held_back < 0 or (self.held_back == 0 and len(self.candidates) > 1):
            raise ValueError(f"held_back must be >= 1 to choose among candidates (0 only with one), got {self.held_back}")
        if self.batch_size < 1:
            raise ValueError(f"select batch_size must be positive, got {self.batch_size}")

    def split(self, calib: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(windows proposals and fits see, held-back windows or None). A single candidate
        is still scored, so its held-back KL is on record, unless held_back is 0."""
        if not self.held_back:
            return calib, None
        if len(calib) <= self.held_back:
            raise ValueError(f"{len(calib)} calibration windows leave none for the removal candidates "
                             f"once {self.held_back} are held back to score them")
        return calib[: -self.held_back], calib[-self.held_back:]


@dataclass
class Selection:
    removed: list[int]  # the winning set, current depths of the model given
    winner: str
    table: dict[str, dict]  # candidate -> removed, held-back KL (removed; cuts repaired), seconds to propose and score
    gates: GateResult | None  # the plain gates' run, when they were a candidate
    repaired: bool = False  # the winner's cuts are to be repaired (it scored best so)


def propose(model: nn.Module, fit: torch.Tensor, num_remove: int, cfg: SelectConfig,
            gate: GateConfig | None = None) -> tuple[dict[str, list[int]], dict[str, float], GateResult | None]:
    """Each candidate's set of `num_remove` blocks; `model` is only read."""
    from compress.shortgpt import block_influence
    from compress.sleb import SLEBConfig, sleb
    from compress.streamline import span_similarity

    n = len(get_adapter(model).get_layers(model))
    gate = replace(gate, num_remove=num_remove) if gate else GateConfig(num_remove=num_remove)
    sets, seconds, gates = {}, {}, None
    order = [c for c in Candidate if c in cfg.candidates]
    if Candidate.GATES_FROM_SLEB in order and Candidate.SLEB not in order:
        order.insert(0, Candidate.SLEB)  # the start needs SLEB's set: proposed, not scored
    for cand in order:
        t = time.monotonic()
        if cand is Candidate.GATES:
            gates = learn_gates(model, fit, gate)
            sets[cand.value] = gates.closed
        elif cand is Candidate.SLEB:
            _, report = sleb(copy.deepcopy(model), fit, SLEBConfig(num_remove=num_remove, batch_size=cfg.batch_size,
                                                                    max_sequences=cfg.sleb_sequences))
            sets[cand.value] = report["removed"]
        elif cand is Candidate.BLOCK_INFLUENCE:
            bi = block_influence(model, fit, cfg.batch_size)
            sets[cand.value] = sorted(range(n), key=lambda d: bi[d])[:num_remove]
        elif cand is Candidate.SPAN:
            sim = span_similarity(model, fit, num_remove, cfg.batch_size)
            start = max(range(len(sim)), key=lambda s: sim[s])
            sets[cand.value] = list(range(start, start + num_remove))
        elif cand is Candidate.GATES_FROM_SLEB:
            removed = set(sets[Candidate.SLEB.value])
            init = tuple(-cfg.init_margin if d in removed else cfg.init_margin for d in range(n))
            sets[cand.value] = learn_gates(model, fit, replace(gate, init=init)).closed
        sets[cand.value] = sorted(sets[cand.value])
        seconds[cand.value] = round(time.monotonic() - t, 1)
    return {c: s for c, s in sets.items() if c in {x.value for x in cfg.candidates}}, seconds, gates


@torch.no_grad()
def held_back_kl(dense: nn.Module, pruned: nn.Module, held: list[torch.Tensor], reference: list[torch.Tensor] | None = None) -> float:
    """Mean per-token KL(dense || pruned) over `held` batches (`reference`: dense log-probs, if already computed)."""
    total, n = 0.0, 0
    for i, batch in enumerate(held):
        ref = reference[i] if reference else F.log_softmax(dense(batch, use_cache=False).logits.float(), -1)
        out = F.log_softmax(pruned(batch, use_cache=False).logits.float(), -1)
        total += F.kl_div(out.flatten(0, 1), ref.flatten(0, 1), log_target=True, reduction="sum").item()
        n += batch.numel()
    return total / n


def choose_removal(model: nn.Module, calib: torch.Tensor, num_remove: int, cfg: SelectConfig,
                   gate: GateConfig | None = None, repair: RepairConfig | None = None) -> Selection:
    """Propose, then score every distinct set on the held-back windows, as removed and, with
    `repair`, also with its cuts repaired: a repair that raises the held-back KL is not kept
    (a 10-block span's single map did, 55x dense perplexity: cut_repair_r10.md).
    `model` is only read. Ties go to the candidate listed first in `Candidate`."""
    fit, held = cfg.split(calib)
    sets, seconds, gates = propose(model, fit, num_remove, cfg, gate)
    table = {c: {"removed": s, "propose_s": seconds[c]} for c, s in sets.items()}
    if held is None:
        (winner,) = table
        return Selection(sets[winner], winner, table, gates, repaired=repair is not None)
    held_batches = batches(held, cfg.batch_size)
    reference = [F.log_softmax(model(b, use_cache=False).logits.float(), -1) for b in held_batches]
    scored: dict[tuple[int, ...], dict] = {}
    for c, s in tqdm(sets.items(), desc="scoring removal candidates"):
        t = time.monotonic()
        if tuple(s) not in scored:
            pruned = remove_blocks(copy.deepcopy(model), s)
            scored[tuple(s)] = {"kl": round(held_back_kl(model, pruned, held_batches, reference), 6)}
            if repair is not None:
                repair_cuts(pruned, model, fit, repair)
                scored[tuple(s)]["kl_repaired"] = round(held_back_kl(model, pruned, held_batches, reference), 6)
            del pruned
        table[c].update(**scored[tuple(s)], score_s=round(time.monotonic() - t, 1))
    options = [(row[key], c, key == "kl_repaired") for c, row in table.items() for key in ("kl", "kl_repaired") if key in row]
    _, winner, repaired = min(options, key=lambda o: o[0])
    return Selection(sets[winner], winner, table, gates, repaired)


def selection_settings(cfg: SelectConfig) -> dict:
    """JSON-able settings (enums by value), for work-dir keys and reports."""
    return {**asdict(cfg), "candidates": [c.value for c in cfg.candidates]}
