"""What a command may write over: outputs never destroy what this tool did not write.

Every command that writes (compress, export, run, bench, eval) calls `check_output` before
any work. An existing path is replaced only when it is an artifact of the same kind that
this tool wrote: a recognised layout (a folded model's `fold` section, an ONNX export's
model.onnx + genai_config.json, an ExecuTorch program's header) or a `.foldgpt` marker
(folders written into over time: a run, a bench report, a compress work dir). Anything
else is refused unless `overwrite`; an output that is, holds or lies inside an input is
refused even then, and so is a symlink to anything but our own artifact.

Replacing is atomic (`replace_path`: one rename swaps the staged artifact in), and shared
files are written under unique temporary names (`write_atomic`) or a lock (`exclusive`).
No torch here: export/'s runtime half and the CLI import it cheaply.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Callable, Iterable, Iterator

MARKER = ".foldgpt"  # {"kind": ...}: a folder this tool made and writes into


class Kind(str, Enum):
    """The kinds of artifact this tool writes; the value names one in messages."""

    FOLDED = "a folded model"
    ONNX = "an ONNX export"
    PTE = "an ExecuTorch program"
    RUN = "a run folder"
    BENCH = "a bench folder"
    WORK = "a compress work dir"
    CHECKPOINT = "a healing checkpoint"
    EVAL = "an eval result"

    @property
    def is_file(self) -> bool:
        return self in (Kind.PTE, Kind.EVAL)


def _json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _flatbuffer_id(path: Path, prefix: bytes) -> bool:
    """A flatbuffer file identifier (bytes 4..8), e.g. b"ET12" for a .pte, b"FT01" for a .ptd."""
    try:
        with open(path, "rb") as f:
            ident = f.read(8)[4:]
    except OSError:
        return False
    return ident.startswith(prefix) and ident[len(prefix):].isdigit()


# kind -> does this existing path look like that kind as this tool writes it (made before the marker too)
_LAYOUTS: dict[Kind, Callable[[Path], bool]] = {
    Kind.FOLDED: lambda p: "fold" in _json(p / "config.json"),
    Kind.ONNX: lambda p: (p / "model.onnx").is_file() and (p / "genai_config.json").is_file(),
    Kind.PTE: lambda p: p.suffix == ".pte" and _flatbuffer_id(p, b"ET"),
    Kind.RUN: lambda p: (p / "run.json").is_file() or _LAYOUTS[Kind.FOLDED](p / "dense"),
    Kind.BENCH: lambda p: (p / "bench.json").is_file() and (p / "report.md").is_file(),
    Kind.WORK: lambda p: (p / "data.json").is_file(),
    Kind.CHECKPOINT: lambda p: (p / "progress.json").is_file(),
    Kind.EVAL: lambda p: p.suffix == ".json" and bool({"metrics", "folded"} & set(_json(p))),  # eval / compress
}


def is_ours(path: Path, kind: Kind) -> bool:
    path = Path(path)
    if kind.is_file != path.is_file():
        return False
    return _LAYOUTS[kind](path) or (path.is_dir() and _json(path / MARKER).get("kind") == kind.name.lower())


def mark(folder: Path, kind: Kind) -> Path:
    """Create `folder` (if needed) and mark it as a `kind` this tool writes into."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / MARKER).is_file():
        write_atomic(folder / MARKER, json.dumps({"kind": kind.name.lower()}) + "\n")
    return folder


def _companions(out: Path, kind: Kind) -> list[Path]:
    """Files written beside `out`: an ExecuTorch program's weights and tokenizer."""
    return [out.with_suffix(".ptd"), out.parent / "tokenizer.json"] if kind is Kind.PTE else []


def _relation(path: Path, src: Path) -> str | None:
    if path == src:
        return "is"
    if path in src.parents:
        return "holds"
    if src in path.parents:
        return "lies inside"
    return None


def check_output(out: str | os.PathLike, kind: Kind, inputs: Iterable[str | os.PathLike] = (),
                 overwrite: bool = False) -> Path:
    """Refuse, before any work, an `out` whose replacement would destroy what this tool did not write.

    Returns the path to write (a symlink to our own artifact resolved). Raises ValueError for
    an `out` that is, holds or lies inside one of `inputs` (symlinks resolved; `overwrite`
    or not) and for a symlink to anything but a `kind` this tool wrote; FileExistsError for
    an existing path that is not a `kind` this tool wrote (nor an empty folder), unless `overwrite`.
    """
    out = Path(out)
    entry = out.parent.resolve() / out.name  # the directory entry a rename replaces
    target = out.resolve()  # what it points at
    for src in inputs:
        src = Path(src)
        if not src.exists():
            continue
        src = src.resolve()
        for path in (entry, target):
            relation = _relation(path, src)
            if relation:
                raise ValueError(f"output {out} {relation} the input {src}; choose an output outside it")
    if out.is_symlink():
        if not is_ours(target, kind):
            raise ValueError(f"output {out} is a symlink to {target}, not {kind.value} this tool wrote; "
                             "remove the link or choose another output")
        return target
    if out.exists() and not overwrite and not is_ours(out, kind):
        if out.is_dir() and not kind.is_file and not any(out.iterdir()):
            return entry  # an empty folder: nothing to lose
        expected, found = ("file", "directory") if kind.is_file else ("directory", "file")
        what = (f"is a {found} where a {expected} is expected" if out.is_dir() == kind.is_file
                else f"exists and is not {kind.value} this tool wrote")
        raise FileExistsError(f"output {out} {what}; choose another output, or pass --overwrite to replace it")
    for other in _companions(entry, kind):
        if other.exists() and not overwrite and not any(is_ours(p, kind) for p in entry.parent.glob("*.pte")):
            raise FileExistsError(f"{other} (written beside {out}) exists and this tool did not write it; "
                                  "choose another output folder, or pass --overwrite to replace it")
    return entry


def sync_files(path: Path) -> None:
    """fsync a file, or every file under a directory: a rename after a crash must not point
    at unwritten data, and clean pages are ones the kernel (and export.pages) can drop."""
    path = Path(path)
    for f in [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]:
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # filesystem or kernel without it
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def replace_path(stage: Path, out: Path, kind: Kind, overwrite: bool = False) -> None:
    """Put `stage` (a finished file or directory) at `out`, replacing what was there.

    Re-checks `out` first (`check_output`: something may have appeared since the command
    started). Both live in one directory: one exchange swaps them, so `out` is always the
    old artifact or the new one, never missing or half-written; where the filesystem cannot
    exchange, two renames leave the old artifact at a hidden sibling in between.
    """
    check_output(out, kind, overwrite=overwrite)
    sync_files(stage)
    if os.path.lexists(out) and _exchange(stage, out):
        _discard(stage)  # now the old artifact
        return
    old = None
    if os.path.lexists(out):
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        _discard(old)


def write_atomic(path: Path, text: str) -> None:
    """Replace the file `path` with `text` in one rename, from a temporary name no other
    writer shares (two processes writing one file never mix their bytes)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def exclusive(lock_file: Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (flock: released when the process dies).

    When another process holds it: wait for it if `wait` (saying so), else ValueError
    naming that process, so a second writer never interleaves with the first.
    """
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            if not wait:
                raise ValueError(f"{what} is in use by another foldgpt process (pid {holder}); "
                                 "wait for it to finish, or choose another output") from None
            print(f"waiting for another foldgpt process (pid {holder}) writing {what}", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
