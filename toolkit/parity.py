"""Numerical parity of an ONNX model against the PyTorch model it came from.

The product's core promise: a converted model computes what the original does.
:func:`check` runs both on the same inputs:

* **prefill** at several batch sizes with left padding (rows of different length),
* **decode**: N steps, each side feeding its *own* cache back (so cache errors
  compound as they would in deployment); both sides are given the same next
  token (the reference's greedy choice) so positions stay aligned,
* **held-out perplexity** for sources that ship held-out text (the trained
  reference model).

Results are data (one :class:`OutputRecord` per output and phase) rendered to a
text table, JSON and JUnit XML, in the spirit of the PyTorch exporter's
verification records. Thresholds per precision live in :data:`THRESHOLDS`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import numpy as np

from toolkit.checker import check_model
from toolkit.errors import InvalidModelError, OpLibraryError, ToolkitError

# One table of thresholds, per precision profile. A record fails when a metric is
# beyond its bound. fp32: export/fusions that keep fp32 math re-associate sums
# (fused kernels, ORT graph optimisations); 1e-3 absolute on logits of magnitude
# ~10 and cosine 1 - 1e-6 catch any real bug (a perturbed weight moves logits by
# >1e-2) while tolerating re-association. Quantized caches are judged on the
# distribution (KL, top-1, perplexity), not on raw logits.
THRESHOLDS: dict[str, dict[str, float]] = {
    "fp32": {
        "logits_max_abs": 1e-3,
        "logits_cosine_min": 1 - 1e-6,
        "top1_min": 0.999,
        "top1_tie_margin": 1e-4,
        "kl_mean_max": 1e-6,
        "present_max_abs": 1e-3,
        "present_cosine_min": 1 - 1e-6,
        "ppl_rel_increase_max": 1e-4,
        "head_probs_max_abs": 1e-5,
    },
    "fp16": {
        "logits_max_abs": 5e-2,
        "logits_cosine_min": 0.9999,
        "top1_min": 0.98,
        "top1_tie_margin": 1e-2,
        "kl_mean_max": 1e-3,
        # float16 keeps 11 significant bits: keys of llama-stdlib reach 5.9 in magnitude
        # (ulp 3.9e-3 there), and each cached key has been rounded by the projection, the
        # rotary products and their sum; 1e-2 failed its --float16 conversion at 1.005e-2
        # (logits within 2.6e-3, perplexity +0.001%). A real bug moves the cache by more
        # and drops the cosine below 0.9999.
        "present_max_abs": 3e-2,
        "present_cosine_min": 0.9999,
        "ppl_rel_increase_max": 5e-3,
        # A logit error d moves a probability by up to p(1 - p) * 2d <= d / 2: 1e-3 failed
        # an fp16 head whose logits were within 4.7e-3 (probabilities 1.07e-3, top-1 100%,
        # perplexity +0.005%; an audit), against a logits bound of 5e-2. It is also the
        # sampled head's tie window (tie_margin_key): a flipped draw within 1e-2 of a
        # boundary of the reference's distribution counts as a tie.
        "head_probs_max_abs": 1e-2,
    },
    "kv-int8": {
        "logits_max_abs": math.inf,
        "logits_cosine_min": 0.999,
        "top1_min": 0.99,
        "top1_tie_margin": 1e-2,
        "kl_mean_max": 5e-3,
        "present_max_abs": math.inf,
        "present_cosine_min": -1.0,
        "ppl_rel_increase_max": 5e-3,
        "head_probs_max_abs": 1e-2,
    },
    "kv-int4": {
        "logits_max_abs": math.inf,
        "logits_cosine_min": 0.99,
        "top1_min": 0.9,
        "top1_tie_margin": 5e-2,
        "kl_mean_max": 5e-2,
        "present_max_abs": math.inf,
        "present_cosine_min": -1.0,
        "ppl_rel_increase_max": 2e-2,
        "head_probs_max_abs": 5e-2,
    },
    # 2-bit KIVI is measured and reported; these bounds only catch a broken cache
    # (a wrong layout gives perplexity in the thousands and near-random top-1).
    "kv-2bit": {
        "logits_max_abs": math.inf,
        "logits_cosine_min": 0.9,
        "top1_min": 0.7,
        "top1_tie_margin": 0.2,
        "kl_mean_max": 0.3,
        "present_max_abs": math.inf,
        "present_cosine_min": -1.0,
        "ppl_rel_increase_max": 0.15,
        "head_probs_max_abs": 0.2,
    },
}

# Reference logits with a median per-position standard deviation below this are
# "nearly flat" (tiny random-weight configs: about 0.1); a trained model's are
# several units apart. The quantized-cache profiles' tie margins and KL bounds assume
# the latter, so a report on flat logits says that its verdict rests on the cosine.
FLAT_LOGITS_STD = 0.5

HIST_EDGES = [0.0] + [10.0**e for e in range(-9, 3)] + [math.inf]


@dataclasses.dataclass
class OutputRecord:
    """Comparison of one output in one phase."""

    name: str
    phase: str
    shape: list[int]
    max_abs: float
    max_rel: float
    cosine: float
    histogram: list[int]
    top1_agreement: float | None = None
    # Reference logit margins (its argmax minus the token the optimized model chose)
    # at the positions whose argmax differs: apply_thresholds counts a flip whose
    # margin is under the profile's top1_tie_margin as a tie, not a disagreement.
    top1_flip_margins: list[float] = dataclasses.field(default_factory=list)
    top1_positions: int = 0
    kl_mean: float | None = None
    kl_max: float | None = None
    # Median over positions of the reference logits' standard deviation (logits only):
    # how far apart the reference holds its tokens, which the tie margins assume.
    ref_logit_std: float | None = None
    failures: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclasses.dataclass
class ParityReport:
    """All records of one parity run, plus the configuration that produced them."""

    original: str
    optimized: str
    profile: str
    thresholds: dict[str, float]
    settings: dict[str, Any]
    records: list[OutputRecord]
    perplexity: dict[str, float] | None = None
    perplexity_failures: list[str] = dataclasses.field(default_factory=list)
    # Why the profile is not the one the model's metadata recorded (default_profile).
    profile_note: str | None = None
    # The optimized model's ``toolkit.*`` metadata (KV scheme, low-rank options, ...):
    # lets a saved report say which compression setting it measured (HTML comparisons).
    model_metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    # What limits the verdict (e.g. nearly flat reference logits under a quantized-cache
    # profile); shown with the table, in the JSON, the HTML and the JUnit properties.
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.records) and not self.perplexity_failures

    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return str(v)
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        return clean({
            "original": self.original,
            "optimized": self.optimized,
            "profile": self.profile,
            "profile_note": self.profile_note,
            "passed": self.passed,
            "thresholds": self.thresholds,
            "settings": self.settings,
            "histogram_edges": HIST_EDGES,
            "records": [dict(dataclasses.asdict(r), passed=r.passed) for r in self.records],
            "perplexity": self.perplexity,
            "perplexity_failures": self.perplexity_failures,
            "model_metadata": self.model_metadata,
            "notes": self.notes,
        })

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_junit(self) -> str:
        suite = ET.Element("testsuite", name="toolkit.parity", tests=str(len(self.records) + 1),
                           failures=str(sum(not r.passed for r in self.records)
                                        + bool(self.perplexity_failures)))
        if self.notes:
            props = ET.SubElement(suite, "properties")
            for i, note in enumerate(self.notes):
                ET.SubElement(props, "property", name=f"note{i}", value=note)
        for r in self.records:
            case = ET.SubElement(suite, "testcase", classname=f"parity.{r.phase}", name=r.name)
            if not r.passed:
                ET.SubElement(case, "failure", message="; ".join(r.failures)).text = json.dumps(
                    dataclasses.asdict(r))
        case = ET.SubElement(suite, "testcase", classname="parity.heldout", name="perplexity")
        if self.perplexity is None:
            ET.SubElement(case, "skipped", message="source ships no held-out text")
        elif self.perplexity_failures:
            ET.SubElement(case, "failure", message="; ".join(self.perplexity_failures))
        return ET.tostring(suite, encoding="unicode")

    def render(self, console: Any = None) -> None:
        """Print the report as a table (rich)."""
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        console = console or Console(width=None if sys.stdout.isatty() else 150)
        table = Table(title=escape(f"parity: {self.optimized} vs {self.original} (profile {self.profile})"))
        for col in ("phase", "output", "max abs", "max rel", "cosine", "top-1", "KL mean", "status"):
            table.add_column(col)
        shown_presents: set[str] = set()
        for r in self.records:
            # One line per phase for the cache tensors unless one fails: they are many.
            if r.name.startswith("present") and r.passed:
                if r.phase in shown_presents:
                    continue
                shown_presents.add(r.phase)
                group = [x for x in self.records if x.phase == r.phase and x.name.startswith("present")]
                table.add_row(escape(r.phase), f"present.* ({len(group)})",
                              f"{max(x.max_abs for x in group):.2e}", f"{max(x.max_rel for x in group):.2e}",
                              f"{min(x.cosine for x in group):.8f}", "", "",
                              "ok" if all(x.passed for x in group) else "FAIL")
                continue
            table.add_row(
                escape(r.phase), r.name, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}", f"{r.cosine:.8f}",
                "" if r.top1_agreement is None else f"{100 * r.top1_agreement:.2f}%" + self._ties(r),
                "" if r.kl_mean is None else f"{r.kl_mean:.2e}",
                "ok" if r.passed else escape("FAIL: " + "; ".join(r.failures)),
            )
        if self.perplexity is not None:
            p = self.perplexity
            table.add_row("heldout", "perplexity", "", f"{p['rel_increase']:+.2e}", "", "", "",
                          (f"ok ({p['reference']:.3f} -> {p['onnx']:.3f}, {int(p['tokens'])} tokens)"
                           if not self.perplexity_failures else "FAIL: " + "; ".join(self.perplexity_failures)))
        console.print(table)
        if self.profile_note:
            console.print(escape(f"profile {self.profile_note}"))
        for note in self.notes:
            console.print(escape(f"note: {note}"))
        console.print("[bold green]PASS[/]" if self.passed else "[bold red]FAIL[/]")

    def _ties(self, r: OutputRecord) -> str:
        """' (n ties)' for flips the gate forgave (reference margin < top1_tie_margin)."""
        margin = self.thresholds.get(tie_margin_key(r))
        ties = sum(1 for m in r.top1_flip_margins if margin is not None and m < margin)
        return f" ({ties} tie{'s' if ties != 1 else ''})" if ties else ""


# ---------------------------------------------------------------- metrics


class _Differences:
    """Elementwise differences of two arrays, accumulated over chunks (float64)."""

    def __init__(self) -> None:
        self.nan_mismatch = False
        self.max_abs = self.max_rel = self.dot = self.norm_a = self.norm_b = 0.0
        self.hist = np.zeros(len(HIST_EDGES) - 1, np.int64)

    def add_values(self, a: np.ndarray, b: np.ndarray) -> None:
        diff = np.abs(a - b)
        self.nan_mismatch |= bool(np.any(np.isnan(a) != np.isnan(b)))
        finite = np.isfinite(diff)
        self.max_abs = max(self.max_abs, float(diff[finite].max(initial=0.0)))
        rel = diff / np.maximum(np.abs(a), 1e-6)
        self.max_rel = max(self.max_rel, float(rel[finite].max(initial=0.0)))
        af, bf = a[finite], b[finite]
        self.dot += float(np.dot(af, bf))
        self.norm_a += float(np.dot(af, af))
        self.norm_b += float(np.dot(bf, bf))
        self.hist += np.histogram(diff[finite], bins=HIST_EDGES)[0]

    def output_record(self, name: str, phase: str, shape: list[int]) -> OutputRecord:
        max_abs = math.inf if self.nan_mismatch else self.max_abs
        denom = math.sqrt(self.norm_a) * math.sqrt(self.norm_b)
        return OutputRecord(name=name, phase=phase, shape=list(shape), max_abs=max_abs,
                            max_rel=math.inf if self.nan_mismatch else self.max_rel,
                            cosine=self.dot / denom if denom > 0 else (1.0 if max_abs == 0 else 0.0),
                            histogram=[int(h) for h in self.hist])


def _check_same_shape(name: str, phase: str, ref: np.ndarray, got: np.ndarray) -> None:
    if ref.shape != got.shape:
        raise ToolkitError(
            f"output {name!r} ({phase}) has shape {list(got.shape)} in the ONNX model but "
            f"{list(ref.shape)} in PyTorch",
            hint="the optimized model's I/O does not match the original; check the passes applied",
        )


def compare(name: str, phase: str, ref: np.ndarray, got: np.ndarray, where: np.ndarray | None = None) -> OutputRecord:
    """Elementwise comparison of two arrays of the same shape (``where``: a boolean mask
    broadcastable to them, the elements to compare, plus every non-finite element of
    ``got``; all by default)."""
    _check_same_shape(name, phase, ref, got)
    shape = list(ref.shape)
    if where is not None:
        # a left-out element still has to be finite: it is read with weight zero, and 0 x NaN is NaN
        where = np.broadcast_to(where, ref.shape) | ~np.isfinite(got)
        ref, got = ref[where], got[where]
    d = _Differences()
    d.add_values(ref.astype(np.float64).ravel(), got.astype(np.float64).ravel())
    return d.output_record(name, phase, shape)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class LogitStats(_Differences):
    """:func:`compare_logits`' statistics accumulated over rows of logits ([n, V] each,
    a few rows at a time in float64), so a long run is never held, or cast to float64,
    whole: greedy[32x128] kept every step's [32, V] logits of both models and compared
    them in one piece (2 x 4096 x V float32, then several float64 copies: about 7 GB at
    V = 32000, four times that at V = 128256)."""

    ROW_ELEMENTS = 1 << 22  # logits per chunk: 32 MB per float64 temporary

    def __init__(self, phase: str) -> None:
        super().__init__()
        self.phase = phase
        self.kl_sum, self.kl_max = 0.0, -math.inf
        self.agree = self.positions = 0
        self.flip_margins: list[float] = []
        self.stds: list[np.ndarray] = []

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        """Rows ``ref`` / ``got`` ([n, V], the same shape) of the two models' logits."""
        rows = max(1, self.ROW_ELEMENTS // max(1, ref.shape[-1]))
        for start in range(0, len(ref), rows):
            r, g = ref[start:start + rows], got[start:start + rows]
            a, b = r.astype(np.float64), g.astype(np.float64)
            self.add_values(a, b)
            lp, lq = _log_softmax(a), _log_softmax(b)
            kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
            self.kl_sum += float(kl.sum())
            self.kl_max = float(np.max([self.kl_max, kl.max()]))  # (a NaN stays)
            r_top, g_top = r.argmax(-1), g.argmax(-1)
            self.agree += int(np.sum(r_top == g_top))
            self.flip_margins += [float(r[i, r_top[i]] - r[i, g_top[i]]) for i in np.nonzero(r_top != g_top)[0]]
            self.positions += len(r)
            self.stds.append(a.std(axis=-1))

    def record(self, shape: list[int]) -> OutputRecord:
        if not self.positions:  # (an empty comparison would pass every bound)
            raise ToolkitError(f"parity {self.phase}: no logit positions to compare",
                               hint="check the parity settings (prompt length, batch, tokens)")
        rec = self.output_record("logits", self.phase, shape)
        rec.top1_agreement = self.agree / self.positions
        rec.kl_mean, rec.kl_max = self.kl_sum / self.positions, self.kl_max
        rec.ref_logit_std = float(np.median(np.concatenate(self.stds)))
        rec.top1_flip_margins = self.flip_margins
        rec.top1_positions = self.positions
        return rec


def compare_logits(phase: str, ref: np.ndarray, got: np.ndarray, keep: np.ndarray) -> OutputRecord:
    """Compare logits at the positions ``keep`` (bool [B, S]: real, non-padding tokens)."""
    _check_same_shape("logits", phase, ref, got)
    stats = LogitStats(phase)
    stats.add(ref[keep], got[keep])
    return stats.record(list(ref.shape))


def tie_margin_key(rec: OutputRecord) -> str:
    """The threshold a record's flips are forgiven under: a sampled token's draw distance
    to a boundary, in probability (head_probs_max_abs); else a logit margin."""
    return "head_probs_max_abs" if rec.name == HeadCheck.RECORD_NAMES[1] else "top1_tie_margin"


def decisive_top1(rec: OutputRecord, tie_margin: float) -> float | None:
    """Top-1 agreement with near ties forgiven: a position whose argmax differs counts
    as agreeing when the reference's own margin between the two tokens is under
    ``tie_margin`` (logit units). A tiny random model has such ties in a handful of
    its few decode positions, and one flip among 18 failed a 0.99 gate while the
    logits agreed to 1e-3; a wrong kernel flips tokens the reference holds apart."""
    if rec.top1_agreement is None or not rec.top1_positions:
        return rec.top1_agreement
    decisive = sum(1 for m in rec.top1_flip_margins if m >= tie_margin)
    return 1.0 - decisive / rec.top1_positions


def apply_thresholds(rec: OutputRecord, th: dict[str, float]) -> None:
    if rec.name in HeadCheck.RECORD_NAMES:
        if not rec.max_abs <= th["head_probs_max_abs"]:
            rec.failures.append(f"max abs {rec.max_abs:.3e} > {th['head_probs_max_abs']:.1e}")
        sampled = rec.name == HeadCheck.RECORD_NAMES[1]
        margin = th[tie_margin_key(rec)]
        top1 = decisive_top1(rec, margin)
        if not top1 >= th["top1_min"]:
            rule = (f"sampled token agreement {top1:.4f} < {th['top1_min']} (flips whose draw lay >= {margin:g} "
                    "from a boundary of the reference's distribution)") if sampled else \
                (f"greedy token agreement {top1:.4f} < {th['top1_min']} (flips with a reference margin >= "
                 f"{margin:g} logits)")
            rec.failures.append(rule)
        return
    kind = "logits" if rec.name == "logits" else "present"
    if not rec.max_abs <= th[f"{kind}_max_abs"]:
        rec.failures.append(f"max abs {rec.max_abs:.3e} > {th[f'{kind}_max_abs']:.1e}")
    if not rec.cosine >= th[f"{kind}_cosine_min"]:
        rec.failures.append(f"cosine {rec.cosine:.8f} < {th[f'{kind}_cosine_min']}")
    top1 = decisive_top1(rec, th["top1_tie_margin"])
    if top1 is not None and not top1 >= th["top1_min"]:
        rec.failures.append(f"top-1 agreement {top1:.4f} < {th['top1_min']} "
                            f"(flips with a reference margin >= {th['top1_tie_margin']:g})")
    if rec.kl_mean is not None and not rec.kl_mean <= th["kl_mean_max"]:
        rec.failures.append(f"KL mean {rec.kl_mean:.3e} > {th['kl_mean_max']:.1e}")


# ---------------------------------------------------------------- ONNX side


def model_file(path: str | Path) -> Path:
    """The model file a path names: a `toolkit convert` output directory's
    ``model.onnx``, else the path itself (inspect, parity and generate take either)."""
    path = Path(path)
    return path / "model.onnx" if (path / "model.onnx").is_file() else path


def checked_model_file(path: str | Path) -> Path:
    """:func:`model_file`, refused with a named error unless it is a non-empty file
    that may be an ONNX model (a model directory, a missing path, a .json ... are named)."""
    path = model_file(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            raise InvalidModelError(f"{str(path)!r} is a model directory (config.json), not an ONNX model",
                                    hint=f"convert it first: toolkit convert {path} -o out/model")
        else:
            raise InvalidModelError(f"{str(path)!r} is a directory without model.onnx, not an ONNX model",
                                    hint="pass a .onnx file or a `toolkit convert` output directory")
    if not path.is_file():
        raise InvalidModelError(f"ONNX file {str(path)!r} does not exist",
                                hint="pass the path of a model.onnx written by `toolkit export/convert`")
    if path.suffix in (".json", ".safetensors", ".bin", ".pt", ".pth", ".txt", ".npy", ".gguf"):
        raise InvalidModelError(f"{str(path)!r} is not an ONNX model ({path.suffix} file)",
                                hint="pass a .onnx file or a `toolkit convert` output directory")
    if path.stat().st_size == 0:
        raise InvalidModelError(f"{str(path)!r} is empty (0 bytes)",
                                hint="the file is truncated: re-run `toolkit export` or `toolkit convert`")
    with path.open("rb") as f:
        head = f.read(8)
    if head[4:8] == b"ORTM":  # the file identifier of ONNX Runtime's flatbuffer format
        raise InvalidModelError(f"{str(path)!r} is an ONNX Runtime format model (.ort), not an ONNX model",
                                hint="inspect, parity and generate read the .onnx it was converted from; ONNX "
                                "Runtime runs the .ort itself (onnxruntime.InferenceSession on the file, with the "
                                "op library registered when it holds com.toolkit ops)")
    return path


def load_onnx(path: str | Path) -> Any:
    """Load and check an ONNX file (weights in external data are not read).

    Corrupt or truncated files, structurally invalid graphs (unknown ops, missing
    inputs, cycles), opsets newer than this ``onnx`` knows, and external data that
    points outside the model's directory each get an :class:`InvalidModelError`
    saying which.
    """
    import onnx

    path = checked_model_file(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InvalidModelError(
            f"{str(path)!r} is not a valid ONNX model: it does not parse "
            f"({type(exc).__name__}: {str(exc).strip()[:200]})",
            hint="the file is corrupt or truncated: re-run `toolkit export` or `toolkit convert`",
        ) from exc
    external = _check_external_data(path, model)
    _check_op_attributes(path, model)
    newest = onnx.defs.onnx_opset_version()
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > newest:
            raise InvalidModelError(
                f"{str(path)!r} imports ONNX opset {imp.version}, newer than this onnx ({onnx.__version__}, "
                f"opset <= {newest}) knows",
                hint="export with an older opset (toolkit export --opset 21) or upgrade onnx/onnxruntime",
            )
    try:
        # A model with external data is checked from its path: the checker looks for the
        # data files beside the model it is given a path to, and beside the current
        # directory for a model given in memory.
        check_model(model, full_check=False, path=path if external else None)
    except Exception as exc:
        if "topologically sorted" not in str(exc):
            raise InvalidModelError(
                f"{str(path)!r} is not a valid ONNX model: {' '.join(str(exc).split())[:600]}",
                hint="the graph is structurally invalid (unknown op, missing input, cycle, ...): fix the producer "
                "or re-run `toolkit export` / `toolkit convert`",
            ) from exc
        # Nodes out of order (onnxruntime.transformers.float16 appends its input Casts last):
        # ONNX Runtime runs such a file; the checker and the passes want it sorted.
        model = _sorted_copy(path, model, exc)
    return model


def _sorted_copy(path: Path, model: Any, exc: Exception) -> Any:
    """``model`` with its nodes in topological order (the file is left as it is), or an
    :class:`InvalidModelError` when sorting cannot fix it (a cycle)."""
    import onnx_ir as ir

    try:
        graph_model = ir.serde.deserialize_model(model)
        graph_model.graph.sort()
        model = ir.serde.serialize_model(graph_model)
        check_model(model, full_check=False, path=None)
    except Exception as err:
        raise InvalidModelError(
            f"{str(path)!r} is not a valid ONNX model: {' '.join(str(exc).split())[:600]} (sorting its nodes "
            f"did not help: {' '.join(str(err).split())[:200]})",
            hint="the graph has a cycle or a value no node produces: fix the producer",
        ) from err
    return model


def _check_external_data(path: Path, model: Any) -> bool:
    """External data must be a relative path inside the model's directory. True when the
    model has any."""
    root = path.parent.resolve()
    found = False
    for graph in all_graphs(model):
        for tensor in graph.initializer:
            for entry in tensor.external_data:
                if entry.key != "location":
                    continue
                found = True
                target = (root / entry.value).resolve()
                if Path(entry.value).is_absolute() or root not in (target, *target.parents):
                    raise InvalidModelError(
                        f"{str(path)!r}: external data of tensor {tensor.name!r} points outside the model's "
                        f"directory ({entry.value!r}); refusing to read it",
                        hint="external data must be a relative path next to the model (as onnx.save writes it)",
                    )
                if not target.is_file():
                    raise InvalidModelError(
                        f"{str(path)!r}: the external data file {entry.value!r} that holds tensor "
                        f"{tensor.name!r} is missing",
                        hint=f"the weights live in {entry.value!r} beside the model: copy or move the whole "
                        "directory (model.onnx and its .data file together)",
                    )
    return found


def _check_op_attributes(path: Path, model: Any) -> None:
    """Our ops' nodes carry only attributes their kernels read (ORT would ignore the rest)."""
    import difflib

    from toolkit.ops import DOMAIN, OP_ATTRIBUTES

    for graph in all_graphs(model):
        for node in graph.node:
            known = OP_ATTRIBUTES.get(node.op_type) if node.domain == DOMAIN else None
            if known is None:
                continue
            for attr in node.attribute:
                if attr.name in known:
                    continue
                close = difflib.get_close_matches(attr.name, sorted(known), n=1)
                raise InvalidModelError(
                    f"{str(path)!r}: node {node.name or '<unnamed>'!r} ({node.op_type}) has attribute "
                    f"{attr.name!r}, which the kernel does not read (it would run as if it were absent)"
                    + (f"; did you mean {close[0]!r}?" if close else ""),
                    hint=f"{node.op_type} reads: {', '.join(sorted(known)) or 'no attributes'}")


def all_graphs(model: Any) -> list[Any]:
    """The main graph and every subgraph (If / Loop / Scan bodies), nested ones too."""
    out, todo = [], [model.graph]
    while todo:
        graph = todo.pop()
        out.append(graph)
        for node in graph.node:
            for attr in node.attribute:
                todo.extend([attr.g] if attr.HasField("g") else list(attr.graphs))
    return out


def metadata(model: Any) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def uses_custom_ops(model: Any) -> bool:
    from toolkit.ops import DOMAIN

    return any(n.domain == DOMAIN for g in all_graphs(model) for n in g.node) or any(
        f.domain == DOMAIN for f in model.functions)


def make_session(path: str | Path, model: Any | None = None, threads: int | None = None,
                 optimization: str = "all") -> Any:
    """An ORT CPU session with the op library registered (required if the model uses our ops)."""
    import onnxruntime as ort

    from toolkit import ops

    model = model if model is not None else load_onnx(path)
    try:
        so = ops.session_options(threads=threads)
    except OpLibraryError:
        if uses_custom_ops(model):
            raise
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        reason = str(exc).strip()
        ours = [op for op in ops.OP_ATTRIBUTES if op in reason]
        if "Type Error" in reason and ours:  # the library is there and refused an input/output type
            hint = (f"{ours[0]} does not take these types (float32; FusedSoftmaxTopK also float16 logits): a "
                    "float16 conversion must keep "
                    f"{', '.join(ops.FLOAT32_ONLY_OPS)} in float32: convert the float32 model with `toolkit "
                    "convert MODEL --float16` (or run the float16 pass on it: --passes float16), or call "
                    "onnxruntime.transformers.float16.convert_float_to_float16(..., op_block_list="
                    f"{list(ops.FLOAT32_ONLY_OPS)} + its DEFAULT_OP_BLOCK_LIST)")
        else:
            hint = ("if it names an op of domain com.toolkit, the op library is missing or too old "
                    "(rebuild with `make build`); otherwise re-export the model")
        raise InvalidModelError(f"ONNX Runtime could not load {str(path)!r}: {reason[:400]}", hint=hint) from exc


def empty_cache_shape(name: str, shape: list, batch: int, known: dict[int, int] | None = None) -> list[int]:
    """The shape of cache input ``name`` before the first call: ``batch`` on axis 0 (a
    fixed-capacity cache's lengths, ``[2]``, have none), ``known`` ``{axis: size}`` for
    symbolic sizes read elsewhere (:func:`decoder_facts`), and 0 on the one symbolic axis
    left, the past length. A second symbolic axis cannot be sized: a named error."""
    dims: list[int | None] = [d if isinstance(d, int) else None for d in shape]
    if len(dims) > 1:
        dims[0] = batch
    for axis, size in (known or {}).items():
        dims[axis] = size
    free = [axis for axis, d in enumerate(dims) if d is None]
    if len(free) > 1:
        raise InvalidModelError(
            f"cache input {name!r} has shape {list(shape)}: axes {free} are symbolic, so its empty first-call "
            "value cannot be sized (only the past length may be symbolic; it starts at 0)",
            hint="give the other axes (heads, head dim) static sizes in the model's input, or export the model "
            "with `toolkit export`")
    return [0 if d is None else d for d in dims]


@dataclasses.dataclass(frozen=True)
class DecoderFacts:
    """What a decoder's session does not tell but its graph does (:func:`decoder_facts`)."""

    cache_dims: dict[str, dict[int, int]]  # {cache input: {axis: size}}: symbolic sizes the graph fixes
    right_padded: bool = False  # GroupQueryAttention: a batch's rows are taken as right-padded
    context_length: int | None = None  # positions its rotary caches hold, when the metadata has none
    quantized_weights: tuple[str, ...] = ()  # ops computing with quantized weights (MatMulNBits, ...)
    attention_windows: tuple[int, ...] = ()  # each GroupQueryAttention's local_window_size (-1: none)


# Ops that compute with quantized weights (onnxruntime-genai's -p int4, ORT's quantizers):
# parity against the float model then measures the weights' quantization too.
QUANTIZED_WEIGHT_OPS = frozenset({"MatMulNBits", "DequantizeLinear", "QLinearMatMul", "MatMulInteger",
                                  "DynamicQuantizeMatMul", "GatherBlockQuantized", "MatMulBnb4", "QAttention"})


def decoder_facts(model: Any) -> DecoderFacts:
    """:class:`DecoderFacts` of an ONNX model (weights not needed). onnxruntime-genai's
    GroupQueryAttention models leave the cache's head dim (axis 3) symbolic (the node's
    attributes and weights give it), take each row of a batch as right-padded (where
    parity and generate left-pad), and record no context length (their cos/sin caches
    hold the positions)."""
    import onnx_ir as ir

    from passes import kv_cache_gqa

    graph_model = ir.serde.deserialize_model(model)
    nodes = [n for n in graph_model.graph if kv_cache_gqa.is_gqa(n)]
    tables = [kv_cache_gqa.table_shape(n.inputs[7]) if len(n.inputs) > 7 else None for n in nodes]
    rows = [t[0] for t in tables if t is not None]
    quantized = tuple(sorted({n.op_type for n in graph_model.graph if n.op_type in QUANTIZED_WEIGHT_OPS}))
    windows = tuple(n.attributes.get_int("local_window_size", -1) for n in nodes)
    return DecoderFacts({name: {3: d} for name, d in kv_cache_gqa.past_head_dims(graph_model).items()},
                        right_padded=bool(nodes), context_length=min(rows) if rows else None,
                        quantized_weights=quantized, attention_windows=windows)


def sliding_window_of(src: Any) -> int | None:
    """The sliding attention window of a Hugging Face source's config, or None. A config
    with ``layer_types`` windows only its ``sliding_attention`` layers (none: no window)."""
    config = getattr(getattr(src, "module", None), "config", None)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not isinstance(window, int) or window <= 0 or getattr(config, "use_sliding_window", True) is False:
        return None
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window


# A parity note for models that take padded rows on the right (GroupQueryAttention).
RIGHT_PADDED_NOTE = (
    "the model's GroupQueryAttention takes each row of a batch as right-padded (its per-row lengths come from "
    "attention_mask), while parity feeds left-padded prompts, as Hugging Face models take them: batches with "
    "padding fail by that convention alone. `toolkit convert --kv-cache ...` rewrites the attention to take the "
    "padding parity feeds; --batch-sizes 1 checks the model as it is")


class OnnxDecoder:
    """Drives an exported decoder's session step by step, keeping its own cache."""

    def __init__(self, session: Any, cache_dims: dict[str, dict[int, int]] | None = None) -> None:
        self.session = session
        self.cache_dims = cache_dims or {}  # {past input: {axis: size}} for symbolic sizes known otherwise
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.output_names = [o.name for o in session.get_outputs()]
        # A sampled head takes a seed per call, call_seed(base, call index) as in
        # toolkit.generate: every step draws fresh numbers and a rerun reproduces them.
        self.seed_base = 0
        self.calls = 0
        self.last_seed: int | None = None
        for required in ("input_ids", "attention_mask"):
            if required not in self.inputs:
                raise InvalidModelError(
                    f"the ONNX model has no input {required!r} (inputs: {', '.join(self.inputs)})",
                    hint="parity expects a decoder exported by `toolkit export` (flat KV cache I/O)",
                )

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        from toolkit.model_info import ORT_TYPE_TO_NUMPY

        return {name: np.zeros(empty_cache_shape(name, self.inputs[name].shape, batch, self.cache_dims.get(name)),
                               dtype=ORT_TYPE_TO_NUMPY[self.inputs[name].type]) for name in self.past_names}

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """One forward step; returns (logits, the cache to feed next, all outputs by name)."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, **past}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = position_ids
        if "sampling_seed" in self.inputs:
            from toolkit.ops.reference import call_seed

            self.last_seed = call_seed(self.seed_base, self.calls)
            feeds["sampling_seed"] = np.array([self.last_seed], dtype=np.int64)
        self.calls += 1
        outs = dict(zip(self.output_names, self.session.run(None, feeds)))
        new_past = {n: outs[n.replace("past_key_values.", "present.")] for n in self.past_names}
        return outs.get("logits"), new_past, outs


# ---------------------------------------------------------------- the check


@dataclasses.dataclass(frozen=True)
class ParitySettings:
    batch_sizes: tuple[int, ...] = (1, 3)
    prompt_len: int = 12
    decode_steps: int = 6
    perplexity_tokens: int = 2048
    perplexity_window: int = 256
    # None: decode (token by token, through the cache) for models with a quantized
    # cache, whose prefill attends in full precision; prefill windows otherwise.
    perplexity_decode: bool | None = None
    # Teacher-forced greedy agreement: prompts x new tokens of the reference's greedy
    # continuation, fed to the ONNX model step by step (None: 32 for quantized-cache
    # models, else 0 = off).
    greedy_prompts: int | None = None
    greedy_tokens: int = 128
    greedy_prompt_len: int = 64
    seed: int = 0
    threads: int | None = None
    optimization: str = "all"
    # Set by fit_to_capacity: the fixed-capacity cache's tokens the runs were cut to.
    capacity: int | None = None


def _check_same_model(src: Any, meta: dict[str, str], onnx_path: str | Path) -> None:
    """Refuse an ORIGINAL that cannot be the OPTIMIZED model's source: another family,
    vocabulary or layer count than the ONNX metadata recorded at export would compare
    unrelated logits or caches, or fail inside ONNX Runtime (token ids out of range)."""
    family = meta.get("toolkit.family")
    source = meta.get("toolkit.source", family or "another model")
    if family and src.family and family != src.family:
        raise ToolkitError(
            f"{str(onnx_path)!r} was exported from {source} (family {family}); "
            f"the original {src.spec!r} is family {src.family}",
            hint=f"compare against the model it was exported from (parity {source} ...)")
    for field, ours in (("vocab_size", src.vocab_size), ("num_layers", src.num_layers)):
        recorded = meta.get(f"toolkit.{field}")
        if recorded is not None and recorded.isdigit() and int(recorded) != ours:
            raise ToolkitError(
                f"{str(onnx_path)!r} was exported from {source} with {field} {recorded}; "
                f"the original {src.spec!r} has {field} {ours}",
                hint=f"compare against the model it was exported from (parity {source} ...), with the same "
                     "--preset/--config")
    # Random-weight sources (presets, hf:<arch>) are their seed: another seed is another model.
    from toolkit.sources import is_builtin_family

    recorded_seed = meta.get("toolkit.seed")
    random_weights = src.spec.startswith("hf:") or is_builtin_family(src.spec)
    if random_weights and recorded_seed is not None and recorded_seed.lstrip("-").isdigit() \
            and int(recorded_seed) != src.seed:
        raise ToolkitError(
            f"{str(onnx_path)!r} was exported from {source}'s random weights drawn with seed {recorded_seed}; "
            f"the original {src.spec!r} uses seed {src.seed}, i.e. other weights",
            hint=f"pass --seed {recorded_seed}")


def fit_to_capacity(settings: ParitySettings, inputs: dict[str, Any]) -> ParitySettings:
    """Settings whose runs fit a fixed-capacity cache (``--kv-capacity``): the decode
    steps, the greedy record's prompt and tokens and the perplexity window are cut
    to the tokens the cache holds (recorded as ``capacity`` in the settings). A cache
    too small for the prefill prompt is a named error."""
    from toolkit.generate import fixed_capacity

    cap = fixed_capacity(inputs)
    if cap is None:
        return settings
    if cap < settings.prompt_len + 1:
        raise ToolkitError(
            f"the model's fixed-capacity KV cache holds {cap} tokens; parity needs at least "
            f"{settings.prompt_len + 1} (a {settings.prompt_len}-token prompt and one decode step)",
            hint="convert with a larger --kv-capacity")
    greedy_prompt = min(settings.greedy_prompt_len, cap // 2)
    return dataclasses.replace(
        settings, capacity=cap, decode_steps=min(settings.decode_steps, cap - settings.prompt_len),
        greedy_prompt_len=greedy_prompt, greedy_tokens=min(settings.greedy_tokens, cap - greedy_prompt),
        perplexity_window=min(settings.perplexity_window, cap))


def _prompts(src: Any, batch: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts: row r is shorter by 2r tokens (at least 1)."""
    lengths = [max(1, length - 2 * r) for r in range(batch)]
    ids = np.zeros((batch, length), dtype=np.int64)
    mask = np.zeros((batch, length), dtype=np.int64)
    text_ids = None
    if src.tokenizer is not None and src.heldout_text:
        text_ids = np.array(src.tokenizer.encode(src.heldout_text[:20000]).ids, dtype=np.int64)
    for r, n in enumerate(lengths):
        if text_ids is not None and len(text_ids) > n:
            start = int(rng.integers(0, len(text_ids) - n))
            row = text_ids[start:start + n]
        else:
            row = rng.integers(0, src.vocab_size, n)
        ids[r, length - n:] = row
        mask[r, length - n:] = 1
    return ids, mask


def _positions(mask: np.ndarray, seq: int) -> np.ndarray:
    pos = np.cumsum(mask, axis=-1) - 1
    return np.clip(pos, 0, None)[:, -seq:].astype(np.int64)


def _torch_step(src: Any, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list) -> tuple:
    import torch

    with torch.no_grad():
        logits, presents = src.forward(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos),
                                       past)
    return logits.float().numpy(), [(k, v) for k, v in presents]


def float16_weights(model: Any) -> tuple[int, int]:
    """(float16, all) counts of the model's matrix weights (initializers of rank >= 2)."""
    import onnx

    matrices = [t for t in model.graph.initializer if len(t.dims) >= 2]
    return sum(t.data_type == onnx.TensorProto.FLOAT16 for t in matrices), len(matrices)


def default_profile(meta: dict[str, str], model: Any = None) -> tuple[str, str | None]:
    """The threshold profile for a model's ``toolkit.*`` metadata, and a note when it
    is not the one a pass recorded (or when none is recorded and ``model``'s weights
    are mostly float16: the fp16 profile).

    A quantized cache records its profile (kv-int8, kv-int4, kv-2bit). Low-rank
    weights are lossy with no profile of their own: alone they are judged by fp32 and
    fail by design (README, low-rank). Combined with a quantized cache, the cache's
    looser bounds would let the low-rank loss through unseen (kivi2 with a parameter
    budget of 0.5 passed at +3.8% perplexity), so the combination is judged by fp32 too.
    """
    recorded = meta.get("toolkit.parity_profile")
    if recorded and "toolkit.low_rank" in meta:
        whose = "--float16's" if recorded == "fp16" else "the KV cache's"
        return "fp32", (f"fp32, not {whose} {recorded}: the low-rank weights are lossy too, and "
                        f"{recorded}'s bounds would hide their loss; --profile {recorded} applies those "
                        "bounds to both, --threshold loosens one metric")
    if not recorded and model is not None:
        half, total = float16_weights(model)
        if total and 2 * half > total:  # e.g. ORT's float16 converter run by hand: no toolkit metadata
            return "fp16", (f"fp16: {half} of the model's {total} weight matrices are float16 (no profile in its "
                            "metadata); --profile fp32 judges it by float32 bounds")
    return recorded or "fp32", None


def check(src: Any, onnx_path: str | Path, settings: ParitySettings = ParitySettings(),
          profile: str | None = None, overrides: dict[str, float] | None = None,
          progress: Any = None) -> ParityReport:
    """Run the parity check of ``onnx_path`` against the PyTorch source ``src``."""
    model = load_onnx(onnx_path)
    meta = metadata(model)
    profile_note = None
    if not profile:
        profile, profile_note = default_profile(meta, model)
    if profile not in THRESHOLDS:
        raise ToolkitError(f"unknown parity profile {profile!r}",
                           hint=f"use one of {', '.join(THRESHOLDS)}")
    th = dict(THRESHOLDS[profile])
    for key, value in (overrides or {}).items():
        if key not in th:
            raise ToolkitError(f"unknown threshold {key!r}", hint=f"known thresholds: {', '.join(th)}")
        th[key] = float(value)
    _check_same_model(src, meta, onnx_path)
    scores_perplexity = bool(src.tokenizer is not None and src.heldout_text and settings.perplexity_tokens > 0)
    if "toolkit.kv_quant" in meta and settings.decode_steps == 0 and settings.greedy_prompts == 0 and not (
            scores_perplexity and settings.perplexity_decode is not False):
        # Prefill attends in full precision (KIVI's rule): such a run would pass a broken cache.
        raise ToolkitError(
            "nothing in this run reads the quantized KV cache: prefill attends in full precision, and "
            "--decode-steps 0 with --greedy 0 (and no perplexity decoded through the cache) leave out every step "
            "that does", hint="keep --decode-steps >= 1 (default 6) or pass --greedy N")
    context = int(meta.get("toolkit.context_length") or 0)
    if context and settings.prompt_len + settings.decode_steps > context:
        raise ToolkitError(f"a {settings.prompt_len}-token prompt and {settings.decode_steps} decode steps need "
                           f"{settings.prompt_len + settings.decode_steps} positions; the model was built for "
                           f"{context}", hint="pass a smaller --prompt-len / --decode-steps")
    session = make_session(onnx_path, model, threads=settings.threads, optimization=settings.optimization)
    facts = decoder_facts(model)
    dec = OnnxDecoder(session, facts.cache_dims)
    settings = fit_to_capacity(settings, dec.inputs)
    rng = np.random.default_rng(settings.seed)
    records: list[OutputRecord] = []
    total = len(settings.batch_sizes) * (1 + settings.decode_steps)
    done = 0
    for batch in settings.batch_sizes:
        ids, mask = _prompts(src, batch, settings.prompt_len, rng)
        pos = _positions(mask, ids.shape[1])
        ref_logits, ref_past = _torch_step(src, ids, mask, pos, src.empty_past(batch))
        got_logits, past, presents = dec.step(ids, mask, pos, dec.empty_past(batch))
        phase = f"prefill[b={batch}]"
        if got_logits is not None:  # a model with a sampling head may drop its logits output
            records.append(compare_logits(phase, ref_logits, got_logits, mask.astype(bool)))
        records += _compare_presents(phase, ref_past, presents, mask)
        head = HeadCheck.for_model(meta)
        if head:
            head.add(ref_logits, presents, dec.last_seed)
            records.append(head.record(phase))
        done += 1
        if progress:
            progress(done, total)
        dec_ref, dec_got = [], []
        head = HeadCheck.for_model(meta)
        for step in range(settings.decode_steps):
            nxt = ref_logits[:, -1].argmax(-1).astype(np.int64)[:, None]
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            pos = _positions(mask, 1)
            ref_logits, ref_past = _torch_step(src, nxt, mask, pos, ref_past)
            got_logits, past, presents = dec.step(nxt, mask, pos, past)
            if head:
                head.add(ref_logits, presents, dec.last_seed)
            dec_ref.append(ref_logits)
            dec_got.append(got_logits)
            done += 1
            if progress:
                progress(done, total)
        if settings.decode_steps:
            phase = f"decode[b={batch},steps={settings.decode_steps}]"
            r = np.concatenate(dec_ref, axis=1)
            if got_logits is not None:
                g = np.concatenate(dec_got, axis=1)
                records.append(compare_logits(phase, r, g, np.ones(r.shape[:2], bool)))
            records += _compare_presents(phase, ref_past, presents, mask)
            if head:  # all decode steps as one record: rows = batch x steps
                records.append(head.record(phase))
    if not any(r.name in ("logits", *HeadCheck.RECORD_NAMES) for r in records):
        raise ToolkitError(f"{str(onnx_path)!r} has neither a 'logits' nor a 'next_token_ids' output to compare",
                           hint="parity compares decoder outputs; keep the logits output or add a sampling head")
    for rec in records:
        apply_thresholds(rec, th)
    report = ParityReport(original=src.spec, optimized=str(onnx_path), profile=profile, thresholds=th,
                          profile_note=profile_note, settings=dataclasses.asdict(settings), records=records,
                          model_metadata={k: v for k, v in meta.items() if k.startswith("toolkit.")})
    has_logits = "logits" in dec.output_names
    quantized_cache = "toolkit.kv_quant" in meta
    greedy_prompts = settings.greedy_prompts if settings.greedy_prompts is not None else (32 if quantized_cache else 0)
    # The settings as run: the greedy prompts the default gave, no perplexity tokens when none ran.
    report.settings["greedy_prompts"] = greedy_prompts if has_logits else 0
    if greedy_prompts > 0 and has_logits:
        rec = greedy_agreement(src, dec, greedy_prompts, settings.greedy_tokens, settings.greedy_prompt_len, rng)
        apply_thresholds(rec, th)
        report.records.append(rec)
    if not (scores_perplexity and has_logits):
        report.settings["perplexity_tokens"] = 0  # no held-out text (or no logits): no perplexity ran
    if facts.right_padded and any(b > 1 for b in settings.batch_sizes):
        report.notes.append(RIGHT_PADDED_NOTE)
    window = sliding_window_of(src)
    if facts.attention_windows and window is not None and max(facts.attention_windows) <= 0:
        report.notes.append(
            f"{src.spec} attends within a sliding window of {window} tokens, but the model's GroupQueryAttention "
            "nodes attend the whole past (local_window_size=-1: onnxruntime-genai's builder windows only the "
            "layers a config's layer_types marks sliding_attention), so sequences longer than the window differ "
            f"by that alone; `toolkit convert {src.spec}` exports the window in the attention mask")
    if facts.quantized_weights:
        report.notes.append(
            f"the model computes with quantized weights ({', '.join(facts.quantized_weights)}): compared with the "
            f"float reference, the {profile} profile's bounds measure that quantization too, far beyond float32 "
            "rounding; judge it with --threshold NAME=VALUE (e.g. logits_cosine_min, top1_min) or against its "
            "float build")
    spreads = [r.ref_logit_std for r in report.records if r.ref_logit_std is not None]
    if profile.startswith("kv-") and spreads and float(np.median(spreads)) < FLAT_LOGITS_STD:
        report.notes.append(
            f"the reference logits are nearly flat (median std {float(np.median(spreads)):.3g} over the vocabulary, "
            f"below {FLAT_LOGITS_STD}): the {profile} profile's tie margin ({th['top1_tie_margin']:g} logits) "
            "forgives most flipped tokens and its KL bound hardly binds, so this verdict rests on the cosine; "
            "judge a quantized cache on a trained checkpoint (e.g. llama-stdlib)")
    if scores_perplexity and has_logits:
        decode = settings.perplexity_decode if settings.perplexity_decode is not None else quantized_cache
        report.perplexity = perplexity(src, dec, settings, decode=decode)
        p = report.perplexity
        if not p["rel_increase"] <= th["ppl_rel_increase_max"]:
            report.perplexity_failures.append(
                f"perplexity {p['reference']:.4f} -> {p['onnx']:.4f} (+{100 * p['rel_increase']:.3f}%) "
                f"> +{100 * th['ppl_rel_increase_max']:.3f}%")
    return report


class HeadCheck:
    """Checks a sampling head (``sampling-head`` pass) against the reference's logits.

    Top-k head: probabilities are compared at the ids the head returned (robust to
    near-tie swaps deep in the top-k), and the greedy id (column 0) must be the
    reference's argmax. Sampled head: the reference draws with the same seed from
    the PyTorch logits (``toolkit.ops.reference.sample_topk_top_p``); the token must
    be the same and its probability close.
    """

    RECORD_NAMES = ("next_token_probs", "next_token_prob")

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.ref_probs: list[np.ndarray] = []
        self.got_probs: list[np.ndarray] = []
        self.agree: list[np.ndarray] = []
        self.flip_margins: list[float] = []

    @classmethod
    def for_model(cls, meta: dict[str, str]) -> HeadCheck | None:
        head = meta.get("toolkit.sampling_head")
        return cls(json.loads(head)) if head else None

    def add(self, ref_logits: np.ndarray, outs: dict[str, np.ndarray], seed: int | None) -> None:
        opts = self.options
        last = ref_logits[:, -1]
        if opts.get("sample"):
            from toolkit.ops.reference import sample_topk_top_p

            ref_ids, ref_p = sample_topk_top_p(last.astype(np.float32), opts["k"], opts["temperature"],
                                               opts["top_p"], opts["min_p"], seed=int(seed))
            agree = outs["next_token"] == ref_ids
            self.agree.append(agree)
            self.ref_probs.append(ref_p.astype(np.float64))
            self.got_probs.append(outs["next_token_prob"])
            if not agree.all():  # a draw near a boundary of the reference's CDF flips on tiny differences
                from toolkit.ops.reference import draw_margin, softmax_topk, uniform

                values, _, _ = softmax_topk(last.astype(np.float32), opts["k"], float(np.float32(opts["temperature"])))
                top_p, min_p = float(np.float32(opts["top_p"])), float(np.float32(opts["min_p"]))
                self.flip_margins += [draw_margin(values[r], top_p, min_p, uniform(int(seed), int(r)))
                                      for r in np.nonzero(~agree)[0]]
            return
        scaled = last.astype(np.float64) / opts.get("temperature", 1.0)
        ids = outs["next_token_ids"]
        self.ref_probs.append(np.take_along_axis(np.exp(_log_softmax(scaled)), ids, axis=-1))
        self.got_probs.append(outs["next_token_probs"])
        top = scaled.argmax(-1)
        self.agree.append(ids[:, 0] == top)
        rows = np.arange(len(top))
        gap = (scaled[rows, top] - scaled[rows, ids[:, 0]]) * opts.get("temperature", 1.0)  # logit units
        self.flip_margins += [float(m) for m in gap[ids[:, 0] != top]]

    def record(self, phase: str) -> OutputRecord:
        name = self.RECORD_NAMES[1] if self.options.get("sample") else self.RECORD_NAMES[0]
        rec = compare(name, phase, np.concatenate(self.ref_probs), np.concatenate(self.got_probs))
        agree = np.concatenate(self.agree)
        rec.top1_agreement = float(np.mean(agree))
        # a top-k head's greedy id: near ties in logits; a sampled token: draws near a boundary of
        # the reference's distribution (margins in probability)
        rec.top1_flip_margins, rec.top1_positions = self.flip_margins, len(agree)
        self.ref_probs, self.got_probs, self.agree, self.flip_margins = [], [], [], []
        return rec


def _compare_presents(phase: str, ref_past: list, presents: dict[str, np.ndarray],
                      mask: np.ndarray) -> list[OutputRecord]:
    """Compare cache outputs when the ONNX model keeps the original fp32 layout, at the
    positions the attention mask ([B, T]) keeps: every attention gives a padding
    position's key and value weight zero, so what a model stores there only has to be
    finite (0 x NaN is NaN; a non-finite value there is still compared). Eager attention
    gives a query row whose keys are all masked the mean of the values, SDPA zeros; that
    reaches the next layer's cache at those positions only."""
    out = []
    for i, (k, v) in enumerate(ref_past):
        for kind, t in (("key", k), ("value", v)):
            name = f"present.{i}.{kind}"
            got = presents.get(name)
            if got is not None and got.shape == tuple(t.shape) and got.dtype == np.float32:
                keep = mask.astype(bool)[:, None, :, None] if mask.shape == (got.shape[0], got.shape[2]) else None
                out.append(compare(name, phase, t.numpy(), got, keep))
    return out


def greedy_agreement(src: Any, dec: OnnxDecoder, prompts: int, tokens: int, prompt_len: int,
                     rng: np.random.Generator) -> OutputRecord:
    """Teacher-forced greedy agreement on the reference's greedy continuations.

    ``prompts`` held-out (or random) prompts of ``prompt_len`` tokens run as one
    batch; the reference decodes ``tokens`` greedy tokens with its own cache, and the
    ONNX model is fed the same tokens one step at a time with *its* cache. The
    record compares the decode-step logits: top-1 agreement (the greedy token the
    ONNX model would have chosen), KL and cosine.
    """
    max_pos = getattr(getattr(src.module, "config", None), "max_position_embeddings", None)
    if isinstance(max_pos, int) and prompt_len + tokens > max_pos:
        # Stay inside the positions the model was built for (learned position tables).
        tokens = max(1, min(tokens, max_pos // 2))
        prompt_len = max(1, max_pos - tokens)
    text_ids = None
    if src.tokenizer is not None and src.heldout_text:
        text_ids = np.array(src.tokenizer.encode(src.heldout_text).ids, dtype=np.int64)
    if text_ids is not None and len(text_ids) > prompts * prompt_len:
        starts = np.linspace(0, len(text_ids) - prompt_len, prompts).astype(int)
        ids = np.stack([text_ids[s:s + prompt_len] for s in starts])
    else:
        ids = rng.integers(0, src.vocab_size, (prompts, prompt_len)).astype(np.int64)
    mask = np.ones_like(ids)
    pos = _positions(mask, ids.shape[1])
    ref_logits, ref_past = _torch_step(src, ids, mask, pos, src.empty_past(prompts))
    _, past, _ = dec.step(ids, mask, pos, dec.empty_past(prompts))
    stats = LogitStats(f"greedy[{prompts}x{tokens}]")  # step by step: the run's logits are never held whole
    for _ in range(tokens):
        nxt = ref_logits[:, -1].argmax(-1).astype(np.int64)[:, None]
        mask = np.concatenate([mask, np.ones((prompts, 1), np.int64)], axis=1)
        pos = _positions(mask, 1)
        ref_logits, ref_past = _torch_step(src, nxt, mask, pos, ref_past)
        got, past, _ = dec.step(nxt, mask, pos, past)
        _check_same_shape("logits", stats.phase, ref_logits, got)
        stats.add(ref_logits[:, -1], got[:, -1])
    return stats.record([prompts, tokens, ref_logits.shape[-1]])


def perplexity(src: Any, dec: OnnxDecoder, settings: ParitySettings, decode: bool = False) -> dict[str, float]:
    """Held-out perplexity of both models over non-overlapping windows.

    The reference always scores a window in one prefill. The ONNX model does too,
    or with ``decode`` feeds the window one token per step through its cache (what a
    quantized cache changes: its prefill attends in full precision).
    """
    ids = np.array(src.tokenizer.encode(src.heldout_text).ids, dtype=np.int64)[: settings.perplexity_tokens + 1]
    w = settings.perplexity_window
    n_win = max(1, (len(ids) - 1) // w)
    nll_ref = nll_got = 0.0
    count = 0
    for i in range(n_win):
        chunk = ids[i * w: i * w + w + 1]
        if len(chunk) < 2:
            break
        x, y = chunk[None, :-1], chunk[1:]
        mask = np.ones_like(x)
        pos = _positions(mask, x.shape[1])
        ref, _ = _torch_step(src, x, mask, pos, src.empty_past(1))
        if decode:
            past, steps = dec.empty_past(1), []
            for j in range(x.shape[1]):
                logits, past, _ = dec.step(x[:, j:j + 1], mask[:, :j + 1], pos[:, j:j + 1], past)
                steps.append(logits)
            got = np.concatenate(steps, axis=1)
        else:
            got, _, _ = dec.step(x, mask, pos, dec.empty_past(1))
        nll_ref -= float(_log_softmax(ref[0])[np.arange(len(y)), y].sum())
        nll_got -= float(_log_softmax(got[0])[np.arange(len(y)), y].sum())
        count += len(y)
    p_ref, p_got = math.exp(nll_ref / count), math.exp(nll_got / count)
    return {"reference": p_ref, "onnx": p_got, "rel_increase": (p_got - p_ref) / p_ref, "tokens": float(count),
            "window": float(w), "decode": float(decode)}


def write_atomic(path: str | Path, text: str) -> None:
    """Write a file so that readers never see a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; reports are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
