"""Python API mirroring the CLI: ``optimize``, ``inspect``, ``compare``.

    import onnxslim_kit
    model, report = onnxslim_kit.optimize("model.onnx", passes=["cleanup"], output="slim.onnx")
    print(report.parity.summary())
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import onnx

from . import runtime
from .calibration import CalibrationData, input_specs, load_calibration
from .errors import InputError, ParityError
from .ir import Model, has_external_data, load_proto, save_proto
from .metrics import ModelStats, disk_bytes, model_stats
from .parity import ParityChecker, ParityReport
from .pass_base import PassContext, Tolerance
from .pipeline import Pipeline
from .report import Report
from .shapes import parse_input_shape

logger = logging.getLogger(__name__)

CHECK_MODES = ("end", "per-pass", "off")
Progress = Callable[[Iterable, str], Iterable]


def _load(model: str | os.PathLike | onnx.ModelProto, *, weights: bool = True, size: bool = False
          ) -> tuple[str, onnx.ModelProto, int | None]:
    """(label, proto, bytes on disk if ``size`` else None). ``weights=False``: external data is left in
    its file (the proto holds references only)."""
    if isinstance(model, onnx.ModelProto):
        return "<memory>", model, None
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        proto = load_proto(path, load_external_data=weights)
        if not size:
            return path, proto, None
        # Without its weights loaded the proto still names its external-data files: no second parse.
        return path, proto, disk_bytes(path, header=None if weights else proto)
    raise InputError(f"expected a model path or an onnx.ModelProto, got {type(model).__name__}")


class _ParityFailed(Exception):
    """Raised inside an atomic save to abandon it (the parity gate failed)."""


def _shapes(input_shapes) -> dict[str, list[int]]:
    """Accept {'name': [dims]} or ['name:1,3,224,224', ...]."""
    if not input_shapes:
        return {}
    if isinstance(input_shapes, dict):
        return {str(k): [int(d) for d in v] for k, v in input_shapes.items()}
    out = {}
    for spec in input_shapes:
        name, dims = parse_input_shape(spec)
        out[name] = dims
    return out


SMALL_MODEL_BYTES = 8 << 20  # below this, parity sessions run on one thread


def _tolerance(base: Tolerance, tolerance: Tolerance | dict[str, float] | None) -> Tolerance:
    if tolerance is None:
        return base
    if isinstance(tolerance, Tolerance):
        return tolerance
    try:
        return base.override(**tolerance)
    except ValueError as exc:
        raise InputError(f"--tolerance: {exc}") from None


def _data(proto: onnx.ModelProto, calibration, shapes, *, num_samples: int, seed: int,
          batch_size: int | None) -> CalibrationData:
    specs = input_specs(proto, shapes)
    return load_calibration(calibration, specs, num_samples=num_samples, seed=seed, batch_size=batch_size)


def optimize(model: str | os.PathLike | onnx.ModelProto, *, passes: Any = None, recipe: str | os.PathLike | None = None,
             calibration: Any = None, input_shapes: Any = None,
             tolerance: Tolerance | dict[str, float] | None = None, check: str = "end", locate: bool = False,
             output: str | os.PathLike | None = None, seed: int = 0, num_samples: int = 8,
             batch_size: int | None = None, progress: Progress | None = None, overwrite: bool = False,
             target: Any = None, metric: Any = None, labels: Any = None, techniques: Any = None,
             workers: int | None = 1, holdout: float = 0.0, max_verifications: int = 8,
             save_recipe: str | os.PathLike | None = None, cache: str | os.PathLike | None = None,
             confidence: float = 0.95, executor: str = "local", objective: str = "balanced",
             latency_threads: int = 2, latency_batch: int = 1) -> tuple[onnx.ModelProto, Report]:
    """Run a pipeline on ``model``, check parity against the original, and optionally write the result.

    ``passes``: None (the default pipeline, ``cleanup``), a list of specs such as
    ``"quantize-weights:bits=4"`` or Pass objects, or a Pipeline; ``recipe``: a TOML recipe instead.
    ``calibration``: .npz path, folder, dict of arrays, iterable of feed dicts, or None (seeded random
    data). ``input_shapes`` pins dynamic dims for calibration, parity and MACs; the written model keeps
    its own (dynamic) input declarations. ``tolerance`` overrides the pipeline's bound (keys atol, rtol,
    cosine, snr, top1). ``check``: 'end' (default), 'per-pass' (a pass that breaks its own tolerance is
    rolled back) or 'off'. Raises :class:`ParityError` (nothing written) when the final check fails.

    A model file with external data (any size; the only way to store one above 2 GB) is processed
    without ever holding all its weights in memory: weights are memory maps of its file, the output is
    written with external data next to ``output`` and checked from there, and the returned proto
    references that written data instead of holding it (with ``output=None`` it holds the weights).

    ``target`` (``"accuracy_drop=0.01"``, ``"size=0.25x"``, ``"latency=0.5x"``) runs the accuracy-aware
    search instead of a pipeline (see :func:`onnxslim_kit.search.search`; ``metric``, ``labels``,
    ``techniques``, ``workers``, ``executor``, ``holdout``, ``max_verifications``, ``cache``, ``confidence``,
    ``objective``, ``latency_threads``, ``latency_batch`` go to it) and returns
    ``(model, SearchResult)``. The verified target is the gate of that run: the model is written only
    when it is met (else :class:`ParityError`, nothing written); ``save_recipe`` writes the plan as TOML.
    """
    if target is not None:
        return _optimize_to_target(model, target=target, calibration=calibration, input_shapes=input_shapes,
                                   output=output, seed=seed, num_samples=num_samples, batch_size=batch_size,
                                   progress=progress, overwrite=overwrite, metric=metric, labels=labels,
                                   techniques=techniques, workers=workers, holdout=holdout,
                                   max_verifications=max_verifications, save_recipe=save_recipe, cache=cache,
                                   confidence=confidence, executor=executor, objective=objective,
                                   latency_threads=latency_threads, latency_batch=latency_batch,
                                   passes=passes, recipe=recipe, tolerance=tolerance, check=check)
    start = time.perf_counter()
    if check not in CHECK_MODES:
        raise InputError(f"--check {check!r}: expected one of {', '.join(CHECK_MODES)}")
    if passes is not None and recipe is not None:
        raise InputError("give passes or a recipe, not both")
    pipeline = Pipeline.coerce(passes) if recipe is None else Pipeline.from_recipe(recipe)
    label, proto, source_bytes = _load(model, weights=False, size=True)
    # A model file with external data is never held as one in-memory protobuf: its weights are memory
    # maps of the file, the reference session is built from the file, and the candidate is saved once
    # (to the atomic-save folder of the output) and checked from there.
    streamed = label != "<memory>" and has_external_data(proto)
    if output is not None:
        out_path = Path(output).resolve()
        if label != "<memory>" and out_path == Path(label).resolve() and not overwrite:
            raise InputError(f"{output}: output would overwrite the input model (pass --overwrite to allow)")
        if not out_path.parent.is_dir():
            raise InputError(f"{output}: output folder {out_path.parent} does not exist")
    shapes = _shapes(input_shapes)
    data = _data(proto, calibration, shapes, num_samples=num_samples, seed=seed, batch_size=batch_size)
    ctx = PassContext(calibration=data, calibration_is_random=data.is_random, input_shapes=shapes, seed=seed,
                      reference=proto, progress=progress)
    before = model_stats(proto, shapes, file_bytes=source_bytes)
    overrides = None
    if isinstance(tolerance, dict):
        overrides = dict(tolerance)
        _tolerance(Tolerance(), overrides)  # validate keys before anything runs (the parity reference thread included)
    checker = None
    if check != "off":
        # In memory, the reference runs in a background thread next to the passes: one onnxruntime
        # thread for it (measured on resnet_tiny, busy 2-core machine: 2 threads took 0.15 s of CPU and
        # 0.35 s wall for the 16 reference runs, 1 thread 0.07 s and 0.17 s).
        # Small models are checked on one thread too: an onnxruntime thread pool costs more to start than
        # it saves on a model of a few MB.
        small = not streamed and before.bytes < SMALL_MODEL_BYTES  # the size model_stats already walked
        checker = ParityChecker(label if streamed else proto, data, progress=progress,
                                threads=1 if small else None,
                                reference_threads=None if streamed or check != "end" else 1)
        if streamed:
            checker.reference_outputs  # noqa: B018 - computed now, and the reference session released
        elif check == "end":
            checker.prefetch()  # runs while the passes do (in memory: two sessions may coexist)
    with _close_on_error(checker):
        working = Model.load(label) if streamed else Model.from_proto(proto, source=label)
    per_pass = check == "per-pass"
    # While the parity reference runs in its background thread, the passes' sessions (calibration,
    # activation streams) take half the CPUs unless the caller set a process default (analyze's
    # evaluations run single-threaded). Measured on 2 cores, busy machine: resnet_tiny quantize-int8 wall
    # 0.60 -> 0.48 s with its calibration session on 1 thread instead of onnxruntime's default 2.
    prefetching = checker is not None and not streamed and check == "end"
    share = (runtime.default_threads(max(1, (os.cpu_count() or 2) // 2))
             if prefetching and runtime.get_default_threads() is None else contextlib.nullcontext())
    with _close_on_error(checker), share:
        result, records = pipeline.run(
            working, ctx, per_pass=per_pass, tolerance_override=overrides,
            checker=(lambda m, tol: checker.check(m if streamed else m.to_proto(), tol)) if per_pass else None)
    final_tol = _tolerance(pipeline.tolerance, tolerance)
    written = False
    after_bytes = None
    serialized = None
    with _close_on_error(checker):  # until the check has joined the reference thread
        if streamed:
            result.release_pages()
            parity, out_proto = None, None
            if output is not None:
                def verify(tmp_model: str) -> None:
                    nonlocal parity, out_proto
                    if checker is not None:
                        parity = checker.check(tmp_model, final_tol)
                        if not parity.ok:
                            raise _ParityFailed
                    out_proto = load_proto(tmp_model, load_external_data=False)

                try:
                    result.save(output, external_data=True, verify=verify)
                    written = True
                except _ParityFailed:
                    pass
            elif checker is not None:
                parity = checker.check(result, final_tol)
            if out_proto is None and (output is None or locate):
                out_proto = result.to_proto()  # returned with its weights, or needed to locate a divergence
            elif out_proto is None:  # parity failed: the proto only feeds the report's stats
                out_proto = result.to_proto(weights=False)
                after_bytes = result.weight_bytes()
        else:
            out_proto = result.to_proto()
            # Serialized once: the parity session is built from these bytes and the file is written from
            # them (each was a serialization of its own, plus a size walk).
            if (checker is not None or output is not None) and \
                    runtime.model_bytes_estimate(out_proto) < runtime.PROTO_LIMIT:
                serialized = out_proto.SerializeToString(deterministic=True)
            parity = checker.check(out_proto if serialized is None else serialized, final_tol) \
                if checker is not None else None
            if serialized is not None:
                after_bytes = len(serialized)  # = out_proto.ByteSize(), what the stats would compute
    found = None
    if parity is not None and not parity.ok and locate:
        found = checker.locate(out_proto, final_tol)
    after = model_stats(out_proto, shapes, file_bytes=disk_bytes(output) if written else after_bytes)
    warnings = list(ctx.warnings)
    for rec in records:
        warnings.extend(rec.warnings)
    if data.is_random and check != "off":
        warnings.append("parity was checked on seeded random inputs; pass --calib for real data")
    report = Report(source=label, output=os.fspath(output) if output is not None else None, before=before,
                    after=after, passes=records, parity=parity, locate=found, tolerance=final_tol, check=check,
                    calibration_source=data.source, calibration_is_random=data.is_random, warnings=warnings)
    if parity is not None and not parity.ok:
        report.seconds = time.perf_counter() - start
        failing = "; ".join(parity.failures()) or (parity.error or "unknown")
        raise ParityError(f"{label}: parity check failed ({failing}); nothing written", report=report)
    if output is not None and not written:
        save_proto(out_proto, output, serialized=serialized)
        written = True
        if serialized is None:   # else the stats already hold len(serialized)
            report.after.bytes = disk_bytes(output)
    report.written = written
    report.seconds = time.perf_counter() - start
    return out_proto, report


@contextlib.contextmanager
def _close_on_error(checker: ParityChecker | None):
    """On any error, wait for the parity reference still running in its thread: a native thread left
    inside onnxruntime aborts the interpreter at exit (exit 134)."""
    try:
        yield
    except BaseException:
        if checker is not None:
            checker.close()
        raise


def _optimize_to_target(model, *, target, passes, recipe, tolerance, check, output, overwrite, save_recipe,
                        **kwargs):
    from .search import search

    if passes is not None or recipe is not None:
        raise InputError("--target runs the search: give it without -p/--pass or --recipe")
    if tolerance is not None:
        raise InputError("--target is the gate of a search run: --tolerance does not apply")
    if check != "end":
        raise InputError("--target verifies the result itself: --check does not apply")
    if output is not None:
        label = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
        out_path = Path(output).resolve()
        if label is not None and out_path == Path(label).resolve() and not overwrite:
            raise InputError(f"{output}: output would overwrite the input model (pass --overwrite to allow)")
        if not out_path.parent.is_dir():
            raise InputError(f"{output}: output folder {out_path.parent} does not exist")
    if save_recipe is not None and not Path(save_recipe).resolve().parent.is_dir():
        raise InputError(f"{save_recipe}: recipe folder does not exist")
    result = search(model, target=target, **kwargs)
    if not result.met:
        raise ParityError(f"target {result.target.describe()} not met: {result.message}; nothing written")
    if save_recipe is not None:
        result.recipe_calibration = result.save_recipe(save_recipe)
        result.recipe_path = os.fspath(save_recipe)
    if output is not None:
        save_proto(result.model, output)
    return result.model, result


def inspect(model: str | os.PathLike | onnx.ModelProto, *, input_shapes: Any = None) -> ModelStats:
    label, proto, size = _load(model, size=True)
    return model_stats(proto, _shapes(input_shapes), file_bytes=size)


def _real_inputs(proto: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in proto.graph.initializer}
    return [vi.name for vi in proto.graph.input if vi.name not in inits]


def compare(a: str | os.PathLike | onnx.ModelProto, b: str | os.PathLike | onnx.ModelProto, *,
            calibration: Any = None, input_shapes: Any = None,
            tolerance: Tolerance | dict[str, float] | None = None, seed: int = 0, num_samples: int = 8,
            batch_size: int | None = None, progress: Progress | None = None) -> ParityReport:
    """Parity of model ``b`` against reference ``a`` on the same inputs (exact tolerance by default)."""
    label_a, ref, _ = _load(a, weights=False)
    label_b, cand, _ = _load(b, weights=False)
    ref_inputs = _real_inputs(ref)
    missing = [n for n in _real_inputs(cand) if n not in ref_inputs]
    if missing:
        raise InputError(f"{label_b}: needs input(s) {missing} that the reference {label_a} does not have "
                         f"(reference inputs: {ref_inputs})")
    shapes = _shapes(input_shapes)
    data = _data(ref, calibration, shapes, num_samples=num_samples, seed=seed, batch_size=batch_size)
    from .pass_base import EXACT

    # Sessions are built from the files (onnxruntime reads external data itself), one at a time.
    checker = ParityChecker(label_a if label_a != "<memory>" else ref, data, progress=progress)
    checker.reference_outputs  # noqa: B018 - computed, and the reference session released, first
    return checker.check(label_b if label_b != "<memory>" else cand, _tolerance(EXACT, tolerance))
