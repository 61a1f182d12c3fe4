"""Shared closed-form reconstruction helpers (the original model is the teacher).

Used by the low-rank, pruning and quantization passes: read intermediate activations of a model over
the calibration data in one onnxruntime session (streamed, nothing stored beyond the current batch),
accumulate second moments X^T X / X^T Y, and solve ridge-regularised least squares in closed form.
This module is not a pass and registers nothing.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from onnxslim_kit.ir import Model
from onnxslim_kit.pass_base import PassContext


def stream_activations(model: Model, names: Iterable[str], ctx: PassContext, label: str | None
                       ) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{name: activation}`` for every calibration batch, from one session that exposes ``names``
    as extra outputs (graph inputs are read from the feed). Activations are not kept between batches.
    ``label``: the progress bar's label (None: no bar, for loops that already show one)."""
    from onnxslim_kit.runtime import make_session
    from onnxslim_kit.shapes import with_outputs

    names = sorted(set(names))
    inputs = {t.name for t in model.graph.inputs}
    computed = [n for n in names if n not in inputs]
    feeds = ctx.track(ctx.calibration, label) if label else ctx.calibration
    if not computed:  # graph inputs only: the feeds are the activations
        for feed in feeds:
            yield {name: feed[name] for name in names}
        return
    proto = _trim_to(with_outputs(model.to_proto(value_info="drop"), computed, model.value_infos()), computed)
    sess = make_session(proto, optimize=False)
    index = {o.name: i for i, o in enumerate(sess.get_outputs())}
    feed_names = {i.name for i in sess.get_inputs()}
    for feed in feeds:
        outs = sess.run(None, {k: v for k, v in feed.items() if k in feed_names})
        yield {name: (outs[index[name]] if name in index else feed[name]) for name in names}


def _trim_to(proto, names: list[str]):
    """Keep only the nodes needed to compute ``names`` (the requested tensors become the only outputs), so
    onnxruntime does not run the rest of the model for every calibration batch."""
    wanted = set(names)
    producer = {out: i for i, node in enumerate(proto.graph.node) for out in node.output}
    keep: set[int] = set()
    stack = [producer[n] for n in wanted if n in producer]
    while stack:
        i = stack.pop()
        if i in keep:
            continue
        keep.add(i)
        node = proto.graph.node[i]
        reads = list(node.input)
        for attr in node.attribute:  # subgraphs read outer-scope values too
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                reads.extend(x for sub in g.node for x in sub.input)
        stack.extend(producer[x] for x in reads if x in producer)
    nodes = [n for i, n in enumerate(proto.graph.node) if i in keep]
    outputs = [o for o in proto.graph.output if o.name in wanted]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    del proto.graph.output[:]
    proto.graph.output.extend(outputs)
    return proto


def as_rows(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Float64 matrix with the feature ``axis`` last and every other axis flattened into rows."""
    x = np.moveaxis(np.asarray(x), axis, -1)
    return np.asarray(x, np.float64).reshape(-1, x.shape[-1])


def gram_cholesky(gram: np.ndarray, damping: float) -> np.ndarray:
    """Lower-triangular L with L L^T = G + damping * mean(diag G) * I (damping keeps it invertible)."""
    k = gram.shape[0]
    scale = float(np.mean(np.diag(gram))) or 1.0
    for attempt in range(6):
        try:
            return np.linalg.cholesky(gram + (damping * 10 ** attempt) * scale * np.eye(k))
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("Gram matrix is not positive definite even with damping")


def ridge_solve(gxx: np.ndarray, gxy: np.ndarray, damping: float, prior: np.ndarray | None = None) -> np.ndarray:
    """W = argmin ||X W - Y||^2 + lambda ||W - W0||^2 from the normal equations
    (X^T X + lambda I) W = X^T Y + lambda W0, with lambda = damping * mean(diag X^T X). ``gxx`` [K, K],
    ``gxy`` [K, N]; ``prior`` W0 [K, N] (zero when None) keeps an under-determined fit (fewer samples than
    features) close to a known-good solution instead of shrinking it to zero."""
    k = gxx.shape[0]
    lam = damping * (float(np.trace(gxx)) / max(k, 1) or 1.0)
    lhs = gxx + lam * np.eye(k)
    rhs = gxy if prior is None else gxy + lam * prior
    try:
        return np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(lhs, rhs, rcond=None)[0]


def conv_patches(x: np.ndarray, weight_shape: tuple[int, ...], attrs: dict) -> np.ndarray | None:
    """im2col of a 2-D convolution input: rows = output positions, columns = (channel, kh, kw) in the
    order of ``weight.reshape(M, -1)``, so ``patches @ weight.reshape(M, -1).T`` is the convolution without
    bias. None for layouts it does not handle (not 2-D, group != 1, SAME auto_pad)."""
    if x.ndim != 4 or len(weight_shape) != 4 or int(attrs.get("group", 1)) != 1:
        return None
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad not in ("NOTSET", "VALID"):
        return None
    kh, kw = weight_shape[2:]
    sh, sw = attrs.get("strides", [1, 1])
    dh, dw = attrs.get("dilations", [1, 1])
    pads = [0, 0, 0, 0] if auto_pad == "VALID" else list(attrs.get("pads", [0, 0, 0, 0]))
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    win = np.lib.stride_tricks.sliding_window_view(xp, (eh, ew), axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    n, c, ho, wo = win.shape[:4]
    return np.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5)).reshape(n * ho * wo, c * kh * kw)


def layer_rows(x: np.ndarray, node, weight_shape: tuple[int, ...]) -> np.ndarray | None:
    """The input of a Conv/Gemm/MatMul as the rows its weight matrix multiplies (the input's dtype), or None."""
    if node.op == "Conv":
        return conv_patches(np.asarray(x), weight_shape, node.attrs)
    x = np.asarray(x)
    return x.reshape(-1, x.shape[-1])


class LeastSquaresFit:
    """Streamed ridge fit of Y from X pulled toward a prior, with the damping chosen by 2-fold
    cross-validation over the calibration batches (alternate batches form the folds).

    With few calibration samples a refit can match them exactly and generalise worse than the weights
    it started from; cross-validation measures that on the held-out fold, and when no damping beats the
    prior the prior is kept (``solve`` then returns ``None``)."""

    GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    WELL_DETERMINED = 10

    def __init__(self):
        self.gxx: list = [0.0, 0.0]
        self.gxy: list = [0.0, 0.0]
        self.batches = 0
        self.rows = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self.rows += x.shape[0]
        fold = self.batches % 2
        self.gxx[fold] = self.gxx[fold] + x.T @ x
        self.gxy[fold] = self.gxy[fold] + x.T @ y
        self.batches += 1

    @staticmethod
    def _error(w: np.ndarray, gxx: np.ndarray, gxy: np.ndarray) -> float:
        """||X W - Y||^2 up to the constant ||Y||^2, from the fold's moments."""
        return float(np.sum(w * (gxx @ w)) - 2.0 * np.sum(w * gxy))

    def solve(self, prior: np.ndarray, damping: float | None = None) -> tuple[np.ndarray | None, float | None]:
        """(weights, damping used); weights None when the prior generalises best. A fixed ``damping``
        skips the cross-validation, and so does a well-determined fit (at least ``WELL_DETERMINED`` rows
        per feature), where the damping barely matters and 1e-3 is used."""
        if self.batches == 0:
            return None, None
        gxx, gxy = self.gxx[0] + self.gxx[1], self.gxy[0] + self.gxy[1]
        if damping is None and self.rows >= self.WELL_DETERMINED * gxx.shape[0]:
            damping = 1e-3
        if damping is not None or self.batches < 2:
            d = 1e-2 if damping is None else damping
            return ridge_solve(gxx, gxy, d, prior=prior), d
        best, best_err = None, sum(self._error(prior, self.gxx[b], self.gxy[b]) for b in (0, 1))
        for d in self.GRID:
            err = 0.0
            for a, b in ((0, 1), (1, 0)):
                err += self._error(ridge_solve(self.gxx[a], self.gxy[a], d, prior=prior), self.gxx[b], self.gxy[b])
            if err < best_err:
                best, best_err = d, err
        if best is None:
            return None, None
        return ridge_solve(gxx, gxy, best, prior=prior), best
