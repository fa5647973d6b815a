"""compress.evaluate on a tiny llama and a byte-level BPE tokenizer trained here, offline.

Every data file is written to tmp_path: the dev sets under ../shared are never read.
"""

import json
import math
import os

import pytest
import torch

from compress.evaluate import EvalConfig, evaluate, load_arc, perplexity, stability, zero_shot
from tests.conftest import tiny_model

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS = [
    "Question: Which gas do plants take in from the air?\nAnswer: carbon dioxide",
    "The cat sat on the mat while the dog slept by the warm fire.",
    "Water boils at one hundred degrees and freezes at zero degrees.",
    "A magnet attracts iron nails, but not wooden sticks or glass.",
]
TEXT = " ".join(CORPUS)


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],  # ids 0-2 as in tiny_config
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model("llama", vocab=len(tok))


def token_nll(model, ids: list[int], context_start: int, t: int) -> float:
    """-log p(ids[t] | ids[context_start:t]), one forward pass per token."""
    logits = model(torch.tensor([ids[context_start:t]])).logits[0, -1]
    return -torch.log_softmax(logits.double(), -1)[ids[t]].item()


@torch.no_grad()
def test_perplexity_of_short_text_is_exp_mean_nll(model, tok):
    ids = tok(TEXT).input_ids[:40]
    expected = math.exp(sum(token_nll(model, ids, 0, t) for t in range(1, 40)) / 39)
    got = perplexity(model, tok, TEXT, seq_len=64, stride=32, max_tokens=40)
    assert got == pytest.approx(expected, rel=1e-5)
    assert got == pytest.approx(math.exp(model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()), rel=1e-5)


@torch.no_grad()
def test_perplexity_with_disjoint_windows_is_exp_mean_nll(model, tok):
    ids = tok(TEXT).input_ids[:50]
    nll = []
    for begin in range(0, 50, 16):  # windows 0-15, 16-31, 32-47, 48-49; each window's first token has no context
        nll += [token_nll(model, ids, begin, t) for t in range(begin + 1, min(begin + 16, 50))]
    assert len(nll) == 50 - 4
    got = perplexity(model, tok, TEXT, seq_len=16, stride=16, max_tokens=50)
    assert got == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


@torch.no_grad()
def test_strided_windows_score_each_token_once_with_enough_context(model, tok):
    n, seq_len, stride = 45, 12, 4
    ids = tok(TEXT).input_ids[:n]
    nll = []
    for t in range(1, n):
        # token t is scored by the first window (starts 0, 4, 8, ...) that reaches it
        begin = 0 if t < seq_len else stride * math.ceil((t - seq_len + 1) / stride)
        assert t < seq_len or t - begin >= seq_len - stride
        nll.append(token_nll(model, ids, begin, t))
    got = perplexity(model, tok, TEXT, seq_len=seq_len, stride=stride, max_tokens=n)
    assert got == pytest.approx(math.exp(sum(nll) / (n - 1)), rel=1e-5)
    disjoint = perplexity(model, tok, TEXT, seq_len=seq_len, stride=seq_len, max_tokens=n)
    assert disjoint != pytest.approx(got, rel=1e-6)  # context matters, so the striding is observable


def test_perplexity_rejects_bad_inputs(model, tok):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        perplexity(model, tok, TEXT, seq_len=1024, stride=512)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, tok, TEXT, seq_len=64, stride=32, max_tokens=1)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tok, TEXT, seq_len=16, stride=32)


ITEMS = [  # (stem, labels, choice texts)
    ("Which gas do plants take in from the air?", "ABCD", ["oxygen", "carbon dioxide", "helium", "steam"]),
    ("What does a magnet attract?", "1234", ["wooden sticks", "glass", "iron nails", "water"]),  # 1-4 labels
    ("At what temperature does water freeze?", "ABC", ["zero degrees", "one hundred degrees", "fifty degrees"]),
    ("Where did the dog sleep?", "ABCDE", ["by the fire", "on the mat", "in the car", "under a tree", "at school"]),
    ("What sat on the mat?", "ABCD", ["the dog", "the cat", "a magnet", "the fire"]),
]


@torch.no_grad()
def choice_scores(model, tok, stem: str, choices: list[str]) -> tuple[list[float], list[int]]:
    """Summed log-likelihood and token count of each " choice" after the ARC prompt."""
    ctx = f"Question: {stem}\nAnswer:"
    n_ctx = len(tok(ctx).input_ids)
    lls, n_tok = [], []
    for c in choices:
        whole = tok(ctx + " " + c).input_ids
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
        lls.append(sum(logp[t - 1, whole[t]].item() for t in range(n_ctx, len(whole))))
        n_tok.append(len(whole) - n_ctx)
    return lls, n_tok


@pytest.fixture(scope="module")
def arc_file(model, tok, tmp_path_factory):
    """Five ARC items whose answer keys make the model's acc_norm choice right on items 0-2, wrong on 3-4."""
    rows, expected = [], []
    for i, (stem, labels, texts) in enumerate(ITEMS):
        lls, n_tok = choice_scores(model, tok, stem, texts)
        pred_norm = max(range(len(texts)), key=lambda j: lls[j] / len(texts[j]))
        gold = pred_norm if i < 3 else (pred_norm + 1) % len(texts)
        pred = max(range(len(texts)), key=lambda j: lls[j])
        expected.append({"correct": i < 3, "acc": pred == gold, "choice_nll": [-ll / k for ll, k in zip(lls, n_tok)]})
        choices = [{"text": t, "label": lab} for t, lab in zip(texts, labels)]
        rows.append({"id": f"q{i}", "question": {"stem": stem, "choices": choices}, "answerKey": labels[gold]})
    path = tmp_path_factory.mktemp("arc") / "tiny_arc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, expected


def test_load_arc_maps_answer_key_through_each_items_labels(arc_file):
    path, _ = arc_file
    docs = load_arc(path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for doc, row in zip(docs, rows):
        labels = [c["label"] for c in row["question"]["choices"]]
        assert doc["choices"][doc["gold"]] == row["question"]["choices"][labels.index(row["answerKey"])]["text"]
    assert [len(d["choices"]) for d in docs] == [4, 4, 3, 5, 4]


def test_zero_shot_matches_hand_computed_loglikelihoods(model, tok, arc_file):
    path, expected = arc_file
    res = zero_shot(model, tok, {"tiny_arc": str(path)}, batch_size=4)["tiny_arc"]
    assert res["n"] == 5
    assert res["ids"] == ["q0", "q1", "q2", "q3", "q4"]
    assert res["correct"] == [True, True, True, False, False]
    assert res["acc_norm"] == pytest.approx(3 / 5)
    assert res["acc"] == pytest.approx(sum(e["acc"] for e in expected) / 5)
    for got, e in zip(res["choice_nll"], expected):
        assert got == pytest.approx(e["choice_nll"], rel=1e-4)


def test_zero_shot_limit_is_a_seeded_subset_in_file_order(model, tok, arc_file):
    path, _ = arc_file
    a = zero_shot(model, tok, {"t": str(path)}, limit=3, seed=1)["t"]
    b = zero_shot(model, tok, {"t": str(path)}, limit=3, seed=1)["t"]
    assert a["n"] == 3 and a["ids"] == b["ids"] and a["ids"] == sorted(a["ids"])
    full = {f"q{i}": c for i, c in enumerate([True, True, True, False, False])}
    assert a["correct"] == [full[i] for i in a["ids"]]


def test_load_arc_rejects_answer_key_outside_labels(tmp_path):
    row = {"id": "x", "question": {"stem": "?", "choices": [{"text": "a", "label": "1"}, {"text": "b", "label": "2"}]},
           "answerKey": "C"}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: answerKey 'C'"):
        load_arc(path)


def test_stability_matches_hand_computed_table():
    dense = [True, True, False, False]
    compressed = [True, False, False, True]
    nll = [[1.0, 1.0, 1.0, 1.0], [0.0, 2.0], [0.0, 0.0, 3.0], [1.0, 3.0]]  # population std: 0, 1, sqrt(2), 1
    e0, e1, e2 = math.exp(0.0), math.exp(1.0), math.exp(math.sqrt(2.0))
    expected = (e0 + e2) / (e0 + e1 + e2 + e1)  # items 0 and 2 agree
    assert stability(dense, compressed, nll) == pytest.approx(expected, rel=1e-12)
    assert stability(dense, compressed, nll) == pytest.approx(0.4846768, abs=1e-7)  # the same, as a number
    assert stability(dense, dense, nll) == pytest.approx(1.0)
    assert stability(dense, [not c for c in dense], nll) == 0.0
    # equal spreads: plain agreement rate
    assert stability(dense, compressed, [[0.0, 1.0]] * 4) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="equally long"):
        stability(dense, compressed[:3], nll)


def test_evaluate_adds_stability_against_reference(model, tok, arc_file, tmp_path):
    path, _ = arc_file
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    cfg = EvalConfig(ppl_files={"tiny": str(text)}, ppl_seq_len=32, ppl_stride=16, tasks={"tiny_arc": str(path)}, batch_size=4)
    dense = evaluate(model, tok, cfg)
    assert dense["perplexity"]["tiny"] == pytest.approx(perplexity(model, tok, TEXT, 32, 16))
    assert "stability" not in dense["tasks"]["tiny_arc"]
    other = tiny_model("llama", seed=1, vocab=len(tok))
    folded = evaluate(other, tok, cfg, reference=dense)
    assert 0.0 <= folded["tasks"]["tiny_arc"]["stability"] <= 1.0
    json.loads(json.dumps(folded))  # JSON-serialisable
    tampered = {"tasks": {"tiny_arc": dict(dense["tasks"]["tiny_arc"], ids=["q4", "q3", "q2", "q1", "q0"])}}
    with pytest.raises(ValueError, match="other items"):
        evaluate(model, tok, EvalConfig(tasks={"tiny_arc": str(path)}), reference=tampered)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(ppl_seq_len=0), ValueError, "ppl_seq_len"),
        (dict(ppl_stride=0), ValueError, "ppl_stride"),
        (dict(ppl_seq_len=128, ppl_stride=256), ValueError, r"ppl_stride \(256\) must not exceed ppl_seq_len \(128\)"),
        (dict(ppl_max_tokens=0), ValueError, "ppl_max_tokens"),
        (dict(limit=0), ValueError, "limit"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(ppl_files={"wiki": "missing.txt"}), FileNotFoundError, r"ppl_files\['wiki'\]: .*missing\.txt"),
        (dict(tasks={"arc": "missing.jsonl"}), FileNotFoundError, r"tasks\['arc'\]: .*missing\.jsonl"),
        (dict(tasks={"arc easy": "missing.jsonl"}), ValueError, "letters, digits and underscores"),
    ],
)
def test_eval_config_rejects_bad_inputs(kwargs, error, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=match):
        EvalConfig(**kwargs)
