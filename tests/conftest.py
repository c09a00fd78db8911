"""Shared fixtures: exported models are built once per session (export is the slow part)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
