"""export.pages: releasing a mapped weight file's resident pages loses nothing."""

from __future__ import annotations

import hashlib
import mmap
import os

import numpy as np
import pytest

from export.pages import mapped_ranges, mapped_resident, release_mapped_pages

MB = 1 << 20


@pytest.fixture
def mapped_file(tmp_path):
    path = tmp_path / "weights.bin"
    data = np.random.default_rng(0).integers(0, 255, 8 * MB, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as f:
        view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    yield path, view, hashlib.sha256(data).hexdigest()
    view.close()


def test_release_drops_the_pages_and_a_read_brings_them_back(mapped_file):
    path, view, digest = mapped_file
    assert hashlib.sha256(view[:]).hexdigest() == digest  # every page read: resident
    assert len(mapped_ranges([path])) == 1
    assert mapped_resident([path]) >= 8 * MB
    assert release_mapped_pages([path]) >= 8 * MB
    assert mapped_resident([path]) < MB
    view[4 * MB:4 * MB + 16]  # read one page again
    assert mapped_resident([path]) < 2 * MB  # only what was read again
    assert hashlib.sha256(view[:]).hexdigest() == digest  # nothing lost
    assert mapped_resident([path]) >= 8 * MB


def test_files_not_mapped_are_left_alone(tmp_path, mapped_file):
    other = tmp_path / "other.bin"
    other.write_bytes(b"x" * 4096)
    assert mapped_ranges([other]) == [] and release_mapped_pages([other]) == 0 and mapped_resident([other]) == 0
