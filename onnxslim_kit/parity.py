"""The parity gate: run the original and the candidate in onnxruntime on calibration data and compare.

Per output (over all batches, streamed):

- ``max_abs``: max |ref - cand|; ``max_rel``: max |ref - cand| / (|ref| + REL_EPS);
- ``cosine``: cosine similarity of the flattened outputs (both all-zero -> 1.0, one all-zero -> 0.0);
- ``snr_db``: 10*log10(sum ref^2 / sum err^2), ``inf`` when equal;
- ``top1``: argmax agreement, only for float outputs of rank 2 ``[batch, classes >= 2]`` (class scores).
  Rank >= 3 outputs (sequence logits, feature maps, detector heads) get ``None``: whether their last
  axis holds classes cannot be told from the shape;
- ``agreement``: fraction of equal elements, for non-float outputs (int64 indices, bool, strings).

Rules: observed shapes and dtypes must match (declared shapes are not trusted, FIELD-NOTES 5). NaN in
the same position in both counts as equal, like the same infinity; any other non-finite mismatch fails.
Non-float outputs compare exactly; under a lossy tolerance with ``min_top1`` they pass when
``agreement >= min_top1``. Exact tolerances check ``|a-b| <= atol + rtol*|ref|`` element by element;
lossy ones check ``cosine >= min_cosine``, ``snr_db >= min_snr_db`` and ``top1 >= min_top1`` (where the
output has a top-1). Metrics are computed in float64.

The reference session runs with graph optimizations disabled (onnxruntime's fusions must not hide a
bug), the candidate with the defaults users run.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import onnx

from .calibration import CalibrationData
from .errors import InputError, one_line
from .pass_base import Tolerance
from .runtime import make_session
from .shapes import elem_type, value_infos, with_outputs

logger = logging.getLogger(__name__)

REL_EPS = 1e-6

Progress = Callable[[Iterable, str], Iterable]


def _json_float(value: float | None) -> float | str | None:
    """JSON-safe float: infinities as "inf"/"-inf", NaN (not computed) as None."""
    if value is None:
        return None
    value = float(value)
    if math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


@dataclass
class OutputMetrics:
    name: str
    ref_shape: tuple
    cand_shape: tuple
    ref_dtype: str
    cand_dtype: str
    max_abs: float
    max_rel: float
    cosine: float
    snr_db: float
    top1: float | None
    ok: bool
    reason: str
    agreement: float | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name, "ref_shape": list(self.ref_shape), "cand_shape": list(self.cand_shape),
            "ref_dtype": self.ref_dtype, "cand_dtype": self.cand_dtype,
            "max_abs": _json_float(self.max_abs), "max_rel": _json_float(self.max_rel),
            "cosine": _json_float(self.cosine), "snr_db": _json_float(self.snr_db),
            "top1": _json_float(self.top1), "agreement": _json_float(self.agreement),
            "ok": self.ok, "reason": self.reason,
        }

    def describe(self) -> str:
        parts = [f"max_abs {self.max_abs:.3g}", f"cosine {self.cosine:.6f}", f"snr {self.snr_db:.1f}dB"]
        if self.top1 is not None:
            parts.append(f"top1 {self.top1:.3f}")
        if self.agreement is not None:
            parts.append(f"agreement {self.agreement:.3f}")
        return ", ".join(parts)


@dataclass
class ParityReport:
    outputs: list[OutputMetrics]
    tolerance: Tolerance
    num_batches: int
    data_source: str
    error: str = ""                     # candidate failed to load/run, or output names differ

    @property
    def ok(self) -> bool:
        return not self.error and all(o.ok for o in self.outputs)

    def failures(self) -> list[str]:
        out = [self.error] if self.error else []
        out.extend(f"{o.name}: {o.reason}" for o in self.outputs if not o.ok and o.reason != self.error)
        return out

    def to_dict(self) -> dict:
        return {"ok": self.ok, "tolerance": self.tolerance.to_dict(), "num_batches": self.num_batches,
                "data_source": self.data_source, "error": self.error or None,
                "outputs": [o.to_dict() for o in self.outputs]}

    def summary(self) -> str:
        head = f"{len(self.outputs)} output(s), {self.num_batches} batch(es) of {self.data_source}, " \
               f"tolerance {self.tolerance.describe()}"
        if not self.ok:
            return f"parity FAILED ({head}): " + "; ".join(self.failures())
        worst = max(self.outputs, key=lambda o: o.max_abs if not math.isnan(o.max_abs) else -1.0,
                    default=None)
        detail = f"; worst {worst.name}: {worst.describe()}" if worst is not None else ""
        return f"parity ok ({head}){detail}"


@dataclass
class LocateResult:
    node_name: str
    op_type: str
    tensor_name: str
    metrics: OutputMetrics
    checked_tensors: int

    def to_dict(self) -> dict:
        return {"node_name": self.node_name, "op_type": self.op_type, "tensor_name": self.tensor_name,
                "metrics": self.metrics.to_dict(), "checked_tensors": self.checked_tensors}

    def summary(self) -> str:
        return (f"first divergence at node '{self.node_name}' ({self.op_type}), tensor '{self.tensor_name}': "
                f"{self.metrics.reason} (checked {self.checked_tensors} tensors)")


# ----------------------------------------------------------------------------------------------
# Streaming metric accumulator
# ----------------------------------------------------------------------------------------------

_DOT_CHUNK = 1 << 20


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Sum of a * b in float64, in chunks, without BLAS: OpenBLAS runs dot products above ~10k
    elements on all its threads, and on a busy machine one call on a 12k-element output took 12 ms
    (measured; 10 us this way), which made the parity gate the slowest step of quantize-int8."""
    a, b = a.reshape(-1), b.reshape(-1)
    return float(sum(np.multiply(a[i:i + _DOT_CHUNK], b[i:i + _DOT_CHUNK]).sum()
                     for i in range(0, a.size, _DOT_CHUNK)))


def _is_scores(shape: tuple) -> bool:
    return len(shape) == 2 and shape[1] >= 2


class _Accumulator:
    """Metrics of one output over all batches, without keeping the arrays."""

    def __init__(self, name: str, tolerance: Tolerance):
        self.name = name
        self.tol = tolerance
        self.ref_shape: tuple | None = None
        self.cand_shape: tuple | None = None
        self.ref_dtype = ""
        self.cand_dtype = ""
        self.problem = ""               # shape/dtype mismatch: no metrics
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.dot = self.ref_sq = self.cand_sq = self.err_sq = 0.0
        self.elements = 0
        self.violations = 0              # exact tolerance
        self.nonfinite_mismatch = 0
        self.nan_cand_only = 0
        self.top1_hits = 0
        self.top1_rows = 0
        self.top1_possible = True
        self.equal = 0                   # non-float outputs
        self.numeric = True

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        ref, cand = np.asarray(ref), np.asarray(cand)
        if self.ref_shape is None:
            self.ref_shape, self.cand_shape = tuple(ref.shape), tuple(cand.shape)
            self.ref_dtype, self.cand_dtype = str(ref.dtype), str(cand.dtype)
        if self.problem:
            return
        if ref.dtype != cand.dtype:
            self.ref_dtype, self.cand_dtype = str(ref.dtype), str(cand.dtype)
            self.problem = f"dtype {ref.dtype} != {cand.dtype}"
            return
        if ref.shape != cand.shape:
            self.ref_shape, self.cand_shape = tuple(ref.shape), tuple(cand.shape)
            self.problem = f"shape {_fmt_shape(ref.shape)} != {_fmt_shape(cand.shape)}"
            return
        self.elements += ref.size
        if ref.dtype.kind == "f":
            self._update_float(ref, cand)
        else:
            self._update_exact(ref, cand)

    def _update_exact(self, ref: np.ndarray, cand: np.ndarray) -> None:
        self.equal += int(np.count_nonzero(ref == cand))
        self.numeric = ref.dtype.kind in "biu"
        if self.numeric and ref.size:
            a, b = ref.astype(np.float64), cand.astype(np.float64)
            d = np.abs(a - b)
            self.max_abs = max(self.max_abs, float(d.max()))
            self.max_rel = max(self.max_rel, float((d / (np.abs(a) + REL_EPS)).max()))
            self.dot += _dot(a, b)
            self.ref_sq += _dot(a, a)
            self.cand_sq += _dot(b, b)
            self.err_sq += _dot(d, d)

    def _update_float(self, ref: np.ndarray, cand: np.ndarray) -> None:
        a = ref.astype(np.float64).ravel()
        b = cand.astype(np.float64).ravel()
        fa, fb = np.isfinite(a), np.isfinite(b)
        both = fa & fb
        if not both.all():
            same_special = (np.isnan(a) & np.isnan(b)) | (np.isinf(a) & (a == b))
            bad = ~both & ~same_special
            self.nonfinite_mismatch += int(np.count_nonzero(bad))
            self.nan_cand_only += int(np.count_nonzero(np.isnan(b) & ~np.isnan(a)))
            a, b = a[both], b[both]
        if a.size:
            d = np.abs(a - b)
            self.max_abs = max(self.max_abs, float(d.max()))
            self.max_rel = max(self.max_rel, float((d / (np.abs(a) + REL_EPS)).max()))
            self.dot += _dot(a, b)
            self.ref_sq += _dot(a, a)
            self.cand_sq += _dot(b, b)
            self.err_sq += _dot(d, d)
            if self.tol.exact:
                limit = (self.tol.atol or 0.0) + (self.tol.rtol or 0.0) * np.abs(a)
                self.violations += int(np.count_nonzero(d > limit))
        if _is_scores(ref.shape):
            self.top1_hits += int(np.count_nonzero(np.argmax(ref, axis=1) == np.argmax(cand, axis=1)))
            self.top1_rows += ref.shape[0]
        else:
            self.top1_possible = False

    def finish(self) -> OutputMetrics:
        nan = float("nan")
        ref_shape = self.ref_shape if self.ref_shape is not None else ()
        cand_shape = self.cand_shape if self.cand_shape is not None else ()
        if self.problem:
            return OutputMetrics(self.name, ref_shape, cand_shape, self.ref_dtype, self.cand_dtype,
                                 nan, nan, nan, nan, None, False, self.problem)
        if self.ref_dtype and np.dtype(self.ref_dtype).kind != "f" and not self.numeric:
            cosine = snr = nan                       # strings: equality only
        else:
            cosine = self._cosine()
            snr = self._snr()
        is_float = bool(self.ref_dtype) and np.dtype(self.ref_dtype).kind == "f"
        top1 = (self.top1_hits / self.top1_rows) if (is_float and self.top1_possible and self.top1_rows) else None
        agreement = None if is_float else (self.equal / self.elements if self.elements else 1.0)
        m = OutputMetrics(self.name, ref_shape, cand_shape, self.ref_dtype, self.cand_dtype,
                          self.max_abs, self.max_rel, cosine, snr, top1, True, "", agreement)
        m.reason = self._judge(m, is_float)
        m.ok = not m.reason
        return m

    def _cosine(self) -> float:
        if self.err_sq == 0.0 or (self.ref_sq == 0.0 and self.cand_sq == 0.0):
            return 1.0                                  # equal (incl. both all-zero)
        if self.ref_sq == 0.0 or self.cand_sq == 0.0:
            return 0.0
        return float(min(1.0, max(-1.0, self.dot / (math.sqrt(self.ref_sq) * math.sqrt(self.cand_sq)))))

    def _snr(self) -> float:
        if self.err_sq == 0.0:
            return math.inf
        if self.ref_sq == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.ref_sq / self.err_sq)

    def _judge(self, m: OutputMetrics, is_float: bool) -> str:
        tol = self.tol
        if self.ref_shape is None:
            return "no batches compared"
        if not is_float:
            if self.equal == self.elements:
                return ""
            if tol.lossy and tol.min_top1 is not None and m.agreement is not None and m.agreement >= tol.min_top1:
                return ""
            return (f"{self.elements - self.equal} of {self.elements} values differ "
                    f"(exact compare for {self.ref_dtype})")
        if self.nonfinite_mismatch:
            where = f", {self.nan_cand_only} NaN only in the candidate" if self.nan_cand_only else ""
            return f"NaN/inf mismatch at {self.nonfinite_mismatch} position(s){where}"
        if tol.exact and self.violations:
            return (f"max_abs {m.max_abs:.3g} > atol {tol.atol or 0:g} + rtol {tol.rtol or 0:g}*|ref| "
                    f"at {self.violations} of {self.elements} elements")
        if tol.min_cosine is not None and not m.cosine >= tol.min_cosine:
            return f"cosine {m.cosine:.6f} < {tol.min_cosine:g}"
        if tol.min_snr_db is not None and not m.snr_db >= tol.min_snr_db:
            return f"snr {m.snr_db:.2f}dB < {tol.min_snr_db:g}dB"
        if tol.min_top1 is not None and m.top1 is not None and not m.top1 >= tol.min_top1:
            return f"top1 {m.top1:.4f} < {tol.min_top1:g}"
        return ""


def _fmt_shape(shape) -> str:
    return "(" + ",".join(str(d) for d in shape) + ")"


def metrics_for(name: str, ref: Iterable[np.ndarray], cand: Iterable[np.ndarray],
                tolerance: Tolerance) -> OutputMetrics:
    """Metrics of one output from matching batches of reference and candidate arrays."""
    acc = _Accumulator(name, tolerance)
    for a, b in zip(ref, cand, strict=True):
        acc.update(a, b)
    return acc.finish()


# ----------------------------------------------------------------------------------------------
# Checker
# ----------------------------------------------------------------------------------------------

def _as_proto(model: Any) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)):
        from .ir import load_proto

        return load_proto(model)
    if hasattr(model, "to_proto"):
        return model.to_proto()
    raise TypeError(f"expected an onnx.ModelProto or onnxslim_kit.ir.Model, got {type(model).__name__}")


def _session(model: Any, *, optimize: bool, threads: int | None):
    """A session for a proto, a saved model's path (onnxruntime reads its external data itself), or an
    ``ir.Model``: one loaded with external data is saved once to a temporary folder and the session is
    built from that path (its weights are never serialized into one in-memory protobuf). Parity
    sessions run without onnxruntime's memory arena (freed tensors, e.g. dequantized weights, are
    returned instead of kept)."""
    if isinstance(model, (str, os.PathLike, onnx.ModelProto, bytes)):
        return make_session(model, optimize=optimize, threads=threads, mem_arena=False)
    meta = getattr(model, "meta", None)
    if meta is not None and getattr(meta, "external_data", False):
        with tempfile.TemporaryDirectory(prefix="onnxslim-session-") as tmp:
            path = os.path.join(tmp, "model.onnx")
            model.save(path, external_data=True)
            return make_session(path, optimize=optimize, threads=threads, mem_arena=False)
    return make_session(_as_proto(model), optimize=optimize, threads=threads, mem_arena=False)


def _read_ahead(feeds: Iterable, budget: int) -> Iterator:
    """``feeds`` in order, the first ones (up to ``budget`` bytes) read at once. Calibration data keeps
    its feeds after one complete pass: read by the background reference at its start, they are there
    for the pass that calibrates in the main thread meanwhile, which otherwise read the files again
    (measured ~1.5 ms a run of det_head_tiny's .npz on the main thread)."""
    source = iter(feeds)
    head: collections.deque = collections.deque()
    size = 0
    for feed in source:
        head.append(feed)
        size += sum(getattr(a, "nbytes", 0) for a in feed.values())
        if size > budget:
            break

    def gen():
        while head:
            yield head.popleft()
        yield from source

    return gen()


class ParityChecker:
    """Compares candidates against one reference on fixed calibration data; reference outputs are
    computed once (on first use) and reused for every check.

    ``reference``: a proto, or the path of a saved model (its session is built from the file, so the
    weights of a model with external data are read by onnxruntime only). The reference session is
    released once its outputs are computed: one session is alive at a time."""

    def __init__(self, reference: onnx.ModelProto | str | os.PathLike, data: CalibrationData, *,
                 progress: Progress | None = None, threads: int | None = None,
                 reference_threads: int | None = None):
        self._reference_path = os.fspath(reference) if isinstance(reference, (str, os.PathLike)) else None
        self._reference = None if self._reference_path else _as_proto(reference)
        self.data = data
        self.progress = progress
        self.threads = threads
        try:
            self._ref_session = make_session(self._reference_path or self._reference, optimize=False,
                                             threads=reference_threads or threads, mem_arena=False)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise InputError(f"reference model does not load in onnxruntime ({one_line(exc)})") from None
        self.output_names = [o.name for o in self._ref_session.get_outputs()]
        self._ref_outputs: list[dict[str, np.ndarray]] | None = None
        self._prefetch: tuple[threading.Thread, dict] | None = None

    @property
    def reference(self) -> onnx.ModelProto:
        """The reference as a proto (loaded from its path, weights included, on first use)."""
        if self._reference is None:
            self._reference = _as_proto(self._reference_path)
        return self._reference

    def _track(self, iterable: Iterable, label: str) -> Iterable:
        return self.progress(iterable, label) if self.progress else iterable

    def prefetch(self) -> None:
        """Compute the reference outputs in a background thread (onnxruntime releases the GIL while it
        runs), so they are ready when the passes finish instead of adding to the run time. For models
        held in memory only: the reference session then lives alongside the passes' sessions."""
        if self._ref_outputs is not None or self._prefetch is not None or self._reference_path:
            return
        box: dict = {}

        def work():
            try:
                box["outputs"] = self._compute_reference(track=False, read_ahead=True)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = exc

        thread = threading.Thread(target=work, name="onnxslim-parity-reference", daemon=True)
        self._prefetch = (thread, box)
        thread.start()

    def close(self) -> None:
        """Wait for a prefetch still running (its onnxruntime session must not outlive the run: the
        interpreter aborts at exit with a native thread still inside onnxruntime)."""
        if self._prefetch is not None:
            self._prefetch[0].join()

    @property
    def reference_outputs(self) -> list[dict[str, np.ndarray]]:
        if self._ref_outputs is None and self._prefetch is not None:
            thread, box = self._prefetch
            thread.join()
            self._prefetch = None
            if "error" in box:
                raise box["error"]
            self._ref_outputs = box["outputs"]
        if self._ref_outputs is None:
            self._ref_outputs = self._compute_reference(track=True)
        return self._ref_outputs

    def _compute_reference(self, *, track: bool, read_ahead: bool = False) -> list[dict[str, np.ndarray]]:
        outs = []
        feeds = self._track(self.data, "parity: reference") if track else self.data
        if read_ahead:
            feeds = _read_ahead(feeds, getattr(self.data, "CACHE_BYTES", 0))
        for i, feed in enumerate(feeds):
            try:
                values = self._ref_session.run(self.output_names, feed)
            except Exception as exc:  # noqa: BLE001
                hint = ("; random data may not suit this model: pass real data (--calib) or pin "
                        "shapes (--input-shape)") if self.data.is_random else ""
                raise InputError(f"reference model fails on calibration batch {i} of {self.data.source} "
                                 f"({one_line(exc)}){hint}") from None
            outs.append(dict(zip(self.output_names, values)))
        self._ref_session = None  # before any candidate session exists
        return outs

    def _failed(self, tolerance: Tolerance, error: str, batches: int) -> ParityReport:
        nan = float("nan")
        outputs = [OutputMetrics(n, (), (), "", "", nan, nan, nan, nan, None, False, error)
                   for n in self.output_names]
        return ParityReport(outputs, tolerance, batches, self.data.source, error=error)

    def check(self, candidate: Any, tolerance: Tolerance) -> ParityReport:
        """Run ``candidate`` (a proto, its serialized bytes, a saved model's path or an ``ir.Model``;
        default onnxruntime optimizations) on every batch and compare outputs."""
        refs = self.reference_outputs
        try:
            session = _session(candidate, optimize=True, threads=self.threads)
        except Exception as exc:  # noqa: BLE001
            return self._failed(tolerance, f"candidate does not load in onnxruntime ({one_line(exc)})", 0)
        cand_names = [o.name for o in session.get_outputs()]
        missing = [n for n in self.output_names if n not in cand_names]
        extra = [n for n in cand_names if n not in self.output_names]
        error = ""
        if missing or extra:
            error = "candidate outputs differ from the reference (" + "; ".join(
                p for p in (f"missing {', '.join(missing)}" if missing else "",
                            f"unexpected {', '.join(extra)}" if extra else "") if p) + ")"
        common = [n for n in self.output_names if n in cand_names]
        accs = {n: _Accumulator(n, tolerance) for n in common}
        batches = 0
        for i, (feed, ref) in enumerate(zip(self._track(self.data, "parity: candidate"), refs)):
            try:
                values = session.run(common, feed)
            except Exception as exc:  # noqa: BLE001
                del session
                return self._failed(tolerance, f"candidate fails on batch {i} ({one_line(exc)})", batches)
            for name, value in zip(common, values):
                accs[name].update(ref[name], value)
            batches += 1
        del session
        nan = float("nan")
        outputs = []
        for name in self.output_names:
            if name in accs:
                outputs.append(accs[name].finish())
            else:
                outputs.append(OutputMetrics(name, (), (), "", "", nan, nan, nan, nan, None, False,
                                             "missing in the candidate"))
        return ParityReport(outputs, tolerance, batches, self.data.source, error=error)

    # -- divergence search ---------------------------------------------------------------------------
    def locate(self, candidate: onnx.ModelProto, tolerance: Tolerance) -> LocateResult | None:
        """First node (in the candidate's topological order) whose output, present under the same name
        in both models, diverges beyond ``tolerance``; None when every shared tensor agrees."""
        cand = _as_proto(candidate)
        ref = self.reference
        ref_produced = {o for node in ref.graph.node for o in node.output if o}
        order: list[tuple[str, onnx.NodeProto]] = []
        seen = set()
        for node in cand.graph.node:
            if node.op_type == "Constant":      # a changed weight shows at the node that computes with it
                continue
            for out in node.output:
                if out and out in ref_produced and out not in seen:
                    seen.add(out)
                    order.append((out, node))
        if not order:
            logger.info("locate: the models share no intermediate tensor names")
            return None
        names = [n for n, _ in order]
        ref_x = with_outputs(ref, names)
        cand_x = with_outputs(cand, names)
        try:
            ref_sess = make_session(ref_x, optimize=False, threads=self.threads, mem_arena=False)
            cand_sess = make_session(cand_x, optimize=True, threads=self.threads, mem_arena=False)
        except Exception as exc:  # noqa: BLE001
            # Some tensors cannot be graph outputs (e.g. non-tensor types); keep the typed ones only.
            logger.info("locate: exposing all shared tensors failed (%s); retrying with typed ones", exc)
            ref_info, cand_info = value_infos(ref), value_infos(cand)
            names = [n for n in names if elem_type(ref_info, n) and elem_type(cand_info, n)]
            order = [(n, node) for n, node in order if n in set(names)]
            try:
                ref_sess = make_session(with_outputs(ref, names, ref_info), optimize=False,
                                        threads=self.threads, mem_arena=False)
                cand_sess = make_session(with_outputs(cand, names, cand_info), optimize=True,
                                         threads=self.threads, mem_arena=False)
            except Exception as exc2:  # noqa: BLE001
                logger.warning("locate: cannot expose intermediate tensors (%s)", exc2)
                return None
        ref_avail = {o.name for o in ref_sess.get_outputs()}
        cand_avail = {o.name for o in cand_sess.get_outputs()}
        order = [(n, node) for n, node in order if n in ref_avail and n in cand_avail]
        names = [n for n, _ in order]
        accs = {n: _Accumulator(n, tolerance) for n in names}
        for i, feed in enumerate(self._track(self.data, "parity: locate")):
            try:
                ref_vals = ref_sess.run(names, feed)
            except Exception as exc:  # noqa: BLE001
                raise InputError(f"reference model fails on calibration batch {i} ({one_line(exc)})") from None
            try:
                cand_vals = cand_sess.run(names, feed)
            except Exception as exc:  # noqa: BLE001
                node = order[0][1]
                metrics = OutputMetrics(names[0], (), (), "", "", float("nan"), float("nan"), float("nan"),
                                        float("nan"), None, False, f"candidate fails ({one_line(exc)})")
                return LocateResult(node.name, node.op_type, names[0], metrics, 0)
            for n, a, b in zip(names, ref_vals, cand_vals):
                accs[n].update(a, b)
            del ref_vals, cand_vals
        for n, node in order:
            metrics = accs[n].finish()
            if not metrics.ok:
                return LocateResult(node.name, node.op_type, n, metrics, len(order))
        return None


def compare(reference: onnx.ModelProto, candidate: onnx.ModelProto, data: CalibrationData,
            tolerance: Tolerance) -> ParityReport:
    """One-shot :meth:`ParityChecker.check`."""
    return ParityChecker(reference, data).check(candidate, tolerance)
