"""`foldgpt chat`, the host twin of the Android app, against tiny exported .pte files; and
ExecuTorch's own C++ LLM runner (what Android's LlmModule wraps) against our Python twin."""


import pytest

from compress.blocks import share_blocks
from compress.format import save_folded
from tests.conftest import byte_tokenizer, reference_greedy, tiny_model


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    """A tiny folded model with a byte-level BPE tokenizer: the form the C++ runner reads."""
    model = tiny_model(layers=4, hidden=64, vocab=260)
    share_blocks(model, [0, 0, 1, 1])
    return save_folded(model, tmp_path_factory.mktemp("chat") / "folded", byte_tokenizer()), model


def _export(tmp_path_factory, folded, **options):
    from export.registry import ExportConfig, get_backend

    out = tmp_path_factory.mktemp("pte") / "model.pte"
    get_backend("executorch").export(folded[0], out, ExportConfig(max_context=128, **options), measure=False)
    return out


@pytest.fixture(scope="module")
def pte(tmp_path_factory, folded):
    return _export(tmp_path_factory, folded)


@pytest.fixture(scope="module")
def pte_8da4w(tmp_path_factory, folded):
    return _export(tmp_path_factory, folded, precision="8da4w", embedding_bits=8)


@pytest.mark.parametrize("which", ["fp32", "8da4w+emb8"])
def test_executorch_llm_runner_generates_what_our_runner_does(which, pte, pte_8da4w, folded):
    """TextLLMRunner: PteLM's greedy text on both programs (same kernels), and on fp32 eager's too."""
    from export.executorch_runtime import PteLM
    from export.llm_runner import RunnerLM

    out, tok, pieces = {"fp32": pte, "8da4w+emb8": pte_8da4w}[which], byte_tokenizer(), []
    text, stats = RunnerLM(out).generate("hello", 12, on_text=pieces.append)
    ours = PteLM(out)
    tokens = ours.generate(ours.encode("hello"), 12)
    assert text == "".join(pieces) == ours.decode(tokens) and len(tokens) > 0
    if which == "fp32":
        assert tokens == reference_greedy(folded[1], tok("hello").input_ids, 12, tok.eos_token_id)
    assert stats["prompt_tokens"] == len("hello") and stats["generated_tokens"] == len(tokens)


def test_a_missing_operator_is_named_and_the_export_says_what_to_link(pte, pte_8da4w, monkeypatch):
    from types import SimpleNamespace

    from executorch.exir._serialize._program import deserialize_pte_binary

    from export import llm_runner
    from export.executorch_runtime import runtime

    program = deserialize_pte_binary(pte_8da4w.read_bytes()).program
    wanted = sorted(llm_runner.operators(program))
    assert any(op.startswith("llama::") for op in wanted) and any(op.startswith("quantized_decomposed::") for op in wanted)
    have = [op for op in runtime()._get_operator_names() if op != wanted[0]]
    monkeypatch.setattr(llm_runner, "runtime", lambda: SimpleNamespace(_get_operator_names=lambda: have))
    assert llm_runner.missing_operators(pte_8da4w) == [wanted[0]]
    assert llm_runner.kernel_libraries(program) == ["LLM custom ops (extension/llm/custom_ops)",
                                                    "XnnpackBackend backend", "quantized kernels (kernels/quantized)"]


def test_llm_runner_names_a_missing_file(pte, tmp_path):
    from export.llm_runner import RunnerLM

    with pytest.raises(FileNotFoundError, match="no such .pte"):
        RunnerLM(tmp_path / "none.pte")
    lone = tmp_path / "model.pte"
    lone.write_bytes(pte.read_bytes())
    with pytest.raises(FileNotFoundError, match="tokenizer.json: no tokenizer"):
        RunnerLM(lone)


def test_template_is_the_apps(pte):
    from foldgpt.chat import prompt_template, render

    template = prompt_template()
    assert "{prompt}" in template and template.startswith("<|im_start|>user")
    assert render("a {b} c") == template.replace("{prompt}", "a {b} c")


def test_chat_produces_the_same_tokens_as_generate(pte):
    from export.executorch_runtime import PteLM
    from export.registry import get_backend
    from foldgpt.chat import chat_turn, render

    prompt = "Hello there"
    expected = get_backend("executorch").generate(pte, render(prompt), 12)
    turn = chat_turn(PteLM(pte, eos_ids=[]), prompt, max_new_tokens=12)
    assert turn.tokens == expected and len(expected) == 12
    assert turn.prompt_tokens == len(render(prompt))  # character-level tokenizer: one id per char


def test_chat_on_executorchs_llm_runner_says_what_our_twin_says(pte):
    """`foldgpt chat` runs on TextLLMRunner (the app's code); PteLM is the Python twin."""
    from export.executorch_runtime import PteLM
    from export.llm_runner import RunnerLM
    from foldgpt.chat import chat_turn, runner_turn

    runner, ours = runner_turn(RunnerLM(pte), "Hello there", 12), chat_turn(PteLM(pte), "Hello there", 12)
    assert (runner.text, runner.prompt_tokens, runner.generated_tokens, runner.stopped_on_eos) == (
        ours.text, ours.prompt_tokens, ours.generated_tokens, ours.stopped_on_eos)
    assert runner.generated_tokens > 0


def test_latency_harness_times_executorchs_llm_runner(pte):
    """The etrunner runtime: TTFT and decode from the runner's own stats."""
    from runtime_tests.latency import measure_latency
    from runtime_tests.runtimes import make_runner

    r = measure_latency(make_runner("etrunner", pte, threads=1), prompt_lengths=(8,), decode_tokens=100, warmup=0,
                        repeats=1, vocab=120)
    assert r["ttft_ms"]["8"]["p50"] >= 0 and r["decode_tokens_per_s"]["p50"] > 0


def test_eos_stops_generation(pte):
    from export.executorch_runtime import PteLM
    from foldgpt.chat import chat_turn

    free = chat_turn(PteLM(pte, eos_ids=[]), "Hi", max_new_tokens=8).tokens
    cut = next((i for i, t in enumerate(free) if i and t not in free[:i]), None)
    if cut is None:  # the greedy stream repeats one token: EOS on it stops before any output
        cut = 0
    stopped = chat_turn(PteLM(pte, eos_ids=[free[cut]]), "Hi", max_new_tokens=8)
    assert stopped.tokens == free[:cut] and stopped.stopped_on_eos


def test_chat_cli_streams_and_reports(pte, capsys):
    from foldgpt.cli import main

    assert main(["chat", str(pte), "--prompt", "Hi", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "tok/s" in out and "resident" in out and "model" in out


def test_chat_missing_model_is_one_line(tmp_path, capsys):
    from foldgpt.cli import main

    assert main(["chat", str(tmp_path / "nope.pte"), "--prompt", "Hi"]) == 2
    assert "no such .pte file" in capsys.readouterr().err
