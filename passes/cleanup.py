"""Dead-code elimination: unused nodes, initializers, functions and opset imports.

Fusions leave behind whatever their patterns no longer need (e.g. the constant of a
``Div`` folded into an attribute). This pass uses onnx_ir's common passes, the same
ones the onnxscript optimizer runs after rewriting. The model's inputs and outputs
are never changed.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from passes.registry import GraphPass, PassOptions, PassResult


@dataclasses.dataclass(frozen=True)
class CleanupOptions(PassOptions):
    """Options of ``cleanup``."""

    remove_unused_opsets: bool = dataclasses.field(
        default=True,
        metadata={"help": "also drop opset imports that no node uses any more"},
    )

    def validate(self) -> None:
        if not isinstance(self.remove_unused_opsets, bool):
            from toolkit.errors import PassError

            raise PassError(
                f"cleanup option 'remove_unused_opsets' must be a bool, "
                f"got {self.remove_unused_opsets!r}",
                hint="set remove_unused_opsets=true or remove_unused_opsets=false",
            )


def _count_nodes(model: ir.Model) -> int:
    graphs = [model.graph, *(f.graph for f in model.functions.values())]
    return sum(sum(1 for _ in ir.traversal.RecursiveGraphIterator(g)) for g in graphs)


def apply(model: ir.Model, options: CleanupOptions, *, explain: bool = False) -> PassResult:
    """Remove dead nodes/initializers/functions; count = number of nodes removed."""
    from onnx_ir.passes import common

    del explain  # nothing to explain: dead code has no "near miss"
    nodes_before = _count_nodes(model)
    initializers_before = len(model.graph.initializers)
    functions_before = len(model.functions)
    opsets_before = set(model.opset_imports)
    steps: list[ir.passes.PassBase] = [
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedFunctionsPass(),
    ]
    if options.remove_unused_opsets:
        steps.append(common.RemoveUnusedOpsetsPass())
    ir.passes.Sequential(*steps)(model)
    return PassResult(
        name=PASS.name,
        count=nodes_before - _count_nodes(model),
        details={
            "initializers_removed": initializers_before - len(model.graph.initializers),
            "functions_removed": functions_before - len(model.functions),
            "opsets_removed": sorted(opsets_before - set(model.opset_imports)),
        },
    )


PASS = GraphPass(
    name="cleanup",
    description="Remove unused nodes, initializers, functions and opset imports",
    options_type=CleanupOptions,
    apply=apply,
)
