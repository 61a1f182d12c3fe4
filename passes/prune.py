"""Pruning (issue 4): structured channel pruning over coupled-channel groups, with closed-form
reconstruction of the layers that read the pruned channels, and fine-grained (unstructured) pruning.

``prune-channels`` removes whole output channels of Conv/ConvTranspose/Gemm/MatMul layers, together with
every tensor and parameter tied to them (``passes/channel_groups.py`` finds the groups), so every op
that follows does less work on any runtime. With calibration data the layers that read the pruned
channels are refit by ridge least squares so that their outputs match the original model's (the
teacher), as in He et al. 2017 / ThiNet.

``prune-weights`` zeroes individual weights (magnitude, random or stability criteria; per-layer or
global; N:M patterns). onnxruntime has no sparse kernels on CPU: it saves file size (with
``sparse_storage``) or compressibility, never time.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_kit.errors import InputError
from onnxslim_kit.ir import Model
from onnxslim_kit.pass_base import Pass, PassContext, PassResult, Tolerance, require_nodes
from onnxslim_kit.registry import register_pass

from .channel_groups import Analysis, Group, Space, analyze, channel_values, kept_indices, resize_groups
from .reconstruct import LeastSquaresFit, as_rows, layer_rows, stream_activations

logger = logging.getLogger(__name__)


# -- importance strategies --------------------------------------------------------------------------
class Importance:
    """Scores every channel of every candidate group; higher means keep. ``needs_data``: reads
    calibration activations."""

    needs_data = False

    def __call__(self, model: Model, an: Analysis, groups: list[Group], ctx: PassContext) -> dict[int, np.ndarray]:
        raise NotImplementedError


def _position_vector(value: np.ndarray, axis: int, p: float) -> np.ndarray:
    other = tuple(i for i in range(value.ndim) if i != axis)
    return np.sum(np.abs(value.astype(np.float64)) ** p, axis=other)


class MagnitudeImportance(Importance):
    """l1 / l2 norm of every weight tied to the channel: the producers' output slices and the consumers'
    input slices, summed over all members of the group."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, model, an, groups, ctx):
        scores = {g.gid: np.zeros(g.channels) for g in groups}
        for s in an.slices:
            if s.role not in ("out", "in"):
                continue
            vec = _position_vector(model.constant_value(s.node.inputs[s.index]), s.axis, self.p)
            for gid in {g for g, _ in s.space.segments} & scores.keys():
                scores[gid] += channel_values(s.space, gid, vec)
        return {gid: v ** (1.0 / self.p) for gid, v in scores.items()}


class BatchNormImportance(Importance):
    """|gamma| of the BatchNormalization layers in the group (network slimming); l1 where there is none."""

    def __call__(self, model, an, groups, ctx):
        scores = {g.gid: np.zeros(g.channels) for g in groups}
        found: set[int] = set()
        for s in an.slices:
            if s.node.op == "BatchNormalization" and s.index == 1:
                vec = np.abs(model.constant_value(s.node.inputs[1]).astype(np.float64))
                for gid in {g for g, _ in s.space.segments} & scores.keys():
                    scores[gid] += channel_values(s.space, gid, vec)
                    found.add(gid)
        missing = [g for g in groups if g.gid not in found]
        if missing:
            scores.update(MagnitudeImportance(1)(model, an, missing, ctx))
        return scores


class RandomImportance(Importance):
    """Seeded random scores: the baseline every criterion must beat."""

    def __call__(self, model, an, groups, ctx):
        rng = np.random.default_rng(ctx.seed)
        return {g.gid: rng.random(g.channels) for g in groups}


class ActivationImportance(Importance):
    """Mean |activation| (``stat='mean'``) or its standard deviation across calibration samples and
    positions (``stat='std'``: low-variance channels carry little information) of the producers' outputs."""

    needs_data = True

    def __init__(self, stat: str):
        self.stat = stat

    def __call__(self, model, an, groups, ctx):
        wanted = {g.gid for g in groups}
        names = sorted({p.outputs[0].name for g in groups for p in g.producers})
        acc: dict[str, list] = {}
        for acts in stream_activations(model, names, ctx, "prune-channels: channel statistics"):
            for name, x in acts.items():
                rows = as_rows(x, an.spaces[name].axis)
                a = acc.setdefault(name, [0.0, 0.0, 0.0, 0])
                a[0] = a[0] + np.abs(rows).sum(0)
                a[1] = a[1] + rows.sum(0)
                a[2] = a[2] + (rows ** 2).sum(0)
                a[3] += rows.shape[0]
        scores = {gid: np.zeros(g.channels) for gid, g in ((g.gid, g) for g in groups)}
        for name, (abs_sum, s1, s2, n) in acc.items():
            if self.stat == "mean":
                vec = abs_sum / max(n, 1)
            else:
                vec = np.sqrt(np.maximum(s2 / max(n, 1) - (s1 / max(n, 1)) ** 2, 0.0))
            space = an.spaces[name]
            for gid in {g for g, _ in space.segments} & wanted:
                scores[gid] += channel_values(Space(space.axis, space.rank, space.segments, 1), gid, vec)
        return scores


class ReconstructionImportance(Importance):
    """ThiNet-style greedy selection: the channels whose removal adds the least to the next layers' output
    error, measured with the consumers' input second moments and weights (exact for Gemm/MatMul and
    1x1 Conv consumers; for kxk Conv the spatial cross terms between kernel taps are left out)."""

    needs_data = True

    def __call__(self, model, an, groups, ctx):
        wanted = {g.gid for g in groups}
        sinks = [(n, s) for n, s in an.sinks if {g for g, _ in s.segments} & wanted]
        names = sorted({n.inputs[0].name for n, _ in sinks})
        grams: dict[str, np.ndarray] = {}
        for acts in stream_activations(model, names, ctx, "prune-channels: consumer statistics"):
            for node, space in sinks:
                name = node.inputs[0].name
                rows = as_rows(acts[name], 1 if node.op in ("Conv", "ConvTranspose") else -1)
                grams[name] = grams.get(name, 0) + rows.T @ rows
        errors = {g.gid: np.zeros((g.channels, g.channels)) for g in groups}
        for node, space in sinks:
            w = model.constant_value(node.inputs[1]).astype(np.float64)
            in_axis = next(s.axis for s in an.slices if s.node is node and s.role == "in")
            wi = np.moveaxis(w, in_axis, 0).reshape(w.shape[in_axis], -1)
            e = grams[node.inputs[0].name] * (wi @ wi.T)
            n_ch = sum(n for _, n in space.segments)
            e = e.reshape(n_ch, space.block, n_ch, space.block).sum(axis=(1, 3))
            offsets, pos = [], 0
            for gid, n in space.segments:
                offsets.append((gid, np.arange(n) + pos))
                pos += n
            for ga, pa in offsets:
                for gb, pb in offsets:
                    if ga == gb and ga in wanted:
                        errors[ga] += e[np.ix_(pa, pb)]
        scores = {}
        for gid, e in errors.items():
            n = e.shape[0]
            order = np.empty(n, np.int64)
            removed = np.zeros(n, bool)
            running = np.zeros(n)
            for step in range(n):
                cost = np.where(removed, np.inf, np.diag(e) + 2.0 * running)
                c = int(np.argmin(cost))
                order[c] = step
                removed[c] = True
                running += e[:, c]
            scores[gid] = order.astype(np.float64)
        return scores


IMPORTANCE: dict[str, Importance] = {
    "l1": MagnitudeImportance(1), "l2": MagnitudeImportance(2), "bn": BatchNormImportance(),
    "random": RandomImportance(), "activation": ActivationImportance("mean"),
    "stability": ActivationImportance("std"), "reconstruction": ReconstructionImportance(),
}


# -- applying a pruning plan -----------------------------------------------------------------------
def apply_plan(model: Model, an: Analysis, kept: dict[int, np.ndarray]) -> None:
    """Slice every weight and parameter tied to the pruned groups and fix the attributes and shape
    constants that carry channel counts (channel_groups.resize_groups)."""
    resize_groups(model, an, kept, lambda space: kept_indices(space, kept), "pruned")


def _weight_matrix(node: gs.Node, w: np.ndarray) -> np.ndarray:
    """[input features, outputs] view of a layer's weight (the matrix its input rows multiply)."""
    if node.op == "Conv":
        return w.reshape(w.shape[0], -1).T
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return w.T
    return w


def _weight_from_matrix(node: gs.Node, mat: np.ndarray, like: np.ndarray) -> np.ndarray:
    if node.op == "Conv":
        return mat.T.reshape((mat.shape[1], -1) + like.shape[2:])
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return mat.T
    return mat


@register_pass
class PruneChannels(Pass):
    """Structured channel pruning over coupled-channel groups, with least-squares reconstruction.

    Options:
        ratio: fraction of each group's channels to remove (before rounding to ``multiple``)
        target_macs: instead of ratio: prune until the model's MACs are at most this fraction of the
            original (searches the ratio)
        criterion: channel importance: l1, l2 (weight magnitude over the whole group), bn (BatchNorm
            |gamma|), random (seeded baseline), activation (mean |activation|), stability (activation
            std across calibration samples), reconstruction (ThiNet-style greedy on the next layers'
            output error)
        scope: local (every group loses the same fraction) or global (importance normalised per group,
            then ranked across groups)
        reconstruct: refit the layers that read pruned channels by ridge least squares against the
            original model's outputs (auto: when real calibration data is given)
        multiple: round every kept channel count up to a multiple of this (default: the channel block of
            onnxruntime's CPU convolutions here, 16 with AVX-512, else 8: partial blocks save no time)
        protect: names of layers whose output channels are never pruned, '+'-separated
        layer_ratios: per-layer ratios NAME=RATIO, '+'-separated (scope=local; a joined group takes the
            smallest ratio of its layers); other layers use ``ratio``
        damping: relative ridge damping of the reconstruction (default: chosen per layer by 2-fold
            cross-validation over the calibration batches; a layer whose refit does not generalise is kept)
        min_cosine: parity bound this pass promises on the final outputs
        include: only groups whose producing layers include one of these node names are pruned,
            '+'-separated (unknown names are refused)
    """

    name = "prune-channels"
    MAX_ROWS = 512         # rows (positions) per calibration batch used by the reconstruction
    summary = "structured channel pruning over coupled-channel groups, with least-squares reconstruction"
    tolerance = Tolerance(min_cosine=0.9)

    def __init__(self, *, ratio: float = 0.3, target_macs: float | None = None,
                 criterion: Literal["l1", "l2", "bn", "random", "activation", "stability", "reconstruction"] = "l1",
                 scope: Literal["local", "global"] = "local",
                 reconstruct: Literal["auto", "true", "false"] = "auto", multiple: int | None = None,
                 protect: list[str] | None = None, layer_ratios: list[str] | None = None,
                 damping: float | None = None, min_cosine: float = 0.9, include: list[str] | None = None):
        if not 0.0 <= ratio < 1.0:
            raise ValueError("ratio must be in [0, 1)")
        if target_macs is not None and not 0.0 < target_macs <= 1.0:
            raise ValueError("target_macs must be in (0, 1]")
        if criterion not in IMPORTANCE:
            raise ValueError(f"criterion must be one of {', '.join(IMPORTANCE)}")
        if scope not in ("local", "global"):
            raise ValueError("scope must be local or global")
        if reconstruct not in ("auto", "true", "false"):
            raise ValueError("reconstruct must be auto, true or false")
        if multiple is not None and multiple < 1:
            raise ValueError("multiple must be >= 1")
        from onnxslim_kit.runtime import channel_block

        self._block = multiple or channel_block()
        self.ratio, self.target_macs, self.criterion, self.scope = ratio, target_macs, criterion, scope
        self.reconstruct, self.multiple = reconstruct, multiple
        self.protect = list(protect) if protect else []
        self.include = list(include) if include else None
        self.layer_ratios = list(layer_ratios) if layer_ratios else []
        self._per_layer: dict[str, float] = {}
        for item in self.layer_ratios:
            name, sep, value = item.rpartition("=")
            try:
                r = float(value)
            except ValueError:
                r = -1.0
            if not sep or not name or not 0.0 <= r < 1.0:
                raise ValueError(f"layer_ratios: expected NAME=RATIO with 0 <= RATIO < 1, got {item!r}")
            self._per_layer[name] = r
        self.damping, self.min_cosine = damping, min_cosine
        self.tolerance = Tolerance(min_cosine=min_cosine)

    # -- planning ----------------------------------------------------------------------------------
    def _candidates(self, an: Analysis, skipped: list | None) -> list[Group]:
        out = []
        for g in an.groups.values():
            if not g.producers:
                continue
            if g.reasons:
                reason = g.reasons[0] + (f" (and {len(g.reasons) - 1} more)" if len(g.reasons) > 1 else "")
            elif any(p.name in self.protect for p in g.producers):
                reason = "protected by option"
            elif self.include is not None and not any(p.name in self.include for p in g.producers):
                reason = "not in include"
            elif g.channels <= self._block:
                reason = f"has {g.channels} channels, not more than multiple={self._block}"
            else:
                out.append(g)
                continue
            if skipped is not None:
                skipped.append((g.label, reason))
        return out

    def _keep_count(self, channels: int, remove: float) -> int:
        keep = math.ceil(max(channels - remove, 1) / self._block) * self._block
        return int(min(max(keep, 1), channels))

    def _allocate(self, groups: list[Group], scores: dict[int, np.ndarray], ratio: float) -> dict[int, np.ndarray]:
        counts: dict[int, int] = {}
        if self.scope == "local":
            for g in groups:
                own = [self._per_layer[p.name] for p in g.producers if p.name in self._per_layer]
                counts[g.gid] = self._keep_count(g.channels, g.channels * (min(own) if own else ratio))
        else:
            pool = []
            for g in groups:
                s = scores[g.gid]
                norm = s / (float(np.mean(np.abs(s))) or 1.0)
                pool.extend((float(v), g.gid) for v in norm)
            pool.sort()
            removed = {g.gid: 0 for g in groups}
            for _, gid in pool[:int(round(ratio * len(pool)))]:
                removed[gid] += 1
            for g in groups:
                counts[g.gid] = self._keep_count(g.channels, removed[g.gid])
        kept = {}
        for g in groups:
            n = counts[g.gid]
            if n < g.channels:
                order = np.argsort(-scores[g.gid], kind="stable")
                kept[g.gid] = np.sort(order[:n])
        return kept

    def _macs(self, model: Model, ctx: PassContext) -> int:
        from onnxslim_kit.metrics import model_stats

        return model_stats(model.to_proto(value_info="drop"), ctx.input_shapes or None, observe=False).macs

    def _search_ratio(self, model: Model, groups, scores, ctx: PassContext) -> float:
        """Smallest ratio whose pruned model has at most target_macs of the MACs (bisection)."""
        base = self._macs(model, ctx)
        goal = self.target_macs * base

        def macs_at(ratio: float) -> int:
            trial = model.copy()
            an = analyze(trial)
            apply_plan(trial, an, self._allocate(self._candidates(an, None), scores, ratio))
            return self._macs(trial, ctx)

        lo, hi = 0.0, 0.95
        if macs_at(hi) > goal:
            return hi
        for _ in range(10):
            mid = (lo + hi) / 2
            if macs_at(mid) <= goal:
                hi = mid
            else:
                lo = mid
        return hi

    # -- run ---------------------------------------------------------------------------------------
    def requires(self, model: Model, ctx: PassContext) -> None:
        require_nodes(model, self.include)

    def reads_calibration(self) -> bool:
        return IMPORTANCE[self.criterion].needs_data or self.reconstruct != "false"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        skipped: list[tuple[str, str]] = []
        warnings: list[str] = []
        model.toposort()
        for node in model.nodes:
            if not node.name:
                node.name = model.unique_name(node.op.lower())
        has_data = ctx.calibration is not None
        strategy = IMPORTANCE[self.criterion]
        if strategy.needs_data and not has_data:
            raise InputError(f"criterion={self.criterion} needs calibration data (--calib)")
        if self.reconstruct == "true" and not has_data:
            raise InputError("reconstruct=true needs calibration data (--calib)")
        reconstruct = self.reconstruct == "true" or (self.reconstruct == "auto" and has_data
                                                       and not ctx.calibration_is_random)
        if strategy.needs_data and ctx.calibration_is_random:
            warnings.append(f"prune-channels: criterion={self.criterion} ranks channels on seeded random data; "
                            f"pass --calib")
        teacher = model.copy() if reconstruct else None
        an = analyze(model)
        groups = self._candidates(an, skipped)
        stats: dict[str, float] = {"groups": len([g for g in an.groups.values() if g.producers]),
                                   "groups_prunable": len(groups), "groups_pruned": 0,
                                   "channels_before": sum(g.channels for g in groups), "channels_removed": 0,
                                   "reconstructed_layers": 0}
        if not groups:
            return PassResult(model, False, stats, skipped, warnings)
        scores = strategy(model, an, groups, ctx)
        ratio = self.ratio
        if self.target_macs is not None:
            ratio = self._search_ratio(model, groups, scores, ctx)
            stats["ratio_searched"] = round(ratio, 4)
        kept = self._allocate(groups, scores, ratio)
        if not kept:
            for g in groups:
                skipped.append((g.label, f"ratio {ratio:g} removes no channel after rounding to multiple="
                                         f"{self._block}"))
            return PassResult(model, False, stats, skipped, warnings)
        apply_plan(model, an, kept)
        stats["groups_pruned"] = len(kept)
        stats["channels_removed"] = sum(an.groups[gid].channels - len(idx) for gid, idx in kept.items())
        if reconstruct:
            stats["reconstructed_layers"] = self._reconstruct(model, teacher, an, kept, ctx, skipped)
        return PassResult(model, True, stats, skipped, warnings)

    # -- reconstruction ------------------------------------------------------------------------------
    def _reconstruct(self, model: Model, teacher: Model, an: Analysis, kept: dict[int, np.ndarray],
                     ctx: PassContext, skipped: list) -> int:
        """Refit, in topological order, every layer that reads pruned channels so that its outputs on the
        pruned model's inputs match the original model's outputs (ridge least squares, bias included)."""
        original = {n.name: n for n in teacher.nodes}
        out_space = {id(s.node): s.space for s in an.slices if s.role == "out"}
        done = 0
        for node, space in ctx.track([(n, s) for n, s in an.sinks if {g for g, _ in s.segments} & kept.keys()],
                                     "prune-channels: reconstruction"):
            label = node.name
            ref = original.get(node.name)
            if node.op == "Gemm" and (float(node.attrs.get("alpha", 1.0)) != 1.0
                                      or float(node.attrs.get("beta", 1.0)) != 1.0):
                skipped.append((label, "not reconstructed: Gemm with alpha/beta != 1"))
                continue
            if node.op not in ("Conv", "Gemm", "MatMul"):
                skipped.append((label, f"not reconstructed: {node.op} is not refit"))
                continue
            w_ref = teacher.constant_value(ref.inputs[1]).astype(np.float64)
            target = _weight_matrix(ref, w_ref)
            own = out_space.get(id(node))
            cols = kept_indices(own, kept) if own is not None else np.arange(target.shape[1])
            target = target[:, cols]
            bias_ref = teacher.constant_value(ref.inputs[2]) if len(ref.inputs) > 2 and ref.inputs[2].name else None
            with_bias = node.op != "MatMul"
            name = node.inputs[0].name
            w_now = model.constant_value(node.inputs[1])
            fit = LeastSquaresFit()
            ok = True
            rng = np.random.default_rng(ctx.seed)
            student = stream_activations(model, [name], ctx, None)
            for x_new, x_ref in zip(student, stream_activations(teacher, [name], ctx, None)):
                rows_new = layer_rows(x_new[name], node, w_now.shape)
                rows_ref = layer_rows(x_ref[name], ref, w_ref.shape)
                if rows_new is None or rows_ref is None:
                    ok = False
                    break
                if rows_new.shape[0] > self.MAX_ROWS:  # conv positions: a seeded sample is enough
                    pick = np.sort(rng.choice(rows_new.shape[0], self.MAX_ROWS, replace=False))
                    rows_new, rows_ref = rows_new[pick], rows_ref[pick]
                rows_new, rows_ref = rows_new.astype(np.float64), rows_ref.astype(np.float64)
                y = rows_ref @ target
                if bias_ref is not None:
                    y += bias_ref.astype(np.float64)[cols]
                if with_bias:
                    rows_new = np.hstack([rows_new, np.ones((rows_new.shape[0], 1))])
                fit.add(rows_new, y)
            if not ok or fit.batches == 0:
                skipped.append((label, "not reconstructed: " + (
                    "input layout not supported (SAME padding or not 2-D)" if not ok else "no calibration batches")))
                continue
            prior = _weight_matrix(node, w_now.astype(np.float64))
            if with_bias:
                b_now = model.constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
                prior = np.vstack([prior, np.zeros((1, prior.shape[1])) if b_now is None
                                   else b_now.astype(np.float64)[None, :]])
            sol, used = fit.solve(prior, self.damping)
            if sol is None:
                skipped.append((label, "not reconstructed: on held-out calibration batches the refit was worse "
                                       "than the pruned weights (cross-validation)"))
                continue
            mat, bias = (sol[:-1], sol[-1]) if with_bias else (sol, None)
            new_w = _weight_from_matrix(node, mat, w_now).astype(np.float32)
            node.inputs[1] = gs.Constant(model.unique_name(label + "_refit_w"), np.ascontiguousarray(new_w))
            if bias is not None:
                b = gs.Constant(model.unique_name(label + "_refit_b"), bias.astype(np.float32))
                if len(node.inputs) > 2:
                    node.inputs[2] = b
                else:
                    node.inputs.append(b)
            model.invalidate()
            done += 1
        return done


def _parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    if not pattern:
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern must be N:M such as 2:4, got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern}: need 0 < N < M")
    return n, m


def _input_axis(node: gs.Node) -> int:
    """Axis of a layer's weight that runs over its input features."""
    if node.op == "Conv":
        return 1
    if node.op == "ConvTranspose":
        return 0
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return 1
    return 0


@register_pass
class PruneWeights(Pass):
    """Fine-grained (unstructured) pruning: zero individual weights of Conv/ConvTranspose/MatMul/Gemm.

    onnxruntime has no sparse kernels on CPU: this saves file size (``sparse_storage``, or better
    compression of the zeros), never time. Use ``prune-channels`` for speed.

    Options:
        sparsity: fraction of each weight (scope=layer) or of all candidate weights (scope=global) zeroed
        criterion: magnitude (|w|), random (seeded baseline) or stability (|w| times the standard deviation
            of the input feature it multiplies over the calibration data; the removed weights' mean
            contribution is folded into the bias)
        scope: layer (every weight to the same sparsity) or global (one threshold over all candidates)
        pattern: N:M structured sparsity along the input features (e.g. 2:4: 2 of every 4 kept); overrides
            sparsity
        sparse_storage: store pruned weights as ONNX sparse tensors (Constant sparse_value) where that is
            smaller than dense (only above ~2/3 sparsity: indices are int64)
        op_types: layer types to prune, '+'-separated (Conv+ConvTranspose+MatMul+Gemm)
        exclude: node names left alone, '+'-separated
        min_elements: skip weights with fewer elements
        min_cosine: parity bound this pass promises on the final outputs
    """

    name = "prune-weights"
    summary = "fine-grained weight pruning (magnitude/random/stability, N:M); saves size, not time"
    tolerance = Tolerance(min_cosine=0.95)
    OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")

    def __init__(self, *, sparsity: float = 0.5, criterion: Literal["magnitude", "random", "stability"] = "magnitude",
                 scope: Literal["layer", "global"] = "layer", pattern: str | None = None,
                 sparse_storage: bool = False, op_types: list[str] | None = None, exclude: list[str] | None = None,
                 min_elements: int = 1024, min_cosine: float = 0.95):
        if not 0.0 <= sparsity < 1.0:
            raise ValueError("sparsity must be in [0, 1)")
        if criterion not in ("magnitude", "random", "stability"):
            raise ValueError("criterion must be magnitude, random or stability")
        if scope not in ("layer", "global"):
            raise ValueError("scope must be layer or global")
        self.nm = _parse_pattern(pattern)
        self.sparsity, self.criterion, self.scope, self.pattern = sparsity, criterion, scope, pattern
        self.sparse_storage = sparse_storage
        self.op_types = list(op_types) if op_types else list(self.OPS)
        unknown = set(self.op_types) - set(self.OPS)
        if unknown:
            raise ValueError(f"op_types: unsupported {', '.join(sorted(unknown))} ({'+'.join(self.OPS)})")
        self.exclude = list(exclude) if exclude else []
        self.min_elements, self.min_cosine = min_elements, min_cosine
        self.tolerance = Tolerance(min_cosine=min_cosine)

    def _candidates(self, model: Model, skipped: list) -> dict[str, list[gs.Node]]:
        """weight tensor name -> the candidate nodes using it (shared weights are pruned once)."""
        out: dict[str, list[gs.Node]] = {}
        for node in model.nodes:
            if node.op not in self.op_types or len(node.inputs) < 2:
                continue
            label = node.name or node.op
            w = model.constant_value(node.inputs[1])
            if w is None:
                continue  # activation x activation (attention scores): no weight to prune
            if node.name in self.exclude:
                skipped.append((label, "excluded by option"))
            elif w.dtype != np.float32:
                skipped.append((label, f"weight is {w.dtype}, not float32"))
            elif node.op == "Gemm" and node.attrs.get("transA", 0):
                skipped.append((label, "Gemm with transA"))
            elif w.size < self.min_elements:
                skipped.append((label, f"weight has {w.size} elements < min_elements={self.min_elements}"))
            elif node.op in ("Conv", "ConvTranspose") and int(node.attrs.get("group", 1)) != 1 and \
                    self.criterion == "stability":
                skipped.append((label, "grouped convolution: stability statistics are per input channel"))
            else:
                out.setdefault(node.inputs[1].name, []).append(node)
        return out

    def _input_stats(self, model: Model, cands: dict[str, list[gs.Node]], ctx: PassContext):
        """Per input feature (mean, std) of every candidate's input, streamed."""
        first = {name: nodes[0] for name, nodes in cands.items()}
        names = sorted({n.inputs[0].name for n in first.values()})
        axis_of = {n.inputs[0].name: (1 if n.op in ("Conv", "ConvTranspose") else -1) for n in first.values()}
        acc: dict[str, list] = {}
        for acts in stream_activations(model, names, ctx, "prune-weights: input statistics"):
            for name, x in acts.items():
                rows = as_rows(x, axis_of[name])
                a = acc.setdefault(name, [0.0, 0.0, 0])
                a[0], a[1], a[2] = a[0] + rows.sum(0), a[1] + (rows ** 2).sum(0), a[2] + rows.shape[0]
        stats = {}
        for name, (s1, s2, n) in acc.items():
            mean = s1 / max(n, 1)
            stats[name] = (mean, np.sqrt(np.maximum(s2 / max(n, 1) - mean ** 2, 0.0)))
        return stats

    def _importance(self, w: np.ndarray, node: gs.Node, stats, rng) -> np.ndarray:
        if self.criterion == "random":
            return rng.random(w.shape)
        imp = np.abs(w.astype(np.float64))
        if self.criterion == "stability":
            axis = _input_axis(node)
            std = stats[node.inputs[0].name][1]
            shape = [1] * w.ndim
            shape[axis] = -1
            imp = imp * std.reshape(shape)
        return imp

    def _mask(self, imp: np.ndarray, node: gs.Node, threshold: float | None) -> np.ndarray | None:
        if self.nm is not None:
            n, m = self.nm
            rows = np.moveaxis(imp, _input_axis(node), -1)
            if rows.shape[-1] % m:
                return None
            groups = rows.reshape(rows.shape[:-1] + (rows.shape[-1] // m, m))
            order = np.argsort(-groups, axis=-1, kind="stable")
            keep = np.zeros(groups.shape, bool)
            np.put_along_axis(keep, order[..., :n], True, axis=-1)
            return np.moveaxis(keep.reshape(rows.shape), -1, _input_axis(node))
        if threshold is not None:
            return imp > threshold
        k = int(self.sparsity * imp.size)
        keep = np.ones(imp.size, bool)
        keep[np.argsort(imp.reshape(-1), kind="stable")[:k]] = False
        return keep.reshape(imp.shape)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        skipped: list[tuple[str, str]] = []
        warnings = ["prune-weights: onnxruntime has no sparse kernels on CPU; zeroed weights save file size "
                    "(sparse_storage, or compression), not time"]
        if self.criterion == "stability":
            if ctx.calibration is None:
                raise InputError("criterion=stability needs calibration data (--calib)")
            if ctx.calibration_is_random:
                warnings.append("prune-weights: stability statistics come from seeded random data; pass --calib")
        cands = self._candidates(model, skipped)
        stats = {"layers_pruned": 0, "weights_zeroed": 0, "weights_total": 0, "sparse_tensors": 0}
        if not cands:
            return PassResult(model, False, stats, skipped, warnings)
        input_stats = self._input_stats(model, cands, ctx) if self.criterion == "stability" else {}
        rng = np.random.default_rng(ctx.seed)
        imps = {name: self._importance(model.constant_value(nodes[0].inputs[1]), nodes[0], input_stats, rng)
                for name, nodes in cands.items()}
        threshold = None
        if self.scope == "global" and self.nm is None:
            flat = np.concatenate([v.reshape(-1) for v in imps.values()])
            k = int(self.sparsity * flat.size)
            threshold = float(np.partition(flat, k - 1)[k - 1]) if k > 0 else -np.inf
        for name, nodes in cands.items():
            node = nodes[0]
            label = node.name or node.op
            w = model.constant_value(node.inputs[1])
            mask = self._mask(imps[name], node, threshold)
            if mask is None:
                skipped.append((label, f"input features not a multiple of M in pattern {self.pattern}"))
                continue
            new = np.where(mask, w, np.float32(0)).astype(np.float32)
            zeroed = int(np.count_nonzero(w) - np.count_nonzero(new))
            if zeroed == 0:
                skipped.append((label, "nothing below the threshold"))
                continue
            if self.criterion == "stability":
                self._compensate_bias(model, nodes, w - new, input_stats, skipped)
            stats["weights_zeroed"] += zeroed
            stats["weights_total"] += int(w.size)
            stats["layers_pruned"] += 1
            tensor = self._store(model, label, new, skipped)
            stats["sparse_tensors"] += int(isinstance(tensor, gs.Variable))
            for n in nodes:
                n.inputs[1] = tensor
        stats["sparsity"] = round(stats["weights_zeroed"] / max(stats["weights_total"], 1), 4)
        model.invalidate()
        return PassResult(model, stats["layers_pruned"] > 0, stats, skipped, warnings)

    def _store(self, model: Model, label: str, new: np.ndarray, skipped: list) -> gs.Tensor:
        if self.sparse_storage:
            idx = np.flatnonzero(new)
            if idx.size * 12 < new.size * 4:
                from onnx import helper, numpy_helper

                name = model.unique_name(label + "_sparse_w")
                sparse = helper.make_sparse_tensor(numpy_helper.from_array(new.reshape(-1)[idx], name),
                                                   numpy_helper.from_array(idx.astype(np.int64), name + "_indices"),
                                                   list(new.shape))
                out = gs.Variable(name, dtype=np.float32, shape=list(new.shape))
                model.graph.nodes.append(gs.Node("Constant", model.unique_name(label + "_sparse"),
                                                 attrs={"sparse_value": sparse}, outputs=[out]))
                return out
            skipped.append((label, f"stored dense: at {1 - idx.size / new.size:.0%} sparsity a sparse tensor "
                                   f"(int64 indices) would be larger"))
        return gs.Constant(model.unique_name(label + "_pruned_w"), new)

    @staticmethod
    def _compensate_bias(model: Model, nodes: list[gs.Node], removed: np.ndarray, stats, skipped: list) -> None:
        """Fold the removed weights' mean contribution (weight x input mean) into the bias."""
        node = nodes[0]
        label = node.name or node.op
        if len(nodes) > 1:
            skipped.append((label, "shared weight: removed weights' mean contribution not folded into a bias"))
            return
        mean = stats[node.inputs[0].name][0]
        if node.op == "Conv":
            delta = removed.astype(np.float64).reshape(removed.shape[0], removed.shape[1], -1).sum(-1) @ mean
        elif node.op == "Gemm":
            delta = (removed.T if node.attrs.get("transB", 0) else removed).astype(np.float64).T @ mean
        elif node.op == "MatMul" and removed.ndim == 2:
            delta = removed.astype(np.float64).T @ mean
        else:
            skipped.append((label, f"{node.op}: removed weights' mean contribution not folded into a bias"))
            return
        if node.op in ("Conv", "Gemm"):
            old = model.constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
            if len(node.inputs) > 2 and node.inputs[2].name and old is None:
                skipped.append((label, "bias is not constant: mean contribution not folded"))
                return
            if node.op == "Gemm" and old is not None and old.shape != delta.shape:
                skipped.append((label, "Gemm bias is broadcast: mean contribution not folded"))
                return
            bias = (delta if old is None else old.astype(np.float64) + delta).astype(np.float32)
            b = gs.Constant(model.unique_name(label + "_bias"), bias)
            if len(node.inputs) > 2:
                node.inputs[2] = b
            else:
                node.inputs.append(b)
            return
        out = node.outputs[0]
        consumers = list(out.outputs)
        add = consumers[0] if len(consumers) == 1 and consumers[0].op == "Add" else None
        if add is not None:
            other = next((i for i, t in enumerate(add.inputs) if t is not out), None)
            old = model.constant_value(add.inputs[other]) if other is not None else None
            if old is not None and old.shape == delta.shape and old.dtype == np.float32:
                add.inputs[other] = gs.Constant(model.unique_name(label + "_bias"),
                                                (old.astype(np.float64) + delta).astype(np.float32))
                return
        skipped.append((label, "MatMul without a following constant bias Add: mean contribution not folded"))
