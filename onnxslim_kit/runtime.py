"""onnxruntime helpers: what the installed runtime accepts, and building sessions from protos.

Everything that creates an ``onnxruntime.InferenceSession`` goes through :func:`make_session`, so
session options (threads, optimization level) and the >2 GB temp-file path live in one place.

Threads: a session made with ``threads=None`` (every pass's calibration session, the parity gate by
default) gets onnxruntime's default, one intra-op thread per core. A process that runs several such
jobs side by side (``analyze``'s worker processes) caps that default with :func:`set_default_threads`
or, for one block of code, :func:`default_threads`: the cap applies to sessions that do not ask for a
thread count, so no pass needs a threads parameter. It is a process-wide setting on purpose (the one
exception to "no global settings"): a worker process does nothing else.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import statistics
import tempfile
import time
from typing import Iterator

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from .errors import InputError, one_line

logger = logging.getLogger(__name__)

# protobuf refuses to serialize a message >= 2 GiB; stay clear of the limit.
PROTO_LIMIT = 2**31 - 2**24

# Thread count for sessions made with threads=None (None: onnxruntime's default). See the module doc.
_default_threads: int | None = None


def set_default_threads(threads: int | None) -> int | None:
    """Sessions made from now on with ``threads=None`` use ``threads`` intra-op threads (and 1
    inter-op thread); None restores onnxruntime's default. Returns the previous setting."""
    global _default_threads
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    previous, _default_threads = _default_threads, threads
    return previous


def get_default_threads() -> int | None:
    return _default_threads


@contextlib.contextmanager
def default_threads(threads: int | None) -> Iterator[None]:
    """:func:`set_default_threads` for the duration of a ``with`` block."""
    previous = set_default_threads(threads)
    try:
        yield
    finally:
        set_default_threads(previous)


def _relu_model(ir_version: int, opset: int) -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model.SerializeToString()


def _loads(ir_version: int, opset: int) -> bool:
    try:
        ort.InferenceSession(_relu_model(ir_version, opset), providers=["CPUExecutionProvider"])
        return True
    except Exception:  # noqa: BLE001 - any refusal means "not supported"
        return False


@functools.lru_cache(maxsize=None)
def max_ir_version() -> int:
    """Highest model IR version the installed onnxruntime loads (probed once)."""
    for ir in range(onnx.IR_VERSION, 6, -1):
        if _loads(ir, 13):
            return ir
    return 7


@functools.lru_cache(maxsize=None)
def max_opset() -> int:
    """Highest default-domain opset the installed onnxruntime loads (probed once)."""
    ir = max_ir_version()
    for opset in range(onnx.defs.onnx_opset_version(), 6, -1):
        if _loads(ir, opset):
            return opset
    return 7


def model_bytes_estimate(model: onnx.ModelProto) -> int:
    """Serialized size without serializing (which fails above 2 GB): sum of tensor payloads + graph."""
    from .ir import iter_model_tensors  # ir imports this module

    total = 0
    for init in iter_model_tensors(model):
        if init.HasField("raw_data"):
            total += len(init.raw_data)
        else:
            total += 8 * (len(init.float_data) + len(init.int64_data) + len(init.double_data)
                          + len(init.int32_data) + len(init.uint64_data))
    return total + 64 * len(model.graph.node)


def session_options(*, optimize: bool = True, threads: int | None = None,
                    optimized_model_path: str | None = None, mem_arena: bool = True) -> ort.SessionOptions:
    """``mem_arena=False``: tensors go back to the system when freed instead of staying in
    onnxruntime's arena (checks that run a model a few times: a model whose DequantizeLinear outputs
    are full float weights otherwise keeps all of them allocated, 1x the float weights).
    ``threads=None``: the process default (:func:`set_default_threads`), else onnxruntime's."""
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = mem_arena
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if not threads:
        threads = _default_threads
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if optimized_model_path:
        opts.optimized_model_filepath = optimized_model_path
    opts.log_severity_level = 3
    return opts


def make_session(model: onnx.ModelProto | bytes | str | os.PathLike, *, optimize: bool = True,
                 threads: int | None = None, optimized_model_path: str | None = None,
                 mem_arena: bool = True) -> ort.InferenceSession:
    """Build a CPU session. A path is handed to onnxruntime as is (it reads external data itself), and
    so are a serialized model's bytes; protos too big to serialize go through a temporary folder."""
    opts = session_options(optimize=optimize, threads=threads, optimized_model_path=optimized_model_path,
                           mem_arena=mem_arena)
    providers = ["CPUExecutionProvider"]
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(os.fspath(model), opts, providers=providers)
    if isinstance(model, bytes):
        return ort.InferenceSession(model, opts, providers=providers)
    if model_bytes_estimate(model) < PROTO_LIMIT:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    tmp = tempfile.mkdtemp(prefix="onnxslim-session-")
    try:
        path = os.path.join(tmp, "model.onnx")
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save_model(copy, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        return ort.InferenceSession(path, opts, providers=providers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_feeds(model: onnx.ModelProto | str | os.PathLike, feeds, *, optimize: bool = True,
              threads: int | None = None, label: str | None = None, source: str = "the feeds"
              ) -> list[dict[str, np.ndarray]]:
    """``{output: array}`` for every feed, from one session released afterwards. With ``label`` (the
    model as the user named it), onnxruntime failures become one-line InputErrors naming it and the
    failing batch of ``source``."""
    try:
        session = make_session(model, optimize=optimize, threads=threads)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types
        if label is None:
            raise
        raise InputError(f"{label}: does not load in onnxruntime ({one_line(exc, 200)})") from None
    names = [o.name for o in session.get_outputs()]
    outputs = []
    for i, feed in enumerate(feeds):
        try:
            outputs.append(dict(zip(names, session.run(names, feed))))
        except Exception as exc:  # noqa: BLE001
            if label is None:
                raise
            raise InputError(f"{label}: fails on calibration batch {i} of {source} "
                             f"({one_line(exc, 200)})") from None
    return outputs


ORT_TYPE_TO_NUMPY = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
    "tensor(string)": np.str_,
}


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags /proc/cpuinfo lists (x86 'flags', Arm 'Features'); empty when unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return frozenset(flags)


def cpu_int8_dot_product() -> str | None:
    """The int8 dot-product instruction set this CPU offers to onnxruntime's kernels, or None.

    x86: AMX-INT8, AVX512-VNNI, AVX-VNNI; Arm: the dot-product extension (asimddp / i8mm)."""
    flags = cpu_flags()
    for flag, name in (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI"),
                       ("i8mm", "Arm I8MM"), ("asimddp", "Arm dot-product")):
        if flag in flags:
            return name
    return None


def channel_block() -> int:
    """Channels onnxruntime's CPU convolutions process as one block (MLAS NCHWc: 16 floats with AVX-512,
    8 with AVX2/NEON). Channel counts that are not a multiple of it are padded up to one, so pruning
    only saves time in whole blocks (measured: a digits CNN pruned 32 -> 24 channels ran 1.1x slower
    on AVX-512, 32 -> 16 ran 0.58x)."""
    return 16 if "avx512f" in cpu_flags() else 8


def time_sessions(models: list, feed: dict, *, threads: int | None = 2, runs: int = 20, warmup: int = 3,
                  rounds: int = 3) -> list[list[float]]:
    """Seconds per run of each model (path or proto) on ``feed``, measured the way FIELD-NOTES 15 asks:
    one session alive at a time, models interleaved A, B, A, B... over ``rounds``."""
    times: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for i, model in enumerate(models):
            sess = make_session(model, threads=threads)
            names = {inp.name for inp in sess.get_inputs()}
            this = {k: v for k, v in feed.items() if k in names}
            for _ in range(warmup):
                sess.run(None, this)
            for _ in range(runs):
                t0 = time.perf_counter()
                sess.run(None, this)
                times[i].append(time.perf_counter() - t0)
            del sess
    return times


def round_medians(times: list[float], rounds: int) -> list[float]:
    """The median run of each round of one model's :func:`time_sessions` list (runs in round order)."""
    per = len(times) // rounds
    return [statistics.median(times[r * per:(r + 1) * per]) for r in range(rounds)]


def paired_ratio(times: list[float], reference: list[float], rounds: int) -> float:
    """Latency of ``times`` / ``reference`` (two lists from one :func:`time_sessions` call): each round's
    median against the reference's in the same round, then the median over rounds, so that a burst of
    load hits both sides of a ratio instead of one variant."""
    return statistics.median(a / b for a, b in zip(round_medians(times, rounds), round_medians(reference, rounds)))
