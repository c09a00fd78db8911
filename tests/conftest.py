"""Shared fixtures: exported models are built once per session (export is the slow part)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Property tests: CI runs a fixed (derandomized) set of examples so a stop is never
# red by chance; TOOLKIT_HYPOTHESIS=explore draws new examples each run (hypothesis
# prints the falsifying example and how to reproduce it).
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
_hypothesis_settings.register_profile("explore", derandomize=False, print_blob=True)
_hypothesis_settings.load_profile(os.environ.get("TOOLKIT_HYPOTHESIS", "ci"))

_EXPORTS: dict[str, tuple] = {}


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="session")
def exported(export_dir):
    """``exported(spec) -> (SourceModel, path to model.onnx)``, cached per session."""

    def get(spec: str):
        if spec not in _EXPORTS:
            from toolkit import export, sources

            src = sources.resolve(spec)
            path = export_dir / (spec.replace(":", "_") + ".onnx")
            export.export(src, path)
            _EXPORTS[spec] = (src, path)
        return _EXPORTS[spec]

    return get
