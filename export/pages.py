"""Give back the resident pages of memory-mapped weight files once a runtime has packed them.

Both runtimes map the weight file and then build their own packed copy of most
weights at load (ORT prepacking, XNNPACK packing). The packing reads every page of the
mapping, and those clean file pages then stay in the process's resident set although
only a few of them are read again: the rows that the embedding gathers out of the tied
weight, whose packed twin serves the head. The kernel would reclaim them under memory
pressure, but until then the app is charged for the weight twice.
`release_mapped_pages` asks the kernel to reclaim them now (MADV_PAGEOUT, falling back
to MADV_COLD): nothing is lost, a page read again faults back in from the file, so the
resident set after a run holds the packed weights plus the rows actually used (a page that
another mapping also holds, e.g. a second session on the same file, is left). Android
(kernel >= 5.4) takes the same madvise call from native code.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

MADV_COLD, MADV_PAGEOUT = 20, 21  # linux/mman.h (5.4+)


def mapped_ranges(files) -> list[tuple[int, int]]:
    """(start, end) of every mapping of `files` in this process, from /proc/self/maps."""
    wanted = {os.path.realpath(f) for f in files}
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and os.path.realpath(parts[5]) in wanted:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


def mapped_resident(files) -> int:
    """Resident bytes of this process's mappings of `files` (the weight pages, not library code)."""
    wanted = {os.path.realpath(f) for f in files}
    total, current = 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and len(parts) >= 5:  # a mapping header: addr perms offset dev inode [path]
            current = os.path.realpath(parts[5]) if len(parts) > 5 else None
        elif parts and parts[0] == "Rss:" and current in wanted:
            total += int(parts[1]) * 1024
    return total


def release_mapped_pages(files) -> int:
    """Reclaim the resident pages of every mapping of `files`; returns the bytes advised (0 off Linux)."""
    if not Path("/proc/self/maps").is_file():
        return 0
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    advised = 0
    for start, end in mapped_ranges(files):
        libc.munlock(start, end - start)  # ExecuTorch's Python loader mlocks its mapping; locked pages stay
        if libc.madvise(start, end - start, MADV_PAGEOUT) != 0 and libc.madvise(start, end - start, MADV_COLD) != 0:
            continue  # an old kernel: leave the pages to the kernel's own reclaim
        advised += end - start
    return advised
