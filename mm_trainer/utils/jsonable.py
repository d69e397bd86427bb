"""JSON-ready values: what mm-trainer writes to `audit.json` and `mm_trainer_state.json` (strict JSON)."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any


def jsonable(value: Any) -> Any:
    """`value` with tensors, sets, tuples, paths and numpy scalars made JSON-ready; NaN / infinity become the
    strings `"nan"` / `"inf"` / `"-inf"` (strict JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(jsonable(v) for v in value)
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return jsonable(tolist())
    return str(value)
