"""The CUDA-simulation tests reuse the op tests' scenarios and references (tests/ops)."""

from __future__ import annotations

import pathlib
import sys

_TESTS = pathlib.Path(__file__).resolve().parents[1]
for path in (_TESTS.parent, _TESTS / "ops"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
