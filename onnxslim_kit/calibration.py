"""Calibration data: re-iterable feed dicts ``{input_name: np.ndarray}`` for passes and the parity gate.

Sources (:func:`load_calibration`):

- ``None``: seeded random data (:func:`random_calibration`);
- a ``.npz`` file: one array per input name, samples stacked on axis 0, fed in slices of the model's
  batch size (static batch ``N`` -> slices of ``N``, dynamic batch -> ``batch_size``, default 1). An
  array with one axis more than the input (e.g. scalar inputs, or models without a batch axis) stacks
  whole feeds on that extra axis 0 instead;
- a ``.npy`` file: the same for a single-input model;
- a folder of per-sample ``.npz`` files (each file one feed dict; inputs may vary in size between
  files) or ``.npy`` files (single-input models). An array that lacks the batch axis gets one;
- a folder of images (Pillow, imported lazily) with a small ``preprocess`` spec (see
  :data:`PREPROCESS_KEYS`);
- a dict ``{name: array}`` (like a ``.npz``), an iterable of feed dicts, or a ``CalibrationData``.

Dtype policy: data must have the input's kind (float, integer, bool). Within a kind it is cast to the
declared dtype: float64 -> float32/float16 is accepted (numpy's default dtype; values that overflow
the target are refused), integers are cast when every value fits (int64 token ids for an int32 input).
Integer data for a float input (or the reverse) and anything for a bool input but bool are errors.

Files are never unpickled (``allow_pickle=False``), and folders are read lazily: one file per feed,
when the feed is produced; only the first file is checked up front so that bad data fails fast.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import onnx
from onnx import helper

from .errors import InputError
from .shapes import input_dims

logger = logging.getLogger(__name__)

# Defaults for dims that the model leaves open (pinned input_shapes override them).
DEFAULT_BATCH = 1
DEFAULT_SYMBOLIC_DIM = 16
DEFAULT_UNKNOWN_DIM = 1
# Random integer inputs (token ids, indices) are drawn from [0, min(vocab guess, MAX_RANDOM_INT)).
MAX_RANDOM_INT = 100

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                            ".pgm"})
ARRAY_SUFFIXES = frozenset({".npz", ".npy"})

# Image preprocessing spec keys: resize (int shorter side, or [h, w]), center_crop (int or [h, w]),
# scale (multiplier applied first, default 1/255 for float inputs, 1 for integer ones), mean/std
# (per channel, after scaling), layout ("NCHW" or "NHWC", default from the input shape), color
# ("RGB", "BGR" or "L"), dtype (default: the input's dtype).
PREPROCESS_KEYS = frozenset({"resize", "center_crop", "scale", "mean", "std", "layout", "color", "dtype"})


# ----------------------------------------------------------------------------------------------
# Input specs
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputSpec:
    """One real model input. ``shape`` holds declared dims (int, symbolic name, or None); pinned dims
    replace symbolic ones. ``int_high`` is an exclusive upper bound for random integer data, guessed
    from an embedding table the input indexes (None when no guess)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]
    int_high: int | None = None
    rank_known: bool = True          # False when the model declares no shape at all (data is not checked)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def batch_dim(self) -> int | str | None:
        """The declared dim 0 (the batch axis by convention), or None for scalars."""
        return self.shape[0] if self.shape else None

    @property
    def static_batch(self) -> int | None:
        dim = self.batch_dim
        return dim if isinstance(dim, int) else None


def _vocab_guess(model: onnx.ModelProto, name: str) -> int | None:
    """Rows of the embedding table an input indexes directly (``Gather(table, name)``)."""
    consts: dict[str, tuple[int, ...]] = {init.name: tuple(init.dims) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    consts[node.output[0]] = tuple(attr.t.dims)
    guesses = []
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name:
            dims = consts.get(node.input[0])
            if dims:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                axis = axis + len(dims) if axis < 0 else axis
                if 0 <= axis < len(dims) and dims[axis] > 0:
                    guesses.append(int(dims[axis]))
    return min(guesses) if guesses else None


def input_specs(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> list[InputSpec]:
    """Real inputs of ``model`` (graph inputs that are initializers, as in IR<4 models, are excluded),
    with pinned ``input_shapes`` replacing declared dims."""
    initializers = {init.name for init in model.graph.initializer}
    real = [vi for vi in model.graph.input if vi.name not in initializers]
    shapes = dict(input_shapes or {})
    unknown = sorted(set(shapes) - {vi.name for vi in real})
    if unknown:
        raise InputError(f"--input-shape: the model has no input named {', '.join(repr(u) for u in unknown)} "
                         f"(inputs: {', '.join(vi.name for vi in real) or 'none'})")
    specs = []
    for vi in real:
        if not vi.type.HasField("tensor_type"):
            raise InputError(f"model input '{vi.name}' is not a tensor ({vi.type.WhichOneof('value')}); "
                             f"calibration data supports tensor inputs only")
        elem = vi.type.tensor_type.elem_type
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
        except Exception:  # noqa: BLE001 - onnx raises KeyError/ValueError for undefined types
            raise InputError(f"model input '{vi.name}' has an unsupported element type {elem}") from None
        dims = tuple(input_dims(vi))
        if vi.name in shapes:
            pinned = [int(d) for d in shapes[vi.name]]
            if dims and len(dims) != len(pinned):
                raise InputError(f"--input-shape {vi.name}: rank {len(pinned)} does not match the model's "
                                 f"rank {len(dims)}")
            for declared, value in zip(dims, pinned):
                if isinstance(declared, int) and declared != value:
                    raise InputError(f"--input-shape {vi.name}: dim {value} conflicts with the model's "
                                     f"static dim {declared}")
            dims = tuple(pinned)
        high = _vocab_guess(model, vi.name) if dtype.kind in "iu" else None
        rank_known = vi.type.tensor_type.HasField("shape") or vi.name in shapes
        specs.append(InputSpec(vi.name, dtype, dims, high, rank_known))
    return specs


# ----------------------------------------------------------------------------------------------
# CalibrationData
# ----------------------------------------------------------------------------------------------

class CalibrationData:
    """Re-iterable sequence of feed dicts. Each ``iter()`` starts over and reads lazily."""

    def __init__(self, factory: Callable[[], Iterator[dict[str, np.ndarray]]], *, length: int,
                 num_samples: int, source: str, is_random: bool):
        self._factory = factory
        self._length = int(length)
        self._num_samples = int(num_samples)
        self.source = source
        self.is_random = is_random

    # Feeds of up to this many bytes in all are kept after the first complete pass, so the passes and
    # the parity gate that read them again do not re-read and re-check the files each time (measured:
    # digits_cnn quantize-int8 read its 16 feeds ~6 times). Larger data is streamed every time.
    CACHE_BYTES = 64 << 20

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        cached = getattr(self, "_cached", None)
        if cached is not None:
            return (dict(feed) for feed in cached)
        return self._first_pass()

    def _first_pass(self) -> Iterator[dict[str, np.ndarray]]:
        store: list | None = []
        size = 0
        for feed in self._factory():
            if store is not None:
                size += sum(getattr(a, "nbytes", 0) for a in feed.values())
                if size <= self.CACHE_BYTES:
                    store.append(feed)
                else:
                    store = None
            yield feed
        if store is not None:
            self._cached = store

    def __len__(self) -> int:
        return self._length

    @property
    def num_samples(self) -> int:
        """Samples in all feeds: a feed of batch ``B`` counts ``B``; a per-sample file counts 1."""
        return self._num_samples

    def __repr__(self) -> str:
        return (f"CalibrationData(source={self.source!r}, feeds={self._length}, samples={self._num_samples}, "
                f"random={self.is_random})")


# ----------------------------------------------------------------------------------------------
# Random data
# ----------------------------------------------------------------------------------------------

def _concrete_shape(spec: InputSpec, batch: int, batch_names: set[str]) -> tuple[int, ...]:
    out = []
    for i, dim in enumerate(spec.shape):
        if isinstance(dim, int):
            out.append(dim)
        elif i == 0 or (isinstance(dim, str) and dim in batch_names):
            out.append(batch)
        elif isinstance(dim, str):
            out.append(DEFAULT_SYMBOLIC_DIM)
        else:
            out.append(DEFAULT_UNKNOWN_DIM)
    return tuple(out)


def _random_array(spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    dtype = spec.dtype
    if dtype.kind == "b":
        return np.ones(shape, dtype=dtype)
    if "mask" in spec.name.lower():
        return np.ones(shape, dtype=dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        high = min(spec.int_high or MAX_RANDOM_INT, MAX_RANDOM_INT)
        high = min(high, int(np.iinfo(dtype).max) + 1)
        return rng.integers(0, max(high, 1), size=shape).astype(dtype)
    raise InputError(f"model input '{spec.name}' has dtype {dtype}: random data is not possible, "
                     f"pass calibration data (--calib)")


def random_calibration(specs: list[InputSpec], *, num_samples: int = 8, seed: int = 0,
                       batch_size: int | None = None) -> CalibrationData:
    """Seeded random feeds: float ~N(0,1), integers in [0, min(vocab guess, 100)), masks and bools ones.
    Feeds hold the model's batch (static dim 0, else ``batch_size``, default 1); ``num_samples`` is
    rounded up to whole feeds. The same seed gives the same arrays on every iteration."""
    if num_samples < 1:
        raise InputError(f"--calib-samples {num_samples}: must be at least 1")
    for spec in specs:  # fail now, not during the first iteration
        if not spec.rank_known:
            raise InputError(f"model input '{spec.name}' declares no shape: random data needs one, pin it "
                             f"with --input-shape {spec.name}:D1,D2,... or pass --calib")
        if spec.dtype.kind not in "biuf":
            _random_array(spec, (), np.random.default_rng(0))
    batch = _feed_batch(specs, batch_size)
    batch_names = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], str)}
    shapes = {s.name: _concrete_shape(s, batch, batch_names) for s in specs}
    has_batch = any(s.shape for s in specs)
    per_feed = batch if has_batch else 1
    length = max(1, math.ceil(num_samples / per_feed))

    def generate() -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        for _ in range(length):
            yield {s.name: _random_array(s, shapes[s.name], rng) for s in specs}

    return CalibrationData(generate, length=length, num_samples=length * per_feed,
                           source=f"random(seed={seed}, samples={num_samples})", is_random=True)


def _feed_batch(specs: list[InputSpec], batch_size: int | None) -> int:
    """Rows per feed: the static batch dim (all inputs must agree), else ``batch_size`` (default 1)."""
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: must be at least 1")
    static = {s.static_batch for s in specs if s.static_batch is not None}
    if len(static) == 1:
        value = static.pop()
        if batch_size is not None and batch_size != value:
            logger.info("batch size %d ignored: the model's batch is static (%d)", batch_size, value)
        return value
    return batch_size or DEFAULT_BATCH


# ----------------------------------------------------------------------------------------------
# Array checks
# ----------------------------------------------------------------------------------------------

_KIND = {"f": "float", "i": "integer", "u": "integer", "b": "bool"}


def _kind(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    kind = _KIND.get(dtype.kind)
    return kind if kind is not None else str(dtype)


def _check_names(names: Iterable[str], specs: list[InputSpec], label: str) -> None:
    got = set(names)
    want = {s.name for s in specs}
    if got != want:
        parts = []
        missing = sorted(want - got)
        unexpected = sorted(got - want)
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected)}")
        raise InputError(f"{label}: input names do not match the model ({'; '.join(parts)}; "
                         f"model inputs: {', '.join(sorted(want)) or 'none'})")


def _check_dtype(dtype: np.dtype, spec: InputSpec, label: str) -> None:
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise InputError(f"{label}: '{spec.name}' holds Python objects: pickled data refused")
    if _kind(dtype) != _kind(spec.dtype) or dtype.kind not in "biuf":
        raise InputError(f"{label}: '{spec.name}' has dtype {dtype}, the model expects {spec.dtype} "
                         f"({_kind(dtype)} data for a {_kind(spec.dtype)} input)")


def _check_shape(shape: tuple[int, ...], spec: InputSpec, label: str, *, skip_batch: bool = False) -> None:
    if not spec.rank_known:
        return
    if len(shape) != len(spec.shape):
        raise InputError(f"{label}: '{spec.name}' has rank {len(shape)} {tuple(shape)}, the model expects "
                         f"rank {len(spec.shape)} {_fmt_dims(spec.shape)}")
    for i, (got, want) in enumerate(zip(shape, spec.shape)):
        if skip_batch and i == 0:
            continue
        if isinstance(want, int) and got != want:
            raise InputError(f"{label}: '{spec.name}' has shape {tuple(shape)}, the model expects "
                             f"{_fmt_dims(spec.shape)} (dim {i}: {got} != {want})")


def _fmt_dims(dims) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def _cast(array: np.ndarray, spec: InputSpec, label: str) -> np.ndarray:
    """Cast within a kind (float64 -> float32, int64 -> int32 when values fit)."""
    array = np.asarray(array)
    _check_dtype(array.dtype, spec, label)
    if spec.dtype.kind == "f" and array.dtype.kind == "f" and array.size and not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise InputError(f"{label}: '{spec.name}' has {bad} NaN/Inf value(s); calibration data must be finite")
    if array.dtype == spec.dtype:
        return np.ascontiguousarray(array)
    if spec.dtype.kind == "f":
        with np.errstate(over="ignore"):
            out = array.astype(spec.dtype)
        if np.any(np.isinf(out) & np.isfinite(array)):
            raise InputError(f"{label}: '{spec.name}' has values that overflow {spec.dtype}")
        return out
    if array.size:
        info = np.iinfo(spec.dtype)
        lo, hi = array.min(), array.max()
        if lo < info.min or hi > info.max:
            raise InputError(f"{label}: '{spec.name}' has values [{lo}, {hi}] outside {spec.dtype}")
    return array.astype(spec.dtype)


def _npy_header(fh) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a .npy stream, reading only its header."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    else:
        shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    return tuple(shape), np.dtype(dtype)


# What a corrupted .npy/.npz can raise from zipfile, zlib or numpy's header parser.
_CORRUPT = (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError, zlib.error, struct.error,
            KeyError, SyntaxError, UnicodeDecodeError)


def _headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{name: (shape, dtype)}`` of a .npz (or ``{"": ...}`` of a .npy) without loading the data."""
    label = os.fspath(path)
    try:
        if path.suffix.lower() == ".npz":
            out = {}
            with zipfile.ZipFile(path) as zf:
                for member in zf.namelist():
                    if not member.endswith(".npy"):
                        continue
                    with zf.open(member) as fh:
                        out[member[:-4]] = _npy_header(fh)
            return out
        with open(path, "rb") as fh:
            return {"": _npy_header(fh)}
    except FileNotFoundError:
        raise InputError(f"{label}: calibration file not found") from None
    except _CORRUPT as exc:
        raise _unreadable(label, exc) from None


def _np_load(path: Path, **kwargs) -> Any:
    label = os.fspath(path)
    try:
        return np.load(path, allow_pickle=False, **kwargs)
    except FileNotFoundError:
        raise InputError(f"{label}: calibration file not found") from None
    except _CORRUPT as exc:
        raise _unreadable(label, exc) from None


def _unreadable(what: str, exc: BaseException) -> InputError:
    """One line for a numpy file (or one .npz member) that cannot be read; pickles are named as such."""
    if isinstance(exc, ValueError) and "pickle" in str(exc).lower():
        return InputError(f"{what}: holds Python objects: pickled data refused")
    return InputError(f"{what}: not a readable numpy file ({type(exc).__name__}: {exc})")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with _np_load(path) as data:
        out = {}
        for key in data.files:
            try:
                out[key] = data[key]
            except _CORRUPT as exc:
                raise _unreadable(f"{path}: '{key}'", exc) from None
        return out


# ----------------------------------------------------------------------------------------------
# Stacked arrays (.npz file, .npy file, dict)
# ----------------------------------------------------------------------------------------------

def _stacked(arrays: Callable[[], dict[str, np.ndarray]], headers: dict[str, tuple[tuple[int, ...], np.dtype]],
             specs: list[InputSpec], label: str, batch_size: int | None) -> CalibrationData:
    """Arrays with samples on axis 0. Same rank as the input: sliced into batches; one axis more:
    each entry along axis 0 is one whole feed."""
    _check_names(headers, specs, label)
    batch = _feed_batch(specs, batch_size)
    modes: dict[str, str] = {}
    counts: dict[str, int] = {}
    for spec in specs:
        shape, dtype = headers[spec.name]
        _check_dtype(dtype, spec, label)
        if not spec.rank_known:
            if not shape:
                raise InputError(f"{label}: '{spec.name}' is a scalar; expected samples stacked on axis 0")
            modes[spec.name] = "rows"
            counts[spec.name] = math.ceil(shape[0] / batch)
        elif len(shape) == len(spec.shape) + 1:
            modes[spec.name] = "feeds"
            _check_shape(shape[1:], spec, label)
            counts[spec.name] = shape[0]
        elif len(shape) == len(spec.shape) and shape:
            modes[spec.name] = "rows"
            _check_shape(shape, spec, label, skip_batch=True)
            counts[spec.name] = shape[0] // batch if spec.static_batch else math.ceil(shape[0] / batch)
            if spec.static_batch and shape[0] % batch:
                logger.warning("%s: '%s' has %d samples, not a multiple of the static batch %d; the last %d "
                               "are not used", label, spec.name, shape[0], batch, shape[0] % batch)
        else:
            raise InputError(f"{label}: '{spec.name}' has rank {len(shape)} {tuple(shape)}: expected rank "
                             f"{spec.rank} (samples on axis 0) or {spec.rank + 1} (whole feeds on axis 0) "
                             f"for an input shaped {_fmt_dims(spec.shape)}")
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        raise InputError(f"{label}: inputs give different numbers of feeds ({detail})")
    length = next(iter(counts.values()), 0)
    if length == 0:
        raise InputError(f"{label}: no samples (need at least {batch} per input)")
    first_shape = headers[specs[0].name][0]
    if modes[specs[0].name] == "rows":
        samples = min(first_shape[0], length * batch)
    else:
        samples = length * (first_shape[1] if len(first_shape) > 1 else 1)

    def generate() -> Iterator[dict[str, np.ndarray]]:
        data = arrays()
        for i in range(length):
            feed = {}
            for spec in specs:
                arr = data[spec.name]
                part = arr[i] if modes[spec.name] == "feeds" else arr[i * batch:(i + 1) * batch]
                feed[spec.name] = _cast(part, spec, label)
            yield feed

    return CalibrationData(generate, length=length, num_samples=samples, source=label, is_random=False)


# ----------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------

def _per_sample(arr: np.ndarray, spec: InputSpec, label: str) -> np.ndarray:
    """A per-sample array: the input's shape, or the input's shape without the batch axis."""
    if spec.shape and arr.ndim == spec.rank - 1 and not (isinstance(spec.batch_dim, int) and spec.batch_dim != 1):
        arr = arr[np.newaxis]
    _check_shape(arr.shape, spec, label)
    return _cast(arr, spec, label)


def _array_folder(files: list[Path], specs: list[InputSpec], label: str) -> CalibrationData:
    npy = [f for f in files if f.suffix.lower() == ".npy"]
    if npy and len(specs) != 1:
        raise InputError(f"{label}: .npy files feed single-input models only; this model has inputs "
                         f"{', '.join(s.name for s in specs)} (use one .npz per sample)")

    def read(path: Path) -> dict[str, np.ndarray]:
        if path.suffix.lower() == ".npy":
            arrays = {specs[0].name: _np_load(path)}
        else:
            arrays = _read_npz(path)
        _check_names(arrays, specs, os.fspath(path))
        return {s.name: _per_sample(arrays[s.name], s, os.fspath(path)) for s in specs}

    # Fail fast on the first file (headers only); every other file is checked when it is read.
    first = files[0]
    heads = _headers(first)
    if first.suffix.lower() == ".npy":
        heads = {specs[0].name: heads[""]}
    _check_names(heads, specs, os.fspath(first))
    for spec in specs:
        _check_dtype(heads[spec.name][1], spec, os.fspath(first))

    def generate() -> Iterator[dict[str, np.ndarray]]:
        for path in files:
            yield read(path)

    return CalibrationData(generate, length=len(files), num_samples=len(files), source=label, is_random=False)


def _image_layout(spec: InputSpec, preprocess: dict) -> str:
    layout = str(preprocess.get("layout", "")).upper()
    if layout:
        if layout not in ("NCHW", "NHWC"):
            raise InputError(f"preprocess layout '{layout}': use NCHW or NHWC")
        return layout
    if spec.rank == 4 and spec.shape[-1] in (1, 3) and spec.shape[1] not in (1, 3):
        return "NHWC"
    return "NCHW"


def _pair(value, key: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"preprocess {key}={value!r}: expected an int or [height, width]") from None
    return h, w


def _image_folder(files: list[Path], specs: list[InputSpec], label: str, preprocess: dict | None,
                  batch_size: int | None) -> CalibrationData:
    if len(specs) != 1:
        raise InputError(f"{label}: an image folder feeds single-input models only; this model has inputs "
                         f"{', '.join(s.name for s in specs)}")
    spec = specs[0]
    if spec.rank != 4:
        raise InputError(f"{label}: input '{spec.name}' has rank {spec.rank}; images need a rank-4 input")
    preprocess = dict(preprocess or {})
    unknown = sorted(set(preprocess) - PREPROCESS_KEYS)
    if unknown:
        raise InputError(f"preprocess: unknown key(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(PREPROCESS_KEYS))})")
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise InputError(f"{label}: image calibration needs Pillow (pip install pillow)") from None

    layout = _image_layout(spec, preprocess)
    c_dim, h_dim, w_dim = (spec.shape[1], spec.shape[2], spec.shape[3]) if layout == "NCHW" else (
        spec.shape[3], spec.shape[1], spec.shape[2])
    color = str(preprocess.get("color", "L" if c_dim == 1 else "RGB")).upper()
    if color not in ("RGB", "BGR", "L"):
        raise InputError(f"preprocess color '{color}': use RGB, BGR or L")
    try:
        out_dtype = np.dtype(preprocess.get("dtype", spec.dtype))
    except TypeError:
        raise InputError(f"preprocess dtype {preprocess.get('dtype')!r}: not a numpy dtype") from None
    _check_dtype(out_dtype, spec, f"preprocess dtype {out_dtype}")
    scale = float(preprocess.get("scale", 1 / 255 if out_dtype.kind == "f" else 1))
    channels = 1 if color == "L" else 3
    mean = np.asarray(preprocess.get("mean", [0.0] * channels), dtype=np.float64).reshape(-1)
    std = np.asarray(preprocess.get("std", [1.0] * channels), dtype=np.float64).reshape(-1)
    for key, vec in (("mean", mean), ("std", std)):
        if vec.size not in (1, channels):
            raise InputError(f"preprocess {key}: {vec.size} values for {channels} channel(s)")
    if np.any(std == 0):
        raise InputError("preprocess std: values must be non-zero")
    target = (h_dim, w_dim) if isinstance(h_dim, int) and isinstance(w_dim, int) else None
    resize = preprocess.get("resize")
    crop = _pair(preprocess["center_crop"], "center_crop") if "center_crop" in preprocess else None
    batch = _feed_batch(specs, batch_size)

    def load_one(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as img:
                img = img.convert("L" if color == "L" else "RGB")
                if resize is not None:
                    if isinstance(resize, int):
                        w, h = img.size
                        s = resize / min(w, h)
                        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
                    else:
                        rh, rw = _pair(resize, "resize")
                        img = img.resize((rw, rh), Image.BILINEAR)
                elif crop is None and target is not None:
                    img = img.resize((target[1], target[0]), Image.BILINEAR)
                if crop is not None:
                    ch, cw = crop
                    w, h = img.size
                    if ch > h or cw > w:
                        raise InputError(f"{path}: center_crop {ch}x{cw} larger than the image {h}x{w}")
                    left, top = (w - cw) // 2, (h - ch) // 2
                    img = img.crop((left, top, left + cw, top + ch))
                arr = np.asarray(img, dtype=np.float64)
        except InputError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise InputError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if color == "BGR":
            arr = arr[:, :, ::-1]
        arr = (arr * scale - mean) / std
        if layout == "NCHW":
            arr = arr.transpose(2, 0, 1)
        if out_dtype.kind in "iu":
            info = np.iinfo(out_dtype)
            arr = np.clip(np.rint(arr), info.min, info.max)
        arr = arr.astype(out_dtype)[np.newaxis]
        _check_shape(arr.shape, spec, os.fspath(path), skip_batch=True)
        return arr

    load_one(files[0])  # fail fast: unreadable first image, wrong size, bad spec
    length = len(files) // batch if spec.static_batch else math.ceil(len(files) / batch)
    if length == 0:
        raise InputError(f"{label}: {len(files)} image(s), fewer than the model's static batch {batch}")

    def generate() -> Iterator[dict[str, np.ndarray]]:
        for i in range(length):
            chunk = [load_one(p) for p in files[i * batch:(i + 1) * batch]]
            shapes = {a.shape for a in chunk}
            if len(shapes) > 1:
                raise InputError(f"{label}: images of one batch differ in size after preprocessing "
                                 f"({sorted(shapes)}); set preprocess resize/center_crop or batch size 1")
            yield {spec.name: np.concatenate(chunk, axis=0)}

    return CalibrationData(generate, length=length, num_samples=min(len(files), length * batch),
                           source=label, is_random=False)


def _folder(path: Path, specs: list[InputSpec], label: str, preprocess: dict | None,
            batch_size: int | None) -> CalibrationData:
    entries = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    arrays = [p for p in entries if p.suffix.lower() in ARRAY_SUFFIXES]
    images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
    if arrays and images:
        raise InputError(f"{label}: folder mixes numpy files and images; use one kind")
    if arrays:
        return _array_folder(arrays, specs, label)
    if images:
        return _image_folder(images, specs, label, preprocess, batch_size)
    raise InputError(f"{label}: empty folder (no .npz, .npy or image files)")


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def _feeds(source: Iterable, specs: list[InputSpec], label: str) -> CalibrationData:
    """An iterable of feed dicts: lists are re-iterated; one-shot iterators are materialized."""
    if iter(source) is source:
        source = list(source)
    count = 0
    for i, feed in enumerate(source):
        if not isinstance(feed, dict):
            raise InputError(f"{label}: item {i} is a {type(feed).__name__}, expected a dict of arrays")
        count += 1
    if count == 0:
        raise InputError(f"{label}: no feed dicts")

    def generate() -> Iterator[dict[str, np.ndarray]]:
        for i, feed in enumerate(source):
            item = f"{label} item {i}"
            _check_names(feed, specs, item)
            out = {}
            for spec in specs:
                arr = np.asarray(feed[spec.name])
                _check_shape(arr.shape, spec, item)
                out[spec.name] = _cast(arr, spec, item)
            yield out

    first = next(iter(generate()))
    rows = next((a.shape[0] for a in first.values() if a.ndim), 1)
    return CalibrationData(generate, length=count, num_samples=count * rows, source=label, is_random=False)


def load_calibration(source, specs: list[InputSpec], *, num_samples: int = 8, seed: int = 0,
                     batch_size: int | None = None, preprocess: dict | None = None,
                     max_samples: int | None = None) -> CalibrationData:
    """Calibration data from ``source`` (see the module doc) for inputs ``specs``.

    ``num_samples``/``seed`` apply to random data only; ``max_samples`` caps the feeds taken from a
    real source (whole feeds; None: all). ``batch_size`` sets rows per feed for a dynamic batch.
    """
    if isinstance(source, CalibrationData):
        return source
    if source is None:
        return random_calibration(specs, num_samples=num_samples, seed=seed, batch_size=batch_size)
    if not specs:
        raise InputError("the model has no inputs to feed calibration data to")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = os.fspath(source)
        if not path.exists():
            raise InputError(f"{label}: calibration data not found")
        if path.is_dir():
            data = _folder(path, specs, label, preprocess, batch_size)
        elif path.suffix.lower() == ".npz":
            headers = _headers(path)
            data = _stacked(lambda: _read_npz(path), headers, specs, label, batch_size)
        elif path.suffix.lower() == ".npy":
            if len(specs) != 1:
                raise InputError(f"{label}: a .npy file feeds single-input models only; this model has inputs "
                                 f"{', '.join(s.name for s in specs)} (use a .npz with one array per input)")
            header = _headers(path)[""]
            _check_dtype(header[1], specs[0], label)
            data = _stacked(lambda: {specs[0].name: _np_load(path, mmap_mode="r")}, {specs[0].name: header},
                            specs, label, batch_size)
        else:
            raise InputError(f"{label}: unsupported calibration file (use .npz, .npy, or a folder)")
    elif isinstance(source, dict):
        arrays = {k: np.asarray(v) for k, v in source.items()}
        for key, arr in arrays.items():
            if arr.dtype.hasobject:
                raise InputError(f"calibration dict: '{key}' holds Python objects: pickled data refused")
        headers = {k: (tuple(v.shape), v.dtype) for k, v in arrays.items()}
        data = _stacked(lambda: arrays, headers, specs, "calibration dict", batch_size)
    elif isinstance(source, Iterable):
        data = _feeds(source, specs, "calibration feeds")
    else:
        raise InputError(f"calibration source of type {type(source).__name__} is not supported")
    if max_samples is not None and max_samples < len(data):
        return _capped(data, max_samples)
    return data


def _capped(data: CalibrationData, feeds: int) -> CalibrationData:
    def generate() -> Iterator[dict[str, np.ndarray]]:
        for i, feed in enumerate(data):
            if i >= feeds:
                return
            yield feed

    per_feed = data.num_samples / max(len(data), 1)
    return CalibrationData(generate, length=feeds, num_samples=round(per_feed * feeds), source=data.source,
                           is_random=data.is_random)
