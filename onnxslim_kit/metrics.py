"""Model metrics: parameters, MACs per node and in total, bytes on disk, op histogram.

MACs need shapes. Dynamic dims are resolved from pinned input shapes (``--input-shape``); dims
still unknown take the defaults of random calibration data (batch 1, other symbolic dims 16; listed
in ``assumed_shapes``). Where onnx shape inference stops (dims computed by Div/Cast at run time, as
in exported attention), the model is run once in onnxruntime on seeded random inputs of those shapes
and the observed shapes are used; nodes whose MACs still cannot be computed are listed in
``unresolved``.
"""

from __future__ import annotations

import collections
import logging
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from . import runtime
from .calibration import DEFAULT_BATCH, DEFAULT_SYMBOLIC_DIM
from .ir import iter_model_tensors, load_proto
from .shapes import infer_shapes, input_dims, light_copy, pin_input_shapes, with_outputs

logger = logging.getLogger(__name__)


@dataclass
class ModelStats:
    nodes: int
    op_histogram: dict[str, int]
    params: int
    macs: int
    macs_per_node: dict[str, int]
    bytes: int
    opset: int
    inputs: dict[str, list] = field(default_factory=dict)
    outputs: dict[str, list] = field(default_factory=dict)
    unresolved: list[str] = field(default_factory=list)
    assumed_shapes: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _default_dims(dims: list) -> list[int]:
    out = []
    for i, d in enumerate(dims):
        if isinstance(d, int):
            out.append(d)
        else:
            out.append(DEFAULT_BATCH if i == 0 else DEFAULT_SYMBOLIC_DIM)
    return out


def _tensor_elems(t: onnx.TensorProto) -> int:
    return math.prod(t.dims)  # 1 for a scalar (no dims)


def count_params(model: onnx.ModelProto) -> int:
    """Elements of every weight: initializers (overridable ones included), Constant-node values and
    subgraph constants."""
    return sum(_tensor_elems(t) for t in iter_model_tensors(model))


def model_stats(model: onnx.ModelProto | str | os.PathLike, input_shapes: dict[str, list[int]] | None = None,
                *, file_bytes: int | None = None, observe: bool = True) -> ModelStats:
    """Stats of a model (proto or path). ``observe``: when shape inference leaves counted nodes
    unresolved (e.g. a head dim computed by Div/Cast), run the model once in onnxruntime on seeded
    random inputs of the pinned/assumed shapes and take the observed shapes of those nodes."""
    if not isinstance(model, onnx.ModelProto):
        path = os.fspath(model)
        model = load_proto(path)
        file_bytes = disk_bytes(path)
    if file_bytes is None:
        estimate = runtime.model_bytes_estimate(model)
        file_bytes = model.ByteSize() if estimate < runtime.PROTO_LIMIT else estimate
    init_names = {t.name for t in model.graph.initializer}
    real_inputs = [vi for vi in model.graph.input if vi.name not in init_names]
    macs_per_node, unresolved, assumed = _macs(model, real_inputs, input_shapes, observe)
    hist = collections.Counter(n.op_type for n in model.graph.node)
    return ModelStats(
        nodes=len(model.graph.node),
        op_histogram=dict(sorted(hist.items())),
        params=count_params(model),
        macs=int(sum(macs_per_node.values())),
        macs_per_node=macs_per_node,
        bytes=int(file_bytes),
        opset=next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0),
        inputs={vi.name: input_dims(vi) for vi in real_inputs},
        outputs={vi.name: input_dims(vi) for vi in model.graph.output},
        unresolved=unresolved,
        assumed_shapes=assumed,
    )


def model_macs(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None, *,
               observe: bool = True) -> tuple[dict[str, int], list[str]]:
    """``(macs per node, unresolved nodes)`` exactly as :func:`model_stats` counts them, without the
    other figures (parameter count, size, histogram)."""
    init_names = {t.name for t in model.graph.initializer}
    real_inputs = [vi for vi in model.graph.input if vi.name not in init_names]
    macs_per_node, unresolved, _ = _macs(model, real_inputs, input_shapes, observe)
    return macs_per_node, unresolved


def _macs(model: onnx.ModelProto, real_inputs: list, input_shapes, observe: bool):
    pinned = dict(input_shapes or {})
    assumed = {}
    for vi in real_inputs:
        dims = input_dims(vi)
        if vi.name not in pinned and dims and not all(isinstance(d, int) for d in dims):
            assumed[vi.name] = _default_dims(dims)
    # Shapes only: work on a copy without the weight payloads (big initializers become typed inputs).
    shaped = light_copy(model)
    if assumed or pinned:
        shaped = pin_input_shapes(shaped, {**assumed, **pinned})
    for out in shaped.graph.output:  # declared output shapes may be symbolic or wrong: infer them
        out.type.tensor_type.ClearField("shape")
    inferred = infer_shapes(shaped, outputs=True, in_place=True, stripped=True)  # shaped: this call's copy
    # Only the values counted nodes read or write need shapes (node_macs reads nothing else).
    needed = {t for node in inferred.graph.node if node.op_type in _COUNTED
              for t in list(node.input) + list(node.output)}
    shapes: dict[str, list] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        if vi.name in needed:
            shapes[vi.name] = input_dims(vi)
    for t in inferred.graph.initializer:
        if t.name in needed:
            shapes[t.name] = list(t.dims)
    for node in inferred.graph.node:
        if node.op_type == "Constant" and node.output[0] in needed:
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = list(a.t.dims)
    macs_per_node: dict[str, int] = {}
    unresolved: list[str] = []
    for i, node in enumerate(inferred.graph.node):
        macs = node_macs(node, shapes)
        name = node.name or f"{node.op_type}_{i}"
        if macs is None:
            unresolved.append(name)
        elif macs:
            macs_per_node[name] = macs
    if unresolved and observe:
        macs_per_node, unresolved = _resolve_by_running(model, inferred, shapes, {**assumed, **pinned},
                                                        macs_per_node, unresolved)
    return macs_per_node, unresolved, assumed


def _resolve_by_running(model, inferred, shapes, feed_shapes, macs_per_node, unresolved):
    from .calibration import input_specs, random_calibration

    if runtime.model_bytes_estimate(model) >= runtime.PROTO_LIMIT:
        return macs_per_node, unresolved
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    names = {(n.name or f"{n.op_type}_{i}"): n for i, n in enumerate(inferred.graph.node)}
    wanted = []
    known = shapes_known(shapes)
    for name in unresolved:
        for t in list(names[name].input) + list(names[name].output):
            if t and t not in known and elem.get(t):
                wanted.append(t)
    wanted = list(dict.fromkeys(w for w in wanted if w not in {o.name for o in model.graph.output}))
    if not wanted:
        return macs_per_node, unresolved
    probe = with_outputs(model, wanted, {vi.name: vi for vi in inferred.graph.value_info})
    try:
        feed = next(iter(random_calibration(input_specs(model, feed_shapes), num_samples=1, seed=0)))
        sess = runtime.make_session(probe, optimize=False, threads=1)
        outs = sess.run(None, feed)
    except Exception as exc:  # observation is best effort: keep the nodes listed as unresolved
        logger.debug("could not observe shapes by running the model: %s", exc)
        return macs_per_node, unresolved
    observed = dict(shapes)
    for meta, value in zip(sess.get_outputs(), outs):
        observed[meta.name] = list(np.shape(value))
    still = []
    for name in unresolved:
        macs = node_macs(names[name], observed)
        if macs is None:
            still.append(name)
        elif macs:
            macs_per_node[name] = macs
    return macs_per_node, still


def shapes_known(shapes: dict[str, list]) -> set[str]:
    return {k for k, v in shapes.items() if _known(v)}


def disk_bytes(path: str | os.PathLike, *, header: onnx.ModelProto | None = None) -> int:
    """Bytes a saved model occupies: the .onnx file plus the external-data files it references.
    ``header``: the file's model as loaded without its external data, when the caller has it."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if header is None:
        header = onnx.load_model(path, load_external_data=False)
    locations = {e.value for t in iter_model_tensors(header) for e in t.external_data if e.key == "location"}
    return os.path.getsize(path) + sum(os.path.getsize(os.path.join(folder, loc)) for loc in locations
                                       if os.path.isfile(os.path.join(folder, loc)))


def _known(dims) -> bool:
    return dims is not None and len(dims) > 0 and all(isinstance(d, int) for d in dims)


_COUNTED = frozenset({"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MatMul", "MatMulInteger",
                      "QLinearMatMul", "MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "Gemm"})


def node_macs(node: onnx.NodeProto, shapes: dict[str, list]) -> int | None:
    """Multiply-accumulates of one node; 0 for ops that are not counted; None when shapes are unknown."""
    op = node.op_type
    if op not in _COUNTED:
        return 0  # Constant, elementwise, data movement: not counted (and never "unresolved")
    if not node.input or not node.output:
        return None
    if op in ("Conv", "ConvTranspose", "ConvInteger", "QLinearConv"):
        w_index = 3 if op == "QLinearConv" else 1
        out = shapes.get(node.output[0])
        w = shapes.get(node.input[w_index]) if len(node.input) > w_index else None
        inp = shapes.get(node.input[0])
        if not (_known(out) and _known(w)):
            return None
        if op == "ConvTranspose":
            if not _known(inp):
                return None
            # every input element is multiplied by C_out/group * prod(kernel) weights
            return int(np.prod(inp) * w[1] * np.prod(w[2:]))
        # out: [N, C_out, spatial...]; each output element costs C_in/group * prod(kernel)
        return int(np.prod(out) * w[1] * np.prod(w[2:]))
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "MatMulNBits", "DynamicQuantizeMatMul",
              "MatMulIntegerToFloat"):
        a = shapes.get(node.input[0])
        out = shapes.get(node.output[0])
        if not (_known(a) and _known(out)):
            return None
        k = a[-1]
        return int(np.prod(out) * k)
    if op == "Gemm":
        a = shapes.get(node.input[0])
        out = shapes.get(node.output[0])
        if not (_known(a) and _known(out)):
            return None
        trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
        k = a[0] if trans_a else a[-1]
        return int(np.prod(out) * k)
    return 0
