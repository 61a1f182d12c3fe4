"""Accuracy-aware search: combine per-layer measurements into a plan that meets a target.

Targets (:func:`parse_target`):

- ``accuracy_drop=D``: the metric (:mod:`onnxslim_kit.usermetric`) may drop by at most ``D`` against the
  original on the search data (``cosine``: the original scores 1.0, so ``accuracy_drop=0.01`` means the
  smallest output cosine stays >= 0.99; ``top1`` with labels: accuracy may drop by ``D``);
- ``size=Rx``: the model's bytes at most ``R`` times the original's;
- ``latency=Rx``: the latency (onnxruntime, :func:`latency_rounds`: interleaved with the original,
  paired per round, at ``latency_batch`` rows and ``latency_threads``) at most ``R`` times the original's.

How (:func:`search`):

1. ``analyze`` measures every technique on every layer alone (on the search data only: with
   ``holdout`` a seeded share of the calibration feeds is set aside and never seen by the search).
2. Candidates (one technique on one layer, status ok, something saved) are ordered by predicted damage
   per unit saved: the metric drop (clamped at 0; the 1 - cosine damage breaks ties) per fraction of the
   baseline's MACs + bytes saved (``accuracy_drop``), per fraction of the bytes saved (``size``) or of
   the MACs saved (``latency``). A layer gets at most one technique of each family (prune, low-rank,
   quantization), applied in that order; a plan uses one quantization technique (the first the order
   reaches: a quantization pass refuses an already quantized model).
3. ``accuracy_drop``: candidates are accumulated while the sum of their predicted drops stays within the
   target. ``size`` / ``latency``: while the estimated ratio is above the target.
4. The plan is built as one pipeline (``cleanup``, then prune, low-rank and quantization passes, each
   with an ``include`` list) and verified end to end, cross-fitted: built with its passes fitted on the
   first half of the search feeds (the model returned) and on the second half, each half scored by the
   build that did not see it. ``accuracy_drop``
   repair: while the verified drop is above the target, the entry with the largest predicted damage is
   reverted (after ``SINGLE_REVERTS`` single reverts, the worse half of the remaining entries at once),
   at most ``max_verifications`` builds; an empty plan is cleanup alone, which always meets the target.
   A verified plan with slack (after the greedy, or after a repair: then without the changes reverted
   one at a time) is *extended*: the next candidates whose predicted drops, rescaled by
   verified / predicted, fit in the slack are added and verified (a failure halves the batch, then skips
   the candidate), within the same ``max_verifications``: per-layer drops do not add up (int8 layers share
   the error of quantizing a common input), so the additive prediction is often pessimistic.
   With ``top1`` the verified drop must hold with a margin for sampling noise (``confidence``,
   :func:`top1_margin`: a prediction bound for fresh data of the same size); a metric that improves
   on the search data is counted as no drop (the gain is not credited).
   Objective ``balanced`` (default): before the greedy, each technique is applied to all its candidate
   layers of one op type at once and timed against the original (:func:`latency_rounds`, batch 1,
   interleaved rounds); a technique slower than the original in each of ``PROBE_ROUNDS`` rounds, or
   ``PROBE_SLOWER`` x slower in the median round, is not used on that op type (``SearchResult.excluded``),
   and candidates are ordered by bytes + measured latency saved (each group's saving shared among its
   layers by MACs, or bytes for quantization) instead of MACs, so the plan is smaller and faster; objective
   ``latency`` probes the same way and orders by the measured latency saved alone (bytes only break
   ties: the fastest plan within the target, then the smallest); objective ``size`` skips the probe.
   The result's latency ratio is always measured.
   ``size`` / ``latency``: more candidates are added until the measured ratio is met, or all are in and
   the target is reported as not met; then the worst trades (predicted drop per share saved) are
   reverted one at a time while the target still holds.
5. The plan is a TOML recipe (:meth:`SearchResult.recipe`) that ``optimize --recipe`` replays to the
   same bytes given the same calibration data (the search half when ``holdout`` > 0).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import numpy as np
import onnx

from .analyze import _Cache, _cache_key
from .calibration import CalibrationData
from .errors import InputError, OnnxSlimError
from .ir import Model, save_proto
from .metrics import model_stats
from .pass_base import PassContext
from .pipeline import Pipeline, build_pass, parse_spec
from .runtime import round_medians, run_feeds, time_sessions
from .usermetric import Metric, load_labels, parse_metric, sample_counts, split_labels, top1_discordant

logger = logging.getLogger(__name__)

TARGET_KINDS = ("accuracy_drop", "size", "latency")
# Pipeline order of the technique families: structure first, then factorization, then storage.
FAMILY = {"prune-channels": "prune", "prune-weights": "prune", "svd": "lowrank", "quantize-int8": "quantize",
          "quantize-weights": "quantize", "quantize-dynamic": "quantize", "fp16": "quantize"}
FAMILY_ORDER = ("prune", "lowrank", "quantize", "other")
# Techniques that come in levels (option, +1 when a larger value is stronger): a plan holds one level per
# layer and may raise it (tests/test_search.py).
LEVELS = {"prune-channels": ("ratio", 1.0), "svd": ("energy", -1.0)}
SINGLE_REVERTS = 3
# accuracy_drop: build and score each technique on all its candidate layers of one op type, and take such
# whole groups first while their measured drop fits (False: single-layer predictions only).
WHOLE_GROUPS = True
# What an accuracy_drop search minimises besides the drop. balanced: measured latency + bytes, and a
# technique that makes the model slower on this machine (its uniform application, timed before the greedy)
# is not used; latency: the same probe, measured latency saved only (bytes break ties); size: bytes (and
# MACs) only, nothing timed.
OBJECTIVES = ("balanced", "latency", "size")
# objective latency: verified builds the latency polish may add after the plan is found (one per group
# tried), and as many again to spend the budget freed by what it took out
POLISH_BUILDS = 4
POLISH_GAIN = 0.98
TIE_BYTES = 1e-3   # objective latency: bytes saved weigh this much against the latency share saved
# Rounds of the latency probe: a technique is left out when it is slower in every round (sign test,
# p = 1/32 when it makes no difference) or its median round is PROBE_SLOWER x slower.
PROBE_ROUNDS = 5
PROBE_SLOWER = 1.05   # ... or when its median round is this much slower

Progress = Callable[[Iterable, str], Iterable]


@dataclass(frozen=True)
class Target:
    kind: str        # accuracy_drop | size | latency
    value: float

    def describe(self) -> str:
        return f"{self.kind}={self.value:g}" + ("x" if self.kind != "accuracy_drop" else "")


def parse_target(spec: str | Target) -> Target:
    """``accuracy_drop=0.01``, ``size=0.25x``, ``latency=0.5x`` -> :class:`Target`."""
    if isinstance(spec, Target):
        return spec
    text = str(spec).strip()
    key, eq, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not eq or key not in TARGET_KINDS:
        raise InputError(f"--target {text!r}: expected accuracy_drop=D, size=Rx or latency=Rx")
    value = value.strip()
    if key != "accuracy_drop":
        value = value[:-1] if value.lower().endswith("x") else value
    try:
        number = float(value)
    except ValueError:
        raise InputError(f"--target {text!r}: {value!r} is not a number") from None
    if key == "accuracy_drop" and not 0.0 <= number < math.inf:
        raise InputError(f"--target {text!r}: the drop must be >= 0")
    if key != "accuracy_drop" and not 0.0 < number <= 1.0:
        raise InputError(f"--target {text!r}: the ratio must be in (0, 1]")
    return Target(key, number)


@dataclass
class PlanEntry:
    layer: str
    op: str
    technique: str
    predicted_drop: float      # the metric drop measured for this change alone (clamped at 0)
    damage: float              # 1 - min cosine for this change alone
    macs_saved_fraction: float
    bytes_saved_fraction: float
    bytes_saved: int
    size_class: str = ""       # the layer's weight-size bucket, where its technique's layers span several

    def to_dict(self) -> dict:
        return {"layer": self.layer, "op": self.op, "technique": self.technique,
                "predicted_drop": self.predicted_drop, "damage": self.damage,
                "macs_saved_fraction": self.macs_saved_fraction,
                "bytes_saved_fraction": self.bytes_saved_fraction, "bytes_saved": self.bytes_saved}


@dataclass
class Step:
    """One end-to-end verification of a plan."""

    entries: int
    action: str                # greedy | revert LAYER(S) | add N
    search_score: float
    search_drop: float
    size_ratio: float
    latency_ratio: float | None
    met: bool
    margin: float = 0.0        # top1: top1_margin(), added to the drop

    def to_dict(self) -> dict:
        return {"entries": self.entries, "action": self.action, "search_score": _jf(self.search_score),
                "search_drop": _jf(self.search_drop), "margin": self.margin, "size_ratio": self.size_ratio,
                "latency_ratio": self.latency_ratio, "met": self.met}


def _jf(x: float | None):
    if x is None or math.isfinite(x):
        return x
    return "inf" if x > 0 else "-inf"


@dataclass
class SearchResult:
    target: Target
    metric: str
    plan: list[PlanEntry]
    met: bool
    message: str
    model: onnx.ModelProto
    pipeline: Pipeline
    steps: list[Step]
    baseline_score: float                  # the original's metric on the search data
    search_score: float
    search_drop: float
    holdout_baseline: float | None         # the same on the held-out feeds (holdout > 0)
    holdout_score: float | None
    holdout_drop: float | None
    search_samples: int                    # the search's samples, each scored by a build not fitted on it
    holdout_samples: int
    original: dict[str, int]               # params, macs, bytes
    result: dict[str, int]
    latency_ratio: float | None            # the result / the original, measured (batch 1 where dynamic)
    candidates: int
    probe: dict[str, float | None] = field(default_factory=dict)   # "technique on Op" -> latency ratio
    excluded: dict[str, str] = field(default_factory=dict)         # "technique on Op" -> why not used
    group_drops: dict[str, float] = field(default_factory=dict)    # "technique on Op" -> measured joint drop
    groups_taken: list[str] = field(default_factory=list)          # the groups the greedy took whole
    objective: str = "balanced"
    analysis: Any = None                   # the AnalysisReport the plan came from
    fit_feeds: list[dict[str, np.ndarray]] = field(default_factory=list, repr=False)  # what the passes saw
    fit_samples: int = 0
    source: str = ""
    fit_is_random: bool = False
    recipe_path: str | None = None         # set when the recipe was saved (CLI --save-recipe)
    recipe_calibration: str | None = None  # the fit feeds saved beside it
    seconds: float = 0.0

    @property
    def verifications(self) -> int:
        return len(self.steps)

    @property
    def size_ratio(self) -> float:
        return self.result["bytes"] / self.original["bytes"] if self.original["bytes"] else 1.0

    @property
    def macs_ratio(self) -> float | None:
        """None when some of the result's nodes have no known MAC count (e.g. MatMulNBits)."""
        if self.result.get("macs_unresolved"):
            return None
        return self.result["macs"] / self.original["macs"] if self.original["macs"] else 1.0

    def recipe(self) -> str:
        """The plan as a TOML recipe (``optimize --recipe``)."""
        head = [f"# onnxslim-kit search plan: target {self.target.describe()}, metric {self.metric}",
                f"# passes fitted on {self.fit_samples} sample(s); verified (cross-fitted) on {self.search_samples} "
                f"search sample(s): drop {self.search_drop:.6g}"
                + (f"; held-out ({self.holdout_samples}): drop {self.holdout_drop:.6g}"
                   if self.holdout_drop is not None else ""),
                f"# size {self.size_ratio:.4f}x, MACs "
                + (f"{self.macs_ratio:.4f}x" if self.macs_ratio is not None else "unknown (unresolved nodes)")
                + " of the original",
                "# replays to the same bytes with the calibration feeds the passes were fitted on "
                "(SearchResult.fit_feeds; the CLI's --save-recipe writes them next to the recipe)",
                ""]
        return "\n".join(head) + self.pipeline.to_toml()

    def save_recipe(self, path: str | os.PathLike) -> str | None:
        """Write the recipe; with its calibration feeds as ``<path without .toml>.calib.npz`` when they
        stack into one array per input (returns that path, or None)."""
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.recipe())
        feeds = self.fit_feeds
        if self.fit_is_random or not feeds or any(set(f) != set(feeds[0]) for f in feeds):
            return None  # random data reloaded from a file would count as real data (passes differ)
        stacked = {}
        for key in feeds[0]:
            arrays = [np.asarray(f[key]) for f in feeds]
            if any(a.ndim == 0 or a.shape[1:] != arrays[0].shape[1:] or a.dtype != arrays[0].dtype for a in arrays):
                return None
            stacked[key] = np.concatenate(arrays, axis=0)
        base = os.fspath(path)
        calib = (base[:-5] if base.endswith(".toml") else base) + ".calib.npz"
        np.savez(calib, **stacked)
        return calib

    def to_dict(self) -> dict:
        return {"target": self.target.describe(), "metric": self.metric, "met": self.met,
                "message": self.message, "plan": [e.to_dict() for e in self.plan],
                "steps": [s.to_dict() for s in self.steps], "verifications": self.verifications,
                "baseline_score": _jf(self.baseline_score), "search_score": _jf(self.search_score),
                "search_drop": _jf(self.search_drop), "holdout_baseline": _jf(self.holdout_baseline),
                "holdout_score": _jf(self.holdout_score), "holdout_drop": _jf(self.holdout_drop),
                "search_samples": self.search_samples, "fit_samples": self.fit_samples, "holdout_samples": self.holdout_samples,
                "original": self.original, "result": self.result, "size_ratio": self.size_ratio,
                "macs_ratio": self.macs_ratio, "latency_ratio": self.latency_ratio,
                "candidates": self.candidates, "objective": self.objective,
                "latency_probe": {k: _jf(v) for k, v in self.probe.items()}, "excluded": self.excluded,
                "group_drops": {k: _jf(v) for k, v in self.group_drops.items()}, "groups_taken": self.groups_taken,
                "seconds": round(self.seconds, 3)}


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def _subset(data: CalibrationData, feeds: list[dict[str, np.ndarray]], label: str) -> CalibrationData:
    return CalibrationData(lambda: iter(feeds), length=len(feeds), num_samples=sum(sample_counts(feeds)),
                           source=label, is_random=data.is_random)


def _run(proto: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], *, optimize: bool = True
         ) -> list[dict[str, np.ndarray]]:
    return run_feeds(proto, feeds, optimize=optimize, threads=1)


def confidence_z(confidence: float) -> float:
    """The normal quantile a top1 margin uses (0 at a confidence of 0.5 or less: no margin)."""
    return statistics.NormalDist().inv_cdf(confidence) if confidence > 0.5 else 0.0


def top1_margin(z: float, discordant: int, count: int) -> float:
    """What a top1 drop measured on ``count`` samples (``discordant`` of them changed correctness) must
    stay below the target by, so that the drop on a fresh sample of the same size stays within it with
    probability z: a prediction bound, not a confidence bound on the mean. The paired drop's variance per
    sample is about the discordant rate, counted with one pseudo-sample (zero discordant samples out of
    270 do not prove a rate of zero); the fresh sample's own noise doubles it."""
    return z * math.sqrt(2.0 * (discordant + 1)) / max(1, count)


def _latency_feed(proto: onnx.ModelProto, feed: dict[str, np.ndarray], batch: int = 1) -> dict[str, np.ndarray]:
    """``feed`` with ``batch`` rows (cut, or repeated) on every input whose batch dim is not fixed:
    latency is compared at the deployment batch (default 1, where int8 and small layers gain least),
    not at the calibration batch."""
    out = dict(feed)
    for inp in proto.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if inp.name in out and dims and not dims[0].HasField("dim_value") and np.ndim(out[inp.name]) >= 1:
            x = np.asarray(out[inp.name])
            out[inp.name] = x[:batch] if len(x) >= batch else np.concatenate([x] * -(-batch // len(x)))[:batch]
    return out


def runs_per_round(original: onnx.ModelProto, feed: dict[str, np.ndarray], *, threads: int = 2,
                   budget_s: float = 0.03) -> int:
    """Timed runs per session and round so that each session is timed for about ``budget_s`` (10 to 200),
    from 5 runs of the original on ``feed``."""
    probe = time_sessions([original], feed, threads=threads, runs=5, warmup=2, rounds=1)[0]
    return int(min(200, max(10, budget_s / max(statistics.median(probe), 1e-6))))


def latency_rounds(original: onnx.ModelProto, candidates: list, feed: dict[str, np.ndarray],
                   *, threads: int = 2, rounds: int = 5, runs: int | None = None, batch: int = 1) -> list[list[float]]:
    """Per candidate (a proto or a model file), its latency / the original's in each of ``rounds`` rounds
    on ``feed`` (``batch`` rows where the batch is dynamic): sessions interleaved, one alive at a time, each round's ratio taken
    against that round's original (median of the round's runs), so that a burst of load hits both
    sides of a ratio. ``runs`` per round: :func:`runs_per_round` when not given."""
    feed = _latency_feed(original, feed, batch)
    runs = runs or runs_per_round(original, feed, threads=threads)
    times = time_sessions([original, *candidates], feed, threads=threads, runs=runs, warmup=3, rounds=rounds)
    per_round = [round_medians(t, rounds) for t in times]
    return [[c / o for c, o in zip(cand, per_round[0])] for cand in per_round[1:]]


class _Timings:
    """Every latency a search measures (probe, plans, latency targets, the result's ratio), kept in the
    analysis cache (when given): a rerun, or the same search on another executor, then takes the same
    decisions and builds the same plan."""

    def __init__(self, cache, original: onnx.ModelProto, feed: dict[str, np.ndarray], *, report, threads: int,
                 batch: int, seed: int, label: str):
        self.store = _Cache(cache) if cache is not None else None
        self.original, self.threads, self.batch = original, threads, batch
        self._runs: int | None = None
        self.feed = _latency_feed(original, feed, batch)
        # A model that cannot run at the latency batch (a batch dim declared dynamic but fixed inside the
        # graph) fails here with one line, not inside the timing loop.
        run_feeds(original, [self.feed], threads=1, label=label,
                  source=f"the latency feed ({batch} row(s) on dynamic-batch inputs; --latency-batch)")
        self.base = {"model": report.model_fingerprint, "calibration": report.calibration_id, "threads": threads,
                     "batch": batch, "rounds": PROBE_ROUNDS, "seed": seed}

    def _fields(self, what: str, entries: list[PlanEntry]) -> dict:
        return {"latency": what, "entries": sorted(f"{e.technique} @ {e.layer}" for e in entries), **self.base}

    def _cached(self, fields: dict) -> list[float] | None:
        hit = self.store.get(_cache_key(fields)) if self.store is not None else None
        if hit is not None and isinstance(hit.get("rounds"), list):
            return [float(x) for x in hit["rounds"]]
        return None

    def _keep(self, fields: dict, rounds: list[float]) -> None:
        if self.store is not None:
            self.store.put(_cache_key(fields), fields, {"rounds": rounds})

    def _time(self, models: list) -> list[list[float]]:
        if self._runs is None:   # sized once per search, not before every timing
            self._runs = runs_per_round(self.original, self.feed, threads=self.threads)
        return latency_rounds(self.original, models, self.feed, threads=self.threads, rounds=PROBE_ROUNDS,
                              runs=self._runs, batch=self.batch)

    def plan(self, entries: list[PlanEntry], proto: onnx.ModelProto) -> list[float]:
        """Per-round latency ratios of a built plan to the original."""
        fields = self._fields("plan", entries)
        rounds = self._cached(fields)
        if rounds is None:
            rounds = self._time([proto])[0]
            self._keep(fields, rounds)
        return rounds

    def compare(self, entries: list[PlanEntry], proto: onnx.ModelProto, other: list[PlanEntry],
                other_proto: onnx.ModelProto) -> list[float]:
        """Per round, the latency of plan ``other`` / that of plan ``entries``, both timed in the same rounds."""
        fields = {**self._fields("compare", entries), "other": self._fields("", other)["entries"]}
        rounds = self._cached(fields)
        if rounds is None:
            mine, theirs = self._time([proto, other_proto])
            rounds = [b / a for a, b in zip(mine, theirs)]
            self._keep(fields, rounds)
        return rounds

    def probe(self, cands: list[PlanEntry], build: Callable[[list[PlanEntry]], onnx.ModelProto]
              ) -> tuple[dict[str, float | None], dict[str, str]]:
        """Each technique applied to all its candidate layers of one op type at once (``build``), timed
        against the original: ({group: median ratio, None where it does not build}, {group: why it is
        left out}). A group is left out when it is slower in every round (a sign test, p =
        2**-PROBE_ROUNDS if it made no difference) or PROBE_SLOWER x slower in the median round (one fast
        round under load does not rescue it). One probe model is in memory at a time: each is written to
        a temporary folder, then all are timed from their files, interleaved."""
        groups = _by_group(cands)
        fields = {key: self._fields("probe " + key, members) for key, members in groups.items()}
        measured = {key: hit for key in groups if (hit := self._cached(fields[key])) is not None}
        probe: dict[str, float | None] = {}
        with tempfile.TemporaryDirectory(prefix="onnxslim-probe-") as folder:
            paths, names = [], []
            for key, members in groups.items():
                if key in measured:
                    continue
                try:
                    built = build(members)
                except OnnxSlimError as exc:
                    probe[key] = None
                    logger.info("latency probe of %s: does not build on all its layers at once (%s); not timed",
                                key, exc)
                    continue
                paths.append(os.path.join(folder, f"probe{len(paths)}.onnx"))
                save_proto(built, paths[-1])
                del built
                names.append(key)
            if paths:
                for key, per_round in zip(names, self._time(paths)):
                    measured[key] = per_round
                    self._keep(fields[key], per_round)
        excluded: dict[str, str] = {}
        for key in groups:
            if key not in measured:
                continue
            per_round = measured[key]
            probe[key] = statistics.median(per_round)
            if min(per_round) > 1.0 or probe[key] > PROBE_SLOWER:
                excluded[key] = (f"applied to all {len(groups[key])} candidate layer(s) at once it ran "
                                 f"{probe[key]:.3f}x the original's latency (median of {PROBE_ROUNDS} "
                                 f"interleaved rounds, slowest {max(per_round):.3f}x, fastest "
                                 f"{min(per_round):.3f}x; {self.threads} threads, batch {self.batch})")
        return probe, excluded


def _measured_share(cands: list[PlanEntry], probe: dict[str, float | None]) -> Callable[[PlanEntry], float]:
    """Share of the original's latency a change saves, from the probe: its group's measured saving shared
    among the group's candidates by MACs saved (bytes saved for quantization, which saves no MACs); a group
    the probe could not time keeps the change's MACs share."""
    def weight(c: PlanEntry) -> float:
        return c.macs_saved_fraction if c.macs_saved_fraction > 0 else c.bytes_saved_fraction

    totals: dict[str, float] = {}
    for c in cands:
        totals[_group(c)] = totals.get(_group(c), 0.0) + weight(c)

    def share(c: PlanEntry) -> float:
        ratio, total = probe.get(_group(c)), totals.get(_group(c), 0.0)
        if ratio is None:
            return c.macs_saved_fraction
        return max(0.0, 1.0 - ratio) * weight(c) / total if total > 0 else 0.0

    return share


def _quant_bits(technique: str) -> int | None:
    """Bits per weight a quantization technique stores (None: not a quantization technique)."""
    name, options = parse_spec(technique)
    if name in ("quantize-int8", "quantize-dynamic"):
        return 8
    if name == "fp16":
        return 16
    if name == "quantize-weights":
        try:
            return int(options.get("bits", 4))
        except ValueError:
            return 4
    return None


def _group(entry: PlanEntry) -> str:
    """The latency probe's unit: one technique on every candidate layer of one op type (and weight-size
    class, where the layers span several)."""
    return f"{entry.technique} on {entry.op}" + (f" ({entry.size_class} weights)" if entry.size_class else "")


def _size_classes(cands: list[PlanEntry], weights: dict[str, int]) -> None:
    """Set ``size_class`` (weights in [4^k, 4^(k+1))) on the candidates of each (technique, op) whose
    layers fall in more than one class. A technique's speed-up depends on the layer's size (svd of
    bert_tiny's 128x128 attention MatMuls saves MACs and no time, that of its 128x512 MLP MatMuls does),
    so the probe times and the greedy takes each class on its own. Not for quantization: int8 layers
    share their Q/DQ with their quantized neighbours, so int8 on bert_tiny's attention MatMuls alone is
    slower than the original while int8 on every MatMul is faster."""
    def bucket(n: int) -> int:
        return int(math.log(n, 4)) if n > 0 else -1

    def label(k: int) -> str:
        return "no" if k < 0 else f"{_count(4 ** k)}-{_count(4 ** (k + 1))}"

    by_kind: dict[tuple[str, str], list[PlanEntry]] = {}
    for c in cands:
        if _family(c.technique) != "quantize":   # quantized neighbours share their Q/DQ: one group
            by_kind.setdefault((c.technique, c.op), []).append(c)
    for members in by_kind.values():
        if len({bucket(weights.get(c.layer, 0)) for c in members}) > 1:
            for c in members:
                c.size_class = label(bucket(weights.get(c.layer, 0)))


def _count(n: int) -> str:
    return f"{n // 1024 ** 2}M" if n >= 1024 ** 2 and n % 1024 ** 2 == 0 else \
        f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _family(technique: str) -> str:
    return FAMILY.get(parse_spec(technique)[0], "other")


def _compatible(families: set[str], family: str) -> bool:
    """At most one technique of each family per layer. Prune, svd and quantization of one layer compose
    in pipeline order (prune, then svd, then quantization of both factors; tests/test_search.py)."""
    return family not in families and family != "other" or not families


def _level(technique: str) -> tuple[str, tuple, float] | None:
    """(pass, its other options, strength) of a technique that comes in levels of one option: a layer's
    pruning ratio (or svd energy) can be raised inside a plan, the stronger level replacing the weaker."""
    name, options = parse_spec(technique)
    option, sign = LEVELS.get(name, (None, 0.0))
    if option is None or option not in options or options.get("scope") == "global":
        return None   # (a global prune-channels ratio is not per layer: no levels, no layer_ratios)
    try:
        value = float(options[option])
    except ValueError:
        return None
    return name, tuple(sorted((k, v) for k, v in options.items() if k != option)), sign * value


def _weaker(c: PlanEntry, entries: list[PlanEntry]) -> PlanEntry | None:
    """The entry of ``entries`` that ``c`` would upgrade: same layer, same pass and other options, a
    weaker level. None when there is none (``c`` is then placed by the family rule)."""
    mine = _level(c.technique)
    if mine is None:
        return None
    for e in entries:
        if e.layer == c.layer and _family(e.technique) == _family(c.technique):
            theirs = _level(e.technique)
            return e if theirs is not None and theirs[:2] == mine[:2] and theirs[2] < mine[2] else None
    return None


def _keys(entries: list[PlanEntry]) -> set[tuple[str, str]]:
    return {(e.technique, e.layer) for e in entries}


def _by_group(entries: list[PlanEntry]) -> dict[str, list[PlanEntry]]:
    groups: dict[str, list[PlanEntry]] = {}
    for e in entries:
        groups.setdefault(_group(e), []).append(e)
    return groups


def _merged(plan: list[PlanEntry], added: list[PlanEntry]) -> list[PlanEntry]:
    """``plan`` + ``added``, an added upgrade replacing the weaker level of its layer."""
    out = list(plan)
    for c in added:
        old = _weaker(c, out)
        if old is not None:
            out.remove(old)
        out.append(c)
    return out


def build_pipeline(entries: list[PlanEntry], layer_order: list[str]) -> Pipeline:
    """``cleanup`` + one pass per technique with its layers as ``include`` (families in pipeline
    order, layers in graph order; a factored layer's quantization includes both factors).
    prune-channels at several ratios (and otherwise the same options) is one pass with per-layer
    ``layer_ratios``: a coupled group is pruned once, at the smallest ratio its layers have in the plan.
    prune-channels specs that differ in other options are separate passes (user technique lists only)."""
    by_technique: dict[str, list[str]] = {}
    factored = {e.layer for e in entries if _family(e.technique) == "lowrank"}
    ratios: dict[tuple, dict[str, str]] = {}   # prune-channels' other options -> layer -> ratio
    for e in entries:
        level = _level(e.technique)
        if level is not None and level[0] == "prune-channels":
            ratios.setdefault(level[1], {})[e.layer] = parse_spec(e.technique)[1]["ratio"]
            continue
        by_technique.setdefault(e.technique, []).append(e.layer)
        if _family(e.technique) == "quantize" and e.layer in factored:
            # svd keeps the layer's name on the second factor and names the first LAYER_factor_a.
            by_technique[e.technique].append(e.layer + "_factor_a")
    rank = {layer: i for i, layer in enumerate(layer_order)}

    def ordered(layers):
        return sorted(layers, key=lambda n: (rank.get(n.removesuffix("_factor_a"), len(rank)), n))

    jobs = [(t, *parse_spec(t), by_technique[t]) for t in by_technique]
    for rest, per_layer in ratios.items():
        levels = sorted(set(per_layer.values()), key=float)
        options = {**dict(rest), "ratio": levels[0]}
        if len(levels) > 1:
            options["layer_ratios"] = [f"{n}={per_layer[n]}" for n in ordered(per_layer)]
        jobs.append(("prune-channels:" + ",".join(f"{k}={v}" for k, v in sorted(options.items())
                                                   if k != "layer_ratios"), "prune-channels", options, list(per_layer)))
    jobs.sort(key=lambda j: (FAMILY_ORDER.index(FAMILY.get(j[1], "other")), j[0]))
    passes = [build_pass("cleanup", {})]
    for _, name, options, layers in jobs:
        passes.append(build_pass(name, {**options, "include": ordered(layers)}))
    return Pipeline(passes)


def _run_plan(pipe: Pipeline, model: Model, ctx: PassContext) -> tuple[Model, Pipeline]:
    """Run the plan's pipeline pass by pass. A quantization pass's ``LAYER_factor_a`` names are kept
    only where svd really factored LAYER (after pruning, svd may find a layer no longer worth it):
    the returned pipeline holds the include lists that were run, so its recipe replays them."""
    passes = list(pipe.passes)
    for i, p in enumerate(passes):
        include = getattr(p, "include", None)
        if _family(p.name) == "quantize" and include and any(n.endswith("_factor_a") for n in include):
            present = {n.name for n in model.nodes}
            keep = [n for n in include if not n.endswith("_factor_a") or n in present]
            if keep != list(include):
                options = {k: v for k, v in p.options().items() if v is not None}
                passes[i] = p = build_pass(p.name, {**options, "include": keep})
        model, _ = Pipeline([p]).run(model, ctx)
    return model, Pipeline(passes)


# ----------------------------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------------------------

def search(model: str | os.PathLike | onnx.ModelProto, calibration: Any = None, *, target: str | Target,
           metric: str | Metric | None = None, labels: Any = None, techniques: Iterable[str] | None = None,
           workers: int | None = 1, executor: str = "local", holdout: float = 0.0, seed: int = 0,
           input_shapes: Any = None,
           num_samples: int = 8, batch_size: int | None = None, max_verifications: int = 8,
           cache: str | os.PathLike | None = None, latency_threads: int = 2, latency_batch: int = 1,
           confidence: float = 0.95,
           objective: str = "balanced", progress: Progress | None = None) -> SearchResult:
    """Find a plan (technique per layer) that meets ``target`` and return it built and verified.

    ``metric``: ``top1|cosine|snr|module:function`` (default cosine; top1 when labels are given);
    ``labels``: one integer per calibration sample (.npy/.npz path or array). ``holdout``: share of the
    calibration feeds (seeded) kept out of the search and only scored at the end. ``max_verifications``:
    end-to-end builds the repair may use. ``confidence`` (top1 only): the verified drop plus
    :func:`top1_margin` (z(confidence) * sqrt(2 * (discordant samples + 1)) / samples) must be within the
    target, so that the plan also meets it on fresh data of the same size (0.5 or less: the drop alone). ``objective``: ``balanced``
    (default), ``latency`` or ``size``, see :data:`OBJECTIVES`. See the module doc.
    """
    from .analyze import analyze
    from .api import _data, _load, _shapes

    start = time.perf_counter()
    tgt = parse_target(target)
    if metric is None:
        metric = "top1" if labels is not None else "cosine"
    scorer = parse_metric(metric)
    if tgt.kind == "accuracy_drop" and scorer.spec == "snr":
        raise InputError("--target accuracy_drop with --metric snr: the original's SNR is infinite; use cosine, "
                         "top1 or module:function")
    if not 0.0 <= holdout < 1.0:
        raise InputError(f"--holdout {holdout}: expected a share in [0, 1)")
    if not 0.0 <= confidence < 1.0:
        raise InputError(f"--confidence {confidence}: expected a probability in [0, 1)")
    if max_verifications < 1:
        raise InputError("max_verifications must be at least 1")
    if latency_threads < 1 or latency_batch < 1:
        raise InputError("latency_threads and latency_batch must be at least 1")
    if objective not in OBJECTIVES:
        raise InputError(f"--objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
    label, original, _ = _load(model)
    shapes = _shapes(input_shapes)
    data = _data(original, calibration, shapes, num_samples=num_samples, seed=seed, batch_size=batch_size)
    feeds = [{k: np.array(v) for k, v in feed.items()} for feed in data]
    counts = sample_counts(feeds)
    all_labels = load_labels(labels, sum(counts))

    # Held-out share: seeded, whole feeds, never seen by the analysis, the greedy or the repair.
    n = len(feeds)
    hold_idx: list[int] = []
    if holdout > 0:
        if n < 2:
            raise InputError(f"--holdout {holdout}: needs at least 2 calibration feeds (there are {n})")
        k = min(n - 1, max(1, int(round(n * holdout))))
        hold_idx = sorted(int(i) for i in np.random.default_rng(seed).permutation(n)[:k])
    search_idx = [i for i in range(n) if i not in set(hold_idx)]
    s_feeds = [feeds[i] for i in search_idx]
    h_feeds = [feeds[i] for i in hold_idx]
    s_labels = split_labels(all_labels, counts, search_idx)
    h_labels = split_labels(all_labels, counts, hold_idx) if hold_idx else None
    s_data = _subset(data, s_feeds, data.source + (" (search share)" if hold_idx else ""))

    report = analyze(original, s_data, techniques=techniques, workers=workers, executor=executor, cache=cache,
                     input_shapes=shapes, seed=seed, progress=progress, metric=scorer, labels=s_labels)

    # Cross-fitted verification: the plan is built twice, with its passes fitted on the first half of the
    # search feeds (the returned model) and on the second half; each half is scored by the model that
    # did not see it, so every search sample counts and none is scored in-sample (a refit measured on
    # its own samples looks better than it is).
    ns = len(s_feeds)
    cross = ns >= 2
    fit_pos = list(range(ns // 2)) if cross else list(range(ns))
    ver_pos = list(range(ns // 2, ns)) if cross else list(range(ns))
    fit_feeds = [s_feeds[i] for i in fit_pos]
    other_feeds = [s_feeds[i] for i in ver_pos]
    fit_data = _subset(data, fit_feeds, s_data.source + (" (first half)" if cross else ""))
    other_data = _subset(data, other_feeds, s_data.source + " (second half)")
    s_counts = [counts[i] for i in search_idx]
    order = ver_pos + fit_pos if cross else ver_pos
    s_labels = split_labels(s_labels, s_counts, order)
    s_feeds = other_feeds + fit_feeds if cross else other_feeds
    ref_all = _run(original, s_feeds + h_feeds, optimize=False)  # one reference session for both shares
    ref_s, ref_h = ref_all[:len(s_feeds)], (ref_all[len(s_feeds):] if h_feeds else None)
    base_s = scorer.baseline(ref_s, s_labels)
    n_other = sum(s_counts[i] for i in ver_pos)   # samples in the second half (scored by the first's build)
    base_o = scorer.baseline(ref_s[:len(other_feeds)], s_labels[:n_other] if s_labels is not None else None)
    orig_stats = model_stats(original, shapes or None)
    original_sizes = {"params": orig_stats.params, "macs": orig_stats.macs, "bytes": orig_stats.bytes}

    # Candidates.
    base = report.baseline
    cands: list[PlanEntry] = []
    for e in report.evaluations:
        if e.status != "ok":
            continue
        bytes_saved = max(0, e.bytes_saved)
        bits = _quant_bits(e.technique)
        if bits is not None and e.layer in report.layer_weights:
            # One quantized layer alone pays Q/DQ nodes that its quantized neighbours would share:
            # its isolated size change understates what it saves inside a plan. Estimate from the weight.
            bytes_saved = max(bytes_saved, int(report.layer_weights[e.layer] * 4 * (1 - bits / 32)))
        if e.macs_saved <= 0 and bytes_saved <= 0:
            continue
        drop = e.metric_drop if e.metric_drop is not None else (e.damage or 0.0)
        cands.append(PlanEntry(layer=e.layer, op=e.op, technique=e.technique, predicted_drop=max(0.0, drop),
                               damage=e.damage or 0.0, macs_saved_fraction=max(0.0, e.macs_saved_fraction),
                               bytes_saved_fraction=bytes_saved / base["bytes"] if base["bytes"] else 0.0,
                               bytes_saved=bytes_saved))
    _size_classes(cands, report.layer_weights)

    probing = objective in ("balanced", "latency") and tgt.kind != "size"
    measured_share: Callable[[PlanEntry], float] | None = None   # share of the latency a change saves

    def saved(c: PlanEntry) -> float:
        """What a change saves, for the order: bytes (size); the latency the probe measured, plus bytes
        for accuracy_drop (balanced; a tie-break for objective latency), once probed; else MACs
        (latency) or MACs + bytes."""
        if tgt.kind == "size":
            return c.bytes_saved_fraction
        if measured_share is not None:
            weight = (TIE_BYTES if objective == "latency" else 1.0) if tgt.kind == "accuracy_drop" else 0.0
            return measured_share(c) + weight * c.bytes_saved_fraction
        if tgt.kind == "latency" and not probing:
            return c.macs_saved_fraction
        return c.macs_saved_fraction + c.bytes_saved_fraction   # to be probed: int8 saves no MACs

    def ranked(entries: list[PlanEntry]) -> list[PlanEntry]:
        kept = [c for c in entries if saved(c) > 0]
        return sorted(kept, key=lambda c: (c.predicted_drop / saved(c), c.damage / saved(c), c.layer, c.technique))

    eps = 1e-12
    cands = ranked(cands)

    steps: list[Step] = []
    built: dict[tuple, tuple] = {}
    z = confidence_z(confidence)

    original_bytes = original.SerializeToString()   # each build starts from a fresh copy of it

    def fitted(entries: list[PlanEntry], on: CalibrationData) -> tuple[Model, Pipeline]:
        ctx = PassContext(calibration=on, calibration_is_random=data.is_random, input_shapes=shapes,
                          seed=seed, reference=original)
        return _run_plan(build_pipeline(entries, report.layers),
                         Model.from_proto(onnx.ModelProto.FromString(original_bytes), source=label), ctx)

    def build(entries: list[PlanEntry], action: str) -> tuple:
        key = tuple(sorted((e.technique, e.layer) for e in entries))
        if key in built:
            return built[key]
        try:
            result, pipe = fitted(entries, fit_data)
            twin = fitted(entries, other_data)[0].to_proto() if cross else None
        except OnnxSlimError as exc:
            # A combination the passes refuse: recorded as a failed verification, then repaired like one.
            if not entries:
                raise
            steps.append(Step(entries=len(entries), action=f"{action} (does not build: {exc})",
                              search_score=-math.inf, search_drop=math.inf, size_ratio=math.inf,
                              latency_ratio=None, met=False))
            built[key] = (None, build_pipeline(entries, report.layers), -math.inf, math.inf, None, 0.0)
            return built[key]
        proto = result.to_proto()
        outs = _run(proto, other_feeds) + (_run(twin, fit_feeds) if cross else [])
        score = scorer.score(outs, ref_s, s_labels)
        margin = 0.0
        if scorer.spec == "top1" and z > 0:
            discordant, count = top1_discordant(outs, ref_s, s_labels)
            margin = top1_margin(z, discordant, count)
        size = model_stats(proto, shapes or None).bytes / max(1, original_sizes["bytes"])
        lat = statistics.median(timings.plan(entries, proto)) if tgt.kind == "latency" else None
        drop = base_s - score
        met = {"accuracy_drop": max(drop, 0.0) + margin <= tgt.value + eps, "size": size <= tgt.value,
               "latency": lat is not None and lat <= tgt.value}[tgt.kind]
        steps.append(Step(entries=len(entries), action=action, search_score=score, search_drop=drop,
                          size_ratio=size, latency_ratio=lat, met=met, margin=margin))
        built[key] = (proto, pipe, score, size, lat, margin)
        return built[key]

    def is_met(step_values) -> bool:
        proto, _, score, size, lat, margin = step_values
        if proto is None:
            return False
        if tgt.kind == "accuracy_drop":
            return max(base_s - score, 0.0) + margin <= tgt.value + eps
        if tgt.kind == "size":
            return size <= tgt.value
        return lat is not None and lat <= tgt.value

    # Latency probe (objective balanced): each technique applied to all its candidate layers of one op
    # type at once, timed against the original. A technique that makes this model slower on this machine
    # (int8 on a dispatch-bound model, MatMulNBits on small MatMuls, factored convolutions) is not used
    # on that op type: the plan is to be smaller AND faster, and MACs / bytes saved do not say that.
    probe: dict[str, float | None] = {}
    excluded: dict[str, str] = {}
    timings = _Timings(cache, original, s_feeds[0], report=report, threads=latency_threads, batch=latency_batch,
                       seed=seed, label=label)
    joint: dict[str, float] = {}   # group -> its measured drop, all its layers changed at once
    groups_taken: dict[str, set[tuple[str, str]]] = {}   # group taken whole -> its members

    def group_model(members: list[PlanEntry]) -> onnx.ModelProto:
        """The group built on the first half; for accuracy_drop its drop scored on the second (the greedy
        takes groups of two or more layers whole)."""
        proto_g = fitted(members, fit_data)[0].to_proto()
        if tgt.kind == "accuracy_drop" and WHOLE_GROUPS and len(members) >= 2:
            outs = _run(proto_g, other_feeds)
            joint[_group(members[0])] = max(0.0, base_o - scorer.score(
                outs, ref_s[:len(other_feeds)], s_labels[:n_other] if s_labels is not None else None))
        return proto_g

    if probing:
        probe, excluded = timings.probe(cands, group_model)
        cands = [c for c in cands if _group(c) not in excluded]
        measured_share = _measured_share(cands, probe)
        cands = ranked(cands)

    plan: list[PlanEntry] = []
    used: dict[str, set[str]] = {}
    chosen: dict[str, str] = {}   # family -> technique, for the families one pipeline can hold once

    def fits(c: PlanEntry, among: list[PlanEntry] | None = None) -> bool:
        family = _family(c.technique)
        if family == "quantize" and chosen.get(family, c.technique) != c.technique:
            return False   # a quantization pass refuses an already quantized model: one per plan
        return _compatible(used.get(c.layer, set()), family) or _weaker(c, plan if among is None else among) is not None

    def cost(c: PlanEntry, among: list[PlanEntry], value: Callable[[PlanEntry], float]) -> float:
        """``value`` of ``c`` less that of the weaker level it replaces."""
        old = _weaker(c, among)
        return max(0.0, value(c) - (value(old) if old is not None else 0.0))

    def mark(c: PlanEntry) -> None:
        used.setdefault(c.layer, set()).add(_family(c.technique))
        chosen.setdefault(_family(c.technique), c.technique)

    def remark(entries: list[PlanEntry]) -> None:
        """``used`` / ``chosen`` as ``entries`` alone make them."""
        used.clear()
        chosen.clear()
        for e in entries:
            mark(e)

    def take(c: PlanEntry) -> None:
        old = _weaker(c, plan)
        if old is not None:
            plan.remove(old)
        plan.append(c)
        mark(c)

    def verified_drop(values) -> float:
        return max(base_s - values[2], 0.0) + values[5]

    def extend(current: tuple, predicted: float, rejected: set[tuple[str, str]] | None = None,
               limit: int | None = None) -> tuple:
        """The verified plan has slack: add the next candidates whose predicted drops, rescaled by how far
        the prediction overshot (per-layer drops rarely add up: int8 layers share their error), fit in
        it; verify; on failure retry with half as many, then skip the first one (until ``limit``
        verifications in all, default ``max_verifications``)."""
        nonlocal plan
        scale = min(1.0, verified_drop(current) / predicted) if predicted > eps else 1.0
        cap = len(cands)
        rejected = set(rejected or ())
        while len(steps) < (max_verifications if limit is None else limit):
            room = tgt.value - verified_drop(current)
            chunk, acc = [], 0.0
            for c in cands:
                if len(chunk) >= cap or c in plan or (c.technique, c.layer) in rejected or \
                        not fits(c, plan + chunk):
                    continue
                more = cost(c, plan + chunk, lambda e: e.predicted_drop) * scale
                if chunk and acc + more > room + eps:
                    continue
                chunk.append(c)
                mark(c)
                acc += more
            if not chunk:
                break
            trial_plan = _merged(plan, chunk)
            trial = build(trial_plan, f"extend +{len(chunk)}")
            if is_met(trial):
                plan = trial_plan
                current = trial
                cap = len(cands)
                continue
            remark(plan)
            if len(chunk) == 1:
                rejected.add((chunk[0].technique, chunk[0].layer))
            cap = max(1, len(chunk) // 2)
        return current

    message = ""
    if tgt.kind == "accuracy_drop":
        total = 0.0
        # Whole groups first: single-layer drops do not add up (int8 layers share their error; one int8
        # layer alone pays for its own Q/DQ), so each technique applied to all its candidate layers of one
        # op type is built and scored too, and taken whole while its measured drop fits. The plan can thus
        # always be at least what a uniform application per op type is; single layers then fill the rest.
        groups = _by_group(cands)
        for key, members in groups.items():
            if len(members) < 2 or not WHOLE_GROUPS or key in joint:
                continue
            try:
                group_model(members)
            except OnnxSlimError as exc:
                logger.info("group %s does not build on all its layers at once (%s)", key, exc)
        for key in [k for k in joint if k not in groups]:   # left out by the probe
            del joint[key]
        level_drops: dict[tuple, float] = {}   # (pass, other options, op, size class) -> joint drop of the level taken
        for key in sorted(joint, key=lambda k: (joint[k] / max(eps, sum(saved(c) for c in groups[k])), k)):
            members = groups[key]
            level = _level(members[0].technique)
            slot = (level[0], level[1], members[0].op, members[0].size_class) if level is not None else (key,)
            more = joint[key] - level_drops.get(slot, 0.0)
            if total + more > tgt.value + eps or not all(fits(c) for c in members):
                continue
            weight = sum(saved(c) for c in members)
            for c in members:   # the joint drop shared by what each member saves (for reverts/extends)
                take(replace(c, predicted_drop=joint[key] * saved(c) / weight if weight > eps else
                             joint[key] / len(members)))
            level_drops[slot] = joint[key]
            groups_taken[key] = _keys(members)
            total += more
        grouped, grouped_total = list(plan), total
        for c in cands:
            more = cost(c, plan, lambda e: e.predicted_drop)
            if not fits(c) or total + more > tgt.value + eps:
                continue
            take(c)
            total += more
        current = build(plan, "greedy")
        if not is_met(current) and grouped and _keys(grouped) != _keys(plan) and len(steps) < max_verifications:
            # The single changes broke it (their drops predicted 0 where a discrete metric saw no change
            # alone): back to the whole groups, whose drops were measured together, and extend from there.
            trial = build(grouped, "revert to the whole groups")
            if is_met(trial):
                plan, current, total = grouped, trial, grouped_total
                remark(plan)
        if is_met(current):
            current = extend(current, total)
        reverts = 0
        singles: set[tuple[str, str]] = set()
        repaired = False
        while not is_met(current) and plan and len(steps) < max_verifications:
            worst = sorted(plan, key=lambda e: (e.predicted_drop, e.damage), reverse=True)
            k = 1 if reverts < SINGLE_REVERTS else max(1, len(plan) // 2)
            gone, plan = worst[:k], worst[k:]
            if k == 1:
                singles.add((gone[0].technique, gone[0].layer))
            reverts += 1
            repaired = True
            current = build(plan, "revert " + "+".join(e.layer for e in gone))
        if repaired and is_met(current) and len(steps) < max_verifications:
            # Halving may have reverted harmless changes too: offer them (not the single reverts) again.
            remark(plan)
            current = extend(current, sum(e.predicted_drop for e in plan), singles)
        if not is_met(current):
            plan = []
            current = build(plan, "revert all (verification budget spent)")
        met = is_met(current)
    else:
        # Size / latency: add by damage per unit saved until the estimate, then the measurement, is met.
        remaining = list(cands)

        def fraction(c: PlanEntry) -> float:
            """Estimated share of the ORIGINAL's bytes (size), or of its latency as the probe measured it
            (else its MACs: latency), this change saves."""
            if tgt.kind == "size":
                return c.bytes_saved / max(1, original_sizes["bytes"])
            if measured_share is not None:
                return measured_share(c)
            return c.macs_saved_fraction * base["macs"] / max(1, original_sizes["macs"])

        def add(need: float) -> int:
            added = 0
            while remaining and (need > 0 or added == 0):
                c = remaining.pop(0)
                if not fits(c):
                    continue
                need -= cost(c, plan, fraction)
                take(c)
                added += 1
            return added

        start_ratio = (base["bytes"] / max(1, original_sizes["bytes"]) if tgt.kind == "size" else
                       1.0 if measured_share is not None else base["macs"] / max(1, original_sizes["macs"]))
        if start_ratio > tgt.value:
            add(start_ratio - tgt.value)
        current = build(plan, "greedy")
        while not is_met(current) and len(steps) < max_verifications:
            measured = current[3] if tgt.kind == "size" else current[4]
            added = add((measured or 1.0) - tgt.value)
            if not added:
                break
            current = build(plan, f"add {added}")
            if current[0] is None:
                break
        if current[0] is None:
            plan = []
            current = build(plan, "revert all (the plan does not build)")
        # Trim: while the target holds, revert the worst trade (predicted drop per share saved), so that a
        # batch added to close a measured gap does not keep a damaging change it did not need.
        tried: set[tuple[str, str]] = set()
        while is_met(current) and len(steps) < max_verifications:
            left = [e for e in plan if (e.technique, e.layer) not in tried and e.predicted_drop > 0]
            if not left:
                break
            worst = max(left, key=lambda e: e.predicted_drop / max(fraction(e), 1e-12))
            tried.add((worst.technique, worst.layer))
            trial_plan = [e for e in plan if e is not worst]
            trial = build(trial_plan, f"trim {worst.layer} ({worst.technique})")
            if is_met(trial):
                plan, current = trial_plan, trial
            else:
                break
        met = is_met(current)
        measured = current[3] if tgt.kind == "size" else current[4]
        if met:
            message = f"measured {tgt.kind} {measured:.4f}x <= {tgt.value:g}x with {len(plan)} change(s)"
        else:
            left = sum(1 for c in remaining if fits(c))
            message = (f"{tgt.kind}={tgt.value:g}x cannot be met: best reached {measured:.4f}x with {len(plan)} "
                       f"change(s)" + (" (every candidate applied)" if not left else
                                       f" ({left} candidate(s) left, verification budget spent)"))

    measured_lat = None
    if tgt.kind == "accuracy_drop" and probing and plan and is_met(current):
        # Speed repair: a verified plan slower than the original in every round loses, one at a time, the
        # probed groups that were slower than the original on their own (worst first), while it still
        # meets the target and gets faster; each removal is a verification.
        rounds = timings.plan(plan, current[0])
        suspects = sorted({_group(e) for e in plan if (probe.get(_group(e)) or 0.0) > 1.0},
                          key=lambda k: (-(probe[k] or 0.0), k))
        while min(rounds) > 1.0 and suspects and len(steps) < max_verifications:
            key = suspects.pop(0)
            trial_plan = [e for e in plan if _group(e) != key]
            trial = build(trial_plan, f"speed: without {key}")
            if not is_met(trial):
                continue
            trial_rounds = timings.plan(trial_plan, trial[0])
            if statistics.median(trial_rounds) < statistics.median(rounds):
                plan, current, rounds = trial_plan, trial, trial_rounds
                excluded[key] = (f"the verified plan ran slower than the original in every round; without it "
                                 f"{statistics.median(trial_rounds):.3f}x (probe alone: {probe[key]:.3f}x)")
        if objective == "latency":
            # Latency polish: techniques interact (svd factors of a small MatMul, each then quantized, cost
            # more dispatch than the int8 MatMul they replace), which no probe of one technique alone
            # shows. Each group of the verified plan is tried out, slowest-alone first, within
            # POLISH_BUILDS builds: the plan without it, verified, and timed against the plan in the same
            # rounds; it goes when the plan runs faster without it in every round (a sign test: p = 1/32
            # per group if it made no difference) and POLISH_GAIN x or less in the median round.
            tries = sorted({_group(e) for e in plan}, key=lambda k: (-(probe.get(k) or 0.0), k))
            dropped: set[tuple[str, str]] = set()
            for key in tries[:POLISH_BUILDS]:
                trial_plan = [e for e in plan if _group(e) != key]
                if not trial_plan:
                    continue
                trial = build(trial_plan, f"latency: without {key}")
                if not is_met(trial):
                    continue
                rel = timings.compare(plan, current[0], trial_plan, trial[0])
                if max(rel) < 1.0 and statistics.median(rel) <= POLISH_GAIN:
                    dropped |= {(e.technique, e.layer) for e in plan if _group(e) == key}
                    plan, current = trial_plan, trial
                    excluded[key] = (f"the verified plan ran {statistics.median(rel):.3f}x its latency without it "
                                     f"({sum(r < 1.0 for r in rel)} of {len(rel)} rounds faster)")
            if dropped:
                # The budget those groups held goes to the next changes by measured saving (not to them,
                # nor to any group the probe, the speed repair or the polish left out).
                remark(plan)
                dropped |= {(c.technique, c.layer) for c in cands if _group(c) in excluded}
                current = extend(current, sum(e.predicted_drop for e in plan), dropped,
                                 limit=len(steps) + POLISH_BUILDS)
                rounds = timings.plan(plan, current[0])
        measured_lat = statistics.median(rounds)
    if tgt.kind == "accuracy_drop":
        message = (f"verified drop {base_s - current[2]:.6g}" + (f" + margin {current[5]:.4g}" if current[5] else "")
                   + f" <= {tgt.value:g} with {len(plan)} change(s)"
                   if met else f"even cleanup alone drops the metric by {base_s - current[2]:.6g}")

    proto, pipe, score, size, lat, margin = current
    if lat is None and proto is not None:
        lat = measured_lat if measured_lat is not None else statistics.median(timings.plan(plan, proto))
    hold_base = hold_score = hold_drop = None
    if h_feeds:
        hold_base = scorer.baseline(ref_h, h_labels)
        hold_score = scorer.score(_run(proto, h_feeds), ref_h, h_labels)
        hold_drop = hold_base - hold_score
    res_stats = model_stats(proto, shapes or None)
    return SearchResult(
        target=tgt, metric=scorer.spec, plan=sorted(plan, key=lambda e: report.layers.index(e.layer)), met=met,
        message=message, model=proto, pipeline=pipe, steps=steps, baseline_score=base_s, search_score=score,
        search_drop=base_s - score, holdout_baseline=hold_base, holdout_score=hold_score, holdout_drop=hold_drop,
        search_samples=sum(s_counts[i] for i in order), fit_samples=sum(s_counts[i] for i in fit_pos),
        holdout_samples=sum(counts[i] for i in hold_idx),
        original=original_sizes, result={"params": res_stats.params, "macs": res_stats.macs, "bytes": res_stats.bytes,
                "macs_unresolved": len([u for u in res_stats.unresolved if u not in orig_stats.unresolved])},
        latency_ratio=lat, candidates=len(cands), probe=probe, excluded=excluded,
        group_drops=dict(joint), groups_taken=[k for k, members in groups_taken.items() if members <= _keys(plan)],
        objective=objective, analysis=report, fit_feeds=fit_feeds, source=label, fit_is_random=data.is_random,
        seconds=time.perf_counter() - start)
