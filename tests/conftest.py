"""Tiny randomly initialised models built from transformers config classes (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Tiny models gain nothing from a second thread, and on a shared 2-core machine a
# second OpenMP thread waiting for a busy core makes small matmuls many times slower.
torch.set_num_threads(1)

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma")


def tiny_config(family: str = "llama", layers: int = 4, hidden: int = 32, vocab: int = 99, **overrides):
    from transformers import GemmaConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig,
           "phi3": Phi3Config, "gemma": GemmaConfig}[family]
    kwargs = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    kwargs.update(overrides)
    return cls(**kwargs)


def tiny_model(family: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw), dtype=torch.float32)
    # Random init gives near-identical norms; perturb them so "per-depth norms stay
    # separate" is a property the tests can actually observe.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def default_model():
    """The real default model (SmolLM2-135M-Instruct, dequantized), loaded once per session."""
    from compress.load import load_model

    return load_model("default")


def tiny_tokenizer(vocab: int = 99):
    """A character-level fast tokenizer whose ids fit a tiny model's vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?!:;'\"-\n()"
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    table = {t: i for i, t in enumerate(specials + list(dict.fromkeys(chars)))}
    assert len(table) <= vocab
    tok = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def byte_tokenizer():
    """A byte-level BPE with no merges (256 byte tokens + 3 specials, ids < 260): the tokenizer
    form ExecuTorch's C++ LLM runner reads, one id per ASCII character. Pair with vocab=260."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def reference_greedy(model, ids: list[int], max_new_tokens: int, eos_id: int | None) -> list[int]:
    """Greedy tokens from the PyTorch model through export.parity's step interface:
    what an exported program's own decode loop must reproduce."""
    from export.parity import torch_steps

    step, out = torch_steps(model)(), []
    logits = step(ids)
    for _ in range(max_new_tokens):
        t = int(logits[-1].argmax())
        if t == eos_id:
            break
        out.append(t)
        logits = step([t])
    return out


ROOT = Path(__file__).resolve().parent.parent

_HOOK = """
import importlib, sys, time
_mod, _, _name = {hook!r}.partition(":")
_m = importlib.import_module(_mod)
_real, _calls = getattr(_m, _name), [0]

def _hooked(*a, **k):
    _calls[0] += 1
    if _calls[0] < {call}:
        return _real(*a, **k)
    if {after}:
        _real(*a, **k)
    open({ready!r}, "w").close()
    time.sleep(3600)

setattr(_m, _name, _hooked)
"""


def kill_mid_write(code: str, hook: str, ready, call: int = 1, after: bool = False, timeout: float = 300) -> None:
    """Run `code` in a child Python whose `hook` ("module:function") blocks at its `call`-th call
    (after running it when `after`), and SIGKILL the child there: a crash at that point of a write.
    `ready` is a path the child creates when it blocks."""
    import signal
    import subprocess
    import sys
    import time

    ready = str(ready)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    child = subprocess.Popen([sys.executable, "-c", _HOOK.format(hook=hook, call=call, after=after, ready=ready) + code],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not os.path.exists(ready):
            if child.poll() is not None:
                pytest.fail(f"the child ended (code {child.returncode}) before {hook} call {call}:\n{child.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the child did not reach {hook} call {call} in {timeout} s")
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stderr.close()
