"""Apply onnxscript rewrite rules and explain the candidates that did not match.

"The pass did nothing" is the most common question about a fusion pass, so every
rewriter-based pass goes through :func:`apply_rules`, which

1. applies a :class:`onnxscript.rewriter.RewriteRuleSet`, counting rewrites per rule;
2. with ``explain=True``, re-runs the same rules on the *rewritten* model in
   onnxscript's tracer mode (which never mutates the graph) and turns the failed
   matches into lines ``"node <name> (<op>): <reason> [rule <rule>]"``. Running the
   tracer after the rewrite means only the nodes that are still unfused are
   explained.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import onnx_ir as ir
from onnxscript.rewriter import MatchingTracer, MatchStatus, RewriteRuleSet
from onnxscript.rewriter import pattern as rw_pattern


@dataclasses.dataclass
class _Attempt:
    rule: rw_pattern.RewriteRule
    root: ir.Node
    status: MatchStatus
    reason: str
    num_matched_nodes: int

    @property
    def score(self) -> int:
        # Same ranking as onnxscript's MatchInfo.score: a failed check beats a partial
        # structural match, and a longer partial match beats a shorter one.
        return self.num_matched_nodes + int(self.status) * 100


class _RecordingTracer(MatchingTracer):
    """A tracer that keeps every attempt (the base class keeps only the best per rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts: list[_Attempt] = []

    def log(self, rule, container, node, match_result, status) -> None:  # noqa: D102
        super().log(rule, container, node, match_result, status)
        self.attempts.append(
            _Attempt(rule, node, status, match_result.reason, len(match_result.nodes))
        )


def describe_node(node: ir.Node) -> str:
    """``node <name> (<op>)``, the prefix every explanation and error uses."""
    op = f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
    return f"node {node.name or '<unnamed>'} ({op})"


def _counting(rule: rw_pattern.RewriteRule, counts: collections.Counter[str]):
    """Wrap ``rule.try_rewrite`` so that every replacement it returns is counted.

    Outside tracer mode the rule set applies every replacement a rule returns, so
    this counts rewrites per rule (the set itself only returns the total).
    """
    original = rule.try_rewrite

    def try_rewrite(*args, **kwargs):
        delta = original(*args, **kwargs)
        if delta is not None and kwargs.get("tracer") is None:
            counts[rule.name] += 1
        return delta

    rule.try_rewrite = try_rewrite  # type: ignore[method-assign]
    return original


def explain_unmatched(model: ir.Model, rules: RewriteRuleSet) -> list[str]:
    """Why each candidate node in ``model`` is not rewritten by ``rules``.

    A node is a candidate if some rule got past the root op (at least two pattern
    nodes matched) or matched completely but failed its ``check``. For each such
    node the most advanced failed attempt is reported. Nodes that some rule could
    rewrite are not reported.
    """
    tracer = _RecordingTracer()
    rules.apply_to_model(model, tracer=tracer)
    by_root: dict[ir.Node, list[_Attempt]] = {}
    for attempt in tracer.attempts:
        by_root.setdefault(attempt.root, []).append(attempt)
    lines = []
    for root, attempts in by_root.items():
        if any(a.status == MatchStatus.SUCCESS for a in attempts):
            continue
        relevant = [
            a
            for a in attempts
            if a.status != MatchStatus.NO_MATCH or a.num_matched_nodes >= 2
        ]
        if not relevant:
            continue
        best = max(relevant, key=lambda a: a.score)
        prefix = describe_node(root)
        reason = best.reason or "pattern did not match"
        # Checks name the node they reject; don't repeat it when that is the root.
        reason = reason.removeprefix(f"{prefix} ")
        lines.append(f"{prefix}: {reason} [rule {best.rule.name}]")
    return lines


@dataclasses.dataclass
class RuleApplication:
    """Outcome of :func:`apply_rules`."""

    count: int
    per_rule: dict[str, int]
    explanations: list[str]


def apply_rules(
    model: ir.Model, rules: Sequence[rw_pattern.RewriteRule], *, explain: bool = False
) -> RuleApplication:
    """Apply ``rules`` to ``model`` in place; see the module docstring."""
    rule_set = RewriteRuleSet(list(rules))
    counts: collections.Counter[str] = collections.Counter()
    originals = [(rule, _counting(rule, counts)) for rule in rule_set.rules]
    try:
        count = rule_set.apply_to_model(model)
    finally:
        for rule, original in originals:
            rule.try_rewrite = original  # type: ignore[method-assign]
    explanations = explain_unmatched(model, rule_set) if explain else []
    return RuleApplication(count, dict(counts), explanations)
