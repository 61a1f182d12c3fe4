"""User metrics: ``--metric top1|cosine|snr|module:function`` and ``--labels FILE``.

A *scorer* turns a model's outputs on the calibration feeds into one number, higher is better::

    scorer(outputs, reference, labels) -> float

``outputs`` and ``reference`` are lists with one ``{output_name: array}`` dict per feed (the candidate's
and the original model's outputs on the same feeds); ``labels`` is a 1-D integer array with one label per
sample (the rows of all feeds in order), or None.

- ``cosine``: the smallest cosine similarity over the float outputs (all feeds concatenated), 1.0 for the
  original itself;
- ``snr``: the smallest signal-to-noise ratio (dB) over the float outputs (inf for the original);
- ``top1``: the fraction of rows whose argmax over the last axis of the first output equals the label
  (with labels), or equals the original's argmax (without labels);
- ``module:function``: a Python function ``f(outputs, reference_outputs)`` (or ``f(outputs,
  reference_outputs, labels)`` when labels are given) that returns a float, higher is better. The module
  is imported by name (the current directory is searched first); a module that cannot be imported, a
  missing function, an exception inside it or a non-finite / non-number result is one-line InputError.

``accuracy_drop`` = the original's score - the candidate's score on the same feeds (for ``cosine`` the
original's score is 1.0, for ``top1`` with labels it is the original's accuracy).
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .errors import InputError, one_line

Outputs = Sequence[dict[str, np.ndarray]]
BUILTIN = ("top1", "cosine", "snr")


def _float_outputs(outputs: Outputs) -> list[str]:
    if not outputs:
        return []
    return [k for k, v in outputs[0].items() if np.issubdtype(np.asarray(v).dtype, np.floating)]


def _flat(outputs: Outputs, name: str) -> np.ndarray:
    return np.concatenate([np.asarray(o[name], dtype=np.float64).reshape(-1) for o in outputs])


def cosine_score(outputs: Outputs, reference: Outputs, labels: np.ndarray | None = None) -> float:
    """Smallest cosine over the float outputs (1.0 when both are all zero, 0.0 when only one is)."""
    names = _float_outputs(reference)
    if not names:
        raise InputError("--metric cosine: the model has no float output (use top1 or module:function)")
    worst = 1.0
    for name in names:
        a, b = _flat(reference, name), _flat(outputs, name)
        if a.shape != b.shape:
            return -1.0
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        if not (math.isfinite(na) and math.isfinite(nb)):
            return -1.0
        if na == 0.0 and nb == 0.0:
            cos = 1.0
        elif na == 0.0 or nb == 0.0:
            cos = 0.0
        else:
            cos = float(a @ b / (na * nb))
        worst = min(worst, cos)
    return worst


def snr_score(outputs: Outputs, reference: Outputs, labels: np.ndarray | None = None) -> float:
    """Smallest SNR (dB) over the float outputs: 10 log10(|ref|^2 / |ref - out|^2)."""
    names = _float_outputs(reference)
    if not names:
        raise InputError("--metric snr: the model has no float output (use top1 or module:function)")
    worst = math.inf
    for name in names:
        a, b = _flat(reference, name), _flat(outputs, name)
        if a.shape != b.shape:
            return -math.inf
        noise = float(np.sum((a - b) ** 2))
        signal = float(np.sum(a ** 2))
        if not math.isfinite(noise):
            return -math.inf
        snr = math.inf if noise == 0.0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
        worst = min(worst, snr)
    return worst


def _predictions(outputs: Outputs) -> np.ndarray:
    first = next(iter(outputs[0]))
    return np.concatenate([np.asarray(o[first]).reshape(-1, np.asarray(o[first]).shape[-1]).argmax(-1)
                           if np.asarray(o[first]).ndim else np.asarray(o[first]).reshape(-1)
                           for o in outputs])


def top1_score(outputs: Outputs, reference: Outputs, labels: np.ndarray | None = None) -> float:
    """Agreement of the first output's argmax with ``labels`` (or with the original's argmax)."""
    pred = _predictions(outputs)
    target = np.asarray(labels).reshape(-1) if labels is not None else _predictions(reference)
    if pred.shape != target.shape:
        raise InputError(f"--metric top1: the model gives {pred.size} prediction(s) but there are "
                         f"{target.size} label(s)")
    return float(np.mean(pred == target)) if pred.size else 1.0


_BUILTIN_FUNCS: dict[str, Callable[..., float]] = {"top1": top1_score, "cosine": cosine_score, "snr": snr_score}


@dataclass(frozen=True)
class Metric:
    """A parsed ``--metric``. Picklable (a user function is re-imported by its spec in workers)."""

    spec: str

    @property
    def name(self) -> str:
        return self.spec

    @property
    def builtin(self) -> bool:
        return self.spec in BUILTIN

    def function(self) -> Callable[..., Any]:
        if self.builtin:
            return _BUILTIN_FUNCS[self.spec]
        return _import_function(self.spec)

    def score(self, outputs: Outputs, reference: Outputs, labels: np.ndarray | None = None) -> float:
        """The metric of ``outputs`` (candidate) against ``reference`` (original), higher is better."""
        fn = self.function()
        if self.builtin:
            return fn(outputs, reference, labels)
        try:
            if labels is not None and accepts_labels(fn):
                value = fn(list(outputs), list(reference), labels)
            else:
                value = fn(list(outputs), list(reference))
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's code: one line, never a traceback
            raise InputError(f"--metric {self.spec}: raised {one_line(exc, 200)}") from None
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise InputError(f"--metric {self.spec}: returned {type(value).__name__}, expected a float") from None
        if math.isnan(value):
            raise InputError(f"--metric {self.spec}: returned NaN")
        return value

    def baseline(self, reference: Outputs, labels: np.ndarray | None = None) -> float:
        """The original model's own score (cosine: 1.0; top1 without labels: 1.0)."""
        return self.score(reference, reference, labels)

    def drop(self, outputs: Outputs, reference: Outputs, labels: np.ndarray | None = None,
             baseline: float | None = None) -> float:
        """baseline score - candidate score (positive = worse than the original)."""
        base = self.baseline(reference, labels) if baseline is None else baseline
        return base - self.score(outputs, reference, labels)


def _import_function(spec: str) -> Callable[..., Any]:
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise InputError(f"--metric {spec!r}: expected top1, cosine, snr or module:function")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - import errors of any kind, one line
        raise InputError(f"--metric {spec}: cannot import module '{module_name}' ({one_line(exc, 160)})") from None
    finally:
        if added:
            sys.path.remove(cwd)
    fn = getattr(module, func_name, None)
    if fn is None or not callable(fn):
        raise InputError(f"--metric {spec}: module '{module_name}' has no function '{func_name}'")
    return fn


def parse_metric(spec: str | Metric | None) -> Metric:
    """``top1|cosine|snr|module:function`` -> :class:`Metric` (a user function is imported now, so a bad
    one fails before anything runs)."""
    if spec is None:
        return Metric("cosine")
    if isinstance(spec, Metric):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise InputError("--metric: expected top1, cosine, snr or module:function")
    spec = spec.strip()
    if spec in BUILTIN:
        return Metric(spec)
    if ":" not in spec:
        raise InputError(f"--metric {spec!r}: expected top1, cosine, snr or module:function")
    _import_function(spec)
    return Metric(spec)


def load_labels(labels: Any, num_samples: int | None = None) -> np.ndarray | None:
    """``--labels``: a .npy integer array, a .npz holding exactly one array, or an array. Never unpickles.
    ``num_samples``: the number of calibration samples the labels must match."""
    if labels is None:
        return None
    label = "labels"
    if isinstance(labels, (str, os.PathLike)):
        label = os.fspath(labels)
        if not os.path.isfile(label):
            raise InputError(f"{label}: labels file not found")
        try:
            if label.endswith(".npz"):
                with np.load(label, allow_pickle=False) as data:
                    if len(data.files) != 1:
                        raise InputError(f"{label}: a labels .npz must hold exactly one array "
                                         f"(it holds {len(data.files)}: {', '.join(data.files[:5])})")
                    arr = data[data.files[0]]
            else:
                arr = np.load(label, allow_pickle=False)
        except InputError:
            raise
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise InputError(f"{label}: not a readable .npy/.npz labels file ({one_line(exc, 120)})") from None
        if not isinstance(arr, np.ndarray):
            raise InputError(f"{label}: not a .npy array or .npz archive")
    else:
        arr = np.asarray(labels)
    if arr.dtype.kind not in "iub":
        raise InputError(f"{label}: labels must be integers (got {arr.dtype})")
    arr = arr.reshape(-1).astype(np.int64)
    if num_samples is not None and arr.size != num_samples:
        raise InputError(f"{label}: {arr.size} label(s) but the calibration data has {num_samples} sample(s)")
    return arr


def sample_counts(feeds: Sequence[dict[str, np.ndarray]]) -> list[int]:
    """Samples (rows) per feed: axis 0 of the first input (1 for a scalar input)."""
    out = []
    for feed in feeds:
        first = np.asarray(next(iter(feed.values()))) if feed else np.zeros(0)
        out.append(int(first.shape[0]) if first.ndim else 1)
    return out


def split_labels(labels: np.ndarray | None, counts: Sequence[int], indices: Sequence[int]) -> np.ndarray | None:
    """The labels of the feeds ``indices`` (in that order), given the samples per feed."""
    if labels is None:
        return None
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    return np.concatenate([labels[starts[i]:starts[i + 1]] for i in indices]) if indices else labels[:0]


def accepts_labels(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


def top1_discordant(outputs: Outputs, reference: Outputs, labels: np.ndarray | None = None) -> tuple[int, int]:
    """(samples where the candidate's correctness differs from the original's, samples): what the
    sampling noise of a top1 drop depends on (a paired, McNemar-style count)."""
    pred, ref = _predictions(outputs), _predictions(reference)
    if labels is None:
        return int(np.sum(pred != ref)), int(pred.size)
    target = np.asarray(labels).reshape(-1)
    return int(np.sum((pred == target) != (ref == target))), int(pred.size)
