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


def stream_activations(model: Model, names: Iterable[str], ctx: PassContext, label: str
                       ) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{name: activation}`` for every calibration batch, from one session that exposes ``names``
    as extra outputs (graph inputs are read from the feed). Activations are not kept between batches."""
    from onnxslim_kit.runtime import make_session
    from onnxslim_kit.shapes import with_outputs

    names = sorted(set(names))
    proto = with_outputs(model.to_proto(value_info="drop"), names, model.value_infos())
    sess = make_session(proto, optimize=False)
    index = {o.name: i for i, o in enumerate(sess.get_outputs())}
    feed_names = {i.name for i in sess.get_inputs()}
    for feed in ctx.track(ctx.calibration, label):
        outs = sess.run(None, {k: v for k, v in feed.items() if k in feed_names})
        yield {name: (outs[index[name]] if name in index else feed[name]) for name in names}


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


def ridge_solve(gxx: np.ndarray, gxy: np.ndarray, damping: float) -> np.ndarray:
    """W = argmin ||X W - Y||^2 + lambda ||W||^2 from the normal equations (X^T X + lambda I) W = X^T Y,
    with lambda = damping * mean(diag X^T X). ``gxx`` [K, K], ``gxy`` [K, N]."""
    k = gxx.shape[0]
    lam = damping * (float(np.trace(gxx)) / max(k, 1) or 1.0)
    lhs = gxx + lam * np.eye(k)
    try:
        return np.linalg.solve(lhs, gxy)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(lhs, gxy, rcond=None)[0]
