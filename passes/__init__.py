"""Graph passes of the ONNX deployment toolkit.

Importing this package is cheap: onnx, onnx_ir and onnxscript are imported only
when a pass runs. Entry points:

* :func:`run_pipeline` -- run passes in the order of ``PIPELINE_ORDER``.
* :func:`list_passes` / :func:`get_pass` -- the registry (``toolkit list-passes``).
"""

from passes.pipeline import PIPELINE_ORDER, PipelineReport, run_pipeline, validate_model
from passes.registry import (
    GraphPass,
    OptionInfo,
    PassInfo,
    PassOptions,
    PassResult,
    format_pass_list,
    get_pass,
    known_pass_names,
    list_passes,
)

__all__ = [
    "PIPELINE_ORDER",
    "GraphPass",
    "OptionInfo",
    "PassInfo",
    "PassOptions",
    "PassResult",
    "PipelineReport",
    "format_pass_list",
    "get_pass",
    "known_pass_names",
    "list_passes",
    "run_pipeline",
    "validate_model",
]
