"""Outputs never destroy what this tool did not write (compress.outputs): refusals before any
work, atomic replacement of our own artifacts, and kill -9 in the middle of each kind of write."""

import json
import os
import threading
import time

import pytest
import torch

import compress.outputs as outputs
from compress.data import DataConfig, self_generated
from compress.format import load_folded, save_folded
from compress.heal import HealConfig, heal
from compress.outputs import Kind, check_output, exclusive, is_ours, mark, replace_path
from foldgpt.cli import main
from tests.conftest import kill_mid_write, tiny_model, tiny_tokenizer


@pytest.fixture
def model_dir(tmp_path):
    return save_folded(tiny_model(), tmp_path / "models" / "m", tiny_tokenizer())


def user_dir(path):
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    return path


# ----------------------------------------------------------------------------- refusals


def test_an_unrelated_directory_is_refused_unless_overwrite(tmp_path):
    mine = user_dir(tmp_path / "mine")
    for kind in (Kind.FOLDED, Kind.ONNX, Kind.RUN, Kind.BENCH, Kind.WORK):
        with pytest.raises(FileExistsError, match=f"exists and is not {kind.value} this tool wrote; .*--overwrite"):
            check_output(mine, kind)
    assert check_output(mine, Kind.ONNX, overwrite=True) == mine.resolve()
    with pytest.raises(FileExistsError):
        save_folded(tiny_model(), mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # refused before anything was staged
    assert (mine / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["is", "holds", "lies inside"])
def test_an_output_at_the_input_is_refused_even_with_overwrite(model_dir, where):
    out = {"is": model_dir, "holds": model_dir.parent, "lies inside": model_dir / "onnx"}[where]
    with pytest.raises(ValueError, match=f"output .* {where} the input .*; choose an output outside it"):
        check_output(out, Kind.FOLDED, inputs=[model_dir], overwrite=True)
    load_folded(model_dir)


def test_a_symlink_to_user_files_is_refused_even_with_overwrite(tmp_path, model_dir):
    mine = user_dir(tmp_path / "mine")
    (tmp_path / "link").symlink_to(mine)
    with pytest.raises(ValueError, match="is a symlink to .*, not a folded model this tool wrote"):
        check_output(tmp_path / "link", Kind.FOLDED, overwrite=True)
    with pytest.raises(ValueError, match="symlink"):
        save_folded(tiny_model(), tmp_path / "link", overwrite=True)
    assert (mine / "notes.txt").read_text() == "mine"
    (tmp_path / "ours").symlink_to(model_dir)  # a link to our own artifact: the artifact is what gets replaced
    assert check_output(tmp_path / "ours", Kind.FOLDED) == model_dir.resolve()
    with pytest.raises(ValueError, match="is the input"):
        check_output(tmp_path / "ours", Kind.FOLDED, inputs=[model_dir])


def test_a_file_where_a_directory_is_expected_and_the_reverse(tmp_path):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(FileExistsError, match="is a file where a directory is expected"):
        check_output(tmp_path / "out", Kind.ONNX)
    user_dir(tmp_path / "model.pte")
    with pytest.raises(FileExistsError, match="is a directory where a file is expected"):
        check_output(tmp_path / "model.pte", Kind.PTE)


def test_a_pte_replaces_only_programs_and_their_tokenizer(tmp_path):
    (tmp_path / "notes.pte").write_text("mine")
    with pytest.raises(FileExistsError, match="not an ExecuTorch program this tool wrote"):
        check_output(tmp_path / "notes.pte", Kind.PTE)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"tokenizer.json \(written beside .*model.pte\) exists"):
        check_output(tmp_path / "model.pte", Kind.PTE)
    (tmp_path / "other.pte").write_bytes(b"\x3c\0\0\0ET12" + bytes(8))  # a program's flatbuffer identifier
    check_output(tmp_path / "model.pte", Kind.PTE)  # the tokenizer beside a program is the program's


def test_new_empty_and_own_paths_are_written(tmp_path, model_dir):
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", Kind.FOLDED) == (tmp_path / "empty").resolve()
    assert check_output(tmp_path / "new" / "deeper", Kind.ONNX) == (tmp_path / "new" / "deeper").resolve()
    assert check_output(model_dir, Kind.FOLDED) == model_dir.resolve()
    with pytest.raises(FileExistsError):  # the same tool, another kind
        check_output(model_dir, Kind.ONNX)


def test_layouts_made_before_the_marker_are_recognised(tmp_path, model_dir):
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    (onnx / "model.onnx").write_bytes(b"")
    (onnx / "genai_config.json").write_text("{}")
    run = tmp_path / "run"
    save_folded(tiny_model(), run / "dense")
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench.json").write_text("{}")
    (bench / "report.md").write_text("# report")
    (tmp_path / "eval.json").write_text(json.dumps({"model": "m", "metrics": {}}))
    for path, kind in ((model_dir, Kind.FOLDED), (onnx, Kind.ONNX), (run, Kind.RUN), (bench, Kind.BENCH),
                       (tmp_path / "eval.json", Kind.EVAL), (mark(tmp_path / "marked", Kind.RUN), Kind.RUN)):
        assert is_ours(path, kind), (path, kind)
        assert not is_ours(path, Kind.WORK)


# ----------------------------------------------------------------------------- the CLI


def test_every_writing_command_refuses_before_any_work(tmp_path, model_dir, capsys):
    mine = user_dir(tmp_path / "mine")
    (mine / "model.pte").write_text("mine")
    text = tmp_path / "valid.txt"
    text.write_text("a short text about folding. " * 40)
    for argv in (["compress", "--model", str(model_dir), "--out", str(mine)],
                 ["export", "onnx", str(model_dir), "--out", str(mine)],
                 ["export", "executorch", str(model_dir), "--out", str(mine / "model.pte")],
                 ["eval", str(model_dir), "--text", str(text), "--out", str(mine / "notes.txt")],
                 ["eval", str(model_dir), "--text", str(text), "--out", str(text), "--overwrite"],
                 ["bench", str(model_dir), "--out", str(mine), "--cores", "1"],
                 ["run", "--model", str(model_dir), "--out", str(mine)],
                 ["export", "onnx", str(model_dir), "--out", str(model_dir.parent), "--overwrite"],
                 ["compress", "--model", str(model_dir), "--out", str(model_dir / "folded"), "--overwrite"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"foldgpt {argv[0]}: error: output ") and "\n" not in err, err
        assert "--overwrite" in err or "the input" in err, err
    assert sorted(p.name for p in mine.iterdir()) == ["model.pte", "notes.txt"]
    assert (mine / "notes.txt").read_text() == "mine" and text.read_text().startswith("a short text")
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["m"]
    load_folded(model_dir)


def test_eval_writes_and_rewrites_its_own_result(tmp_path, capsys):
    model_dir = save_folded(tiny_model(max_position_embeddings=512), tmp_path / "m", tiny_tokenizer())
    text = tmp_path / "valid.txt"
    text.write_text("a short text about folding. " * 40)
    for _ in range(2):
        assert main(["eval", str(model_dir), "--text", f"t={text}", "--ppl-max-tokens", "64"]) == 0
    assert "metrics" in json.loads((model_dir / "eval.json").read_text())


# ----------------------------------------------------------------------------- replacing our own, shared writers


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_replacing_our_own_artifact_is_atomic(tmp_path, monkeypatch, exchange):
    out = save_folded(tiny_model(seed=0), tmp_path / "m")
    stage = save_folded(tiny_model(seed=1), tmp_path / ".m.tmp-test")
    if exchange:  # one swap: `out` is never missing, so no plain rename may run
        monkeypatch.setattr(os, "replace", lambda *a: pytest.fail("out was renamed away"))
    else:
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    replace_path(stage, out, Kind.FOLDED)
    monkeypatch.undo()
    assert same_weights(out, seed=1) and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_second_compress_on_one_work_dir_is_refused(tmp_path, model_dir):
    from compress.recipe import CompressConfig, compress

    cfg = CompressConfig(out=str(tmp_path / "out"), model=str(model_dir), heal=None, resume=True)
    with exclusive(mark(cfg.work, Kind.WORK) / ".lock", "another run"):
        with pytest.raises(ValueError, match=f"{cfg.work} is in use by another foldgpt process \\(pid {os.getpid()}\\)"):
            compress(cfg)
    assert not (tmp_path / "out").exists()


def test_a_second_cache_writer_waits_for_the_first(tmp_path, capsys):
    lock, held = tmp_path / "cache.lock", threading.Event()

    def first():
        with exclusive(lock, "the cache"):
            held.set()
            time.sleep(0.5)

    thread = threading.Thread(target=first)
    thread.start()
    held.wait()
    start = time.monotonic()
    with exclusive(lock, "the cache", wait=True):
        waited = time.monotonic() - start
    thread.join()
    assert waited > 0.3 and "waiting for another foldgpt process" in capsys.readouterr().out


# ----------------------------------------------------------------------------- kill -9 mid-write


def same_weights(path, seed: int) -> bool:
    model, _ = load_folded(path)
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_model(seed=seed).state_dict().values()))


@pytest.mark.parametrize("hook", ["compress.outputs:sync_files", "compress.outputs:_discard"], ids=["staged", "swapped"])
def test_save_folded_killed_mid_write(tmp_path, hook):
    out = save_folded(tiny_model(seed=0), tmp_path / "m")
    kill_mid_write("from compress.format import save_folded\nfrom tests.conftest import tiny_model\n"
                   f"save_folded(tiny_model(seed=1), {str(out)!r})", hook, tmp_path / "ready")
    # whole: the old model before the swap, the new one after it
    assert same_weights(out, seed=0 if hook.endswith("sync_files") else 1)
    save_folded(tiny_model(seed=1), out)  # the rerun completes beside the killed write's leftovers
    assert same_weights(out, seed=1)


def cache_config(n: int, cache: str) -> DataConfig:
    return DataConfig(seq_len=8, num_sequences=n, cache_dir=cache, gen_batch_size=2, gen_max_new_tokens=12)


def test_self_text_cache_killed_mid_write(tmp_path):
    cache = str(tmp_path / "cache")
    model, tok = tiny_model(), tiny_tokenizer()
    first = self_generated(cache_config(2, cache), model, tok)
    # the child grows the cache; killed after its text grew and before the meta that vouches for it
    kill_mid_write("from compress.data import self_generated\nfrom tests.test_outputs import cache_config, tiny_model, "
                   f"tiny_tokenizer\nself_generated(cache_config(8, {cache!r}), tiny_model(), tiny_tokenizer())",
                   "compress.data:write_atomic", tmp_path / "ready", call=2)
    assert self_generated(cache_config(2, cache), model, tok) == first  # what the meta vouches for is intact
    grown = self_generated(cache_config(8, cache), model, tok)  # the rerun completes
    assert len(grown) > len(first) and grown[: len(first)] == first


def cure(work) -> tuple:
    """A 4-step cure of a tiny model, a checkpoint after every step."""
    torch.manual_seed(0)
    data = torch.randint(3, 99, (8, 16))
    cfg = HealConfig(max_steps=4, checkpoint_every=1, distill="none", batch_size=2, warmup_steps=1)
    return heal(tiny_model(), None, data, cfg, work, resume=True)


def test_cure_checkpoint_killed_mid_write(tmp_path):
    work = tmp_path / "cure"
    # killed with the third checkpoint staged, before it is swapped in
    kill_mid_write(f"from tests.test_outputs import cure\ncure({str(work)!r})", "compress.outputs:sync_files",
                   tmp_path / "ready", call=3)
    assert json.loads((work / "checkpoint" / "progress.json").read_text())["step"] == 2
    resumed, state = cure(work)
    straight, _ = cure(tmp_path / "straight")
    assert state.step == 4 and [s["step"] for s in state.losses] == [1, 2, 3, 4]
    for (name, a), b in zip(resumed.named_parameters(), straight.parameters()):
        assert torch.equal(a, b), name
