"""Low-rank factorization (issue 5): ``svd`` replaces a constant weight of a MatMul, Gemm or Conv by two
smaller factors when that saves MACs.

Every candidate is seen as a matrix W [K, N] acting on rows of its input (outputs = rows(X) @ W):

- MatMul X @ W (any batch dims), MatMul W @ X (constant on the left: rows are X's second-to-last axis),
  Gemm with any transA/transB/alpha/beta (alpha folded into the second factor, bias and beta kept on it);
- Conv 1x1 (group 1): W [M, C, 1, 1] as [C, M]; the first factor is a 1x1 Conv with r outputs that
  carries the strides/pads, the second a 1x1 Conv with the bias;
- Conv kxk (group 1, channel SVD): W [M, C, k, k] as [C*k*k, M]; the first factor is a kxk Conv with r
  outputs and the original strides/pads/dilations, the second a 1x1 Conv with the bias.

Factors are stored in the layout their op reads (MatMul [K, r] @ [r, N], Conv OIHW), so no Transpose
runs at inference time. Plain SVD minimises the weight error ||W - AB||. With calibration data
(``whiten=true``, the default when real data is given) the truncation is done in the whitened space of
the layer's input (SVD-LLM-style): with G = X^T X = L L^T, take the SVD of L^T W, so the kept rank
minimises the output error ||XW - XAB|| instead (for a kxk Conv, X is the im2col patch matrix, used
while C*k*k <= 1024). With ``energy`` / ``rank_ratio``, the Gram matrix that whitens is shrunk toward
a multiple of the identity (Ledoit-Wolf, :func:`shrink_gram`): few rows for many features (a pooler
reads one vector per sample) otherwise leave directions the calibration data missed with no weight, and
the truncation drops them; ``max_error`` / ``budget`` bound the error on the calibration data itself
and use its Gram matrix as is. ``refit=true`` then re-solves B by least squares against the original layer's
outputs (the original model is the teacher), using the same streamed Gram matrix.

Rank choice (first that is given): ``budget`` (global fraction of the candidates' weight parameters,
spread greedily by the smallest output-error increase per parameter saved), ``max_error`` (smallest
rank whose relative output error ||X(W - AB)||_F / ||XW||_F on the calibration data is within the bound,
computed from the Gram matrix), ``energy``, ``rank_ratio``. Ranks are rounded up to ``multiple``; a
factorization that does not save ``min_saving`` of the layer's MACs is never applied.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_kit.errors import InputError
from onnxslim_kit.ir import Model, release_pages
from onnxslim_kit.pass_base import Pass, PassContext, PassResult, Tolerance, require_nodes
from onnxslim_kit.registry import register_pass

from .reconstruct import as_rows, gram_cholesky, ridge_solve, stream_activations

logger = logging.getLogger(__name__)

IM2COL_MAX_FEATURES = 1024  # whiten a kxk Conv only while its patch Gram matrix stays this small


def factorize(weight: np.ndarray, rank: int, *, chol: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] ~= A [K, r] @ B [r, N]; whitened by the input's Cholesky factor when given."""
    w = weight.astype(np.float64)
    if chol is None:
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        a = u[:, :rank] * s[:rank]
        return a, vt[:rank]
    u, s, vt = np.linalg.svd(chol.T @ w, full_matrices=False)
    a = np.linalg.solve(chol.T, u[:, :rank] * s[:rank])
    return a, vt[:rank]


def shrink_gram(gram: np.ndarray, rows: int, fourth: float) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf shrinkage of the second moment S = G / n toward mu I (mu = tr S / K), from the
    streamed sums G = sum x x^T and sum ||x||^4 over the n rows: intensity min(1, b2 / d2) with
    d2 = ||S - mu I||_F^2 and b2 = (sum ||x||^4 / n - ||S||_F^2) / n. Few rows for many features (the 8
    CLS vectors a pooler reads: 128 features) give a Gram matrix with no energy where the calibration
    data did not go, and a whitened truncation that drops those directions fails on the next input
    (cosine 0.81 on held-out samples at every energy); the estimate says how far to trust it.
    Returns (n * shrunk S, intensity)."""
    n = max(int(rows), 1)
    g = np.asarray(gram, dtype=np.float64)
    s = g / n
    k = s.shape[0]
    mu = float(np.trace(s)) / k
    d2 = float(np.sum((s - mu * np.eye(k)) ** 2))
    b2 = max(0.0, (fourth / n - float(np.sum(s * s))) / n)
    delta = 1.0 if d2 <= 0.0 else min(1.0, b2 / d2)
    return n * ((1.0 - delta) * s + delta * mu * np.eye(k)), delta


def refit_second_factor(a: np.ndarray, weight: np.ndarray, gram: np.ndarray, damping: float) -> np.ndarray:
    """B = argmin ||X A B - X W||: (A^T G A) B = A^T G W (ridge-damped normal equations)."""
    ga = gram @ a
    return ridge_solve(a.T @ ga, ga.T @ weight.astype(np.float64), damping)


def singular_values(weight: np.ndarray, chol: np.ndarray | None) -> np.ndarray:
    w = weight.astype(np.float64)
    return np.linalg.svd(w if chol is None else chol.T @ w, compute_uv=False)


def error_profile(weight: np.ndarray, gram: np.ndarray | None, chol: np.ndarray | None
                  ) -> tuple[np.ndarray, float]:
    """(q, total) with ||X(W - A_r B_r)||_F^2 <= sum(q[r:]) and total = ||XW||_F^2, for the factorization
    :func:`factorize` makes with the same ``chol``; without a Gram matrix, the weight error ||W - A_r B_r||.

    Whitened: q = the whitened singular values squared (exact for the damped Gram, an upper bound for
    the plain one). Plain SVD W = U S V^T: the residual U_{>r} S_{>r} V_{>r}^T has output error
    sum_{i>r} s_i^2 u_i^T G u_i (V's rows are orthonormal)."""
    w = weight.astype(np.float64)
    if gram is None:
        s = np.linalg.svd(w, compute_uv=False)
        return s ** 2, float(np.sum(s ** 2))
    total = float(np.einsum("kn,kl,ln->", w, gram, w))
    if chol is not None:
        return singular_values(w, chol) ** 2, total
    u, s, _ = np.linalg.svd(w, full_matrices=False)
    return s ** 2 * np.einsum("ki,kl,li->i", u, gram, u), total


# -- how a candidate's input becomes the rows X of X @ W ------------------------------------------

def _conv_rows(x: np.ndarray, view: tuple) -> np.ndarray:
    kind = view[0]
    if kind == "axis":
        return as_rows(x[:, None] if np.ndim(x) == 1 and view[1] == -2 else x, view[1])
    if kind == "conv1x1":  # only the pixels the strided 1x1 Conv reads (padding adds zero rows only)
        _, strides, pads = view
        index = (slice(None), slice(None)) + tuple(slice((-p) % s, None, s) for s, p in zip(strides, pads))
        return as_rows(x[index], 1)
    _, kernel, strides, pads, dilations = view  # im2col, 2-D: rows ordered like W.reshape(M, C*kh*kw)
    nd = len(kernel)
    x = np.pad(np.asarray(x, np.float64), [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    span = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations))
    win = np.lib.stride_tricks.sliding_window_view(x, span, axis=(2, 3))  # [N, C, H', W', span_h, span_w]
    win = win[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]
    return np.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5)).reshape(-1, x.shape[1] * kernel[0] * kernel[1])


@dataclass
class _Candidate:
    node: gs.Node
    label: str
    kind: str                 # matmul, matmul_left, gemm, conv
    weight: np.ndarray        # [K, N] (alpha folded in for Gemm)
    x: gs.Tensor              # the activation input
    view: tuple | None        # how x becomes rows; None: no Gram matrix for this candidate (plain only)
    note: str = ""
    rank: int = 0
    gram: np.ndarray | None = field(default=None, repr=False)
    shrunk: np.ndarray | None = field(default=None, repr=False)   # shrink_gram(gram): what whitens

    @property
    def key(self):
        return (self.x.name, self.view)


@register_pass
class LowRankSVD(Pass):
    """Factor MatMul/Gemm/Conv weights into two smaller ones, plain or activation-aware (whitened).

    Options:
        rank_ratio: keep this fraction of the full rank (when no other rank option is given)
        energy: keep the fewest singular values whose squared sum reaches this fraction
        max_error: smallest rank whose relative output error on the calibration data is within this
        budget: keep this fraction of the candidates' weight parameters, ranks spread by sensitivity
        rank_by: spectrum that energy/rank_ratio read: weights, outputs (whitened), or auto (the one
            the factorization uses)
        whiten: whiten by the layer input's second moment from calibration data (auto: when real
            calibration data is given)
        refit: re-solve the second factor by least squares against the original layer's outputs
        multiple: round the rank up to a multiple of this (SIMD-friendly shapes)
        min_size: skip weights with fewer elements
        min_saving: apply only when the factors save at least this fraction of the layer's MACs
        exclude: node names to leave alone, '+'-separated
        damping: relative ridge damping of the Gram matrix
        include: only these node names are factored, '+'-separated (unknown names are refused)
        min_cosine: parity bound this pass promises on the final outputs
    """

    name = "svd"
    summary = "low-rank factorization of MatMul/Gemm/Conv weights (plain or activation-aware SVD; error/budget ranks)"
    tolerance = Tolerance(min_cosine=0.95)

    def __init__(self, *, rank_ratio: float = 0.5, energy: float | None = None, max_error: float | None = None,
                 budget: float | None = None, rank_by: Literal["auto", "weights", "outputs"] = "auto",
                 whiten: Literal["auto", "true", "false"] = "auto",
                 refit: bool = False, multiple: int = 8, min_size: int = 4096, min_saving: float = 0.25,
                 exclude: list[str] | None = None, damping: float = 1e-4, min_cosine: float = 0.95,
                 include: list[str] | None = None):
        if not 0.0 < rank_ratio <= 1.0:
            raise ValueError("rank_ratio must be in (0, 1]")
        if energy is not None and not 0.0 < energy <= 1.0:
            raise ValueError("energy must be in (0, 1]")
        if max_error is not None and not 0.0 < max_error < 1.0:
            raise ValueError("max_error must be in (0, 1)")
        if budget is not None and not 0.0 < budget < 1.0:
            raise ValueError("budget must be in (0, 1)")
        if rank_by not in ("auto", "weights", "outputs"):
            raise ValueError("rank_by must be auto, weights or outputs")
        if whiten not in ("auto", "true", "false"):
            raise ValueError("whiten must be auto, true or false")
        if multiple < 1:
            raise ValueError("multiple must be >= 1")
        if not 0.0 <= min_saving < 1.0:
            raise ValueError("min_saving must be in [0, 1)")
        self.rank_ratio, self.energy, self.max_error, self.budget = rank_ratio, energy, max_error, budget
        self.rank_by, self.whiten, self.refit = rank_by, whiten, refit
        self.multiple, self.min_size, self.min_saving = multiple, min_size, min_saving
        self.exclude = list(exclude) if exclude else []
        self.include = list(include) if include else None
        self.damping, self.min_cosine = damping, min_cosine
        self.tolerance = Tolerance(min_cosine=min_cosine)

    # -- rank choice --------------------------------------------------------------------------------
    def _round(self, r: int, full: int) -> int:
        r = -(-r // self.multiple) * self.multiple
        return max(1, min(r, full))

    def _rank(self, sv: np.ndarray, k: int, n: int) -> int:
        full = min(k, n)
        if self.energy is not None:
            cum = np.cumsum(sv ** 2) / max(float(np.sum(sv ** 2)), 1e-30)
            r = int(np.searchsorted(cum, self.energy - 1e-12) + 1)
        else:
            r = int(np.ceil(self.rank_ratio * full))
        return self._round(r, full)

    def _grid(self, full: int) -> list[int]:
        return sorted({self._round(r, full) for r in range(self.multiple, full + self.multiple, self.multiple)})

    def _max_error_rank(self, q: np.ndarray, total: float, full: int) -> int:
        tail = np.concatenate([np.cumsum(q[::-1])[::-1], [0.0]])  # tail[r] = error^2 at rank r
        for r in self._grid(full):
            if tail[r] <= self.max_error ** 2 * max(total, 1e-30):
                return r
        return full

    def _saves(self, r: int, k: int, n: int) -> bool:
        return r * (k + n) <= (1.0 - self.min_saving) * k * n

    def _budget_ranks(self, cands: list[_Candidate], profiles: dict[int, tuple[np.ndarray, float]]
                      ) -> tuple[dict[int, int], float, float]:
        """Greedy: start with every layer unfactored, repeatedly take the move (factor a layer at its
        largest saving rank, or lower a factored layer's rank by one step) with the smallest increase of
        relative squared output error per parameter saved, until the budget is met."""
        before = float(sum(c.weight.size for c in cands))
        target = self.budget * before
        current = before
        ranks: dict[int, int] = {}
        heap: list = []

        def err(i, r):
            q, total = profiles[i]
            return float(np.sum(q[r:])) / max(total, 1e-30)

        grids = {}
        for i, c in enumerate(cands):
            k, n = c.weight.shape
            grid = [r for r in self._grid(min(k, n)) if self._saves(r, k, n)]
            grids[i] = grid
            if grid:
                saved = k * n - grid[-1] * (k + n)
                heapq.heappush(heap, (err(i, grid[-1]) / max(saved, 1), i, len(grid) - 1, saved))
        while current > target and heap:
            _, i, g, saved = heapq.heappop(heap)
            ranks[i] = grids[i][g]
            current -= saved
            if g > 0:
                k, n = cands[i].weight.shape
                step = (grids[i][g] - grids[i][g - 1]) * (k + n)
                heapq.heappush(heap, ((err(i, grids[i][g - 1]) - err(i, grids[i][g])) / max(step, 1),
                                      i, g - 1, step))
        return ranks, before, current

    # -- the pass -----------------------------------------------------------------------------------
    def reads_calibration(self) -> bool:
        return (self.whiten != "false" or self.refit or self.max_error is not None or self.budget is not None
                or self.rank_by == "outputs")

    def requires(self, model: Model, ctx: PassContext) -> None:
        require_nodes(model, self.include)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        skipped: list[tuple[str, str]] = []
        warnings: list[str] = []
        cands = self._candidates(model, skipped, warnings)
        whiten = self.whiten == "true" or (self.whiten == "auto" and not ctx.calibration_is_random
                                           and ctx.calibration is not None)
        if self.whiten == "true" and ctx.calibration is None:
            raise InputError("whiten=true needs calibration data (--calib)")
        by_outputs = self.rank_by == "outputs" or (self.rank_by == "auto" and whiten)
        bounded = self.max_error is not None or self.budget is not None
        need_grams = whiten or self.refit or by_outputs or bounded
        if need_grams and cands and ctx.calibration is not None:
            # the shrunk Gram only whitens / ranks energy and rank_ratio (0.4 s for K=3072 here)
            self._grams(model, cands, ctx, shrink=(whiten or by_outputs) and not bounded)
        stats = {"layers_factored": 0, "params_before": 0, "params_after": 0, "whitened": int(whiten),
                 "candidate_params_before": int(sum(c.weight.size for c in cands))}
        chols: dict[int, np.ndarray | None] = {}
        profiles: dict[int, tuple[np.ndarray, float]] = {}
        # energy / rank_ratio promise nothing on the calibration data: their whitening uses the shrunk
        # estimate, which carries over to new inputs; max_error / budget are bounds ON the calibration
        # data, so they whiten with (and account for) the calibration data's own Gram matrix.
        for i, c in enumerate(cands):
            whitening_gram = c.gram if c.shrunk is None else c.shrunk
            chols[i] = gram_cholesky(whitening_gram, self.damping) if (whiten and c.gram is not None) else None
            if bounded:
                profiles[i] = error_profile(c.weight, c.gram, chols[i])
            if whiten and c.gram is None:
                warnings.append(f"svd: {c.label}: not whitened ({c.note or 'no input statistics'}); plain SVD")
        budget_ranks = None
        if self.budget is not None:
            budget_ranks, before, after = self._budget_ranks(cands, profiles)
            if after > self.budget * before:
                warnings.append(f"svd: budget={self.budget} not reached: {after / max(before, 1):.3f} of the "
                                f"candidates' parameters at the smallest ranks that save MACs")
        for i, c in enumerate(cands):
            if i:  # memory-mapped weights: the previous one's pages leave memory (peak ~ one weight + factors)
                release_pages([cands[i - 1].weight])
            k, n = c.weight.shape
            if budget_ranks is not None:
                if i not in budget_ranks:
                    skipped.append((c.label, f"no rank saves {self.min_saving:.0%} of the MACs" if not self._saves(
                        min(self.multiple, k, n), k, n) else f"budget={self.budget} met without factoring this layer"))
                    continue
                r = budget_ranks[i]
            elif self.max_error is not None:
                r = self._max_error_rank(*profiles[i], min(k, n))
            else:
                rank_chol = chols[i]
                if by_outputs and rank_chol is None and c.gram is not None:
                    rank_chol = gram_cholesky(c.shrunk if c.shrunk is not None else c.gram, self.damping)
                r = self._rank(singular_values(c.weight, rank_chol if by_outputs else chols[i]), k, n)
            if not self._saves(r, k, n):
                skipped.append((c.label, f"rank {r} of {k}x{n} would not save {self.min_saving:.0%} of the MACs "
                                         f"({r * (k + n)} vs {k * n} per output position)"))
                continue
            a, b = factorize(c.weight, r, chol=chols[i])
            if self.refit and c.gram is not None:
                b = refit_second_factor(a, c.weight, c.gram, self.damping)
            self._rewrite(model, c, a.astype(np.float32), b.astype(np.float32))
            stats["layers_factored"] += 1
            stats["params_before"] += k * n
            stats["params_after"] += r * (k + n)
        if cands:
            release_pages([cands[-1].weight])
        stats["candidate_params_after"] = (stats["candidate_params_before"] - stats["params_before"]
                                           + stats["params_after"])
        model.invalidate()
        return PassResult(model, stats["layers_factored"] > 0, stats, skipped, warnings)

    def _candidates(self, model: Model, skipped: list, warnings: list) -> list[_Candidate]:
        cands: list[_Candidate] = []
        for node in model.nodes:
            if node.op not in ("MatMul", "Gemm", "Conv") or (node.domain or "") not in ("", "ai.onnx"):
                continue
            label = node.name or f"<{node.op}>"
            if node.name in self.exclude:
                skipped.append((label, "excluded by option"))
                continue
            if self.include is not None and node.name not in self.include:
                skipped.append((label, "not in include"))
                continue
            cand = self._match(model, node, label, skipped)
            if cand is None:
                continue
            if cand.weight.size < self.min_size:
                skipped.append((label, f"weight has {cand.weight.size} elements < min_size={self.min_size}"))
                continue
            cands.append(cand)
        return cands

    def _match(self, model: Model, node: gs.Node, label: str, skipped: list) -> _Candidate | None:
        """match + check: the candidate as a [K, N] matrix, or None (a reason recorded where it is one)."""
        if len(node.inputs) < 2:
            return None
        x_val, w_val = (model.constant_value(t) for t in node.inputs[:2])
        if x_val is not None and w_val is not None:
            skipped.append((label, "both inputs are constant (fold them with cleanup)"))
            return None
        if node.op == "MatMul":
            if x_val is None and w_val is None:
                return None  # activation x activation (attention scores): nothing to factor
            left = w_val is None
            w = x_val if left else w_val
            if not self._is_matrix(w, label, skipped):
                return None
            x = node.inputs[1] if left else node.inputs[0]
            if left:  # W [M, K] @ X [..., K, N]: rows are X's axis -2, matrix W^T [K, M]
                return _Candidate(node, label, "matmul_left", np.ascontiguousarray(w.T), x, ("axis", -2))
            return _Candidate(node, label, "matmul", np.ascontiguousarray(w), x, ("axis", -1))
        if node.op == "Gemm":
            if w_val is None:
                if x_val is not None:
                    skipped.append((label, "Gemm whose constant is the first input (A)"))
                return None
            if not self._is_matrix(w_val, label, skipped):
                return None
            if node.attrs.get("transA", 0) and model.opset < 11:
                skipped.append((label, f"Gemm with transA at opset {model.opset}: the first factor would need "
                                       "a bias input (optional only from opset 11)"))
                return None
            w = w_val.T if node.attrs.get("transB", 0) else w_val
            w = w.astype(np.float64) * float(node.attrs.get("alpha", 1.0))
            view = ("axis", 0) if node.attrs.get("transA", 0) else ("axis", -1)
            return _Candidate(node, label, "gemm", np.ascontiguousarray(w), node.inputs[0], view)
        # Conv
        if w_val is None:
            skipped.append((label, "Conv weight is not constant"))
            return None
        if w_val.dtype != np.float32 or w_val.ndim < 3:
            skipped.append((label, f"Conv weight is not a float32 kernel ({w_val.ndim}-D {w_val.dtype})"))
            return None
        group = int(node.attrs.get("group", 1))
        if group != 1:
            kind = "depthwise" if group == w_val.shape[0] and w_val.shape[1] == 1 else "grouped"
            skipped.append((label, f"{kind} Conv (group={group}): not factored"))
            return None
        m, c = w_val.shape[:2]
        kernel = list(w_val.shape[2:])
        nd = len(kernel)
        strides = tuple(node.attrs.get("strides", [1] * nd))
        pads = tuple(node.attrs.get("pads", [0] * 2 * nd))
        dilations = tuple(node.attrs.get("dilations", [1] * nd))
        auto_pad = node.attrs.get("auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        w = np.ascontiguousarray(w_val.reshape(m, -1).T)  # [C*prod(kernel), M]
        note, view = "", None
        if auto_pad not in ("NOTSET", ""):
            note = f"auto_pad={auto_pad}"
        elif all(k == 1 for k in kernel):
            view = ("conv1x1", strides, pads)
        elif nd != 2:
            note = f"{nd}-D kxk Conv: im2col statistics only for 2-D"
        elif c * int(np.prod(kernel)) > IM2COL_MAX_FEATURES:
            note = f"C*k*k={c * int(np.prod(kernel))} > {IM2COL_MAX_FEATURES}: im2col Gram too large"
        else:
            view = ("im2col", tuple(kernel), strides, pads, dilations)
        return _Candidate(node, label, "conv", w, node.inputs[0], view, note)

    @staticmethod
    def _is_matrix(w: np.ndarray, label: str, skipped: list) -> bool:
        if w.ndim != 2 or w.dtype != np.float32:
            skipped.append((label, f"weight is not a 2-D float32 matrix ({w.ndim}-D {w.dtype})"))
            return False
        return True

    def _grams(self, model: Model, cands: list[_Candidate], ctx: PassContext, *, shrink: bool) -> None:
        """X^T X of every candidate's input rows over the calibration data, streamed (no activation storage)."""
        keys = {c.key for c in cands if c.view is not None}
        grams: dict = {}
        rows: dict = {}
        fourth: dict = {}
        for acts in stream_activations(model, {name for name, _ in keys}, ctx, "svd: input statistics"):
            for name, view in keys:
                act = acts[name]
                # im2col copies every patch: one sample at a time keeps that copy small
                parts = [act[i:i + 1] for i in range(len(act))] if view[0] == "im2col" else [act]
                for part in parts:
                    x = _conv_rows(part, view)
                    grams[(name, view)] = grams.get((name, view), 0) + x.T @ x
                    rows[(name, view)] = rows.get((name, view), 0) + x.shape[0]
                    norms = np.einsum("ij,ij->i", x, x, dtype=np.float64)
                    fourth[(name, view)] = fourth.get((name, view), 0.0) + float(norms @ norms)
        for c in cands:
            if c.view is not None and c.key in grams:
                c.gram = grams[c.key]
                if shrink:
                    c.shrunk = shrink_gram(grams[c.key], rows[c.key], fourth[c.key])[0]

    @staticmethod
    def _rewrite(model: Model, c: _Candidate, a: np.ndarray, b: np.ndarray) -> None:
        """a [K, r], b [r, N] (float32) into two nodes; the original node becomes the second factor."""
        node = c.node
        base = node.name or node.op.lower()
        mid = gs.Variable(model.unique_name(base + "_lowrank"), dtype=np.float32)
        name_a, name_b = model.unique_name(base + "_A"), model.unique_name(base + "_B")
        if c.kind == "matmul":
            first = gs.Node("MatMul", model.unique_name(base + "_factor_a"),
                            inputs=[c.x, gs.Constant(name_a, a)], outputs=[mid])
            node.inputs[0], node.inputs[1] = mid, gs.Constant(name_b, b)
        elif c.kind == "matmul_left":  # W ~= b^T a^T: first a^T [r, K] @ X, then b^T [M, r] @ that
            first = gs.Node("MatMul", model.unique_name(base + "_factor_a"),
                            inputs=[gs.Constant(name_a, np.ascontiguousarray(a.T)), c.x], outputs=[mid])
            node.inputs[0], node.inputs[1] = gs.Constant(name_b, np.ascontiguousarray(b.T)), mid
        elif c.kind == "gemm":
            if node.attrs.get("transA", 0):
                first = gs.Node("Gemm", model.unique_name(base + "_factor_a"),
                                inputs=[c.x, gs.Constant(name_a, a)], outputs=[mid], attrs={"transA": 1})
            else:
                first = gs.Node("MatMul", model.unique_name(base + "_factor_a"),
                                inputs=[c.x, gs.Constant(name_a, a)], outputs=[mid])
            node.inputs[0], node.inputs[1] = mid, gs.Constant(name_b, b)
            node.attrs.update({"transA": 0, "transB": 0, "alpha": 1.0})
        else:  # conv: a [C*k*k, r] -> [r, C, k...]; b [r, M] -> 1x1 [M, r, 1...]
            w_shape = model.constant_value(node.inputs[1]).shape
            nd = len(w_shape) - 2
            r = a.shape[1]
            first_w = np.ascontiguousarray(a.T).reshape((r,) + tuple(w_shape[1:]))
            attrs = {k: v for k, v in node.attrs.items() if k in ("strides", "pads", "dilations", "auto_pad")}
            attrs["kernel_shape"] = list(w_shape[2:])
            attrs["group"] = 1
            first = gs.Node("Conv", model.unique_name(base + "_factor_a"),
                            inputs=[c.x, gs.Constant(name_a, first_w)], outputs=[mid], attrs=attrs)
            second_w = np.ascontiguousarray(b.T).reshape(w_shape[0], r, *([1] * nd))
            node.inputs[1] = gs.Constant(name_b, second_w)
            node.inputs[0] = mid
            node.attrs.clear()
            node.attrs.update({"kernel_shape": [1] * nd, "strides": [1] * nd, "pads": [0] * (2 * nd),
                               "dilations": [1] * nd, "group": 1})
        model.graph.nodes.append(first)
