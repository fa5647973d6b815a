import json
import subprocess
import sys

import pytest

from compress.blocks import share_blocks
from compress.format import save_folded
from foldgpt.cli import main
from tests.conftest import tiny_model


@pytest.fixture
def folded_dir(tmp_path):
    model = tiny_model("llama", layers=4)
    share_blocks(model, [0, 0, 1, 1])
    return save_folded(model, tmp_path / "m", provenance={"method": "test"})


def test_inspect_json(folded_dir, capsys):
    assert main(["inspect", str(folded_dir), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["schedule"] == [0, 0, 1, 1] and s["num_unique_blocks"] == 2
    assert s["unique_params"] < s["effective_params"]
    assert s["bytes_on_disk"] > 0 and s["groups"][1]["depths"] == [2, 3]


def test_inspect_human(folded_dir, capsys):
    assert main(["inspect", str(folded_dir)]) == 0
    out = capsys.readouterr().out
    assert "4 layers over 2 unique blocks" in out and "[2, 3]" in out


@pytest.mark.parametrize("arg", ["/nonexistent/dir", "missing.gguf", "./nope"])
def test_missing_source_is_one_line(arg, capsys):
    assert main(["inspect", arg]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("foldgpt inspect: error:") and "\n" not in err


def test_unknown_architecture_from_cli(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "g")
    assert main(["inspect", str(tmp_path / "g")]) == 2
    assert "unsupported architecture 'gpt2'" in capsys.readouterr().err


def test_console_script_exit_code_and_no_traceback(tmp_path):
    bad = tmp_path / "m"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    proc = subprocess.run([sys.executable, "-m", "foldgpt.cli", "inspect", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "config.json" in proc.stderr.strip().splitlines()[-1]
