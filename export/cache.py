"""Exports kept across runs: the same model exported the same way by the same code is lowered once
per machine. `foldgpt run` exports the dense model in every run though it never changes (its
ExecuTorch program alone lowered in 802-983 s in the committed main-job reports); a fold is new in each run and is not kept.

The key is a digest of every file in the model folder, the export's settings (with the gate's and
the calibration's text by content, not by path), the source of the `export` and `compress`
packages, and the versions of the packages an export runs through. A hit is copied into the run
folder (never linked, so the kept copy stays as it was made); a new export is copied in under a
temporary name and renamed, so an entry is whole or absent. Entries live in
$XDG_CACHE_HOME/foldgpt/exports (default ~/.cache); deleting that folder only costs time. Entries are
not pruned: a new version of this code or of a package makes new keys beside the old ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

VERSION = 1
PACKAGES = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "executorch", "torchao")
_SOURCES = [Path(__file__).resolve().parents[1] / name for name in ("export", "compress")]


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "foldgpt" / "exports"


def _digest_files(files) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def export_key(model_dir: Path, backend: str, settings: dict, texts: dict[str, str | None]) -> str:
    """The cache key of one export: model bytes, settings, texts by content, code and package versions."""
    model_files = sorted(f for f in Path(model_dir).iterdir() if f.is_file())
    code = sorted(f for folder in _SOURCES for f in folder.glob("*.py"))
    key = {"v": VERSION, "backend": backend, "settings": settings, "model": _digest_files(model_files),
           "texts": {k: _digest_files([Path(p)]) if p else None for k, p in sorted(texts.items())},
           "code": _digest_files(code), "packages": {p: _version(p) for p in PACKAGES}}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def restore(key: str, folder: Path) -> bool:
    """Copy the kept export `key` into `folder` (True), or False when there is none."""
    entry = cache_root() / key
    if not entry.is_dir():
        return False
    shutil.copytree(entry, folder, dirs_exist_ok=True)
    return True


def store(key: str, folder: Path) -> None:
    """Keep a copy of the export in `folder` under `key` (whole or not at all)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    if (root / key).exists():
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
    try:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
        os.rename(tmp, root / key)  # another process may have kept the same export meanwhile
    except OSError:
        if not (root / key).is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
