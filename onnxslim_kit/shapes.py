"""Shape inference that copes with big models and symbolic dims, and pinning of input shapes.

onnx's in-memory shape inference serializes the model (fails at 2 GB) and copies every weight. We
infer on a light copy whose large initializers are turned into graph inputs of the same type and
shape, which keeps shapes exact without the weight bytes. Inference never fails the caller: on an
error the model is returned unchanged (real models often defeat shape inference; FIELD-NOTES 3).
"""

from __future__ import annotations

import logging
import re

import onnx
from onnx import TensorProto, helper

from .errors import InputError

logger = logging.getLogger(__name__)

# Initializers above this many bytes are replaced by typed graph inputs for inference.
STRIP_BYTES = 1024


def _tensor_nbytes(t: TensorProto) -> int:
    if t.HasField("raw_data"):
        return len(t.raw_data)
    return 8 * (len(t.float_data) + len(t.int64_data) + len(t.int32_data) + len(t.double_data))


def light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy the model without big initializer payloads (they become typed graph inputs)."""
    light = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(light, field, getattr(model, field))
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    src, dst = model.graph, light.graph
    dst.name = src.name
    dst.node.extend(src.node)
    dst.input.extend(src.input)
    dst.output.extend(src.output)
    dst.value_info.extend(src.value_info)
    input_names = {i.name for i in src.input}
    for init in src.initializer:
        if _tensor_nbytes(init) > STRIP_BYTES or init.data_location == TensorProto.EXTERNAL:
            if init.name not in input_names:
                dst.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            dst.initializer.append(init)
    return light


def infer_shapes(model: onnx.ModelProto, *, strict: bool = False, data_prop: bool = True,
                 outputs: bool = False, in_place: bool = False, stripped: bool = False) -> onnx.ModelProto:
    """Return ``model`` with ``value_info`` filled in by onnx shape inference (weights untouched).

    Declared graph-output types are kept unless ``outputs`` is true (then the inferred ones replace
    them: declarations can be wrong, FIELD-NOTES 5). ``in_place``: fill in ``model`` itself and return
    it, instead of a copy with all its weights (for a proto the caller has just built). ``stripped``:
    ``model`` is a :func:`light_copy` already (inferred as it is, not copied again)."""
    light = model if stripped else light_copy(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=strict,
                                                     data_prop=data_prop)
    except Exception as exc:  # noqa: BLE001 - onnx raises InferenceError, RuntimeError, ValueError...
        if strict:
            raise
        logger.info("shape inference failed, keeping the model's annotations: %s", exc)
        return model
    if in_place:
        out = model
    else:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    known = {vi.name for vi in out.graph.input} | {vi.name for vi in out.graph.output}
    del out.graph.value_info[:]
    for vi in inferred.graph.value_info:
        if vi.name not in known:
            out.graph.value_info.append(vi)
    if outputs:
        del out.graph.output[:]
        out.graph.output.extend(inferred.graph.output)
    return out


def value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Every value's inferred type and shape by name (graph inputs, outputs, intermediates and
    initializers): what :func:`infer_shapes` with ``outputs=True`` annotates, on a light copy (the
    model's own annotations when inference fails)."""
    out = {t.name: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
           for t in model.graph.initializer}
    inferred = infer_shapes(light_copy(model), outputs=True, in_place=True, stripped=True)
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        out[vi.name] = vi
    return out


def elem_type(infos: dict[str, onnx.ValueInfoProto], name: str) -> int:
    """The tensor element type of ``name`` (0 when unknown)."""
    vi = infos.get(name)
    return vi.type.tensor_type.elem_type if vi is not None and vi.type.HasField("tensor_type") else 0


def with_outputs(model: onnx.ModelProto, names, infos: dict[str, onnx.ValueInfoProto] | None = None
                 ) -> onnx.ModelProto:
    """Copy of ``model`` that also outputs ``names`` (typed from ``infos`` where known; untyped
    otherwise, onnxruntime infers the type). How calibration, parity and metrics read intermediates."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    existing = {o.name for o in out.graph.output} | {i.name for i in out.graph.input}
    for name in names:
        if name in existing:
            continue
        vi = out.graph.output.add()
        vi.name = name
        if infos and elem_type(infos, name):
            vi.type.tensor_type.elem_type = elem_type(infos, name)
        existing.add(name)
    return out


_SHAPE_RE = re.compile(r"^(?P<name>.+):(?P<dims>-?\d+(?:,-?\d+)*)$")


def parse_input_shape(spec: str) -> tuple[str, list[int]]:
    """``'input_ids:1,128'`` -> ('input_ids', [1, 128])."""
    m = _SHAPE_RE.match(spec.strip())
    if not m:
        raise InputError(f"--input-shape '{spec}': expected NAME:D1,D2,... (e.g. input:1,3,224,224)")
    dims = [int(d) for d in m.group("dims").split(",")]
    if any(d <= 0 for d in dims):
        raise InputError(f"--input-shape '{spec}': dimensions must be positive")
    return m.group("name"), dims


def pin_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """Copy of ``model`` whose graph inputs have the given static shapes (rank must match)."""
    if not shapes:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    by_name = {vi.name: vi for vi in out.graph.input}
    for name, dims in shapes.items():
        if name not in by_name:
            raise InputError(f"--input-shape {name}: the model has no input named '{name}' "
                             f"(inputs: {', '.join(sorted(by_name)) or 'none'})")
        tensor_type = by_name[name].type.tensor_type
        if tensor_type.HasField("shape") and len(tensor_type.shape.dim) != len(dims):
            raise InputError(f"--input-shape {name}: rank {len(dims)} does not match the model's "
                             f"rank {len(tensor_type.shape.dim)}")
        declared = list(tensor_type.shape.dim) if tensor_type.HasField("shape") else []
        for d, value in zip(declared, dims):
            if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != value:
                raise InputError(f"--input-shape {name}: dim {value} conflicts with the model's static "
                                 f"dim {d.dim_value}")
        tensor_type.ClearField("shape")
        for value in dims:
            tensor_type.shape.dim.add().dim_value = value
    return out


def input_dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    """Declared dims of a value: int, symbolic name, or None when unknown."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return []
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims
