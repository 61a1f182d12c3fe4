"""Per-layer sensitivity analysis: apply one technique to one layer at a time and measure the damage.

For every technique (a pass spec with an ``include`` option, e.g. ``quantize-weights:bits=4``) and
every candidate layer, an *evaluation* applies ``cleanup`` and then that technique restricted to the
one layer (``include=LAYER``), runs the result in onnxruntime on the calibration data and records:

- the cosine similarity and SNR (dB) of every output against the ORIGINAL model's outputs, and the
  ``damage`` = 1 - the smallest cosine over the outputs (1 - agreement for non-float outputs);
- the MACs, parameters and bytes it saves against the *baseline* (the original after ``cleanup``, so
  each row shows that one change alone, not what cleanup saved);
- optionally (``latency=True``) the latency ratio candidate / baseline (1 thread, interleaved runs);
- optionally (``metric=``, ``labels=``) a user metric (:mod:`onnxslim_kit.usermetric`): its value and its
  drop against the original's value on the same samples;
- ``score`` = damage per unit saved: damage / (fraction of the MACs saved), or for a change that
  saves no MACs (quantization) damage / (fraction of the bytes saved). Lower is a better trade.

A technique that fits anything to the calibration data (``Pass.reads_calibration()``: quantize-int8's
ranges, prune-channels' refit, svd's whitening, GPTQ) is given the first half of the feeds and measured on
the second half (``measured_on = "held-out"``): measured on the samples it was fitted on, a refit looks
better than it is. The other techniques are measured on every feed (``measured_on = "all"``).

Candidate layers: the named compute nodes of the baseline whose op type is Conv, ConvTranspose,
MatMul or Gemm, and the embedding lookups: a Gather whose data input is a constant float 2-D tensor
(unnamed ones are given a name first). Each technique decides for itself whether it
touches a layer: an evaluation where the pass changes nothing is recorded as ``skipped`` with the
pass's own reason (e.g. "weight has 512 elements < min_size=4096"); one where the pass raises is
recorded as ``error`` with its one-line message.

Evaluations are independent, so they run in parallel (``onnxslim_kit.executors``): with
``executor="local"`` (the default), ``workers > 1`` runs them in a process pool (spawn; each worker
receives the baseline model, the calibration feeds and the reference outputs once) and ``workers=1``
inline; ``executor="ray"`` or ``"ray://host:port"`` runs one Ray task per evaluation with that state
put into Ray's object store once (``pip install onnxslim-kit[ray]``). Every evaluation runs with
1-thread onnxruntime sessions and 1 BLAS thread whatever the executor, so all of them give the same
numbers. As with every spawn-based pool, a script that calls ``analyze(..., workers > 1)`` must do
so under ``if __name__ == "__main__":`` (the workers import the script; without the guard the pool
fails with an error saying so). The CLI needs nothing.

Resumability: with ``cache=PATH`` every finished evaluation is appended to a JSON-lines file, keyed by
(model fingerprint, technique spec, layer, calibration identity, latency on/off). A rerun reuses every
entry it finds there and computes only the rest, so an interrupted analysis resumes where it stopped.

This module builds passes by spec through the registry; it imports no pass module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import onnx

from . import executors
from .calibration import CalibrationData
from .errors import InputError, OnnxSlimError, one_line
from .ir import Model
from .metrics import model_stats
from .parity import _json_float, metrics_for
from .pass_base import PassContext, Tolerance
from .pipeline import Pipeline, build_pass, parse_spec
from .registry import get_pass, pass_options
from .runtime import PROTO_LIMIT, make_session, model_bytes_estimate, run_feeds, time_sessions

logger = logging.getLogger(__name__)

DEFAULT_TECHNIQUES = ("quantize-int8", "quantize-weights:bits=4", "prune-channels:ratio=0.25", "prune-channels:ratio=0.5",
                      "prune-channels:ratio=0.75", "svd:energy=0.9")
CANDIDATE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Gather")  # Gather: embedding tables only
CACHE_FORMAT = "onnxslim-kit-analyze-cache/1"
_METRICS_ONLY = Tolerance(min_cosine=-1.0)  # metrics are computed, nothing is judged

Progress = Callable[[Iterable, str], Iterable]


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------

def _num(value: Any) -> float | None:
    """A JSON number back as a float ("inf" strings included)."""
    if value is None:
        return None
    return float(value)


@dataclass
class Evaluation:
    """One technique applied to one layer."""

    technique: str
    layer: str
    op: str
    status: str                            # ok | skipped | error
    reason: str = ""
    cosine: float | None = None            # smallest cosine over the outputs
    snr_db: float | None = None            # smallest SNR over the outputs
    damage: float | None = None            # 1 - cosine (non-float outputs: 1 - agreement)
    outputs: list[dict] = field(default_factory=list)
    macs_saved: int = 0
    params_saved: int = 0
    bytes_saved: int = 0
    macs_saved_fraction: float = 0.0
    bytes_saved_fraction: float = 0.0
    macs_unresolved: list[str] = field(default_factory=list)  # changed nodes whose MACs are unknown
    latency_ratio: float | None = None      # candidate / baseline median latency (latency=True)
    score: float | None = None              # damage per fraction saved (MACs, else bytes); lower is better
    metric: str | None = None               # --metric: its name, the candidate's value and the drop
    metric_score: float | None = None       # vs the original's own value on the same samples
    metric_drop: float | None = None
    measured_on: str = "all"               # all | held-out (fit on the first half of the feeds)
    seconds: float = 0.0
    cached: bool = False                    # reused from the cache (not part of the cached entry)

    def to_dict(self) -> dict:
        return {
            "technique": self.technique, "layer": self.layer, "op": self.op, "status": self.status,
            "reason": self.reason, "cosine": _json_float(self.cosine), "snr_db": _json_float(self.snr_db),
            "damage": _json_float(self.damage), "outputs": self.outputs, "macs_saved": self.macs_saved,
            "params_saved": self.params_saved, "bytes_saved": self.bytes_saved,
            "macs_saved_fraction": self.macs_saved_fraction, "bytes_saved_fraction": self.bytes_saved_fraction,
            "macs_unresolved": self.macs_unresolved, "latency_ratio": _json_float(self.latency_ratio), "score": _json_float(self.score),
            "metric": self.metric, "metric_score": _json_float(self.metric_score),
            "metric_drop": _json_float(self.metric_drop), "measured_on": self.measured_on,
            "seconds": round(self.seconds, 4), "cached": self.cached,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Evaluation":
        return cls(technique=d["technique"], layer=d["layer"], op=d["op"], status=d["status"],
                   reason=d.get("reason", ""), cosine=_num(d.get("cosine")), snr_db=_num(d.get("snr_db")),
                   damage=_num(d.get("damage")), outputs=list(d.get("outputs", [])),
                   macs_saved=int(d.get("macs_saved", 0)), params_saved=int(d.get("params_saved", 0)),
                   bytes_saved=int(d.get("bytes_saved", 0)),
                   macs_saved_fraction=float(d.get("macs_saved_fraction", 0.0)),
                   bytes_saved_fraction=float(d.get("bytes_saved_fraction", 0.0)),
                   macs_unresolved=list(d.get("macs_unresolved", [])),
                   latency_ratio=_num(d.get("latency_ratio")), score=_num(d.get("score")),
                   metric=d.get("metric"), metric_score=_num(d.get("metric_score")),
                   metric_drop=_num(d.get("metric_drop")), measured_on=d.get("measured_on", "all"),
                   seconds=float(d.get("seconds", 0.0)))

    def sort_key(self) -> tuple:
        """Evaluated rows first, by score (damage per fraction saved), then by damage."""
        if self.status != "ok":
            return (1, math.inf, math.inf)
        score = self.score if self.score is not None else math.inf
        return (0, score, self.damage if self.damage is not None else math.inf)


@dataclass
class AnalysisReport:
    source: str
    techniques: list[str]
    layers: list[str]
    evaluations: list[Evaluation]          # in task order (technique, then layer in graph order)
    baseline: dict[str, int]               # params, macs, bytes of the original after cleanup
    original: dict[str, int]
    calibration_source: str
    calibration_is_random: bool
    calibration_id: str
    model_fingerprint: str
    workers: int
    executor: str = "local"
    computed: int = 0                      # evaluations run in this call
    reused: int = 0                        # evaluations taken from the cache
    cache: str | None = None
    latency: bool = False
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    layer_weights: dict[str, int] = field(default_factory=dict)  # elements of each layer's constant weight

    def ranked(self) -> list[Evaluation]:
        return sorted(self.evaluations, key=lambda e: e.sort_key())

    RUN_FIELDS = ("seconds", "workers", "executor", "computed", "reused", "cache")  # how/when it ran

    def to_dict(self, *, run_details: bool = True) -> dict:
        """The JSON of ``--json``. ``run_details=False`` leaves out what depends on how and when the
        analysis ran (timings, workers, executor, cache use), so two runs can be compared for equality."""
        if not run_details:
            d = self.to_dict()
            for key in self.RUN_FIELDS:
                d.pop(key)
            for e in d["evaluations"]:
                e.pop("seconds")
                e.pop("cached")
            return d
        return {
            "source": self.source, "techniques": self.techniques, "layers": self.layers,
            "baseline": self.baseline, "original": self.original,
            "calibration": {"source": self.calibration_source, "is_random": self.calibration_is_random,
                            "id": self.calibration_id},
            "model_fingerprint": self.model_fingerprint, "workers": self.workers,
            "executor": self.executor, "computed": self.computed,
            "reused": self.reused, "cache": self.cache, "latency": self.latency,
            "seconds": round(self.seconds, 3), "warnings": self.warnings,
            "evaluations": [e.to_dict() for e in self.ranked()],
        }

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2)
            fh.write("\n")


# ----------------------------------------------------------------------------------------------
# One evaluation (runs in a worker process or inline)
# ----------------------------------------------------------------------------------------------

@dataclass
class _State:
    """What every evaluation needs; shipped once per run (a file each pool worker reads, or Ray's object
    store)."""

    baseline: bytes                        # serialized baseline proto
    feeds: list[dict[str, np.ndarray]]
    reference: list[dict[str, np.ndarray]]  # original model's outputs per feed
    output_names: list[str]
    input_shapes: dict[str, list[int]]
    seed: int
    is_random: bool
    source: str
    stats: dict[str, int]                  # baseline params, macs, bytes
    unresolved: list[str]                  # baseline nodes whose MACs are unknown
    latency: bool
    metric: Any = None                     # usermetric.Metric or None
    labels: np.ndarray | None = None       # one per sample of all feeds, in order
    counts: list[int] = field(default_factory=list)  # samples per feed

    def split(self) -> tuple[list[int], list[int]]:
        """(fit, measure) feed indices for a technique that reads calibration data: the first half
        fits, the second half measures (with fewer than 2 feeds, both are every feed)."""
        n = len(self.feeds)
        if n < 2:
            return list(range(n)), list(range(n))
        return list(range(n // 2)), list(range(n // 2, n))

    def proto(self) -> onnx.ModelProto:
        """A fresh baseline proto for each evaluation: nothing one evaluation does (a pass that
        touches the proto it was loaded from) can leak into the next one."""
        return onnx.ModelProto.FromString(self.baseline)

    def calibration(self, indices: list[int] | None = None) -> CalibrationData:
        feeds = self.feeds if indices is None else [self.feeds[i] for i in indices]
        return CalibrationData(lambda: iter(feeds), length=len(feeds), num_samples=len(feeds),
                               source=self.source, is_random=self.is_random)


def _output_damage(m) -> float:
    if m.cosine is not None and math.isfinite(m.cosine):
        return max(0.0, 1.0 - m.cosine)
    if m.agreement is not None:
        return 1.0 - m.agreement
    return 1.0


def evaluate_one(state: _State, technique: str, layer: str, op: str) -> Evaluation:
    """Apply ``technique`` restricted to ``layer`` on the baseline and measure it."""
    start = time.perf_counter()
    ev = Evaluation(technique=technique, layer=layer, op=op, status="ok")
    name, options = parse_spec(technique)
    measure = list(range(len(state.feeds)))
    try:
        p = build_pass(name, {**options, "include": [layer]})
        fit = None
        if p.reads_calibration() and len(state.feeds) >= 2:
            # Measured on feeds the pass did not fit on (an in-sample refit/range looks better than it is).
            fit, measure = state.split()
            ev.measured_on = "held-out"
        baseline = state.proto()
        ctx = PassContext(calibration=state.calibration(fit), calibration_is_random=state.is_random,
                          input_shapes=dict(state.input_shapes), seed=state.seed, reference=state.proto())
        model, records = Pipeline([p]).run(Model.from_proto(baseline, source="<analyze>"), ctx)
    except OnnxSlimError as exc:
        ev.status, ev.reason = "error", str(exc)
        ev.seconds = time.perf_counter() - start
        return ev
    record = records[0]
    if not record.modified:
        own = [r for c, r in record.skipped if c == layer]
        other = [r for c, r in record.skipped if r != "not in include"]
        ev.status = "skipped"
        ev.reason = (own or other or [f"{name} does not handle this {op} (it changed nothing)"])[0]
        ev.seconds = time.perf_counter() - start
        return ev
    proto = model.to_proto()
    try:
        session = make_session(proto, threads=1)
        values = [session.run(state.output_names, state.feeds[i]) for i in measure]
        del session
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        ev.status = "error"
        ev.reason = f"candidate does not run in onnxruntime ({one_line(exc, 200)})"
        ev.seconds = time.perf_counter() - start
        return ev
    damages, cosines, snrs = [], [], []
    reference = [state.reference[i] for i in measure]
    for i, out in enumerate(state.output_names):
        m = metrics_for(out, (r[out] for r in reference), (v[i] for v in values), _METRICS_ONLY)
        d = _output_damage(m) if not m.reason else 1.0
        damages.append(d)
        if m.cosine is not None and not math.isnan(m.cosine):
            cosines.append(m.cosine)
        if m.snr_db is not None and not math.isnan(m.snr_db):
            snrs.append(m.snr_db)
        ev.outputs.append({"name": out, "cosine": _json_float(m.cosine), "snr_db": _json_float(m.snr_db),
                           "max_abs": _json_float(m.max_abs), "agreement": _json_float(m.agreement),
                           "problem": m.reason or None})
    ev.damage = max(damages) if damages else 0.0
    ev.cosine = min(cosines) if cosines else None
    ev.snr_db = min(snrs) if snrs else None
    if state.metric is not None:
        from .usermetric import split_labels

        outs = [dict(zip(state.output_names, v)) for v in values]
        labels = split_labels(state.labels, state.counts, measure)
        ev.metric = state.metric.name
        ev.metric_score = state.metric.score(outs, reference, labels)
        ev.metric_drop = state.metric.baseline(reference, labels) - ev.metric_score
    after = model_stats(proto, state.input_shapes or None)
    base = state.stats
    # A node whose MACs cannot be computed (e.g. a com.microsoft MatMulNBits that shape inference does
    # not know) would count as "saved": then no MACs saving is claimed and the nodes are listed.
    ev.macs_unresolved = [n for n in after.unresolved if n not in state.unresolved]
    ev.macs_saved = 0 if ev.macs_unresolved else base["macs"] - after.macs
    ev.params_saved = base["params"] - after.params
    ev.bytes_saved = base["bytes"] - after.bytes
    ev.macs_saved_fraction = ev.macs_saved / base["macs"] if base["macs"] else 0.0
    ev.bytes_saved_fraction = ev.bytes_saved / base["bytes"] if base["bytes"] else 0.0
    saved = ev.macs_saved_fraction if ev.macs_saved > 0 else ev.bytes_saved_fraction
    ev.score = ev.damage / saved if saved > 0 else math.inf
    if state.latency:
        times = time_sessions([state.proto(), proto], state.feeds[0], threads=1, runs=10, warmup=2, rounds=3)
        ev.latency_ratio = statistics.median(times[1]) / statistics.median(times[0])
    ev.seconds = time.perf_counter() - start
    return ev


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------

def _cache_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class _Cache:
    """Append-only JSON lines: a header line, then one ``{"key", "fields", "entry"}`` per evaluation.
    A torn last line (an interrupted write) is ignored."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = os.fspath(path) if path is not None else None
        self.entries: dict[str, dict] = {}
        self.torn = 0
        if self.path is None:
            return
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise InputError(f"{self.path}: cache folder {folder} does not exist")
        if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
            with open(self.path, "w", encoding="utf-8") as fh:
                fh.write(json.dumps({"format": CACHE_FORMAT}) + "\n")
            return
        try:
            with open(self.path, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{self.path}: cache is not readable ({type(exc).__name__})") from None
        try:
            header = json.loads(lines[0])
        except (json.JSONDecodeError, IndexError):
            header = None
        if not isinstance(header, dict) or header.get("format") != CACHE_FORMAT:
            raise InputError(f"{self.path}: not an analyze cache (first line is not {{\"format\": "
                             f"\"{CACHE_FORMAT}\"}}); refusing to append to it")
        for line in lines[1:]:
            try:
                rec = json.loads(line)
                self.entries[rec["key"]] = rec["entry"]
            except (json.JSONDecodeError, KeyError, TypeError):
                self.torn += 1

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, fields: dict, entry: dict) -> None:
        self.entries[key] = entry
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"key": key, "fields": fields, "entry": entry}) + "\n")
            fh.flush()


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------

class _Sized:
    """An iterator with a length, so a progress bar knows the total."""

    def __init__(self, it: Iterator, length: int):
        self._it, self._length = it, length

    def __iter__(self) -> Iterator:
        return self._it

    def __len__(self) -> int:
        return self._length


def _normalise_technique(spec: str) -> str:
    """Validate a technique spec (registered pass, known options, an ``include`` option that analyze
    sets per layer) and return it in canonical form ``name:k=v,...`` (options sorted)."""
    name, options = parse_spec(spec)
    cls = get_pass(name)
    if "include" not in {o.name for o in pass_options(cls)}:
        raise InputError(f"technique '{name}' has no 'include' option, so it cannot be applied to one layer "
                         f"at a time")
    if "include" in options:
        raise InputError(f"technique '{spec}': do not set include; analyze sets it to each layer in turn")
    build_pass(name, options)  # option names and values checked before anything runs
    return name + (":" + ",".join(f"{k}={options[k]}" for k in sorted(options)) if options else "")


def _calibration_id(feeds: list[dict[str, np.ndarray]], is_random: bool) -> str:
    digest = hashlib.sha256(b"random" if is_random else b"real")
    for feed in feeds:
        for key in sorted(feed):
            arr = np.ascontiguousarray(feed[key])
            digest.update(f"{key}:{arr.dtype.str}:{arr.shape}".encode())
            digest.update(arr.tobytes())
    return digest.hexdigest()[:32]


def default_workers() -> int:
    """The CPUs this process may use, at most 8: every evaluation is single-threaded, so one worker
    per CPU (tools/results/analyze_workers.md: 2 workers vs 1 on 2 cores)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def analyze(model: str | os.PathLike | onnx.ModelProto, calibration: Any = None, *,
            techniques: Iterable[str] | None = None, workers: int | None = None,
            executor: str = "local", cache: str | os.PathLike | None = None, latency: bool = False,
            input_shapes: Any = None, seed: int = 0, num_samples: int = 8, batch_size: int | None = None,
            progress: Progress | None = None, metric: Any = None, labels: Any = None) -> "AnalysisReport":
    """Per-layer sensitivity of ``model`` to each technique (see the module doc).

    ``techniques``: pass specs that take an ``include`` option (default: :data:`DEFAULT_TECHNIQUES`).
    ``calibration``: as for :func:`onnxslim_kit.optimize` (None: seeded random data). ``workers``:
    local processes (None: up to :func:`default_workers`, used only when the evaluations are long
    enough to pay for starting them, see ``executors.run_auto``; 1: inline). ``executor``:
    ``"local"``, ``"ray"`` or ``"ray://host:port"`` (with Ray, ``workers`` is unused: Ray runs as
    many tasks at once as its cluster has CPUs). ``cache``: JSON-lines file to resume from and
    append to. ``latency``: also time each candidate against the baseline (slow, noisy). ``progress``: an
    ``(iterable, label) -> iterable`` wrapper over the evaluations still to compute; an exception it
    raises stops the analysis (what finished is already in the cache). ``metric``: also score every
    candidate with a user metric (``top1|cosine|snr|module:function``, see :mod:`onnxslim_kit.usermetric`)
    and record its drop against the original; ``labels``: one integer label per calibration sample.

    A technique that fits anything to the calibration data (``Pass.reads_calibration``: quantize-int8's
    ranges, prune-channels' refit, svd's whitening) sees the first half of the feeds only and is measured
    on the second half (``measured_on = "held-out"``); the others are measured on every feed.
    """
    from .api import _data, _load, _shapes
    from .usermetric import load_labels, parse_metric, sample_counts

    start = time.perf_counter()
    scorer = None
    if metric is not None or labels is not None:
        scorer = parse_metric(metric if metric is not None else "top1")
    specs = [_normalise_technique(t) for t in (techniques or DEFAULT_TECHNIQUES)]
    specs = list(dict.fromkeys(specs))
    auto = workers is None
    if workers is None:
        workers = default_workers()
    if workers < 1:
        raise InputError(f"--workers {workers}: expected at least 1")
    kind = executors.check_executor(executor)
    if kind == "local" and workers > 1 and getattr(multiprocessing.current_process(), "_inheriting", False):
        # A spawned worker is importing the caller's script, which calls analyze at import time:
        # stop here (the parent then reports a broken pool) instead of starting a pool in the worker.
        raise InputError("analyze with workers > 1 must be called under `if __name__ == '__main__':`")
    store = _Cache(cache)
    label, original, _ = _load(model)
    if model_bytes_estimate(original) >= PROTO_LIMIT:
        raise InputError(f"{label}: analyze handles models below 2 GB only")
    shapes = _shapes(input_shapes)
    data = _data(original, calibration, shapes, num_samples=num_samples, seed=seed, batch_size=batch_size)
    feeds = [{k: np.array(v) for k, v in feed.items()} for feed in data]
    counts = sample_counts(feeds)
    label_array = load_labels(labels, sum(counts))

    # Reference outputs of the original (1 thread, no graph optimizations, as the parity gate does).
    reference = run_feeds(original, feeds, optimize=False, threads=1, label=label, source=data.source)
    output_names = [o.name for o in original.graph.output]

    # Baseline: the original after cleanup, every candidate layer named.
    ctx = PassContext(calibration=data, calibration_is_random=data.is_random, input_shapes=shapes, seed=seed,
                      reference=original)
    base_model, _ = Pipeline.from_specs(["cleanup"]).run(Model.from_proto(original, source=label), ctx)
    layers: list[tuple[str, str]] = []
    for node in base_model.nodes:
        if node.op in CANDIDATE_OPS and (node.domain or "") in ("", "ai.onnx"):
            if node.op == "Gather" and base_model.embedding_table(node) is None:
                continue  # index arithmetic on shapes, a lookup in an activation
            if not node.name:
                node.name = base_model.unique_name(node.op.lower())
            layers.append((node.name, node.op))
    base_proto = base_model.to_proto()
    init_sizes = {t.name: int(np.prod(t.dims)) for t in base_proto.graph.initializer}
    layer_names = {layer for layer, _ in layers}
    weight_input = {n.name: n.input[0] if n.op_type == "Gather" else n.input[1] if len(n.input) > 1 else ""
                    for n in base_proto.graph.node if n.name in layer_names}  # a Gather's table is input 0
    layer_weights = {name: init_sizes[w] for name, w in weight_input.items() if w in init_sizes}
    fingerprint = base_model.fingerprint()
    orig_stats = model_stats(original, shapes or None)
    base_stats = model_stats(base_proto, shapes or None)
    calib_id = _calibration_id(feeds, data.is_random)
    state = _State(baseline=base_proto.SerializeToString(), feeds=feeds, reference=reference,
                   output_names=output_names, input_shapes=shapes, seed=seed, is_random=data.is_random,
                   source=data.source, stats={"params": base_stats.params, "macs": base_stats.macs,
                                              "bytes": base_stats.bytes},
                   unresolved=list(base_stats.unresolved), latency=latency, metric=scorer, labels=label_array,
                   counts=counts)
    if scorer is not None:  # a metric that cannot score the original fails here, once, with one line
        scorer.baseline(reference, label_array)
    labels_id = (hashlib.sha256(label_array.tobytes()).hexdigest()[:16] if label_array is not None else None)

    tasks = [(t, layer, op) for t in specs for layer, op in layers]
    results: dict[int, Evaluation] = {}
    todo: list[tuple[int, str, str, str, str, dict]] = []
    for i, (t, layer, op) in enumerate(tasks):
        fields = {"model": fingerprint, "technique": t, "layer": layer, "calibration": calib_id,
                  "latency": latency, "seed": seed, "measure": "heldout-half/1",
                  "metric": scorer.spec if scorer is not None else None, "labels": labels_id}
        key = _cache_key(fields)
        hit = store.get(key)
        if hit is not None:
            ev = Evaluation.from_dict(hit)
            ev.cached = True
            results[i] = ev
        else:
            todo.append((i, t, layer, op, key, fields))

    def run_all() -> Iterator[Evaluation]:
        by_index = {i: (key, fields) for i, _, _, _, key, fields in todo}
        for i, entry in executors.run(state, [(i, t, layer, op) for i, t, layer, op, _, _ in todo],
                                      executor=executor, workers=workers, auto=auto):
            entry.pop("cached")
            key, fields = by_index[i]
            store.put(key, fields, entry)
            ev = Evaluation.from_dict(entry)
            results[i] = ev
            yield ev

    stream: Iterable[Evaluation] = _Sized(run_all(), len(todo))
    if progress is not None and todo:
        stream = progress(stream, "analyze")
    computed = 0
    for _ in stream:
        computed += 1

    warnings = []
    if data.is_random:
        warnings.append("damage was measured on seeded random inputs; pass --calib for real data")
    if store.torn:
        warnings.append(f"{store.torn} unreadable line(s) in the cache were ignored")
    return AnalysisReport(
        source=label, techniques=specs, layers=[layer for layer, _ in layers],
        evaluations=[results[i] for i in range(len(tasks))],
        baseline={"params": base_stats.params, "macs": base_stats.macs, "bytes": base_stats.bytes},
        original={"params": orig_stats.params, "macs": orig_stats.macs, "bytes": orig_stats.bytes},
        calibration_source=data.source, calibration_is_random=data.is_random, calibration_id=calib_id,
        model_fingerprint=fingerprint, workers=workers, executor=executor, computed=computed,
        reused=len(tasks) - len(todo),
        cache=store.path, latency=latency, seconds=time.perf_counter() - start, warnings=warnings,
        layer_weights=layer_weights)
