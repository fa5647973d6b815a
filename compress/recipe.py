"""`foldgpt compress`: the FoldGPT recipe (or a peer method) as resumable stages.

    1. data      calibration + healing sequences        work/calib.pt, work/heal.pt
    2. fold      the method: FoldGPT's removal chosen   work/folded/ (unhealed), work/fold_report.json
                 among candidates -> cuts repaired ->
                 shared groups, or a peer's removal
                 (compress.methods)
    3. local     the block before each cut, and each     work/local/, work/local_report.json
                 shared group, trained towards the dense
                 states (compress.local_heal; FoldGPT's
                 default: a fifth of healing's minutes)
    4. heal      fine-tune (the method's kind of        work/heal/checkpoint (resumable)
                 healing; FoldGPT: distillation)
    5. eval      optional metrics vs the dense model    OUT/eval.json, config.fold.provenance.metrics
    6. save      the folded model with provenance       OUT/

Each stage records its settings in work/<stage>.json and writes its artifact
atomically; with --resume a finished stage is skipped and healing continues from its
last checkpoint. A work dir made with different settings is refused rather than mixed.

Under `accelerate launch --num_processes N` (or torchrun) the main process makes the text
while the others wait; all run the fold and local healing together, their training (block
gates, local healing) splitting each batch across processes (compress.parallel), and the main
process writes what they made, which all then read as a resumed run would; all run healing
data-parallel (compress.heal: DDP, or FSDP with `parallel="fsdp"`); the main process alone
evaluates and writes OUT.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import torch

from compress.data import DataConfig, build_sequences
from compress.fold import FoldConfig
from compress.format import load_folded, save_folded
from compress.heal import HealConfig, heal
from compress.importance import GateConfig
from compress.local_heal import LocalHealConfig, has_units, local_heal
from compress.load import load_depth, load_model
from compress.methods import get_method, heal_config
from compress.outputs import Kind, check_output, exclusive, mark

METHOD_DEFAULT = "method default"
LOCAL_SHARE = 0.2  # of FoldGPT's healing minutes spent on local healing by default (4 of 20 measured better than 0 of 20)


@dataclass
class CompressConfig:
    out: str
    model: str = "default"
    dtype: str = "float32"
    calib: DataConfig = field(default_factory=lambda: DataConfig(num_sequences=40, seq_len=256))  # FoldGPT holds 8 back
    heal_data: DataConfig = field(default_factory=lambda: DataConfig(num_sequences=192, seq_len=256, seed=1))
    fold: FoldConfig = field(default_factory=FoldConfig)  # FoldGPT's settings; a peer takes removal_rate from it
    method: str = "foldgpt"  # compress.methods: foldgpt, shortgpt, streamline, layerchop, sleb
    peer: object | None = None  # a peer method's config (None: its defaults)
    heal: HealConfig | None | str = METHOD_DEFAULT  # None: no healing; default: the method's (compress.methods)
    # block-local healing at the cuts and groups; its minutes come out of healing's. Default: FoldGPT with a
    # healing budget in minutes spends LOCAL_SHARE of them here (measured: benchmarks/results/quality.md, p25
    # removal vs removal+local); other methods, and healing runs budgeted in steps or tokens, none
    local: LocalHealConfig | None | str = METHOD_DEFAULT
    eval: object | None = None  # compress.evaluate.EvalConfig
    eval_reference: dict | None = None  # the dense model's evaluate() result, if already measured
    work_dir: str | None = None  # default: OUT + ".work"
    resume: bool = False
    overwrite: bool = False  # replace an OUT this tool did not write (never the source model)

    def __post_init__(self):
        method = get_method(self.method)
        if method.configured_by_fold and self.peer is not None:
            raise ValueError(f"method {self.method} is configured by fold, not peer")
        if not method.configured_by_fold:
            self.peer = self.peer if self.peer is not None else method.config()
            if not isinstance(self.peer, method.config):
                raise ValueError(f"method {self.method} takes a {method.config.__name__}, not {type(self.peer).__name__}")
        if method.configured_by_fold and self.fold.select.held_back and self.calib.num_sequences <= self.fold.select.held_back:
            raise ValueError(f"{self.calib.num_sequences} calibration windows leave none for the removal candidates "
                             f"once {self.fold.select.held_back} are held back to score them")
        if isinstance(self.heal, str):
            if self.heal != METHOD_DEFAULT:
                raise ValueError(f"heal must be a HealConfig, None or {METHOD_DEFAULT!r}, got {self.heal!r}")
            self.heal = heal_config(self.method)
        if isinstance(self.local, str):
            if self.local != METHOD_DEFAULT:
                raise ValueError(f"local must be a LocalHealConfig, None or {METHOD_DEFAULT!r}, got {self.local!r}")
            timed = method.configured_by_fold and self.heal is not None and self.heal.max_minutes
            self.local = LocalHealConfig(max_minutes=round(LOCAL_SHARE * self.heal.max_minutes, 3)) if timed else None
        if self.local is not None and self.heal is not None and self.heal.max_minutes and self.local.max_minutes:
            # one budget: the local minutes come out of healing's
            if self.local.max_minutes >= self.heal.max_minutes:
                raise ValueError(f"local healing's {self.local.max_minutes:g} min leave nothing of healing's "
                                 f"{self.heal.max_minutes:g} min")
            self.heal = replace(self.heal, max_minutes=self.heal.max_minutes - self.local.max_minutes)

    def method_config(self, num_layers: int):
        """The chosen method's config with its removal count resolved; ValueError if the
        count does not fit a model of `num_layers` blocks."""
        if self.peer is None:
            cfg = self.fold
        else:
            cfg = self.peer.resolved(self.fold.num_remove(num_layers))
            if cfg is not self.peer and self.fold.num_remove(num_layers) >= num_layers:  # the count came from the rate
                raise ValueError(f"removal_rate {self.fold.removal_rate} removes all {num_layers} blocks")
        cfg.check(num_layers)
        return cfg

    @property
    def work(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(str(Path(self.out)) + ".work")


WORKDIR_VERSION = 3  # bump when a stage's settings or names change; older work dirs are refused, not guessed at
# (3: the end-to-end stage is "heal", as its config, function and flags are; it was "cure")


def _claim_stage(work: Path, stage: str, settings: dict) -> bool:
    """Record the stage's settings (or check them against a recorded run); True if the
    stage already finished. Raises ValueError when the work dir was made by another
    version of this recipe or with other settings."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    file = work / f"{stage}.json"
    if file.is_file():
        saved = json.loads(file.read_text())
        if saved.get("version") != WORKDIR_VERSION:
            raise ValueError(f"{work} was made by an older foldgpt (work-dir version {saved.get('version', 1)}, "
                             f"this is {WORKDIR_VERSION}); finish it with that version, or delete it to start over")
        if saved["key"] != key:
            raise ValueError(f"{work} holds a '{stage}' stage made with other settings; use another --out or delete {work}")
        return saved["done"]
    _write_json(file, {"version": WORKDIR_VERSION, "key": key, "done": False, "settings": settings})
    return False


def _claim_together(procs, work: Path, stage: str, settings: dict) -> bool:
    """`_claim_stage` on the main process, and its answer on every process: they run the stage together."""
    done = [_claim_stage(work, stage, settings) if procs.is_main_process else None]
    if procs.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(done)
    return done[0]


def _finish_stage(work: Path, stage: str) -> None:
    file = work / f"{stage}.json"
    _write_json(file, {**json.loads(file.read_text()), "done": True})


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _save_tensor(t: torch.Tensor, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(t, tmp)
    os.replace(tmp, path)


def compress(cfg: CompressConfig) -> Path:
    """Run the recipe; returns the output directory. Raises ValueError/FileNotFoundError
    for bad settings before any heavy work: the depth is read without the weights;
    FileExistsError for an OUT this tool did not write (compress.outputs)."""
    work = cfg.work
    procs = processes()
    if procs.is_main_process:  # the others may find the main process's work dir already made
        check_output(cfg.out, Kind.FOLDED, inputs=(cfg.model,), overwrite=cfg.overwrite)
        check_output(work, Kind.WORK, inputs=(cfg.model,))
        if work.exists() and not cfg.resume and any(work.iterdir()):
            raise ValueError(f"{work} exists from an earlier run; pass --resume to continue it, or choose another --out")
    method_cfg = cfg.method_config(load_depth(cfg.model))
    lock = exclusive(mark(work, Kind.WORK) / ".lock", str(work)) if procs.is_main_process else contextlib.nullcontext()
    with lock:  # a second run on this work dir is refused
        return _run_stages(cfg, work, method_cfg, procs)


def processes():
    """accelerate's view of this launch (one process unless launched with several). The
    others wait at a barrier while the main process makes the text and the fold, which
    takes longer than torch's default 30-minute timeout."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=24))


def _run_stages(cfg: CompressConfig, work: Path, method_cfg, procs) -> Path:
    dense, tokenizer, student, report, local_report, fold_settings, timings = _prepare(cfg, work, method_cfg, procs)

    # 4. heal (resumes from its own checkpoint; a finished one is restored from it)
    heal_state = None
    if cfg.heal is not None:
        t = time.monotonic()
        heal_settings = {**fold_settings, "heal": asdict(cfg.heal)}
        if procs.is_main_process:
            _claim_stage(work, "heal", heal_settings)
        procs.wait_for_everyone()
        student, heal_state = heal(student, dense, torch.load(work / "heal.pt"), cfg.heal, work / "heal", resume=True)
        if procs.is_main_process:
            _finish_stage(work, "heal")
        timings["heal_s"] = time.monotonic() - t
    if not procs.is_main_process:
        procs.wait_for_everyone()  # the main process evaluates and writes OUT
        return Path(cfg.out)
    out = _evaluate_and_save(cfg, dense, tokenizer, student, method_cfg, report, local_report, heal_state, timings)
    procs.wait_for_everyone()
    return out


def _prepare(cfg: CompressConfig, work: Path, method_cfg, procs):
    """Stages 1-3: the dense model, the text, the fold and its local healing."""
    dense, tokenizer = load_model(cfg.model, cfg.dtype)
    if cfg.peer is None:
        cfg.fold.check_model(dense)  # what needs the layer shapes (delta ranks), before the text is made
    timings: dict[str, float] = {}

    # 1. data (the main process makes it, the others then find it made)
    t = time.monotonic()
    data_settings = {"model": cfg.model, "calib": asdict(cfg.calib), "heal": asdict(cfg.heal_data)}
    with procs.main_process_first():
        if not _claim_stage(work, "data", data_settings):
            _save_tensor(build_sequences(cfg.calib, dense, tokenizer), work / "calib.pt")
            _save_tensor(build_sequences(cfg.heal_data, dense, tokenizer), work / "heal.pt")
            _finish_stage(work, "data")
    calib, heal_seqs = torch.load(work / "calib.pt"), torch.load(work / "heal.pt")
    timings["data_s"] = time.monotonic() - t

    # 2. fold
    t = time.monotonic()
    fold_settings = {**data_settings, "fold": asdict(cfg.fold), "method": cfg.method,
                     "peer": asdict(method_cfg) if cfg.peer is not None else None}
    if cfg.peer is None and cfg.fold.gate is None:  # the gates' defaults choose the blocks: record them in the key
        fold_settings["fold"]["gate"] = asdict(GateConfig())
    if not _claim_together(procs, work, "fold", fold_settings):  # every process folds: the gates split batches
        student, report = run_method(cfg.method, copy.deepcopy(dense), calib, method_cfg)
        if procs.is_main_process:
            save_folded(student, work / "folded", tokenizer, provenance={"source": cfg.model, "method": cfg.method})
            _write_json(work / "fold_report.json", report)
            _finish_stage(work, "fold")
    procs.wait_for_everyone()
    student, _ = load_folded(work / "folded")  # the main process's fold, on every process
    report = json.loads((work / "fold_report.json").read_text())
    timings["fold_s"] = time.monotonic() - t

    # 3. local healing at the cuts (a stage of its own: minutes, redone whole if interrupted)
    local_report = None
    if cfg.local is not None and not has_units(student, cfg.local):
        print("local healing: nothing was removed or shared, so there is nothing to heal locally; "
              f"its {cfg.local.max_minutes} min go back to healing")
        if cfg.heal is not None and cfg.heal.max_minutes and cfg.local.max_minutes:
            cfg.heal = replace(cfg.heal, max_minutes=cfg.heal.max_minutes + cfg.local.max_minutes)
    elif cfg.local is not None:
        t = time.monotonic()
        fold_settings = {**fold_settings, "local": asdict(cfg.local)}
        if not _claim_together(procs, work, "local", fold_settings):
            student, rep = local_heal(student, dense, heal_seqs, cfg.local)
            if procs.is_main_process:
                save_folded(student, work / "local", tokenizer)
                _write_json(work / "local_report.json", asdict(rep))
                _finish_stage(work, "local")
        procs.wait_for_everyone()
        student, _ = load_folded(work / "local")
        local_report = json.loads((work / "local_report.json").read_text())
        timings["local_s"] = time.monotonic() - t
    return dense, tokenizer, student, report, local_report, fold_settings, timings


def _evaluate_and_save(cfg: CompressConfig, dense, tokenizer, student, method_cfg, report: dict,
                       local_report: dict | None, heal_state, timings: dict) -> Path:
    """Stages 5-6, on the main process."""
    # 5. eval
    metrics = None
    if cfg.eval is not None:
        from compress.evaluate import evaluate

        metrics = {"dense": cfg.eval_reference or evaluate(dense, tokenizer, cfg.eval)}
        metrics["folded"] = evaluate(student, tokenizer, cfg.eval, reference=metrics["dense"])

    # 6. save
    if cfg.peer is None:
        provenance = {
            "source": cfg.model, "method": cfg.method,
            "removal_rate": cfg.fold.removal_rate, "group_size": cfg.fold.group_size,
            "num_unique_blocks": cfg.fold.num_unique_blocks,
            "gates": (report.get("gates") or {}).get("gates"), "share_sources": report["sources"],
            "removal_selection": report.get("selection"), "repair": report.get("repair"),
        }
    else:
        provenance = {"source": cfg.model, "method": cfg.method, "removal_rate": cfg.fold.removal_rate,
                      "method_config": asdict(method_cfg), "method_report": report}
    provenance.update({
        "params": report["params"], "local_heal": local_report,
        "heal": None if heal_state is None else {
            "steps": heal_state.step, "tokens": heal_state.tokens, "seconds": round(heal_state.seconds, 1),
            "final_loss": heal_state.losses[-1] if heal_state.losses else None,
            "processes": heal_state.processes, "parallel": heal_state.parallel,
            **({"qat": {"bits": cfg.heal.qat_bits, "group_size": cfg.heal.qat_group_size}} if cfg.heal.qat_bits else {}),
        },
        "timings": {k: round(v, 1) for k, v in timings.items()},
    })
    if metrics is not None:
        provenance["metrics"] = summary_metrics(metrics)
    out = save_folded(student, cfg.out, tokenizer, provenance=provenance, overwrite=cfg.overwrite)
    if heal_state is not None:
        _write_json(out / "heal_log.json", heal_state.losses)
    if metrics is not None:
        _write_json(out / "eval.json", metrics)
    return out


def run_method(name: str, model, calib: torch.Tensor, cfg) -> tuple[object, dict]:
    """The fold stage's work: method `name` on `model` (edited in place)."""
    return get_method(name).run(model, calib, cfg)


def summary_metrics(metrics):
    """The metrics without per-item lists, small enough for config provenance."""
    if isinstance(metrics, dict):
        return {k: summary_metrics(v) for k, v in metrics.items() if not isinstance(v, list)}
    return metrics
