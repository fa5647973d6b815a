"""Target phone profiles: data files under runtime_tests/profiles/, one per device class.

Each figure is an object {"value", "source", "note"}: a number without a source is
rejected, so every projection can say where its inputs came from.

    profile = load_profile("apple_a17_pro")
    cores = check_cores(profile.performance_cores)   # ValueError if this machine has fewer
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

PROFILE_DIR = Path(__file__).parent / "profiles"
DEFAULT_PROFILE = "apple_a17_pro"  # 2 performance cores: the one class this 2-core machine can emulate whole
FIGURES = {  # field -> (type, lower bound)
    "performance_cores": (int, 1),
    "clock_ghz": (float, 0.1),
    "memory_bandwidth_gbs": (float, 0.1),
    "llc_mb": (float, 0.0),
    "app_ram_budget_mb": (float, 1.0),
}


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    performance_cores: int
    clock_ghz: float
    memory_bandwidth_gbs: float
    llc_mb: float
    app_ram_budget_mb: float
    sources: dict  # field -> {"source", "note"}

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                **{k: getattr(self, k) for k in FIGURES}, "sources": self.sources}


def known_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_path: str | os.PathLike) -> Profile:
    """A profile by name (a file in PROFILE_DIR) or by path to a JSON file.

    Raises ValueError naming the known profiles for an unknown name, and ValueError
    naming the field for a figure that is missing, out of range or without a source.
    """
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = PROFILE_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ValueError(f"unknown profile {str(name_or_path)!r}; known profiles: {', '.join(known_profiles())}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    values, sources = {}, {}
    for field, (kind, low) in FIGURES.items():
        entry = data.get(field)
        if not isinstance(entry, dict) or "value" not in entry:
            raise ValueError(f"{path}: {field} must be an object with 'value' and 'source'")
        if not str(entry.get("source", "")).strip():
            raise ValueError(f"{path}: {field} has no source")
        value = entry["value"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise ValueError(f"{path}: {field} must be a {kind.__name__}, got {value!r}")
        if value < low:
            raise ValueError(f"{path}: {field} = {value} is below {low}")
        values[field] = kind(value)
        sources[field] = {"source": entry["source"], "note": entry.get("note", "")}
    return Profile(name=data.get("name", path.stem), description=data.get("description", ""), sources=sources, **values)


def check_cores(n: int) -> list[int]:
    """The first `n` CPUs this process may run on. Raises ValueError if the machine has fewer."""
    total = os.cpu_count() or 1
    allowed = sorted(os.sched_getaffinity(0))
    if n < 1:
        raise ValueError(f"core count must be at least 1, got {n}")
    if n > total:
        raise ValueError(f"the profile needs {n} cores but this machine has {total} (os.cpu_count()); "
                         f"pass a smaller core count (--cores) to emulate on part of the target")
    if n > len(allowed):
        raise ValueError(f"the profile needs {n} cores but this process may only use {len(allowed)} "
                         f"(CPUs {allowed}); pass a smaller core count (--cores)")
    return allowed[:n]
