"""`foldgpt chat`, the host twin of the Android app, against a tiny exported .pte."""


import pytest

from compress.blocks import share_blocks
from compress.format import save_folded
from tests.conftest import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def pte(tmp_path_factory):
    from export.registry import ExportConfig, get_backend

    tmp = tmp_path_factory.mktemp("chat")
    model = tiny_model(layers=4, hidden=64, vocab=99)
    share_blocks(model, [0, 0, 1, 1])
    src = save_folded(model, tmp / "folded", tiny_tokenizer())
    out = tmp / "model.pte"
    get_backend("executorch").export(src, out, ExportConfig(max_context=128))
    return out


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
