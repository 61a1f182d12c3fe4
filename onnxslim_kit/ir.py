"""Graph IR: a thin ``Model`` wrapper around ``onnx_graphsurgeon.Graph``.

Responsibilities:
- load from a path or a ``ModelProto``; external data is resolved against the model's own folder and
  refused when a location points outside it (``..``, absolute paths, symlinks);
- queries passes need (cached name->tensor map, producer/consumers, constant values that also sees
  weights stored as ``Constant`` nodes), and the few safe mutations (replace_all_uses, batched
  remove_nodes, dead-code cleanup, an iterative topological sort);
- export back to a ``ModelProto`` that the installed onnxruntime accepts, keeping the model's
  metadata, and atomic saving (temporary file + rename), with external data above 2 GB.
"""

from __future__ import annotations

import copy as _copy
import hashlib
import heapq
import logging
import mmap
import os
import secrets
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from . import runtime
from .errors import InputError, PassError

logger = logging.getLogger(__name__)

MIN_OPSET = 1


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def _iter_graph_tensors(graph: onnx.GraphProto):
    """Every TensorProto in a graph: initializers, sparse initializers, Constant/attribute tensors,
    recursively through subgraphs."""
    for g in _graph_protos(graph):
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors


def iter_model_tensors(model: onnx.ModelProto):
    yield from _iter_graph_tensors(model.graph)
    for fn in model.functions:
        for node in fn.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t


def check_external_data(model: onnx.ModelProto, base_dir: str | os.PathLike, label: str) -> None:
    """Refuse external-data locations that leave ``base_dir`` or do not exist (CVE-2022-25882 class)."""
    base = os.path.realpath(base_dir)
    for tensor in iter_model_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location:
            raise InputError(f"{label}: tensor '{tensor.name}' has external data without a location")
        if os.path.isabs(location) or location.startswith(("/", "\\")):
            raise InputError(f"{label}: external data of tensor '{tensor.name}' uses an absolute path "
                             f"'{location}'; only files inside the model's folder are allowed")
        target = os.path.realpath(os.path.join(base, location))
        if os.path.commonpath([base, target]) != base:
            raise InputError(f"{label}: external data of tensor '{tensor.name}' points outside the "
                             f"model's folder ('{location}')")
        if not os.path.isfile(target):
            raise InputError(f"{label}: external data file '{location}' for tensor '{tensor.name}' "
                             f"is missing")
        offset = int(info.get("offset", 0) or 0)
        length = int(info.get("length", 0) or 0)
        if offset < 0 or length < 0 or offset + length > os.path.getsize(target):
            raise InputError(f"{label}: external data of tensor '{tensor.name}' reads past the end of "
                             f"'{location}' (truncated data file?)")


def check_opset(model: onnx.ModelProto, label: str) -> None:
    opset = default_opset(model)
    newest = min(onnx.defs.onnx_opset_version(), runtime.max_opset())
    if opset is None:
        return  # e.g. a model of ai.onnx.ml ops only
    if opset < MIN_OPSET or opset > newest:
        raise InputError(f"{label}: unsupported opset {opset} (supported: {MIN_OPSET}-{newest} with the "
                         f"installed onnx {onnx.__version__} / onnxruntime)")


def _check_text_fields(proto: onnx.ModelProto, label: str) -> None:
    """Corrupted files can parse with names, op types or dims that are not valid UTF-8 (protobuf then
    hands out bytes): refuse them here instead of failing somewhere deep inside a pass."""
    from google.protobuf.descriptor import FieldDescriptor

    stack = [proto]
    while stack:
        msg = stack.pop()
        for desc, value in msg.ListFields():
            repeated = desc.is_repeated if hasattr(desc, "is_repeated") else \
                desc.label == FieldDescriptor.LABEL_REPEATED
            if desc.type == FieldDescriptor.TYPE_STRING:
                for item in (value if repeated else [value]):
                    if not isinstance(item, str):
                        raise InputError(f"{label}: not a valid ONNX model (corrupted text {item[:40]!r})")
            elif desc.type == FieldDescriptor.TYPE_MESSAGE:
                stack.extend(value if repeated else [value])
        if isinstance(msg, onnx.NodeProto) and not any(msg.output):
            raise InputError(f"{label}: not a valid ONNX model (node '{msg.name or msg.op_type}' has no outputs)")
        if isinstance(msg, onnx.AttributeProto) and msg.type == onnx.AttributeProto.STRING:
            try:
                msg.s.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{label}: not a valid ONNX model (corrupted attribute text {msg.s[:40]!r})") \
                    from None


def default_opset(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


def load_proto(path: str | os.PathLike, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Read and validate a model file; every problem becomes a one-line :class:`InputError`."""
    label = os.fspath(path)
    p = Path(path)
    if not p.exists():
        raise InputError(f"{label}: file not found")
    if p.is_dir():
        raise InputError(f"{label}: is a directory, expected an .onnx file")
    if p.stat().st_size == 0:
        raise InputError(f"{label}: file is empty")
    try:
        proto = onnx.load_model(label, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, TypeError) as exc:
        raise InputError(f"{label}: not a valid ONNX model (protobuf parse failed: truncated or not ONNX)") \
            from exc
    except OSError as exc:
        raise InputError(f"{label}: cannot read file ({exc.strerror or exc})") from exc
    if not proto.HasField("graph") or proto.ir_version <= 0 or not proto.opset_import:
        raise InputError(f"{label}: not a valid ONNX model (no graph, IR version or opset)")
    _check_text_fields(proto, label)
    check_opset(proto, label)
    base_dir = str(p.resolve().parent)
    check_external_data(proto, base_dir, label)
    if load_external_data:
        try:
            onnx.load_external_data_for_model(proto, base_dir)
        except (OSError, ValueError) as exc:
            raise InputError(f"{label}: cannot read external data ({exc})") from exc
    return proto


def has_external_data(model: onnx.ModelProto) -> bool:
    """Whether any tensor of ``model`` still points at an external-data file (not loaded)."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in iter_model_tensors(model))


def _plain_dtype(data_type: int) -> np.dtype | None:
    """The numpy dtype whose bytes are the tensor's raw little-endian layout, or None for types that
    need unpacking (sub-byte, ml_dtypes floats, strings)."""
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
    except (KeyError, TypeError, ValueError):
        return None
    if dtype.kind not in "biufc" or dtype.type.__module__ != "numpy":
        return None
    return dtype.newbyteorder("<")


def _external_info(tensor: onnx.TensorProto, base_dir: str) -> tuple[str, int, int | None]:
    info = {e.key: e.value for e in tensor.external_data}
    length = info.get("length")
    return (os.path.join(base_dir, info.get("location", "")), int(info.get("offset", 0) or 0),
            int(length) if length else None)


def map_external_tensor(tensor: onnx.TensorProto, base_dir: str, label: str) -> np.ndarray | None:
    """A read-only array over ``tensor``'s bytes in its external-data file (memory-mapped: nothing is
    read until used, and pages can be dropped again, see :func:`release_pages`); None when the type
    has no plain numpy layout. The location was checked by :func:`check_external_data`."""
    dtype = _plain_dtype(tensor.data_type)
    if dtype is None:
        return None
    path, offset, length = _external_info(tensor, base_dir)
    dims = [int(d) for d in tensor.dims]
    count = int(np.prod(dims)) if dims else 1
    nbytes = count * dtype.itemsize
    if length is not None and length != nbytes:
        raise InputError(f"{label}: external data of tensor '{tensor.name}' has {length} bytes, its type and "
                         f"shape need {nbytes}")
    if count == 0:
        return np.zeros(dims, dtype)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        with open(path, "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), offset - start + nbytes, access=mmap.ACCESS_READ, offset=start)
    except (OSError, ValueError) as exc:
        raise InputError(f"{label}: cannot map external data of tensor '{tensor.name}' ({exc})") from None
    return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset - start).reshape(dims)


def _mapping(array) -> "mmap.mmap | None":
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None) if isinstance(base, np.ndarray) else getattr(base, "obj", None)
    return base


def release_pages(arrays: Iterable) -> None:
    """Drop the resident pages of memory-mapped weights (they are re-read from the file if used
    again): weights read by a pass or a save do not stay in the process's memory."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None:
        return
    seen = set()
    for array in arrays:
        mapped = _mapping(array) if isinstance(array, np.ndarray) else None
        if mapped is not None and id(mapped) not in seen:
            seen.add(id(mapped))
            try:
                mapped.madvise(advice)
            except (OSError, ValueError):
                pass


def _load_small_external(proto: onnx.ModelProto, base_dir: str, label: str) -> None:
    """Load in place the external tensors that are not mapped (small ones, types without a plain
    layout): they become ordinary in-memory tensors, exactly as a full load makes them."""
    from onnx.external_data_helper import load_external_data_for_tensor

    for tensor in iter_model_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        dtype = _plain_dtype(tensor.data_type)
        nbytes = int(np.prod(tensor.dims)) * dtype.itemsize if dtype is not None else 0
        if dtype is not None and nbytes > STUB_BYTES:
            continue
        try:
            load_external_data_for_tensor(tensor, base_dir)
        except (OSError, ValueError) as exc:
            raise InputError(f"{label}: cannot read external data ({exc})") from exc
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

@dataclass
class ModelMeta:
    """Model-level fields graphsurgeon does not carry; restored on export."""

    ir_version: int = 0
    producer_name: str = ""
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    doc_string: str = ""
    metadata_props: list[tuple[str, str]] = field(default_factory=list)
    opset_imports: dict[str, int] = field(default_factory=dict)
    # Graph input order, and the initializers also listed as graph inputs (IR < 4 exports). Those are
    # overridable inputs with a default: graphsurgeon drops them from the inputs, so export restores
    # them and constant_value() does not treat them as constants (FIELD-NOTES 8).
    node_doc_strings: dict[str, str] = field(default_factory=dict)  # graphsurgeon drops them
    # Non-tensor value types (optional, sequence, map) by value name: graphsurgeon cannot export
    # optional types and flattens nested ones, so export restores them from here.
    special_types: dict[str, bytes] = field(default_factory=dict)
    # TYPE_PROTO attributes (Optional's 'type'), which graphsurgeon drops, by node name.
    type_attrs: dict[str, list[bytes]] = field(default_factory=dict)
    input_order: list[str] = field(default_factory=list)
    initializer_inputs: list[str] = field(default_factory=list)
    source: str = "<memory>"
    # Loaded from a file with external data: big weights are read-only memory maps of that file, and
    # the model is saved with external data again (never as one in-memory protobuf).
    external_data: bool = False

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, source: str) -> "ModelMeta":
        return cls(
            ir_version=proto.ir_version,
            producer_name=proto.producer_name,
            producer_version=proto.producer_version,
            domain=proto.domain,
            model_version=proto.model_version,
            doc_string=proto.doc_string,
            metadata_props=[(p.key, p.value) for p in proto.metadata_props],
            opset_imports={imp.domain: imp.version for imp in proto.opset_import},
            node_doc_strings={n.name: n.doc_string for n in proto.graph.node if n.name and n.doc_string},
            special_types=_special_types(proto.graph),
            input_order=[i.name for i in proto.graph.input],
            initializer_inputs=[i.name for i in proto.graph.input
                                if i.name in {t.name for t in proto.graph.initializer}],
            source=source,
        )


class Model:
    """A mutable model: a graphsurgeon graph plus the model-level fields it does not keep."""

    def __init__(self, graph: gs.Graph, meta: ModelMeta):
        self.graph = graph
        self.meta = meta
        self._tensor_map: dict[str, gs.Tensor] | None = None
        self._names: set[str] | None = None
        # (structure key, result) of the last value_infos(): passes ask for types several times a run
        # on an unchanged graph (each call is an export plus onnx shape inference).
        self._infos: tuple[list, dict[str, onnx.ValueInfoProto]] | None = None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def load(cls, source: "str | os.PathLike | onnx.ModelProto | Model") -> "Model":
        if isinstance(source, Model):
            return source.copy()
        if isinstance(source, onnx.ModelProto):
            return cls.from_proto(source)
        label = os.fspath(source)
        proto = load_proto(source, load_external_data=False)
        return cls.from_proto(proto, source=label, base_dir=str(Path(label).resolve().parent))

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, source: str = "<memory>", *,
                   base_dir: str | None = None) -> "Model":
        """Import ``proto``. When it still references external data (loaded with
        ``load_external_data=False``), ``base_dir`` is the model's folder: tensors above STUB_BYTES
        become read-only memory maps of their file (the weights are never copied into memory), the
        small ones are read. ``proto`` is modified in place in that case (the small tensors)."""
        external = base_dir is not None and has_external_data(proto)
        if external:
            _load_small_external(proto, base_dir, source)
        proto = _densify_sparse_initializers(proto)
        type_attrs = _collect_type_attrs(proto)
        if type_attrs:
            proto, type_attrs = type_attrs
        try:
            graph = gs.import_onnx(proto)
        except Exception as exc:  # noqa: BLE001 - graphsurgeon raises many types on malformed graphs
            raise InputError(f"{source}: cannot import graph ({type(exc).__name__}: {exc})") from exc
        meta = ModelMeta.from_proto(proto, source)
        meta.type_attrs = type_attrs or {}
        meta.external_data = external
        if external:
            _map_constants(graph, base_dir, source)
        return cls(graph, meta)

    def constants(self) -> list[gs.Constant]:
        """Every constant of the graph and its subgraphs (initializers and Constant-node values)."""
        out: dict[int, gs.Constant] = {}
        for g in _all_graphs(self.graph):
            for t in tensor_map(g).values():
                if isinstance(t, gs.Constant):
                    out[id(t)] = t
            for node in g.nodes:
                for value in node.attrs.values():
                    if isinstance(value, gs.Constant):
                        out[id(value)] = value
        return list(out.values())

    def weight_bytes(self) -> int:
        """Bytes of all constant payloads (without loading lazily held ones)."""
        total = 0
        for c in self.constants():
            values = c._values
            total += int(getattr(values, "nbytes", 0) or 0)
        return total

    def release_pages(self) -> None:
        """Drop the resident pages of memory-mapped weights (see :func:`release_pages`). Weights a
        pass replaced are often only cyclic garbage (graphsurgeon nodes and tensors point at each
        other): collecting it first unmaps them, which returns the pages they had read."""
        if not self.meta.external_data:  # nothing is memory-mapped: skip the (slow) full collection
            return
        import gc

        gc.collect()
        release_pages(c._values for c in self.constants())

    def copy(self) -> "Model":
        """Structural copy. Numpy buffers are shared: passes must never modify weights in place."""
        return Model(self.graph.copy(), _copy.deepcopy(self.meta))

    # -- basic properties ----------------------------------------------------------------------
    @property
    def opset(self) -> int:
        return int(self.graph.opset)

    @property
    def nodes(self) -> list[gs.Node]:
        return self.graph.nodes

    def invalidate(self) -> None:
        """Drop cached maps; call after any structural change made without the helpers below. The set of
        used names is kept: it only grows (a removed tensor's name stays taken), and new names come from
        :meth:`unique_name`, so it never misses one (rebuilding it after every change made rewrite loops
        quadratic: ~26 ms a run on a small opset-11 model's Constant folding)."""
        self._tensor_map = None

    def reset_names(self) -> None:
        """Forget the used-name set (rebuilt by the next :meth:`unique_name`): the pipeline does so before
        each pass, so a pass that named something without :meth:`unique_name` (a plugin) does not leave
        a stale set to the next one."""
        self._names = None

    def tensors(self) -> dict[str, gs.Tensor]:
        """Cached name -> tensor map of the main graph (graphsurgeon's ``tensors()`` walks every node)."""
        if self._tensor_map is None:
            self._tensor_map = tensor_map(self.graph)
        return self._tensor_map

    def has_node(self, node: gs.Node) -> bool:
        """Whether this very node is still in the main graph (by identity: graphsurgeon's ``Node.__eq__``
        compares names, attributes and tensors, and formats a log line, for every node before it, and
        would call a removed node present when a live one equals it)."""
        return any(n is node for n in self.graph.nodes)

    def node_by_name(self, name: str) -> gs.Node | None:
        for node in self.graph.nodes:
            if node.name == name:
                return node
        return None

    # -- queries -------------------------------------------------------------------------------
    @staticmethod
    def producer(tensor: gs.Tensor) -> gs.Node | None:
        return tensor.inputs[0] if tensor.inputs else None

    @staticmethod
    def consumers(tensor: gs.Tensor) -> list[gs.Node]:
        return list(tensor.outputs)

    def is_graph_output(self, tensor: gs.Tensor) -> bool:
        return any(t is tensor for t in self.graph.outputs)

    def is_graph_input(self, tensor: gs.Tensor) -> bool:
        return any(t is tensor for t in self.graph.inputs)

    def embedding_table(self, node: gs.Node) -> np.ndarray | None:
        """The constant float 2-D table a default-domain Gather looks rows up in (an embedding), else None
        (index arithmetic on shapes, a lookup in an activation)."""
        if node.op != "Gather" or (node.domain or "") not in ("", "ai.onnx") or not node.inputs:
            return None
        table = self.constant_value(node.inputs[0])
        if table is None or table.ndim != 2 or not np.issubdtype(table.dtype, np.floating):
            return None
        return table

    def constant_value(self, tensor: gs.Tensor) -> np.ndarray | None:
        """The value of a constant tensor: an initializer (not overridable as a graph input) or the
        output of a ``Constant`` node (exporters such as paddle2onnx store every weight that way)."""
        if isinstance(tensor, gs.Constant):
            if self.is_graph_input(tensor) or tensor.name in self.meta.initializer_inputs:
                return None
            return np.asarray(tensor.values)
        node = self.producer(tensor)
        if node is None or node.op != "Constant" or (node.domain or "") not in ("", "ai.onnx"):
            return None
        attrs = node.attrs
        if "value" in attrs:
            value = attrs["value"]
            return np.asarray(value.values) if isinstance(value, gs.Constant) else np.asarray(value)
        for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                           ("value_int", np.int64), ("value_ints", np.int64)):
            if key in attrs:
                return np.asarray(attrs[key], dtype=dtype)
        return None  # sparse_value / string values: treat as non-constant

    def is_constant(self, tensor: gs.Tensor) -> bool:
        return self.constant_value(tensor) is not None

    def outer_scope_names(self) -> set[str]:
        """Names of main-graph values read from inside If/Loop/Scan bodies: passes must keep their
        names, producers and types."""
        names: set[str] = set()
        for node in self.graph.nodes:
            for attr in node.attrs.values():
                subs = [attr] if isinstance(attr, gs.Graph) else \
                    [a for a in attr if isinstance(a, gs.Graph)] if isinstance(attr, (list, tuple)) else []
                for sub in subs:
                    for g in _all_graphs(sub):
                        for n in g.nodes:
                            names.update(t.name for t in n.inputs)
        return names

    # -- names -----------------------------------------------------------------------------------
    def unique_name(self, prefix: str) -> str:
        """A tensor/node name not used anywhere in the graph (including subgraphs)."""
        if self._names is None:
            names: set[str] = set()
            for graph in _all_graphs(self.graph):
                names.update(t.name for t in tensor_map(graph).values())
                names.update(n.name for n in graph.nodes if n.name)
            self._names = names
        name, i = prefix, 0
        while name in self._names:
            i += 1
            name = f"{prefix}_{i}"
        self._names.add(name)
        return name

    # -- mutations -------------------------------------------------------------------------------
    def replace_all_uses(self, old: gs.Tensor, new: gs.Tensor) -> bool:
        """Make every consumer of ``old`` read ``new`` instead (subgraph consumers included).

        A graph output keeps its name: if ``old`` is a graph output, ``new`` takes over its name,
        which is only possible when ``new`` is an internal node output. Returns False (and changes
        nothing) when that is impossible, so the caller can record why it skipped.
        """
        if old is new:
            return True
        out_positions = [i for i, t in enumerate(self.graph.outputs) if t is old]
        if out_positions:
            if (not isinstance(new, gs.Variable) or not new.inputs or self.is_graph_input(new)
                    or self.is_graph_output(new)):
                return False
        for node in list(old.outputs):
            for i, inp in enumerate(node.inputs):
                if inp is old:
                    node.inputs[i] = new
        if out_positions:
            out_name = old.name
            old.name = self.unique_name(out_name + "_replaced")
            new.name = out_name
            # Same value, so the graph output keeps its declared type and shape.
            if old.dtype is not None:
                new.dtype = old.dtype
            if old.shape is not None:
                new.shape = old.shape
            for i in out_positions:
                self.graph.outputs[i] = new
        self.invalidate()
        return True

    def remove_nodes(self, nodes: Iterable[gs.Node]) -> int:
        """Remove several nodes in one sweep (O(graph)), disconnecting their inputs and outputs."""
        doomed = {id(n) for n in nodes}
        if not doomed:
            return 0
        kept, removed = [], []
        for node in self.graph.nodes:
            (removed if id(node) in doomed else kept).append(node)
        for node in removed:
            node.inputs.clear()
            node.outputs.clear()
        self.graph.nodes = kept
        self.invalidate()
        return len(removed)

    def cleanup(self) -> dict[str, int]:
        """Remove dead nodes and unused initializers/tensors (graph inputs are kept)."""
        graphs = list(_all_graphs(self.graph))
        nodes_before = sum(len(g.nodes) for g in graphs)
        inits_before = _count_initializers(graphs)
        self.graph.cleanup(remove_unused_node_outputs=False, recurse_subgraphs=True,
                           remove_unused_graph_inputs=False, recurse_functions=True)
        self.invalidate()
        graphs = list(_all_graphs(self.graph))
        return {
            "dead_nodes_removed": nodes_before - sum(len(g.nodes) for g in graphs),
            "unused_initializers_removed": inits_before - _count_initializers(graphs),
        }

    def toposort(self) -> None:
        """Iterative, stable Kahn sort of the main graph, its subgraphs and local functions (a list that
        is already in order is kept as it is, without the sort)."""
        for graph in _all_graphs(self.graph):
            if not _in_order(graph.nodes):
                graph.nodes = _kahn(graph.nodes)
        for fn in getattr(self.graph, "functions", []) or []:
            if not _in_order(fn.nodes):
                fn.nodes = _kahn(fn.nodes)
        self.invalidate()

    # -- export --------------------------------------------------------------------------------
    def value_infos(self, *, export: onnx.ModelProto | None = None) -> dict[str, onnx.ValueInfoProto]:
        """Types and shapes of every value (onnx shape inference on the model as declared, no pinned
        dims), computed on an export without weight payloads: passes call this on models of any size.

        The result is reused while the graph is unchanged: the cache key is :func:`structure_key`, built
        from everything that export writes for shape inference (nodes, names, attributes, types, small
        constant values, big constants' types and dims, opsets), so a mutation made without
        :meth:`invalidate` is still seen. The returned dict is the caller's; its protos are shared
        (read-only). ``export``: ``to_proto(value_info="drop")`` of the model as it is now, when the
        caller has it: inferred on instead of a second, weight-free export (the same types: inference
        sets aside the big weights it holds exactly as the weight-free export stubs them).
        """
        from .shapes import value_infos  # local import: shapes imports ir

        key = structure_key(self)
        if key is not None and self._infos is not None:
            try:
                hit = self._infos[0] == key
            except Exception:  # noqa: BLE001 - an attribute type whose comparison raises: recompute
                hit = False
            if hit:
                return dict(self._infos[1])
        infos = value_infos(export if export is not None else self.to_proto(value_info="drop", weights=False))
        self._infos = (key, infos) if key is not None else None
        return dict(infos)

    def to_proto(self, *, value_info: str = "infer", weights: bool = True,
                 pending: list | None = None) -> onnx.ModelProto:
        """Export. ``value_info``: 'keep' graphsurgeon's shapes, 'drop' intermediate annotations, or
        'infer' (drop, then recompute with onnx shape inference; stale annotations break tools).
        ``weights=False``: large initializers are written as external-data stubs without payload (for
        shape inference only; the result cannot run). With a ``pending`` list, the stubs are
        numbered and their payloads (arrays or bytes) appended to it, for :func:`write_external_data`."""
        patched = []
        hidden = []
        stubbed = [] if weights and pending is None else _stub_large_constants(self.graph, pending)
        try:
            graphs = list(_all_graphs(self.graph))
            if value_info != "keep" and len(graphs) == 1 and not self.meta.special_types:
                # The main graph's value_info is dropped below: graphsurgeon need not build it (one
                # ValueInfoProto per typed intermediate tensor). Only without subgraphs, whose value_info
                # is kept and may describe the same (outer-scope) tensors.
                interface = {id(t) for t in self.graph.inputs} | {id(t) for t in self.graph.outputs}
                for t in tensor_map(self.graph).values():
                    if isinstance(t, gs.Variable) and id(t) not in interface and \
                            (t.dtype is not None or t.shape is not None):
                        hidden.append((t, t.dtype, t.shape))
                        t.dtype, t.shape = None, None
            for graph in graphs:
                _pack_string_constants(graph)
                if not self.meta.special_types:
                    continue
                for t in tensor_map(graph).values():
                    if isinstance(t, gs.Variable) and (
                            getattr(t, "type", "tensor_type") not in ("tensor_type", "sequence_type", "sparse_tensor_type")
                            or isinstance(t.dtype, onnx.TypeProto)):
                        patched.append((t, t.type, t.dtype))
                        t.type, t.dtype = "tensor_type", None  # placeholder; the real type is restored below
            proto = gs.export_onnx(self.graph, do_type_check=False)
        finally:
            for t, dtype, shape in hidden:
                t.dtype, t.shape = dtype, shape
            for t, kind, dtype in patched:
                t.type, t.dtype = kind, dtype
            for c, values in stubbed:
                c._values = values
        if self.meta.special_types:
            _restore_special_types(proto.graph, self.meta.special_types)
        if self.meta.type_attrs:
            for g in _graph_protos(proto.graph):
                for node in g.node:
                    for blob in self.meta.type_attrs.get(node.name, []):
                        attr = onnx.AttributeProto()
                        attr.ParseFromString(blob)
                        if all(a.name != attr.name for a in node.attribute):
                            node.attribute.append(attr)
        meta = self.meta
        proto.producer_name = meta.producer_name
        proto.producer_version = meta.producer_version
        proto.domain = meta.domain
        proto.model_version = meta.model_version
        proto.doc_string = meta.doc_string
        del proto.metadata_props[:]
        for key, value in meta.metadata_props:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        # Keep opset imports the graph no longer mentions (custom domains used by functions), and
        # declare domains that passes introduced (com.microsoft contrib ops).
        present = {imp.domain for imp in proto.opset_import}
        for domain, version in meta.opset_imports.items():
            if domain not in present and domain not in ("", "ai.onnx"):
                proto.opset_import.append(onnx.helper.make_opsetid(domain, version))
                present.add(domain)
        for node in proto.graph.node:
            if node.domain not in present and node.domain not in ("", "ai.onnx"):
                proto.opset_import.append(onnx.helper.make_opsetid(node.domain, 1))
                present.add(node.domain)
        if "" not in meta.opset_imports and "ai.onnx" not in meta.opset_imports and \
                not any((n.domain or "") in ("", "ai.onnx") for g in _graph_protos(proto.graph) for n in g.node):
            kept = [o for o in proto.opset_import if o.domain not in ("", "ai.onnx")]
            del proto.opset_import[:]
            proto.opset_import.extend(kept)
        _restore_initializer_inputs(proto, meta)
        if meta.node_doc_strings:
            for node in proto.graph.node:
                doc = meta.node_doc_strings.get(node.name)
                if doc and not node.doc_string:
                    node.doc_string = doc
        required = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
        ir = max(meta.ir_version or required, required)
        proto.ir_version = min(ir, runtime.max_ir_version())
        if value_info in ("drop", "infer"):
            del proto.graph.value_info[:]
        if value_info == "infer":
            from .shapes import infer_shapes  # local import: shapes imports ir

            proto = infer_shapes(proto, strict=False, in_place=True)  # the proto is this call's own
        return proto

    def fingerprint(self) -> str:
        proto = self.to_proto(value_info="drop")
        digest = hashlib.sha256()
        for tensor in iter_model_tensors(proto):
            digest.update(tensor.raw_data)
            tensor.ClearField("raw_data")
        digest.update(proto.SerializeToString(deterministic=True))
        return digest.hexdigest()

    def save(self, path: str | os.PathLike, *, external_data: bool | None = None,
             verify: Callable[[str], None] | None = None) -> None:
        """Write atomically (see :func:`save_proto`). ``external_data=None``: with external data when
        the model was loaded with external data or its weights reach 2 GB. Then the weights go to
        ``<name>.data`` tensor by tensor, straight from their arrays (memory maps of the source file
        included): the model is never one in-memory protobuf with all weights."""
        if external_data is None:
            external_data = self.meta.external_data or self.weight_bytes() >= runtime.PROTO_LIMIT
        if not external_data:
            save_proto(self.to_proto(), path, external_data=False, verify=verify)
            return
        pending: list = []
        proto = self.to_proto(pending=pending)
        try:
            save_proto(proto, path, external_data=True, verify=verify, pending=pending)
        finally:
            self.release_pages()


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def tensor_map(graph: gs.Graph) -> "OrderedDict[str, gs.Tensor]":
    """``graph.tensors(check_duplicates=False)`` (same tensors, same order, the last of distinct
    tensors sharing a name wins), built ~3x faster: graphsurgeon concatenates each node's input and
    output lists and calls a checking function per tensor. It does not log duplicate names."""
    out: OrderedDict[str, gs.Tensor] = OrderedDict()
    for t in graph.inputs:
        if t.name != "":
            out[t.name] = t
    for node in graph.nodes:
        for t in node.inputs:
            if t.name != "":
                out[t.name] = t
        for t in node.outputs:
            if t.name != "":
                out[t.name] = t
    for t in graph.outputs:
        if t.name != "":
            out[t.name] = t
    return out


def _all_graphs(graph: gs.Graph):
    """The graph and every nested subgraph (If/Loop/Scan bodies), outermost first."""
    yield graph
    for node in graph.nodes:
        for attr in node.attrs.values():
            if isinstance(attr, gs.Graph):
                yield from _all_graphs(attr)
            elif isinstance(attr, (list, tuple)):
                for item in attr:
                    if isinstance(item, gs.Graph):
                        yield from _all_graphs(item)


all_graphs = _all_graphs


STUB_BYTES = 1024


PENDING = "<pending:"


class _Unkeyable(Exception):
    """A value :func:`structure_key` has no cheap exact key for (the caller does not cache)."""


def _constant_key(c: gs.Constant) -> tuple:
    """What an export without weights writes for a constant: small payloads by value, the ones
    :func:`_stub_large_constants` stubs by type and dims only."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    values = c._values
    export_dtype = getattr(c, "_export_dtype", None)
    if isinstance(values, np.ndarray):
        if values.dtype.kind in "OSUV" and values.dtype.type.__module__ == "numpy":
            raise _Unkeyable  # strings (packed at export), structured types
        if values.nbytes <= STUB_BYTES:
            return ("a", c.name, values.dtype, values.shape, values.tobytes(), export_dtype)
        if (export_dtype is not None and np.dtype(export_dtype) != values.dtype) or \
                values.dtype.kind not in "biufc" or values.dtype.type.__module__ != "numpy":
            raise _Unkeyable  # exported with its payload
        return ("stub", c.name, values.dtype, values.shape)
    if isinstance(values, LazyValues) and isinstance(values.tensor, onnx.TensorProto):
        src = values.tensor
        if src.HasField("raw_data") and src.data_location != onnx.TensorProto.EXTERNAL and \
                len(src.raw_data) > STUB_BYTES:
            return ("stub", c.name, src.data_type, tuple(src.dims), export_dtype)
        if src.ByteSize() <= 4 * STUB_BYTES:
            payload = onnx.TensorProto()
            payload.CopyFrom(src)
            payload.ClearField("name")  # an export names the proto it reads: the key must not change with it
            return ("p", c.name, payload.SerializeToString(deterministic=True), export_dtype)
    raise _Unkeyable


_PLAIN = (int, float, str, bytes, bool, type(None), np.generic)


def _graph_key(graph: gs.Graph, memo: dict[int, tuple]) -> list:
    def tensor(t: gs.Tensor) -> tuple:
        found = memo.get(id(t))
        if found is None:
            if isinstance(t, gs.Constant):
                found = _constant_key(t)
            else:
                shape = t.shape
                found = ("v", t.name, t.dtype, tuple(shape) if shape is not None else None,
                         getattr(t, "type", "tensor_type"))
            memo[id(t)] = found
        return found

    def attr(value):
        if isinstance(value, _PLAIN):
            return value
        if isinstance(value, (list, tuple)):
            items = tuple(value)
            if all(type(v) is int for v in items):  # noqa: E721 - the common case (pads, strides, perm)
                return items
            return tuple(attr(v) for v in items)
        if isinstance(value, gs.Constant):
            return _constant_key(value)
        if isinstance(value, gs.Graph):
            return ("g", _graph_key(value, memo))
        if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
            return ("nd", value.dtype, value.shape, value.tobytes())
        raise _Unkeyable

    key: list = [graph.name, getattr(graph, "opset", None), tuple(map(tensor, graph.inputs)),
                 tuple(map(tensor, graph.outputs))]
    for node in graph.nodes:
        key.append((node.op, node.domain, node.name, tuple(map(tensor, node.inputs)),
                    tuple(map(tensor, node.outputs)), tuple((k, attr(v)) for k, v in node.attrs.items())))
    return key


def structure_key(model: "Model") -> list | None:
    """A value equal for two states of ``model`` exactly when its export without weights
    (``to_proto(value_info="drop", weights=False)``) is the same for shape inference: every node
    (op, domain, name, attributes, inputs and outputs in order), every tensor's name, type and dims,
    small constants' bytes, and the model-level fields export writes. Compare with ``==`` (nothing in
    it is an object id, so it holds no objects alive). None for models it does not cover exactly
    (local functions, string constants, attribute types it does not know): do not cache those."""
    if getattr(model.graph, "functions", None):
        return None
    meta = model.meta
    try:
        graph = _graph_key(model.graph, {})
    except _Unkeyable:
        return None
    return [meta.ir_version, dict(meta.opset_imports), list(meta.initializer_inputs), list(meta.input_order),
            dict(meta.special_types), {k: list(v) for k, v in meta.type_attrs.items()},
            dict(meta.node_doc_strings),
            [(d.domain, d.version) for d in getattr(model.graph, "import_domains", None) or []], graph]


def _stub_large_constants(graph: gs.Graph, pending: list | None = None) -> list:
    """Swap the values of initializers above STUB_BYTES for payload-free TensorProtos (dims and type,
    external location) so an export does not copy the weights; returns what to restore.

    Only payloads whose raw bytes are known without converting are stubbed (plain numpy arrays, and
    TensorProtos holding ``raw_data``); everything else is exported as usual. With ``pending``, each
    stub's location is ``<pending:i>`` and its payload is ``pending[i]``."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    swapped = []
    for g in _all_graphs(graph):
        for t in tensor_map(g).values():
            if not isinstance(t, gs.Constant):
                continue
            values = t._values
            if isinstance(values, LazyValues):
                source = values.tensor
                if not isinstance(source, onnx.TensorProto) or not source.HasField("raw_data") or \
                        source.data_location == onnx.TensorProto.EXTERNAL or len(source.raw_data) <= STUB_BYTES:
                    continue
                payload, data_type, dims = source.raw_data, source.data_type, list(source.dims)
            elif isinstance(values, np.ndarray):
                if t._export_dtype is not None and np.dtype(t._export_dtype) != values.dtype:
                    continue
                if values.dtype.kind not in "biufc" or values.dtype.type.__module__ != "numpy" or \
                        values.nbytes <= STUB_BYTES:
                    continue
                payload, data_type, dims = values, onnx.helper.np_dtype_to_tensor_dtype(values.dtype), \
                    list(values.shape)
            else:
                continue
            stub = onnx.TensorProto()
            stub.name = t.name
            stub.data_type = data_type
            stub.dims.extend(int(d) for d in dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            entry = stub.external_data.add()
            entry.key = "location"
            if pending is None:
                entry.value = "<not written>"
            else:
                entry.value = f"{PENDING}{len(pending)}>"
                pending.append(payload)
            t._values = LazyValues(stub)
            swapped.append((t, values))
    return swapped


def _map_constants(graph: gs.Graph, base_dir: str, label: str) -> None:
    """Replace the lazily held external tensors of an imported graph by memory maps of their file."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    seen = set()
    for g in _all_graphs(graph):
        consts = [t for t in tensor_map(g).values() if isinstance(t, gs.Constant)]
        for node in g.nodes:
            consts.extend(v for v in node.attrs.values() if isinstance(v, gs.Constant))
        for c in consts:
            if id(c) in seen or not isinstance(c._values, LazyValues):
                continue
            seen.add(id(c))
            tensor = c._values.tensor
            if not isinstance(tensor, onnx.TensorProto) or tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            array = map_external_tensor(tensor, base_dir, label)
            if array is None:  # cannot happen: _load_small_external read those
                raise InputError(f"{label}: tensor '{tensor.name}' of type {tensor.data_type} cannot be mapped")
            c._values = array
            c.data_location = onnx.TensorProto.DEFAULT


def _pack_string_constants(graph: gs.Graph) -> None:
    """graphsurgeon writes every constant as raw bytes, which string tensors cannot be: hand it the
    onnx TensorProto instead (for initializers and tensor attributes)."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    def pack(c):
        if isinstance(c, gs.Constant) and not isinstance(c._values, LazyValues):
            values = np.asarray(c.values)
            if values.dtype.kind in "OSU":
                c._values = LazyValues(numpy_helper.from_array(values, c.name))

    for t in tensor_map(graph).values():
        pack(t)
    for node in graph.nodes:
        for value in node.attrs.values():
            pack(value)


def _graph_protos(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graph_protos(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graph_protos(g)


def sparse_to_dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """Dense value of a SparseTensorProto (linear [NNZ] or coordinate [NNZ, rank] int64 indices)."""
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    dense = np.zeros(tuple(sparse.dims), dtype=values.dtype)
    if indices.ndim == 1:
        dense.reshape(-1)[indices] = values
    else:
        dense[tuple(indices.T)] = values
    return dense


def _densify_sparse_initializers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """graphsurgeon ignores ``sparse_initializer``: turn each into an ordinary initializer (exact)."""
    if not any(len(g.sparse_initializer) for g in _graph_protos(proto.graph)):
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for g in _graph_protos(copy.graph):
        for sparse in g.sparse_initializer:
            g.initializer.append(numpy_helper.from_array(sparse_to_dense(sparse), sparse.values.name))
        del g.sparse_initializer[:]
    return copy


def _collect_type_attrs(proto: onnx.ModelProto):
    """Attributes graphsurgeon drops on import (type protos, sparse tensors): (copy of proto with such nodes named, {node name: [attribute bytes]}) or None when none exist."""
    kinds = (onnx.AttributeProto.TYPE_PROTO, onnx.AttributeProto.TYPE_PROTOS,
             onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS)
    if not any(a.type in kinds for g in _graph_protos(proto.graph) for n in g.node for a in n.attribute):
        return None
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    found: dict[str, list[bytes]] = {}
    counter = 0
    for g in _graph_protos(copy.graph):
        for node in g.node:
            attrs = [a for a in node.attribute if a.type in kinds]
            if not attrs:
                continue
            if not node.name:
                counter += 1
                node.name = f"{node.op_type}_typed_{counter}"
            found[node.name] = [a.SerializeToString() for a in attrs]
    return copy, found


def _special_types(graph: onnx.GraphProto) -> dict[str, bytes]:
    out = {}
    for g in _graph_protos(graph):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.WhichOneof("value") not in (None, "tensor_type"):
                out[vi.name] = vi.type.SerializeToString()
    return out


def _restore_special_types(graph: onnx.GraphProto, types: dict[str, bytes]) -> None:
    for g in _graph_protos(graph):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.name in types:
                vi.type.ParseFromString(types[vi.name])


def _restore_initializer_inputs(proto: onnx.ModelProto, meta: ModelMeta) -> None:
    """Re-list initializers that the source model declared as graph inputs, in the original order."""
    if not meta.initializer_inputs:
        return
    inits = {t.name: t for t in proto.graph.initializer}
    present = {vi.name: vi for vi in proto.graph.input}
    for name in meta.initializer_inputs:
        if name in inits and name not in present:
            t = inits[name]
            present[name] = onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims))
    rank = {name: i for i, name in enumerate(meta.input_order)}
    ordered = sorted(present.values(), key=lambda vi: rank.get(vi.name, len(rank)))
    del proto.graph.input[:]
    proto.graph.input.extend(ordered)


def _count_initializers(graphs: list[gs.Graph]) -> int:
    """Constant tensors of ``graphs`` (a graph and its subgraphs, from :func:`_all_graphs`)."""
    total = 0
    for g in graphs:
        total += sum(1 for t in tensor_map(g).values() if isinstance(t, gs.Constant))
    return total


def _subgraph_outer_refs(node: gs.Node) -> list[gs.Tensor]:
    """Tensors used inside ``node``'s subgraphs but defined outside them (implicit inputs)."""
    refs: list[gs.Tensor] = []
    for attr in node.attrs.values():
        subs = [attr] if isinstance(attr, gs.Graph) else [a for a in attr if isinstance(a, gs.Graph)] \
            if isinstance(attr, (list, tuple)) else []
        for sub in subs:
            defined = {id(t) for t in sub.inputs}
            for g in _all_graphs(sub):
                for n in g.nodes:
                    defined.update(id(t) for t in n.outputs)
                defined.update(id(t) for t in g.inputs)
            for g in _all_graphs(sub):
                for n in g.nodes:
                    for t in n.inputs:
                        if id(t) not in defined:
                            refs.append(t)
    return refs


def _in_order(nodes: list[gs.Node]) -> bool:
    """Every node's inputs are produced before it (no control flow: those go through _kahn)."""
    produced = {id(o) for n in nodes for o in n.outputs}
    seen: set[int] = set()
    for node in nodes:
        if node.op in ("If", "Loop", "Scan", "SequenceMap") or (node.domain and any(
                isinstance(a, gs.Graph) or (isinstance(a, (list, tuple)) and any(isinstance(x, gs.Graph) for x in a))
                for a in node.attrs.values())):
            return False  # subgraphs: their outer reads count as inputs (_kahn knows them)
        for t in node.inputs:
            if id(t) in produced and id(t) not in seen:
                return False
        seen.update(id(o) for o in node.outputs)
    return True


def _kahn(nodes: list[gs.Node]) -> list[gs.Node]:
    producer_of: dict[int, int] = {}
    producer_by_name: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.outputs:
            producer_of[id(out)] = i
            if out.name:
                producer_by_name[out.name] = i
    indegree = [0] * len(nodes)
    users: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        deps = set()
        inputs = list(node.inputs)
        outer: list[gs.Tensor] = []
        if any(isinstance(a, (gs.Graph, list, tuple)) for a in node.attrs.values()):
            outer = _subgraph_outer_refs(node)
        for t in inputs + outer:
            j = producer_of.get(id(t))
            if j is None and t.name:
                # graphsurgeon may import a subgraph's read of a not-yet-defined outer value as a
                # separate tensor object: resolve those by name.
                j = producer_by_name.get(t.name) if any(t is o for o in outer) else None
            if j is not None and j != i and j not in deps:
                deps.add(j)
                users[j].append(i)
        indegree[i] = len(deps)
    ready = [i for i, d in enumerate(indegree) if d == 0]
    heapq.heapify(ready)
    order: list[gs.Node] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for k in users[i]:
            indegree[k] -= 1
            if indegree[k] == 0:
                heapq.heappush(ready, k)
    if len(order) != len(nodes):
        stuck = [nodes[i].name or nodes[i].op for i, d in enumerate(indegree) if d > 0][:5]
        raise PassError(f"graph has a cycle (nodes involved include {stuck})")
    return order


def save_proto(proto: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None,
               verify: Callable[[str], None] | None = None, pending: list | None = None,
               serialized: bytes | None = None) -> None:
    """Write atomically: into a temporary file (with external data: a temporary folder) beside the
    destination, then rename into place.

    ``external_data=None`` stores weights in ``<name>.data`` only when the model is above 2 GB.
    ``verify(tmp_model_path)`` runs on the complete written model before the rename (the parity gate
    builds its session from it); if it raises, nothing is written. ``pending``: payloads of the
    ``<pending:i>`` stubs of :meth:`Model.to_proto` (then ``proto`` is consumed: its stubs are
    rewritten in place). ``serialized``: ``proto.SerializeToString(deterministic=True)`` when the caller
    has it already (written as is; the model is then saved without external data).
    An interrupted or failed write never leaves a half-written file or replaces an existing one.
    """
    dest = Path(path).resolve()
    if dest.is_dir():
        raise InputError(f"{path}: is a directory, expected an output .onnx file path")
    if not dest.parent.is_dir():
        raise InputError(f"{path}: output folder {dest.parent} does not exist")
    if serialized is not None:
        if external_data:
            raise ValueError("save_proto: serialized bytes are written without external data")
        _save_single_file(serialized, dest, verify)
        return
    if external_data is None:
        external_data = runtime.model_bytes_estimate(proto) >= runtime.PROTO_LIMIT
    if not external_data:
        if pending:
            raise ValueError("save_proto: pending weight stubs are written only with external data")
        _save_single_file(proto.SerializeToString(deterministic=True), dest, verify)
        return
    tmp = tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    try:
        tmp_model = os.path.join(tmp, dest.name)
        data_name = dest.name + ".data"
        if pending is None:
            out = onnx.ModelProto()
            out.CopyFrom(proto)  # the payloads move to the file: do not strip the caller's proto
            proto = out
        write_external_data(proto, os.path.join(tmp, data_name), data_name, pending or [])
        with open(tmp_model, "wb") as fh:
            fh.write(proto.SerializeToString(deterministic=True))
            fh.flush()
            os.fsync(fh.fileno())
        if verify is not None:
            verify(tmp_model)
        tmp_data = os.path.join(tmp, data_name)
        if os.path.exists(tmp_data):
            os.replace(tmp_data, dest.parent / data_name)
        os.replace(tmp_model, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_single_file(data: bytes, dest: Path, verify: Callable[[str], None] | None) -> None:
    """:func:`save_proto` of a model without external data: a temporary file beside ``dest``, fsynced,
    verified, renamed. (A temporary folder, needed only to keep a model and its data file together,
    measured ~8 ms more a save on this machine's ext4: the fsync of a file in a new folder commits the
    journal, and the rename and the folder's removal wait for it.) The file is created like any other
    (permissions from the umask), exclusively, under a name no other file has."""
    for _ in range(100):
        tmp_model = dest.parent / f".{dest.name}.tmp-{secrets.token_hex(4)}"
        try:
            fh = open(tmp_model, "xb")
        except FileExistsError:
            continue
        break
    else:  # pragma: no cover - 100 collisions of 32 random bits
        raise InputError(f"{dest}: cannot create a temporary file in {dest.parent}")
    try:
        with fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if verify is not None:
            verify(str(tmp_model))
        os.replace(tmp_model, dest)
    finally:
        if os.path.lexists(tmp_model):
            os.unlink(tmp_model)


WRITE_CHUNK = 64 * 2**20


def write_external_data(proto: onnx.ModelProto, data_path: str, location: str, pending: list) -> None:
    """Move initializer payloads above STUB_BYTES (``raw_data``, or ``pending`` stubs) into one file,
    in graph order, rewriting each tensor as an external reference to ``location``. Arrays are written
    from their buffers in chunks (no full copy; pages of memory-mapped weights are dropped after each
    tensor); the file is fsynced. Nothing is written (not even an
    empty file) when no tensor qualifies."""
    fh = None
    offset = 0
    try:
        for g in _graph_protos(proto.graph):
            for tensor in g.initializer:
                payload = None
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    loc = next((e.value for e in tensor.external_data if e.key == "location"), "")
                    if loc.startswith(PENDING):
                        payload = pending[int(loc[len(PENDING):-1])]
                elif tensor.HasField("raw_data") and len(tensor.raw_data) > STUB_BYTES:
                    payload = tensor.raw_data
                if payload is None:
                    continue
                if fh is None:
                    fh = open(data_path, "wb")
                if isinstance(payload, np.ndarray):
                    flat = np.ascontiguousarray(payload).reshape(-1).view(np.uint8)
                    for start in range(0, flat.size, WRITE_CHUNK):
                        fh.write(flat[start:start + WRITE_CHUNK].data)
                    length = int(flat.size)
                    del flat
                    release_pages([payload])
                else:
                    fh.write(payload)
                    length = len(payload)
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                del tensor.external_data[:]
                for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
                offset += length
        if fh is not None:
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        if fh is not None:
            fh.close()


def tensor_from_array(name: str, value: np.ndarray) -> gs.Constant:
    """A new constant tensor (copy of ``value``; never share buffers with an existing weight).

    Sub-byte and other ml_dtypes arrays (int4, uint4, int2, float8...) are packed by onnx's
    ``numpy_helper`` (graphsurgeon's own exporter writes them unpacked, which is invalid)."""
    value = np.asarray(value)
    if value.dtype.kind == "V" or value.dtype.type.__module__.startswith("ml_dtypes"):
        from onnx_graphsurgeon.ir.tensor import LazyValues

        return gs.Constant(name, LazyValues(numpy_helper.from_array(value, name)))
    return gs.Constant(name, np.array(value, copy=True))


def numpy_from_tensor_proto(tensor: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(tensor)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file (reports, recipes) via a temporary file in the same folder + rename."""
    dest = Path(path).resolve()
    if not dest.parent.is_dir():
        raise InputError(f"{path}: folder {dest.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
