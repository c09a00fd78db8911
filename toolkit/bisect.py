"""``toolkit parity --bisect``: which pass breaks parity?

Exports the source once, then applies the requested passes cumulatively in
pipeline order (first pass, first two, ...) and runs the parity check after each.
The first prefix that fails names the culprit pass, together with the nodes that
pass introduced (the rewritten places to look at).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _label(node: Any) -> str:
    return f"{node.name} ({node.domain + '::' if node.domain else ''}{node.op_type})"


def bisect(src: Any, names: list[str] | None, options: dict[str, dict[str, Any]] | None, settings: Any,
           profile: str | None = None, overrides: dict[str, float] | None = None,
           on_report: Callable[[str, Any], None] | None = None) -> dict[str, Any]:
    """Apply ``names`` cumulatively, checking parity after each; see the module docstring.

    ``on_report(pass_name, ParityReport)`` is called after each check (the CLI uses
    it to render ``--html``: one report per step, compared side by side).
    """
    from passes import run_pipeline
    from passes.pipeline import resolve_pass_names
    from toolkit import parity
    from toolkit.export import export, save_model

    selected = resolve_pass_names(names)
    steps: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="toolkit-bisect-") as tmp:
        base = export(src, Path(tmp) / "exported.onnx")
        before = {n.name for n in base.graph.node}
        for i, name in enumerate(selected):
            model, report = run_pipeline(base, selected[: i + 1], options)
            path = Path(tmp) / f"after-{i}-{name}.onnx"
            save_model(model, path)
            result = parity.check(src, path, settings, profile=profile, overrides=overrides)
            if on_report is not None:
                on_report(name, result)
            added = [_label(n) for n in model.graph.node if n.name not in before]
            steps.append({
                "pass": name, "rewrites": report.counts.get(name, 0), "parity_passed": result.passed,
                "failures": [f"{r.phase} {r.name}: {'; '.join(r.failures)}" for r in result.records if not r.passed]
                + result.perplexity_failures,
                "nodes_added": added,
            })
            if not result.passed:
                return {"first_failing_pass": name, "nodes_added": added, "steps": steps}
            before = {n.name for n in model.graph.node}
    return {"first_failing_pass": None, "nodes_added": [], "steps": steps}
