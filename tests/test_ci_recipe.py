"""The CI recipe in the README stays valid: the workflow is YAML with the expected
steps, and every `toolkit ...` command in it parses with this version of the CLI
(a renamed flag would otherwise rot the documented recipe silently)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from toolkit.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _recipe() -> dict:
    text = README.read_text()
    section = text[text.index("### CI recipe"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block, "the CI recipe section has no yaml block"
    return yaml.safe_load(block.group(1))


def _toolkit_commands() -> list[str]:
    steps = [s for job in _recipe()["jobs"].values() for s in job["steps"]]
    return [s["run"] for s in steps if str(s.get("run", "")).startswith("toolkit ")]


def test_recipe_is_a_workflow_that_gates_on_parity():
    recipe = _recipe()
    steps = recipe["jobs"]["convert-and-gate"]["steps"]
    runs = " ".join(str(s.get("run", "")) for s in steps)
    assert "toolkit convert" in runs and "toolkit parity" in runs and "--junit" in runs
    assert any(s.get("if") == "failure()" and "--bisect" in s["run"] for s in steps)
    assert any(str(s.get("uses", "")).startswith("actions/upload-artifact") for s in steps)


@pytest.mark.parametrize("command", _toolkit_commands())
def test_recipe_commands_parse(command):
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert callable(args._run)
