"""Registry of named graph passes.

A pass is a :class:`GraphPass`: a name, a one-line description, a frozen options
dataclass (each field documented through ``dataclasses.field(metadata={"help": ...})``
and checked by one ``validate()``), and an ``apply`` function that rewrites an
``onnx_ir.Model`` in place and returns a :class:`PassResult`.

The registry only knows *where* each pass lives (``_PASS_MODULES``); the module is
imported on first use, so ``import passes`` stays cheap (no onnxscript, no onnx).
The order in which passes run is not decided here but in :mod:`passes.pipeline`.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from typing import TYPE_CHECKING, Any, Callable

from toolkit.errors import PassError

if TYPE_CHECKING:
    import onnx_ir as ir

# name -> module defining ``PASS: GraphPass``. Keep in sync with pipeline.PIPELINE_ORDER
# (a test asserts both list the same names).
_PASS_MODULES: dict[str, str] = {
    "fuse-softmax-topk": "passes.softmax_topk",
    "kv-cache": "passes.kv_cache",
    "sampling-head": "passes.sampling_head",
    "low-rank": "passes.low_rank",
    "low-rank-kv": "passes.low_rank_kv",
    "float16": "passes.float16",
    "portable": "passes.portable",
    "cleanup": "passes.cleanup",
}


@dataclasses.dataclass
class PassResult:
    """What one pass did.

    Attributes:
        name: The pass name.
        count: Number of rewrites (fusions applied, nodes removed, ...).
        explanations: With ``explain=True``, one line per candidate node that did
            not match, in the form ``"node <name> (<op>): <reason>"``.
        details: Pass-specific counters (e.g. per-rule counts).
    """

    name: str
    count: int
    explanations: list[str] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PassOptions:
    """Base class of pass options; subclasses are frozen dataclasses."""

    def validate(self) -> None:
        """Raise :class:`PassError` (with a ``hint``) if the options are unusable."""


@dataclasses.dataclass(frozen=True)
class GraphPass:
    """A registered pass.

    Attributes:
        name: Name used on the command line and in ``PIPELINE_ORDER``.
        description: One line, shown by ``toolkit list-passes``.
        options_type: The frozen dataclass of options (a :class:`PassOptions`).
        apply: ``apply(model, options, *, explain=False) -> PassResult``; rewrites
            ``model`` in place.
    """

    name: str
    description: str
    options_type: type[PassOptions]
    apply: Callable[..., PassResult]

    def make_options(self, raw: PassOptions | dict[str, Any] | None = None) -> PassOptions:
        """Build and validate options from a dict (e.g. parsed from the CLI)."""
        if isinstance(raw, self.options_type):
            options = raw
        else:
            options = _options_from_dict(self.name, self.options_type, dict(raw or {}))
        options.validate()
        return options


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    """One option of a pass, for ``list-passes``."""

    name: str
    type: str
    default: Any
    help: str


@dataclasses.dataclass(frozen=True)
class PassInfo:
    """A pass as ``toolkit list-passes`` shows it."""

    name: str
    description: str
    options: tuple[OptionInfo, ...]


def known_pass_names() -> list[str]:
    """Names of all registered passes, sorted."""
    return sorted(_PASS_MODULES)


def _unknown_pass_error(name: str) -> PassError:
    known = ", ".join(known_pass_names())
    return PassError(
        f"unknown pass {name!r}; known passes: {known}",
        hint="run `toolkit list-passes` to see each pass with its options",
    )


def get_pass(name: str) -> GraphPass:
    """Return the registered pass called ``name``.

    Raises:
        PassError: if no pass has that name; the message lists the known ones.
    """
    module_name = _PASS_MODULES.get(name)
    if module_name is None:
        raise _unknown_pass_error(name)
    graph_pass = importlib.import_module(module_name).PASS
    assert graph_pass.name == name, f"{module_name}.PASS is named {graph_pass.name!r}"
    return graph_pass


def check_pass_names(names: list[str]) -> None:
    """Raise :class:`PassError` for the first unknown name (listing the known ones)."""
    for name in names:
        if name not in _PASS_MODULES:
            raise _unknown_pass_error(name)


def list_passes() -> list[PassInfo]:
    """All passes with their options, for ``toolkit list-passes``."""
    infos = []
    for name in known_pass_names():
        graph_pass = get_pass(name)
        hints = typing.get_type_hints(graph_pass.options_type)
        options = tuple(
            OptionInfo(
                name=f.name,
                type=_type_name(hints[f.name]),
                default=f.default,
                help=f.metadata.get("help", ""),
            )
            for f in dataclasses.fields(graph_pass.options_type)
        )
        infos.append(PassInfo(name, graph_pass.description, options))
    return infos


def format_pass_list(infos: list[PassInfo] | None = None) -> str:
    """Render :func:`list_passes` as the text ``toolkit list-passes`` prints."""
    lines = []
    for info in infos if infos is not None else list_passes():
        lines.append(f"{info.name}: {info.description}")
        for opt in info.options:
            lines.append(f"    {opt.name} ({opt.type}, default {opt.default!r}): {opt.help}")
    return "\n".join(lines)


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args and len(args) < len(typing.get_args(tp)):
        return f"{_type_name(args[0])} | None"
    return getattr(tp, "__name__", str(tp))


def _coerce(pass_name: str, field_name: str, tp: Any, value: Any) -> Any:
    """Check (and for strings from the CLI, convert) one option value."""
    args = typing.get_args(tp)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), tp) if args else tp
    if value is None and optional:
        return None
    if optional and isinstance(value, str) and value.strip().lower() in ("none", "null"):
        return None  # --pass-option fuse-softmax-topk.max_k=None, as list-passes writes the default
    if isinstance(value, str) and base is not str:
        text = value.strip().lower()
        try:
            if base is bool and text in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return text in ("1", "true", "yes", "on")
            if base is int:
                return int(text)
            if base is float:
                return float(text)
        except ValueError:
            pass
    ok = isinstance(value, base) and not (base is not bool and isinstance(value, bool))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise PassError(
            f"option {field_name!r} of pass {pass_name!r} expects {_type_name(tp)}, "
            f"got {type(value).__name__} {value!r}",
            hint=f"pass e.g. {field_name}={_example(base)}",
        )
    return value


def _example(base: Any) -> str:
    return {bool: "true", int: "8", float: "1.0", str: "'text'"}.get(base, "<value>")


def _options_from_dict(
    pass_name: str, options_type: type[PassOptions], raw: dict[str, Any]
) -> PassOptions:
    hints = typing.get_type_hints(options_type)
    fields = {f.name for f in dataclasses.fields(options_type)}
    for key in raw:
        if key not in fields:
            valid = ", ".join(sorted(fields)) or "(none)"
            raise PassError(
                f"pass {pass_name!r} has no option {key!r}; valid options: {valid}",
                hint="run `toolkit list-passes` to see each option with its help",
            )
    values = {key: _coerce(pass_name, key, hints[key], value) for key, value in raw.items()}
    return options_type(**values)


def apply_pass(
    model: ir.Model,
    name: str,
    options: PassOptions | dict[str, Any] | None = None,
    *,
    explain: bool = False,
) -> PassResult:
    """Run one pass by name on ``model`` (in place), without validation."""
    graph_pass = get_pass(name)
    return graph_pass.apply(model, graph_pass.make_options(options), explain=explain)
