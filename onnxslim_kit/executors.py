"""Where ``analyze`` runs its evaluations: inline, in a local process pool, or on a Ray cluster.

An executor takes the shared evaluation state (baseline model, calibration feeds, reference outputs:
``analyze._State``) and a list of tasks ``(index, technique, layer, op)``, and yields
``(index, entry)`` pairs in completion order, where ``entry`` is ``Evaluation.to_dict()``. The caller
(``analyze``) writes each entry to its cache and advances its progress bar as it arrives, so an
interrupted run keeps everything that finished, whatever the executor.

Every evaluation runs single-threaded: onnxruntime sessions made without an explicit thread count
(the calibration sessions of quantize-int8, prune-channels' refit, ...) get 1 intra-op and 1 inter-op
thread (:func:`onnxslim_kit.runtime.set_default_threads`), and numpy's BLAS gets 1 thread
(threadpoolctl). Measured on 2 cores (tools/results/analyze_workers.md): with the defaults (one thread
per core in every onnxruntime session and in OpenBLAS) 2 workers oversubscribed the cores and were
slower than 1; single-threaded, they are clearly faster. Inline runs use the same setting, so every
executor gives the same numbers.

- ``local`` (the default): ``workers=1`` runs inline in this process; no worker count (``auto``)
  starts inline and moves the rest to a pool only when it is long enough to pay for the pool's
  start-up (:func:`run_auto`); ``workers > 1`` starts a
  ``ProcessPoolExecutor`` (spawn); each worker reads the state once, at start-up, from a private
  temporary file (removed at the end). A script that
  uses it must call ``analyze`` under ``if __name__ == "__main__":``.
- ``ray`` / ``ray://host:port``: one Ray task (1 CPU) per evaluation; the state is put into Ray's
  object store once (``ray.put``) and every task reads it from there. Ray is initialised with that
  address only when it is not initialised already (a caller may have run ``ray.init(...)`` itself),
  and shut down again at the end when analyze started it. Plain ``ray`` starts a local instance, or
  joins the cluster named by ``RAY_ADDRESS``. Every node needs onnxslim-kit installed. Ray is an
  optional extra: ``pip install onnxslim-kit[ray]``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import pickle
import tempfile
import time
import warnings
from typing import Any, Iterator

from .errors import InputError, OnnxSlimError, one_line
from .runtime import default_threads, set_default_threads

logger = logging.getLogger(__name__)

Task = tuple[int, str, str, str]           # (index, technique, layer, op)
Result = tuple[int, dict]                  # (index, Evaluation.to_dict())

RAY_MISSING = "executor 'ray' needs the ray package: pip install onnxslim-kit[ray]"


def parse_executor(spec: str | None) -> tuple[str, str | None]:
    """``"local"`` -> ("local", None); ``"ray"`` -> ("ray", None); ``"ray://host:port"`` -> ("ray", that
    address). Anything else is an :class:`InputError`."""
    spec = (spec or "local").strip()
    if spec == "local":
        return "local", None
    if spec == "ray":
        return "ray", None
    if spec.startswith("ray://"):
        host, sep, port = spec[len("ray://"):].rpartition(":")
        if not host or not sep or not port.isdigit():
            raise InputError(f"--executor {spec}: expected ray://HOST:PORT")
        return "ray", spec
    raise InputError(f"--executor {spec}: expected local, ray or ray://HOST:PORT")


def check_executor(spec: str | None) -> str:
    """Validate ``spec`` before any work starts: the executor kind, and for Ray that it is installed."""
    kind, _ = parse_executor(spec)
    if kind == "ray":
        _import_ray()
    return kind


# ----------------------------------------------------------------------------------------------
# Single-threaded evaluation
# ----------------------------------------------------------------------------------------------

def _blas_limit(threads: int | None):
    """threadpoolctl's limit on numpy's BLAS (and any OpenMP runtime loaded); None: leave it."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """1 onnxruntime thread for sessions that do not ask for a count, 1 BLAS thread, for a block."""
    with default_threads(1), _blas_limit(1):
        yield


def _evaluate(state: Any, task: Task) -> Result:
    from .analyze import evaluate_one  # analyze imports this module

    index, technique, layer, op = task
    return index, evaluate_one(state, technique, layer, op).to_dict()


# ----------------------------------------------------------------------------------------------
# Inline and local pool
# ----------------------------------------------------------------------------------------------

def run_inline(state: Any, tasks: list[Task]) -> Iterator[Result]:
    with single_threaded():
        for task in tasks:
            yield _evaluate(state, task)


_WORKER_STATE: Any = None


def _init_worker(state_path: str | None) -> None:
    """Pool worker start-up: single-threaded for the life of the process; the state is read once from
    the file the parent wrote (None: no state, for probes)."""
    global _WORKER_STATE
    set_default_threads(1)
    _blas_limit(1)  # applies until the process ends
    if state_path is not None:
        with open(state_path, "rb") as fh:
            _WORKER_STATE = pickle.load(fh)


def _worker_evaluate(task: Task) -> Result:
    assert _WORKER_STATE is not None
    return _evaluate(_WORKER_STATE, task)


def run_pool(state: Any, tasks: list[Task], workers: int) -> Iterator[Result]:
    """The state goes to the workers through a private temporary file, not as the pool's initargs:
    CPython (3.11) writes a new worker's initargs into a pipe whose read end it still holds itself,
    so when a worker dies before reading them (a script without a ``__main__`` guard) and they exceed
    the pipe buffer (64 KiB), ``submit`` blocks forever. The file is pickled once, read by every
    worker, and removed when the pool is done. While the workers start, this process evaluates
    tasks itself (single-threaded too), so their start-up costs less wall time."""
    fd, path = tempfile.mkstemp(prefix="onnxslim-analyze-", suffix=".pkl")
    pool = None
    finished = False
    try:
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(state, fh, protocol=pickle.HIGHEST_PROTOCOL)
        mp = multiprocessing.get_context("spawn")
        pool = concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=mp,
                                                      initializer=_init_worker, initargs=(path,))
        pending = collections.deque(tasks)
        in_flight: dict = {}

        def feed() -> None:  # the pool takes tasks from the back, a few ahead of its workers
            while pending and len(in_flight) < 2 * workers:
                task = pending.pop()
                in_flight[pool.submit(_worker_evaluate, task)] = task

        try:
            feed()
            # Spawned workers import Python, numpy, onnx, onnxruntime and the passes again (~1 s on
            # 2 cores): until the first of them returns a result, this process evaluates from the front.
            with single_threaded():
                while pending and not any(f.done() for f in in_flight):
                    yield _evaluate(state, pending.popleft())
            while in_flight:
                done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
                for fut in done:
                    in_flight.pop(fut)
                    yield fut.result()
                feed()
        except concurrent.futures.process.BrokenProcessPool:
            raise InputError(
                "analyze: a worker process died or failed to start (a script that calls analyze "
                "with workers > 1 must do so under `if __name__ == '__main__':`); finished "
                "evaluations are in the cache; rerun, or use workers=1") from None
        finished = True
    finally:
        # On an error or an interruption, do not wait for running evaluations.
        if pool is not None:
            pool.shutdown(wait=finished, cancel_futures=True)
        os.unlink(path)


# ----------------------------------------------------------------------------------------------
# Ray
# ----------------------------------------------------------------------------------------------

def _import_ray():
    try:
        import ray
    except ImportError:
        raise InputError(RAY_MISSING) from None
    return ray


def _ray_evaluate(state: Any, task: Task) -> Result:
    """One Ray task. ``state`` arrives resolved from the object store (Ray passes an ObjectRef given
    as a top-level argument by value; its numpy arrays are read without a copy)."""
    with single_threaded():
        return _evaluate(state, task)


def run_ray(state: Any, tasks: list[Task], address: str | None) -> Iterator[Result]:
    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        try:
            with warnings.catch_warnings():  # a failed connection also warns; the error below says it
                warnings.simplefilter("ignore")
                ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        except Exception as exc:  # noqa: BLE001 - connection errors come in several types
            where = address or "a local Ray instance"
            raise InputError(f"--executor: could not start or reach {where} "
                             f"({one_line(exc, 200)})") from None
        started = True
    remote = ray.remote(num_cpus=1, max_retries=0)(_ray_evaluate)
    pending: dict = {}
    try:
        state_ref = ray.put(state)
        pending = {remote.remote(state_ref, task): task for task in tasks}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                pending.pop(ref)
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayTaskError:
                    raise  # an exception raised by the evaluation itself: as in the local pool
                except ray.exceptions.RayError as exc:
                    raise OnnxSlimError(
                        f"analyze: a Ray task failed ({one_line(exc, 200)}); finished evaluations are in the cache; "
                        f"rerun to resume") from None
    finally:
        for ref in pending:  # an error or an interruption: drop what has not run yet
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - best effort; shutdown below ends a Ray we started
                logger.debug("could not cancel a Ray task", exc_info=True)
        if started:
            ray.shutdown()


def run_auto(state: Any, tasks: list[Task], workers: int, *, probe_seconds: float = 1.0,
             pool_min_seconds: float = 3.0) -> Iterator[Result]:
    """The default when no worker count is given: evaluate inline for up to ``probe_seconds``, then
    run the rest in a pool of ``workers`` only when it is estimated (mean time so far x tasks left)
    to take at least ``pool_min_seconds`` inline. Starting spawn workers costs about 1 s on 2 cores
    (Python, numpy, onnx, onnxruntime and the passes imported again in each), so a pool only pays
    for work of a few seconds; small models (a digits CNN: ~0.5 s for every evaluation) stay inline."""
    start = time.perf_counter()
    done = 0
    with single_threaded():
        for task in tasks:
            yield _evaluate(state, task)
            done += 1
            if time.perf_counter() - start >= probe_seconds:
                break
    rest = tasks[done:]
    if not rest:
        return
    estimate = (time.perf_counter() - start) / done * len(rest)
    logger.debug("analyze: %d evaluations left, about %.1fs inline", len(rest), estimate)
    if estimate < pool_min_seconds:
        yield from run_inline(state, rest)
    else:
        yield from run_pool(state, rest, workers)


def run(state: Any, tasks: list[Task], *, executor: str | None = "local", workers: int = 1,
        auto: bool = False) -> Iterator[Result]:
    """Yield ``(index, entry)`` for every task, in completion order, on the executor ``executor``.
    ``auto`` (local only): ``workers`` is an upper bound, see :func:`run_auto`."""
    kind, address = parse_executor(executor)
    if not tasks:
        return iter(())
    if kind == "ray":
        return run_ray(state, tasks, address)
    if workers == 1 or len(tasks) == 1:
        return run_inline(state, tasks)
    if auto:
        return run_auto(state, tasks, workers)
    return run_pool(state, tasks, workers)
