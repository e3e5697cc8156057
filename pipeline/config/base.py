"""What every section of the config builds on: ConfigError, the `resume` metadata of the fields, and the checks
that name the field, the value and the fix.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

from pipeline.errors import PipelineError


class ConfigError(PipelineError, ValueError):
    """A configuration problem found before any work started."""


# How each field of ModelConfig and TrainConfig counts when a run resumes: its `resume` metadata, read by
# resume_fields (the model and train part of the math a checkpoint records, which a resume compares). Every field
# has one (tests/pipeline/test_config_resume.py): a new field without it fails there, not on a user's resume.
MATH = {"resume": "math"}  # changes the numbers the run computes
FREE = {"resume": "free"}  # logging, checkpointing, kernels: the same numbers whatever its value
LENGTH = {"resume": "length"}  # the run's length: math unless the schedule is constant (cosine and WSD stretch over it)


def later(before: Any) -> dict[str, Any]:
    """A math field added after checkpoints existed: it counts only when it differs from `before`, the value every
    run had before the field existed, so that older checkpoints (which never recorded it) still resume."""
    return {"resume": "later", "before": before}


RESUME_KINDS = ("math", "free", "length", "later")


class Choice(str, Enum):
    """A field whose value is one of a fixed set of strings: an Enum, so that Hydra refuses any other value when it
    composes the config (OmegaConf names the field and the allowed values), and a str equal to its value, so that
    it works wherever the plain string did: ==, `in`, dict keys, json.dumps, pickling to Ray workers, and str(),
    f-strings and %s (MLflow params, log lines, override strings) give the plain value. Each member is named
    exactly as its value (OmegaConf reads and writes the names). A config built in code may still hold the plain
    string: every check and every use compares by value, and validate's `choice` checks it."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(str.__str__(self), spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


def choice(name: str, value: Any, allowed: tuple | type[Choice]) -> None:
    """value is one of allowed (a tuple of strings, or a Choice enum's values)."""
    if isinstance(allowed, type) and issubclass(allowed, Choice):
        allowed = allowed.values()
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}: set {name} to one of them.")


def positive(name: str, value: float) -> None:
    if value is None or not 0 < value < math.inf:  # NaN fails the comparison
        raise ConfigError(f"{name}={value!r} must be positive: set {name} to a number > 0.")


def non_negative(name: str, value: float, meaning: str = "") -> None:
    """value >= 0; meaning says what 0 means (e.g. "0 turns it off")."""
    if not 0 <= value < math.inf:
        why = f" ({meaning})" if meaning else ""
        raise ConfigError(f"{name}={value!r} must be a finite number >= 0{why}: set {name} to 0 or more.")


def fraction(name: str, value: float, low: float = 0.0, high: float = 1.0) -> None:
    """low <= value < high."""
    if not low <= value < high:
        raise ConfigError(f"{name}={value!r} must be in [{low:g}, {high:g}): set {name} inside that range.")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _finite_numbers(obj: Any, prefix: str) -> list[str]:
    """Dotted names of the float values below obj (dataclass fields, list items, dict values) that are NaN or
    infinite: Hydra reads `nan` and `inf` as floats, and a NaN slips through every `value <= 0` check."""
    if hasattr(obj, "__dataclass_fields__"):
        return [n for key in obj.__dataclass_fields__ for n in _finite_numbers(getattr(obj, key), f"{prefix}{key}.")]
    if isinstance(obj, dict):
        return [n for key, value in obj.items() for n in _finite_numbers(value, f"{prefix}{key}.")]
    if isinstance(obj, list):
        return [n for i, value in enumerate(obj) for n in _finite_numbers(value, f"{prefix}{i}.")]
    if isinstance(obj, float) and not math.isfinite(obj):
        return [f"{prefix.rstrip('.')}={obj}"]
    return []


def validate_finite(cfg: Any, prefix: str = "") -> None:
    """Every float of the config (or of its section named by prefix, e.g. "parallel.") is a number: NaN and
    infinity are refused, naming the field."""
    bad = _finite_numbers(cfg, prefix)
    if bad:
        raise ConfigError(f"{', '.join(bad)}: not a finite number; set {'it' if len(bad) == 1 else 'each'} to a "
                          f"finite value (NaN and inf are never valid settings).")
