"""FoldGPT compression stages on tiny models: data, gates, fold, cure, recipe."""

import copy
import json

import pytest
import torch

import compress.data as data
import compress.heal as heal_mod
from compress.adapter import get_adapter
from compress.blocks import count_parameters, schedule_of
from compress.data import DataConfig, build_sequences, pack, self_generated
from compress.fold import FoldConfig, best_candidate, fold
from compress.heal import HealConfig, TeacherCache, _step, heal, teacher_hidden, teacher_logits
from compress.importance import BlockGates, GateConfig, learn_gates
from tests.conftest import FAMILIES, tiny_model, tiny_tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "\n\n"
        "Folding shares weights between adjacent blocks of a network. " * 3 + "\n\n") * 8


def tokens(n=16, seq=32, vocab=99, seed=0):
    return torch.randint(4, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def identity_blocks(model, depths):
    """Zero the output projections: the block's residual update becomes exactly zero."""
    layers = get_adapter(model).get_layers(model)
    with torch.no_grad():
        for d in depths:
            layers[d].self_attn.o_proj.weight.zero_()
            layers[d].mlp.down_proj.weight.zero_()


# --- data ---------------------------------------------------------------------------

def test_pack_is_seeded_and_fixed_length():
    tok = tiny_tokenizer()
    a = pack([TEXT], tok, seq_len=24, num_sequences=5, seed=3)
    b = pack([TEXT], tok, seq_len=24, num_sequences=5, seed=3)
    c = pack([TEXT], tok, seq_len=24, num_sequences=5, seed=4)
    assert a.shape == (5, 24) and torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_local_file_sources(tmp_path, kind):
    docs = [p for p in TEXT.split("\n\n") if p.strip()]
    path = tmp_path / f"data.{kind}"
    if kind == "txt":
        path.write_text("\n\n".join(docs))
    elif kind == "jsonl":
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs}), path)
    seqs = build_sequences(DataConfig(source=str(path), seq_len=16, num_sequences=4), tokenizer=tiny_tokenizer())
    assert seqs.shape == (4, 16)


def test_self_generated_text_is_cached(tmp_path, monkeypatch):
    model, tok = tiny_model(vocab=99), tiny_tokenizer()
    cfg = DataConfig(source="self", seq_len=16, num_sequences=4, gen_max_new_tokens=24, gen_batch_size=4,
                     cache_dir=str(tmp_path))
    first = build_sequences(cfg, model, tok)
    monkeypatch.setattr(data, "sample", lambda *a, **k: pytest.fail("cache not used"))
    assert torch.equal(build_sequences(cfg, model, tok), first)


def test_self_text_does_not_change_when_the_cache_grows(tmp_path):
    """A larger request (the healing set) grows the shared cache; the smaller one
    (calibration) must still get the sequences it got on a fresh cache."""
    model, tok = tiny_model(vocab=99), tiny_tokenizer()
    small = DataConfig(source="self", seq_len=16, num_sequences=4, gen_max_new_tokens=24, gen_batch_size=4,
                       cache_dir=str(tmp_path))
    first = build_sequences(small, model, tok)
    meta = next(tmp_path.glob("self-text/*.json"))
    batches = json.loads(meta.read_text())["batches"]
    build_sequences(DataConfig(**{**small.__dict__, "num_sequences": 40}), model, tok)
    assert json.loads(meta.read_text())["batches"] > batches  # the cache did grow
    assert torch.equal(build_sequences(small, model, tok), first)


def test_bf16_sampler_same_seed_same_text_and_its_own_cache(tmp_path, monkeypatch):
    """The faster sampler: a rerun with the same seed gives the same documents, in a cache of its own
    that an fp32 request never reads (and the caller's fp32 model is left as it was)."""
    model, tok = tiny_model(vocab=99), tiny_tokenizer()
    fp32 = DataConfig(source="self", seq_len=16, num_sequences=4, gen_max_new_tokens=24, gen_batch_size=4,
                      cache_dir=str(tmp_path), gen_dtype="float32")
    bf16 = DataConfig(**{**fp32.__dict__, "gen_dtype": "bfloat16"})
    assert DataConfig().gen_dtype == "bfloat16"  # the default
    first = self_generated(bf16, model, tok)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert len(list(tmp_path.glob("self-text/*.jsonl"))) == 1
    fresh = self_generated(DataConfig(**{**bf16.__dict__, "cache_dir": str(tmp_path / "other")}), model, tok)
    assert fresh == first  # same seed, same backend, same text
    calls = []
    real = data.sample
    monkeypatch.setattr(data, "sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    self_generated(fp32, model, tok)
    assert calls and len(list(tmp_path.glob("self-text/*.jsonl"))) == 2  # generated anew, not read from bf16's
    with pytest.raises(ValueError, match="gen_dtype"):
        DataConfig(gen_dtype="float16")


def test_empty_and_short_data(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(ValueError, match="no text"):
        build_sequences(DataConfig(source=str(empty)), tokenizer=tiny_tokenizer())
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ValueError, match="data too short"):
        build_sequences(DataConfig(source=str(short), seq_len=64), tokenizer=tiny_tokenizer())
    with pytest.raises(FileNotFoundError):
        DataConfig(source=str(tmp_path / "missing.jsonl"))


# --- gates --------------------------------------------------------------------------

def test_gates_close_exactly_the_redundant_blocks():
    model = tiny_model(layers=6, hidden=64, vocab=99)
    identity_blocks(model, [1, 4])
    before = [p.detach().clone() for p in model.parameters()]
    result = learn_gates(model, tokens(), GateConfig(num_remove=2, steps=60))
    assert sorted(result.closed) == [1, 4]
    assert result.separated
    assert sum(g < 0.5 for g in result.gates) == 2
    assert len(result.trajectory) == 60 and len(result.trajectory[0]) == 6
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # weights untouched


def test_each_sequence_draws_its_own_gate_sample():
    model = tiny_model(layers=4).eval()
    batch = tokens()[:1].repeat(2, 1)
    gates = BlockGates(model)
    gates.temperature = 0.01
    noise = torch.tensor([[9.0, -9.0, 9.0, 9.0], [9.0, 9.0, 9.0, -9.0]])  # row 0 drops block 1, row 1 block 3
    with torch.no_grad():
        gates.noise = noise
        both = model(batch).logits
        rows = []
        for b in range(2):  # each sample alone, on one sequence
            gates.noise = noise[b:b + 1]
            rows.append(model(batch[:1]).logits[0])
    gates.remove()
    assert not torch.allclose(both[0], both[1], atol=1e-3)  # identical inputs, different sub-networks
    torch.testing.assert_close(both[0], rows[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both[1], rows[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_remove", [1, 3])
def test_gates_close_the_requested_number(num_remove):
    result = learn_gates(tiny_model(layers=6), tokens(), GateConfig(num_remove=num_remove, steps=40))
    assert len(result.closed) == num_remove
    assert sum(g < 0.5 for g in result.gates) == num_remove


@pytest.mark.parametrize("unit", ["blocks", "params"])
def test_gate_budget_unit_weighs_blocks_by_size(unit):
    """Block 1 is exactly redundant but three times the size of the others (an unused
    parameter): counting blocks, it is the one to close; counting parameters, closing it
    removes more than one small block's worth, so the budget keeps it open."""
    model = tiny_model(layers=4)
    identity_blocks(model, [1])
    big = get_adapter(model).get_layers(model)[1]
    big.register_parameter("unused", torch.nn.Parameter(torch.zeros(2 * sum(p.numel() for p in big.parameters()))))
    result = learn_gates(model, tokens(), GateConfig(num_remove=1, steps=20, budget_unit=unit))
    w = torch.tensor([1.0, 3.0, 1.0, 1.0] if unit == "params" else [1.0] * 4)
    w = w / w.mean()
    keep = torch.tensor(result.trajectory[-1])
    assert float((w * keep).sum()) == pytest.approx(float(w.sum() - w.min()), rel=1e-3)  # the budget held
    assert (result.closed == [1]) == (unit == "blocks")


# --- fold ---------------------------------------------------------------------------

def test_fold_schedule_and_unique_params_follow_the_rate():
    model = tiny_model(layers=6, hidden=64, vocab=99)
    dense = count_parameters(model)
    block = dense.per_block[0]
    norms = 2 * 64
    model, report = fold(model, tokens(), FoldConfig(removal_rate=1 / 3, group_size=2,
                                                     gate=GateConfig(steps=20)))
    assert schedule_of(model) == report.schedule == [0, 0, 1, 1]
    assert model.config.num_hidden_layers == 4 and len(report.removed) == 2
    after = count_parameters(model)
    # 2 blocks removed, the remaining 4 stored as 2 blocks + 2 extra per-depth norm sets
    assert after.unique == dense.unique - 4 * block + 2 * norms
    assert report.params["removed_blocks"] == 2
    layers = get_adapter(model).get_layers(model)
    assert layers[0].mlp.gate_proj.weight is layers[1].mlp.gate_proj.weight
    assert layers[0].post_attention_layernorm.weight is not layers[1].post_attention_layernorm.weight
    assert not torch.equal(layers[0].post_attention_layernorm.weight, layers[1].post_attention_layernorm.weight)


def test_fold_with_unique_block_target_merges_cheapest_neighbours():
    model = tiny_model(layers=5, hidden=64, vocab=99)
    identity_blocks(model, [2, 3])  # sharing these two costs nothing: both are identity
    model, report = fold(model, tokens(), FoldConfig(removal_rate=0.0, group_size=None, num_unique_blocks=4))
    assert report.schedule == [0, 1, 2, 2, 3]


@pytest.mark.parametrize("family", FAMILIES)
def test_share_scorer_tail_replays_the_full_forward(family):
    """Scores rerun only the depths after a group's start; that replay must be the model."""
    from compress.fold import ShareScorer

    model = tiny_model(family, layers=4)
    calib = tokens()
    scorer = ShareScorer(model, calib, FoldConfig(score_batches=1, score_batch_size=2))
    with torch.no_grad():
        full = model(calib[:2], use_cache=False).logits
    for start in range(4):
        torch.testing.assert_close(scorer.tail_logits(0, start), full, rtol=1e-5, atol=1e-5)


def test_best_candidate_is_the_lowest_measured_kl():
    """Each member's score equals KL(dense || whole model with that member's weights at
    both depths), computed here from scratch with full forwards."""
    import torch.nn.functional as F

    model = tiny_model(layers=4, hidden=64, vocab=99)
    calib, cfg = tokens(), FoldConfig()
    best, table = best_candidate(model, calib, [0, 1], cfg)
    assert set(table) == {"0", "1", "mean", "regmean"}
    batches = [calib[i:i + cfg.score_batch_size] for i in range(0, min(len(calib), cfg.score_batches * cfg.score_batch_size),
                                                                  cfg.score_batch_size)]
    names = get_adapter(model).shared_param_names(get_adapter(model).get_layers(model)[0])
    for member in (0, 1):
        shared = copy.deepcopy(model)
        layers = get_adapter(shared).get_layers(shared)
        with torch.no_grad():
            for n in names:
                for d in (0, 1):
                    layers[d].get_parameter(n).copy_(get_adapter(model).get_layers(model)[member].get_parameter(n))
            kl = sum(F.kl_div(F.log_softmax(shared(b, use_cache=False).logits, -1).flatten(0, 1),
                              F.log_softmax(model(b, use_cache=False).logits, -1).flatten(0, 1),
                              log_target=True, reduction="batchmean").item() for b in batches) / len(batches)
        assert table[str(member)] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert table[str(best)] == min(table.values()) and table["0"] != table["1"]


def test_regmean_keeps_what_each_member_uses():
    """Member 0 only ever sees inputs in the first three coordinates, member 1 in the last
    three: the exact least-squares merge takes each half from the member that uses it,
    reproducing both outputs, where the mean reproduces neither."""
    from compress.fold import regmean

    g = torch.Generator().manual_seed(0)
    w0, w1 = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    x0, x1 = torch.zeros(40, 6), torch.zeros(40, 6)
    x0[:, :3] = torch.randn(40, 3, generator=g)
    x1[:, 3:] = torch.randn(40, 3, generator=g)
    w = regmean([w0, w1], [x0.T @ x0, x1.T @ x1], alpha=1.0)
    torch.testing.assert_close(w, torch.cat([w0[:, :3], w1[:, 3:]], 1), rtol=1e-4, atol=1e-4)
    mean = (w0 + w1) / 2
    assert (x0 @ (mean - w0).T).norm() > 1.0 and (x1 @ (mean - w1).T).norm() > 1.0


def test_share_scorer_grams_are_the_linear_inputs():
    """The Gram behind RegMean is X^T X of what q_proj (after the depth's own norm) and
    down_proj (act(gate) * up) actually receive."""
    from compress.fold import ShareScorer

    model = tiny_model(layers=3, hidden=32, vocab=99)
    calib = tokens(n=4, seq=16)
    scorer = ShareScorer(model, calib, FoldConfig(score_batches=2, score_batch_size=2))
    layer = get_adapter(model).get_layers(model)[1]
    seen = {}
    hooks = [layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("q", []).append(a[0])),
             layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("down", []).append(a[0]))]
    with torch.no_grad():
        model(calib, use_cache=False)
    for h in hooks:
        h.remove()
    grams = scorer.grams(1)
    for key, name in (("q", "self_attn.q_proj"), ("down", "mlp.down_proj")):
        x = torch.cat([t.flatten(0, 1) for t in seen[key]]).double()
        torch.testing.assert_close(grams[name], x.T @ x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(removal_rate=1.0), "removal_rate"),
    (dict(removal_rate=-0.1), "removal_rate"),
    (dict(group_size=0), "group_size"),
    (dict(regmean_alpha=0.0), "regmean_alpha"),
])
def test_fold_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FoldConfig(**kwargs)


def test_fold_config_defaults_remove_only_and_pass_their_own_checks():
    """The measured default (quality.md): no shared groups, no cut repair; num_unique_blocks
    alone no longer clashes with a group_size default."""
    cfg = FoldConfig(removal_rate=0.25, gate=GateConfig(steps=2))
    assert cfg.group_size is None and cfg.repair is None
    FoldConfig(num_unique_blocks=2).check(4)
    student, report = fold(tiny_model(layers=4, hidden=64, vocab=99), tokens(), cfg)
    assert schedule_of(student) == [0, 1, 2] and report.repair is None


def test_fold_config_checks_against_depth():
    with pytest.raises(ValueError, match="removes all"):
        FoldConfig(removal_rate=0.9).check(2)
    with pytest.raises(ValueError, match="larger than the 3 retained"):
        FoldConfig(removal_rate=0.25, group_size=4).check(4)


# --- cure ---------------------------------------------------------------------------

@pytest.mark.parametrize("steps, compute_dtype", [(1, "float32"), (3, "bfloat16")])
def test_cure_steps_reduce_the_loss_on_a_fixed_batch(tmp_path, steps, compute_dtype):
    """compute_dtype=bfloat16 autocasts the forward passes; the weights it trains stay fp32."""
    teacher = tiny_model(layers=4, hidden=64, vocab=99)
    student, _ = fold(copy.deepcopy(teacher), tokens(), FoldConfig(removal_rate=0.25, group_size=2, gate=GateConfig(steps=10)))
    batch = tokens(n=4)
    cfg = HealConfig(max_steps=steps, batch_size=4, lr=1e-3, warmup_steps=1, compute_dtype=compute_dtype)
    with torch.no_grad():
        before = _step(student, teacher, batch, cfg)["loss"].item()
    student, state = heal(student, teacher, batch, cfg, tmp_path)
    with torch.no_grad():
        after = _step(student, teacher, batch, cfg)["loss"].item()
    assert state.step == steps and after < before
    assert schedule_of(student) == [0, 0, 1]
    assert {p.dtype for p in student.parameters()} == {torch.float32}


def test_cure_compute_dtype_is_checked():
    with pytest.raises(ValueError, match="compute_dtype must be float32 or bfloat16"):
        HealConfig(max_steps=1, compute_dtype="float16")


def test_distillation_alone_drops_the_next_token_loss():
    """ce_weight=0 (Minitron): the loss is the logit KL and nothing else; at ce_weight=1 the CE adds on."""
    teacher = tiny_model(layers=4, hidden=64, vocab=99)
    student, _ = fold(copy.deepcopy(teacher), tokens(), FoldConfig(removal_rate=0.25, group_size=2, gate=GateConfig(steps=10)))
    batch = tokens(n=4)
    with torch.no_grad():
        alone = _step(student, teacher, batch, HealConfig(max_steps=1, distill="logits", ce_weight=0.0, temperature=1.0))
        both = _step(student, teacher, batch, HealConfig(max_steps=1, distill="logits", temperature=1.0))
    assert alone["logit_kl"] > 0 and torch.equal(alone["loss"], alone["logit_kl"])
    assert torch.allclose(both["loss"], both["ce"] + both["logit_kl"])
    with pytest.raises(ValueError, match="no loss"):
        HealConfig(max_steps=1, distill="none", ce_weight=0.0)


def test_lora_cure_keeps_sharing_and_changes_weights(tmp_path):
    teacher = tiny_model(layers=4, hidden=64, vocab=99)
    student, _ = fold(copy.deepcopy(teacher), tokens(), FoldConfig(removal_rate=0.0, group_size=2, gate=GateConfig(steps=1)))
    w = get_adapter(student).get_layers(student)[0].mlp.up_proj.weight.detach().clone()
    student, _ = heal(student, teacher, tokens(), HealConfig(max_steps=3, lora_rank=4, lr=1e-2, warmup_steps=1), tmp_path)
    layers = get_adapter(student).get_layers(student)
    assert layers[0].mlp.up_proj.weight is layers[1].mlp.up_proj.weight
    assert not torch.equal(layers[0].mlp.up_proj.weight, w)
    assert schedule_of(student) == [0, 0, 1, 1]


def test_last_blocks_cure_trains_only_the_last_depths(tmp_path):
    teacher = tiny_model(layers=4, hidden=64, vocab=99)
    student = copy.deepcopy(teacher)
    before = [[p.detach().clone() for p in layer.parameters()] for layer in student.model.layers]
    student, _ = heal(student, teacher, tokens(), HealConfig(max_steps=2, last_blocks=1, lr=1e-2, warmup_steps=1), tmp_path)
    moved = [not all(torch.equal(a, b) for a, b in zip(old, layer.parameters()))
             for old, layer in zip(before, student.model.layers)]
    assert moved == [False, False, False, True]
    with pytest.raises(ValueError, match="last_blocks 5 exceeds the model's 4 depths"):
        heal(student, teacher, tokens(), HealConfig(max_steps=1, last_blocks=5), tmp_path / "b")
    with pytest.raises(ValueError, match="last_blocks must be >= 1"):
        HealConfig(max_steps=1, last_blocks=0)


def test_interrupted_cure_resumes_to_the_same_weights(tmp_path, monkeypatch):
    teacher = tiny_model(layers=4, hidden=64, vocab=99)
    start, _ = fold(copy.deepcopy(teacher), tokens(), FoldConfig(removal_rate=0.0, group_size=2, gate=GateConfig(steps=1)))
    data, cfg = tokens(n=12), HealConfig(max_steps=5, checkpoint_every=2, lr=1e-3)
    straight, _ = heal(copy.deepcopy(start), teacher, data, cfg, tmp_path / "a")

    calls = {"n": 0}
    real_step = heal_mod._step

    def crash_on_fourth(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(heal_mod, "_step", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        heal(copy.deepcopy(start), teacher, data, cfg, tmp_path / "b")
    monkeypatch.setattr(heal_mod, "_step", real_step)
    assert json.loads((tmp_path / "b" / "checkpoint" / "progress.json").read_text())["step"] == 2
    resumed, state = heal(copy.deepcopy(start), teacher, data, cfg, tmp_path / "b", resume=True)
    assert state.step == 5 and [l["step"] for l in state.losses] == [1, 2, 3, 4, 5]
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES + ("gemma2",))
def test_teacher_hidden_and_logits_are_the_full_forwards(family):
    """The cure runs the teacher without its head and rebuilds logits from the final hidden
    state: both must be what the *ForCausalLM returns (gemma2: with its logit soft-capping)."""
    if family == "gemma2":
        from transformers import AutoModelForCausalLM, Gemma2Config

        torch.manual_seed(0)
        teacher = AutoModelForCausalLM.from_config(Gemma2Config(
            vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5), dtype=torch.float32).eval()
    else:
        teacher = tiny_model(family)
    batch = tokens(n=2, seq=16)
    full = teacher(input_ids=batch, output_hidden_states=True)
    hidden = teacher_hidden(teacher, batch)
    torch.testing.assert_close(hidden, full.hidden_states[-1])
    torch.testing.assert_close(teacher_logits(teacher, hidden), full.logits)
    if family == "gemma2":  # the cap matters here: the bare head gives other logits
        assert not torch.allclose(get_adapter(teacher).get_lm_head(teacher)(hidden), full.logits)


def test_teacher_cache_runs_each_sequence_once_and_changes_nothing(tmp_path):
    teacher = tiny_model(layers=4, hidden=64, vocab=99)
    start, _ = fold(copy.deepcopy(teacher), tokens(), FoldConfig(removal_rate=0.25, group_size=2, gate=GateConfig(steps=1)))
    data = tokens(n=6)
    rows = []
    base = get_adapter(teacher).get_base(teacher)
    hook = base.register_forward_hook(lambda m, args, kwargs, out: rows.append(len(kwargs["input_ids"])), with_kwargs=True)
    cfg = HealConfig(max_steps=8, batch_size=4, lr=1e-3, distill="both")
    cached, _ = heal(copy.deepcopy(start), teacher, data, cfg, tmp_path / "a")
    assert sum(rows) == 6  # 8 steps x 4 sequences drawn, each of the 6 computed once
    rows.clear()
    uncached, _ = heal(copy.deepcopy(start), teacher, data, HealConfig(**{**vars(cfg), "teacher_cache_mb": 0}), tmp_path / "b")
    hook.remove()
    assert sum(rows) == 8 * 4
    for a, b in zip(cached.parameters(), uncached.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    small = TeacherCache(teacher, data, max_mb=6 * 32 * 64 * 4 / 2**20 - 1e-6)  # one value too many: keeps nothing
    assert small.store is None


@pytest.mark.parametrize("kwargs", [dict(max_steps=0), dict(max_minutes=0), dict(max_tokens=-5), dict()])
def test_cure_budget_must_be_positive(kwargs):
    with pytest.raises(ValueError):
        HealConfig(**kwargs)


# --- recipe and CLI -----------------------------------------------------------------

@pytest.fixture
def tiny_dir(tmp_path):
    from compress.format import save_folded

    model = tiny_model(layers=6, hidden=64, vocab=99)
    path = save_folded(model, tmp_path / "dense", tiny_tokenizer())
    text = tmp_path / "heal.txt"
    text.write_text(TEXT)
    return path, text


def compress_args(tmp_path, tiny_dir, *extra):
    model, text = tiny_dir
    return ["compress", "--model", str(model), "--out", str(tmp_path / "folded"), "--data", str(text),
            "--removal-rate", "0.34", "--group-size", "2", "--seq-len", "16", "--calib-sequences", "12",
            "--heal-sequences", "8", "--gate-steps", "10", "--heal-steps", "3", *extra]


def test_compress_cli_writes_a_folded_model(tmp_path, tiny_dir):
    from compress.format import load_folded
    from foldgpt.cli import main

    assert main(compress_args(tmp_path, tiny_dir)) == 0
    model, tok = load_folded(tmp_path / "folded")
    fold = model.config.fold
    assert fold["schedule"] == [0, 0, 1, 1] and len(fold["provenance"]["removed_blocks"]) == 2
    assert fold["provenance"]["method"] == "foldgpt" and fold["provenance"]["heal"]["steps"] == 3
    assert len(fold["provenance"]["gates"]) == 6 and fold["provenance"]["repair"] is None  # repair is opt-in
    assert (tmp_path / "folded" / "heal_log.json").is_file() and (tmp_path / "folded.work" / "heal.json").is_file()
    assert tok is not None


def test_compress_resume_skips_finished_stages(tmp_path, tiny_dir, monkeypatch):
    import compress.recipe as recipe
    from foldgpt.cli import main

    assert main(compress_args(tmp_path, tiny_dir)) == 0
    monkeypatch.setattr(recipe, "run_method", lambda *a, **k: pytest.fail("finished fold stage was redone"))
    monkeypatch.setattr(recipe, "build_sequences", lambda *a, **k: pytest.fail("finished data stage was redone"))
    assert main(compress_args(tmp_path, tiny_dir, "--resume")) == 0


def test_compress_refuses_a_work_dir_from_other_settings(tmp_path, tiny_dir, capsys):
    from foldgpt.cli import main

    assert main(compress_args(tmp_path, tiny_dir)) == 0
    args = compress_args(tmp_path, tiny_dir, "--resume")
    args[args.index("--group-size") + 1] = "3"
    assert main(args) == 2
    assert "other settings" in capsys.readouterr().err


def test_compress_refuses_a_work_dir_from_an_older_version(tmp_path, tiny_dir, capsys):
    """A stage record without this recipe's work-dir version: one line, nothing guessed or redone."""
    from foldgpt.cli import main

    assert main(compress_args(tmp_path, tiny_dir)) == 0
    work = next(p for p in tmp_path.iterdir() if p.name.endswith(".work"))
    stage = json.loads((work / "fold.json").read_text())
    del stage["version"]
    (work / "fold.json").write_text(json.dumps(stage))
    capsys.readouterr()  # the first run's progress bars
    assert main(compress_args(tmp_path, tiny_dir, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "older foldgpt (work-dir version 1, this is 3)" in err[0]


def test_default_gates_are_part_of_the_fold_key(tmp_path, tiny_dir):
    from compress.recipe import CompressConfig, compress

    model, text = tiny_dir
    data = DataConfig(source=str(text), seq_len=16, num_sequences=12)
    compress(CompressConfig(out=str(tmp_path / "f"), model=str(model), calib=data, heal_data=data, heal=None,
                            fold=FoldConfig(removal_rate=0.34, group_size=2)))
    recorded = json.loads((tmp_path / "f.work" / "fold.json").read_text())["settings"]["fold"]["gate"]
    assert recorded == {**GateConfig().__dict__, "budget_unit": "blocks", "temperature": [1.0, 0.05]}


@pytest.mark.parametrize("flag, value, match, before", [
    ("--removal-rate", "1.5", "removal_rate", "load"),
    ("--removal-rate", "0.95", "removes all", "load"),
    ("--group-size", "9", "larger than", "load"),
    ("--heal-steps", "0", "max_steps must be positive", "load"),
    ("--distill", "soft", "unknown distillation target 'soft'; choose one of hidden, logits, both, none", "load"),
    ("--ce-weight", "-1", "ce_weight and distill_weight must be >= 0", "load"),
    ("--parallel", "zero3", "unknown parallelism 'zero3'; choose one of ddp, fsdp", "load"),
    ("--repair", "sideways", "unknown repair fit 'sideways'; choose one of sequential, dense", "load"),
    ("--removal-candidates", "gates,magic", "unknown removal candidate 'magic'", "load"),
    ("--held-back", "12", "12 calibration windows leave none", "load"),
    ("--local-loss", "l1", "--local-loss needs --local-minutes", "load"),  # the loss itself: test_local_heal
    ("--seq-len", "50000", "data too short", "fold"),  # needs the tokenizer: found by the data stage
    ("--delta-rank", "0", "delta rank must be a positive integer, got 0", "load"),
    ("--delta-init", "zero", "--delta-init, --delta-base and --delta-linears need --delta-rank", "load"),
    ("--remove", "0,9", "cannot remove blocks [9]: the model has blocks 0..5", "load"),
    ("--delta-rank", "40", "delta rank 40 exceeds min(in, out) = 32 of self_attn.k_proj", "data"),  # needs the shapes
])
def test_compress_bad_input_is_one_line(tmp_path, tiny_dir, capsys, flag, value, match, before, monkeypatch):
    import compress.recipe as recipe
    from foldgpt.cli import main

    monkeypatch.setattr(recipe, "run_method", lambda *a, **k: pytest.fail("heavy work started before the check"))
    if before == "load":
        monkeypatch.setattr(recipe, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    if before == "data":
        monkeypatch.setattr(recipe, "build_sequences", lambda *a, **k: pytest.fail("text made before the check"))
    args = compress_args(tmp_path, tiny_dir)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err
    if before == "load":
        assert not (tmp_path / "folded.work").exists()


def test_nucleus_is_transformers_sampling_distribution():
    """compress.data.nucleus on the top-k candidates gives the probabilities transformers' warpers
    (temperature, top-k 50, top-p 0.95) give over the whole vocabulary."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 500, generator=g) * torch.tensor([0.5, 1, 2, 4, 8, 16])[:, None]  # flat to peaked
    scores = logits
    for warp in (TemperatureLogitsWarper(0.8), TopKLogitsWarper(50), TopPLogitsWarper(0.95)):
        scores = warp(None, scores)
    expected = scores.softmax(-1)
    p, ids = data.nucleus(logits, 0.8)
    got = torch.zeros_like(expected).scatter(1, ids, p)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (p > 0).sum(-1).tolist()[0] > (p > 0).sum(-1).tolist()[-1]  # flat logits keep more candidates


def test_sample_follows_greedy_generate_and_drops_finished_rows():
    """At a near-zero temperature the sampler is greedy: each row's tokens equal transformers'
    greedy generate with the same left padding, up to and including the row's stop token."""
    model, tok = tiny_model(vocab=99), tiny_tokenizer()
    tok.padding_side = "left"
    enc = tok(["a b c d e f", "b", "c d e", "d e f a"], return_tensors="pt", padding=True, add_special_tokens=False)
    assert (enc["attention_mask"] == 0).any()  # left padding exercised
    logits = model(**enc).logits[:, -1]
    stop = {int(logits[1].argmax())}  # row 1 stops at once, the others go on (different argmaxes)
    rows = data.sample(model, enc["input_ids"], enc["attention_mask"], 12, 1e-4, stop, torch.Generator().manual_seed(0))
    greedy = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    greedy = greedy[:, enc["input_ids"].shape[1]:].tolist()
    assert len(rows[1]) == 1 and any(len(r) > 1 for r in rows)
    for mine, ref in zip(rows, greedy):
        stop_at = next((i for i, t in enumerate(ref) if t in stop), len(ref) - 1)
        assert mine == ref[:stop_at + 1]
