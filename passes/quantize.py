"""Quantization passes (issue 3). This module starts with ``quantize-dynamic``.

``quantize-dynamic``: int8 weights, activations quantized at run time, for MatMul/Gemm with a constant
weight: the standard recipe for transformers on CPU (FIELD-NOTES 12). Each candidate becomes::

    x -> DynamicQuantizeLinear -> (x_q:uint8, x_scale, x_zp)
    MatMulInteger(x_q, W_q:int8, x_zp, W_zp) -> Cast(float) -> Mul(x_scale * W_scale) [-> Add(bias)]

which is the exact pattern onnxruntime fuses into ``DynamicQuantizeMatMul`` /
``MatMulIntegerToFloat`` (U8S8 kernels). Weights are symmetric int8, per output column by default.
Shared (tied) weights are quantized once and the quantized tensor is shared too.
"""

from __future__ import annotations

import logging
from typing import Literal

import ml_dtypes  # ships with onnx: numpy dtypes for int4/int2
import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_kit.ir import Model, tensor_from_array
from onnxslim_kit.pass_base import Pass, PassContext, PassResult, Tolerance
from onnxslim_kit.registry import register_pass

logger = logging.getLogger(__name__)


def quantize_weight_symmetric(weight: np.ndarray, *, axis: int | None, bits: int = 8,
                              reduce_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric signed quantization of ``weight``; per-channel along ``axis`` or per-tensor (None).

    Returns (int8 values, float32 scales); scales have one entry per channel (or one in all).
    """
    qmax = 2 ** (bits - 1) - 1
    if reduce_range:
        qmax = 2 ** (bits - 2) - 1
    w = weight.astype(np.float32)
    if axis is None:
        amax = np.array([np.max(np.abs(w))], np.float32)
    else:
        other = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.max(np.abs(w), axis=other).astype(np.float32)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


def _match_weight(model: Model, node: gs.Node):
    """(weight tensor, weight as [K, N], bias tensor or None), or the reason to skip."""
    a = node.inputs[0]
    if a.dtype is not None and np.dtype(a.dtype) != np.float32:
        return f"activation dtype {np.dtype(a.dtype)} is not float32"
    weight_t = node.inputs[1]
    weight = model.constant_value(weight_t)
    if weight is None:
        return "second input is not a constant weight (activation x activation MatMul)"
    if weight.dtype != np.float32:
        return f"weight dtype {weight.dtype} is not float32"
    if weight.ndim != 2:
        return f"weight is {weight.ndim}-D, not 2-D"
    bias_t = None
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return "Gemm with transA=1"
        if float(node.attrs.get("alpha", 1.0)) != 1.0 or float(node.attrs.get("beta", 1.0)) != 1.0:
            return "Gemm with alpha/beta != 1"
        if node.attrs.get("transB", 0):
            weight = weight.T
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias_t = node.inputs[2]
    return weight_t, np.ascontiguousarray(weight), bias_t



def _weight_candidates(model: Model, op_types, exclude, min_elements: int, skipped: list):
    """MatMul/Gemm nodes with a constant float32 2-D weight: yields (node, weight tensor, weight as
    [K, N], bias tensor or None); every node left alone goes into ``skipped`` with its reason."""
    for node in list(model.nodes):
        if node.op not in op_types:
            continue
        label = node.name or f"<{node.op}>"
        if node.name in exclude:
            skipped.append((label, "excluded by option"))
            continue
        plan = _match_weight(model, node)
        if isinstance(plan, str):
            skipped.append((label, plan))
            continue
        weight_t, weight, bias_t = plan
        if weight.size < min_elements:
            skipped.append((label, f"weight has {weight.size} elements < min_elements={min_elements}"))
            continue
        yield node, weight_t, weight, bias_t


@register_pass
class QuantizeDynamic(Pass):
    """Dynamic int8: int8 weights, uint8 activations quantized at run time (MatMul and Gemm).

    Options:
        per_channel: one weight scale per output column (true) or one per tensor (false)
        reduce_range: 7-bit weights (for CPUs without VNNI dot-product instructions)
        op_types: which ops to quantize, '+'-separated (MatMul+Gemm)
        exclude: node names to keep in float, '+'-separated
        min_elements: skip weights smaller than this many elements (too small to pay off)
        min_cosine: parity bound this pass promises on the final outputs
    """

    name = "quantize-dynamic"
    summary = "int8 weights + run-time uint8 activations for MatMul/Gemm (fused by onnxruntime on CPU)"
    tolerance = Tolerance(min_cosine=0.99)

    def __init__(self, *, per_channel: bool = True, reduce_range: bool = False,
                 op_types: list[str] | None = None, exclude: list[str] | None = None,
                 min_elements: int = 1024, min_cosine: float = 0.99):
        self.per_channel = per_channel
        self.reduce_range = reduce_range
        self.op_types = list(op_types) if op_types else ["MatMul", "Gemm"]
        unknown = set(self.op_types) - {"MatMul", "Gemm"}
        if unknown:
            raise ValueError(f"op_types: unsupported {', '.join(sorted(unknown))} (MatMul, Gemm)")
        self.exclude = list(exclude) if exclude else []
        self.min_elements = min_elements
        self.min_cosine = min_cosine
        self.tolerance = Tolerance(min_cosine=min_cosine)

    def requires(self, model: Model, ctx: PassContext) -> None:
        if model.opset < 10:
            raise ValueError(f"opset {model.opset} has no MatMulInteger/DynamicQuantizeLinear (needs >= 11)")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        skipped: list[tuple[str, str]] = []
        cache: dict[int, tuple[gs.Constant, gs.Constant, np.ndarray]] = {}
        done = 0
        weight_bytes_before = weight_bytes_after = 0
        for node, weight_t, weight, bias_t in _weight_candidates(model, self.op_types, self.exclude,
                                                                self.min_elements, skipped):
            key = id(weight_t) if node.op == "MatMul" or not node.attrs.get("transB", 0) else -id(weight_t)
            if key not in cache:
                q, scale = quantize_weight_symmetric(weight, axis=1 if self.per_channel else None,
                                                     reduce_range=self.reduce_range)
                q_t = gs.Constant(model.unique_name(weight_t.name + "_quantized"), q)
                zp_t = gs.Constant(model.unique_name(weight_t.name + "_zero_point"),
                                   np.zeros(scale.shape if self.per_channel else (), np.int8))
                cache[key] = (q_t, zp_t, scale)
                weight_bytes_before += weight.nbytes
                weight_bytes_after += q.nbytes + scale.nbytes
            q_t, zp_t, scale = cache[key]
            self._rewrite(model, node, q_t, zp_t, scale, bias_t)
            done += 1
        stats = {"nodes_quantized": done, "weights_quantized": len(cache),
                 "weight_bytes_before": weight_bytes_before, "weight_bytes_after": weight_bytes_after}
        return PassResult(model, done > 0, stats, skipped)

    @staticmethod
    def _rewrite(model: Model, node: gs.Node, q_t: gs.Constant, zp_t: gs.Constant, scale: np.ndarray,
                 bias_t: gs.Tensor | None) -> None:
        base = node.name or node.op.lower()
        out = node.outputs[0]

        def var(suffix, dtype, shape=None):
            return gs.Variable(model.unique_name(f"{base}_{suffix}"), dtype=dtype, shape=shape)

        x_q, x_scale, x_zp = var("x_q", np.uint8), var("x_scale", np.float32, []), var("x_zp", np.uint8, [])
        acc, acc_f, scale_ab = var("int32", np.int32), var("int32_float", np.float32), var("scale", np.float32)
        w_scale = gs.Constant(model.unique_name(f"{base}_w_scale"), scale.astype(np.float32))
        new_nodes = [
            gs.Node("DynamicQuantizeLinear", model.unique_name(base + "_quant"), inputs=[node.inputs[0]],
                    outputs=[x_q, x_scale, x_zp]),
            gs.Node("MatMulInteger", model.unique_name(base + "_matmul_int"), inputs=[x_q, q_t, x_zp, zp_t],
                    outputs=[acc]),
            gs.Node("Cast", model.unique_name(base + "_cast"), attrs={"to": 1}, inputs=[acc], outputs=[acc_f]),
            gs.Node("Mul", model.unique_name(base + "_scale_mul"), inputs=[x_scale, w_scale], outputs=[scale_ab]),
        ]
        result = gs.Variable(model.unique_name(base + "_dequant"), dtype=np.float32, shape=out.shape)
        new_nodes.append(gs.Node("Mul", model.unique_name(base + "_rescale"), inputs=[acc_f, scale_ab],
                                 outputs=[result]))
        if bias_t is not None:
            biased = gs.Variable(model.unique_name(base + "_biased"), dtype=np.float32, shape=out.shape)
            new_nodes.append(gs.Node("Add", model.unique_name(base + "_bias"), inputs=[result, bias_t],
                                     outputs=[biased]))
            result = biased
        # Take over the original output tensor so names (and graph outputs) stay as they were.
        node.outputs.clear()
        node.inputs.clear()
        new_nodes[-1].outputs[0] = out
        model.graph.nodes.remove(node)
        model.graph.nodes.extend(new_nodes)
        model.invalidate()


# ----------------------------------------------------------------------------------------------
# quantize-weights: weight-only blocked int4 / int8 / int2
# ----------------------------------------------------------------------------------------------

_SUB_BYTE = {4: ("int4", "uint4"), 2: ("int2", "uint2"), 8: ("int8", "uint8")}
_DQ_MIN_OPSET = {8: 21, 4: 21, 2: 25}  # blocked DequantizeLinear; INT2 only from opset 25


def quantize_blocked(weight: np.ndarray, *, bits: int, block_size: int, symmetric: bool
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize a [K, N] weight in blocks of ``block_size`` rows along K (the reduction axis).

    Returns integer values [K, N] (int8 container: signed if symmetric, else unsigned range), scales
    [ceil(K/bs), N] float32 and zero points of the same shape (None when symmetric)."""
    k, n = weight.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.float32)
    padded[:k] = weight
    wb = padded.reshape(blocks, block_size, n)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1 if bits > 2 else 1  # int2 symmetric = ternary {-1, 0, 1}
        amax = np.abs(wb).max(axis=1)
        scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
        q = np.clip(np.rint(wb / scale[:, None, :]), -qmax, qmax).astype(np.int16)
        zero = None
    else:
        levels = 2 ** bits - 1
        lo = np.minimum(wb.min(axis=1), 0.0)
        hi = np.maximum(wb.max(axis=1), 0.0)
        scale = np.where(hi > lo, (hi - lo) / levels, 1.0).astype(np.float32)
        zero = np.clip(np.rint(-lo / scale), 0, levels).astype(np.int16)
        q = np.clip(np.rint(wb / scale[:, None, :]) + zero[:, None, :], 0, levels).astype(np.int16)
    return q.reshape(-1, n)[:k], scale, zero


def dequantize_blocked(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, block_size: int) -> np.ndarray:
    k, n = q.shape
    idx = np.arange(k) // block_size
    zp = 0 if zero is None else zero[idx].astype(np.float32)
    return ((q.astype(np.float32) - zp) * scale[idx]).astype(np.float32)


@register_pass
class QuantizeWeights(Pass):
    """Weight-only quantization of MatMul/Gemm weights in blocks along the reduction axis.

    Options:
        bits: 4 (int4, ~4x smaller), 8, or 2 (ternary; opset >= 25, large accuracy cost)
        block_size: rows of K sharing one scale (power of two >= 16)
        symmetric: symmetric signed values (true) or asymmetric with zero points (false)
        format: auto (standard DequantizeLinear when the opset allows, else MatMulNBits), dq, matmulnbits
        accuracy_level: MatMulNBits compute precision (4 = int8 compute, fastest on CPU)
        exclude: node names to keep in float, '+'-separated
        min_elements: skip weights smaller than this many elements
        min_cosine: parity bound this pass promises on the final outputs
    """

    name = "quantize-weights"
    summary = "weight-only blocked int4/int8/int2 for MatMul/Gemm (DequantizeLinear or MatMulNBits)"
    tolerance = Tolerance(min_cosine=0.98)

    def __init__(self, *, bits: Literal[4, 8, 2] = 4, block_size: int = 32, symmetric: bool = True,
                 format: Literal["auto", "dq", "matmulnbits"] = "auto", accuracy_level: int = 4,
                 exclude: list[str] | None = None, min_elements: int = 4096, min_cosine: float = 0.98):
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size {block_size}: must be a power of two >= 16")
        if bits == 2 and format == "matmulnbits":
            raise ValueError("bits=2 is only available as DequantizeLinear (format=dq, opset >= 25)")
        self.bits, self.block_size, self.symmetric = bits, block_size, symmetric
        self.format, self.accuracy_level = format, accuracy_level
        self.exclude = list(exclude) if exclude else []
        self.min_elements = min_elements
        self.min_cosine = min_cosine
        self.tolerance = Tolerance(min_cosine=min_cosine)

    def _resolve_format(self, opset: int) -> str:
        if self.format == "dq" or (self.format == "auto" and opset >= _DQ_MIN_OPSET[self.bits]):
            if opset < _DQ_MIN_OPSET[self.bits]:
                raise ValueError(f"bits={self.bits} as DequantizeLinear needs opset >= {_DQ_MIN_OPSET[self.bits]}, "
                                 f"the model has {opset}")
            return "dq"
        if self.bits == 2:
            raise ValueError(f"bits=2 needs opset >= 25 (INT2 DequantizeLinear); the model has {opset}")
        return "matmulnbits"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        fmt = self._resolve_format(model.opset)
        skipped: list[tuple[str, str]] = []
        cache: dict[int, gs.Tensor] = {}   # weight tensor id -> dequantized weight tensor (dq format)
        stats = {"nodes_quantized": 0, "weights_quantized": 0, "weight_bytes_before": 0,
                 "weight_bytes_after": 0, "max_weight_rel_error": 0.0}
        warnings = []
        if fmt == "matmulnbits":
            warnings.append("quantize-weights: using com.microsoft.MatMulNBits (runs in onnxruntime only); "
                            "opset >= 21 models get standard DequantizeLinear")
        for node, weight_t, weight, bias_t in _weight_candidates(model, ("MatMul", "Gemm"), self.exclude,
                                                                self.min_elements, skipped):
            label = node.name or f"<{node.op}>"
            k, n = weight.shape
            if fmt == "matmulnbits" and k % self.block_size:
                skipped.append((label, f"K={k} is not a multiple of block_size={self.block_size}"))
                continue
            key = (id(weight_t), node.op == "Gemm" and bool(node.attrs.get("transB", 0)))
            q, scale, zero = quantize_blocked(weight, bits=self.bits, block_size=self.block_size,
                                              symmetric=self.symmetric)
            err = np.linalg.norm(dequantize_blocked(q, scale, zero, self.block_size) - weight) / \
                max(np.linalg.norm(weight), 1e-12)
            stats["max_weight_rel_error"] = max(stats["max_weight_rel_error"], round(float(err), 6))
            if key not in cache:
                stats["weights_quantized"] += 1
                stats["weight_bytes_before"] += weight.nbytes
                stats["weight_bytes_after"] += q.size * self.bits // 8 + scale.nbytes + \
                    (0 if zero is None else zero.size * self.bits // 8)
                cache[key] = self._emit_weight(model, weight_t.name, q, scale, zero, fmt)
            self._replace(model, node, cache[key], bias_t, fmt, k, n)
            stats["nodes_quantized"] += 1
        return PassResult(model, stats["nodes_quantized"] > 0, stats, skipped, warnings)

    def _emit_weight(self, model: Model, base: str, q, scale, zero, fmt):
        signed, unsigned = _SUB_BYTE[self.bits]
        if fmt == "dq":
            np_type = getattr(ml_dtypes, signed if self.symmetric else unsigned) if self.bits != 8 else \
                (np.int8 if self.symmetric else np.uint8)
            q_t = tensor_from_array(model.unique_name(base + f"_q{self.bits}"), q.astype(np_type))
            s_t = tensor_from_array(model.unique_name(base + "_scale"), scale)
            inputs = [q_t, s_t]
            if zero is not None:
                inputs.append(tensor_from_array(model.unique_name(base + "_zero_point"), zero.astype(np_type)))
            w = gs.Variable(model.unique_name(base + "_dequantized"), dtype=np.float32, shape=list(q.shape))
            model.graph.nodes.append(gs.Node("DequantizeLinear", model.unique_name(base + "_dq"), inputs=inputs,
                                             outputs=[w], attrs={"axis": 0, "block_size": self.block_size}))
            return w
        # MatMulNBits: B [N, K/bs, bs*bits/8] uint8 (low bits first), scales [N*K/bs], zero points packed.
        k, n = q.shape
        blocks = k // self.block_size
        offset = 0 if not self.symmetric else 2 ** (self.bits - 1)  # stored unsigned; default zp = 2^(b-1)
        qu = (q + offset).astype(np.uint8).T.reshape(n, blocks, self.block_size)
        per_byte = 8 // self.bits
        packed = np.zeros((n, blocks, self.block_size // per_byte), np.uint8)
        for i in range(per_byte):
            packed |= (qu[..., i::per_byte] << (self.bits * i)).astype(np.uint8)
        inputs = [tensor_from_array(model.unique_name(base + f"_q{self.bits}"), packed),
                  tensor_from_array(model.unique_name(base + "_scale"), scale.T.reshape(-1).copy())]
        if zero is not None:
            zu = zero.astype(np.uint8).T  # [N, blocks]
            zb = -(-blocks // per_byte)
            zpad = np.zeros((n, zb * per_byte), np.uint8)
            zpad[:, :blocks] = zu
            zpacked = np.zeros((n, zb), np.uint8)
            for i in range(per_byte):
                zpacked |= (zpad[:, i::per_byte] << (self.bits * i)).astype(np.uint8)
            inputs.append(tensor_from_array(model.unique_name(base + "_zero_point"), zpacked.reshape(-1)))
        return inputs

    def _replace(self, model: Model, node: gs.Node, weight, bias_t, fmt: str, k: int, n: int) -> None:
        out = node.outputs[0]
        base = node.name or node.op.lower()
        x = node.inputs[0]
        node.outputs.clear()
        node.inputs.clear()
        model.graph.nodes.remove(node)
        mm_out = out if bias_t is None else gs.Variable(model.unique_name(base + "_matmul"), dtype=np.float32)
        if fmt == "dq":
            new = gs.Node("MatMul", model.unique_name(base + "_wq"), inputs=[x, weight], outputs=[mm_out])
        else:
            new = gs.Node("MatMulNBits", model.unique_name(base + "_nbits"), domain="com.microsoft",
                          inputs=[x] + list(weight), outputs=[mm_out],
                          attrs={"K": k, "N": n, "bits": self.bits, "block_size": self.block_size,
                                 "accuracy_level": self.accuracy_level})
        model.graph.nodes.append(new)
        if bias_t is not None:
            model.graph.nodes.append(gs.Node("Add", model.unique_name(base + "_bias"), inputs=[mm_out, bias_t],
                                             outputs=[out]))
        model.invalidate()


# ----------------------------------------------------------------------------------------------
# fp16
# ----------------------------------------------------------------------------------------------

FP16_MAX = float(np.finfo(np.float16).max)
# Precision-sensitive ops kept in float32 by default (long reductions, normalisation, exponentials),
# plus ops whose float inputs are sizes or scales rather than data.
DEFAULT_FP32_OPS = ("Softmax", "LogSoftmax", "LayerNormalization", "ReduceMean", "ReduceSum",
                    "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "Range", "Resize", "Upsample",
                    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                    "ConstantOfShape", "NonMaxSuppression", "RoiAlign", "CumSum", "EyeLike")
# Ops that accept any input type: their inputs never need a cast back to float32.
_TYPE_AGNOSTIC_INPUTS = {"Shape", "Size", "Cast", "CastLike"}


@register_pass
class Fp16(Pass):
    """Convert weights and compute to float16; model inputs and outputs stay float32.

    Options:
        keep_ops: op types kept in float32, '+'-separated (default: Softmax, LayerNormalization,
            reductions, Range, Resize, random and shape-like ops)
        keep_nodes: node names kept in float32, '+'-separated
        min_cosine: parity bound this pass promises on the final outputs
    """

    name = "fp16"
    summary = "float16 weights and compute, float32 model inputs/outputs, casts only at boundaries"
    tolerance = Tolerance(min_cosine=0.999)

    def __init__(self, *, keep_ops: list[str] | None = None, keep_nodes: list[str] | None = None,
                 min_cosine: float = 0.999):
        self.keep_ops = list(keep_ops) if keep_ops is not None else list(DEFAULT_FP32_OPS)
        self.keep_nodes = list(keep_nodes) if keep_nodes else []
        self.min_cosine = min_cosine
        self.tolerance = Tolerance(min_cosine=min_cosine)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        from onnxslim_kit.shapes import infer_shapes

        types = {vi.name: vi.type.tensor_type.elem_type
                 for vi in _value_infos(infer_shapes(model.to_proto(value_info="drop")))}
        f32 = 1

        def is_f32(t: gs.Tensor) -> bool:
            if isinstance(t, gs.Constant):
                return np.asarray(t.values).dtype == np.float32
            if model.constant_value(t) is not None:
                return model.constant_value(t).dtype == np.float32
            return types.get(t.name) == f32 or (t.dtype is not None and np.dtype(t.dtype) == np.float32)

        outer = model.outer_scope_names()
        skipped: list[tuple[str, str]] = []
        warnings: list[str] = []
        half: dict[str, gs.Tensor] = {}      # float32 tensor name -> its float16 version
        back: dict[str, gs.Tensor] = {}      # converted tensor name -> float32 cast of it
        converted: set[str] = set()          # tensors now float16 in place
        new_nodes: list[gs.Node] = []
        stats = {"nodes_fp16": 0, "nodes_fp32": 0, "casts_added": 0, "weights_converted": 0,
                 "weights_clipped": 0}

        def to_half(t: gs.Tensor) -> gs.Tensor:
            if t.name in converted:
                return t
            if t.name in half:
                return half[t.name]
            value = model.constant_value(t)
            if value is not None:
                if np.any(np.abs(value[np.isfinite(value)]) > FP16_MAX):
                    stats["weights_clipped"] += 1
                    warnings.append(f"fp16: constant '{t.name}' has values beyond +-65504, clipped")
                with np.errstate(over="ignore"):
                    h = np.asarray(np.clip(value, -FP16_MAX, FP16_MAX), dtype=np.float16)
                new = gs.Constant(model.unique_name(t.name + "_fp16"), h)
                stats["weights_converted"] += 1
            else:
                new = gs.Variable(model.unique_name(t.name + "_fp16"), dtype=np.float16, shape=t.shape)
                new_nodes.append(gs.Node("Cast", model.unique_name(t.name + "_to_fp16"), attrs={"to": 10},
                                         inputs=[t], outputs=[new]))
                stats["casts_added"] += 1
            half[t.name] = new
            return new

        def to_float(t: gs.Tensor) -> gs.Tensor:
            if t.name not in back:
                new = gs.Variable(model.unique_name(t.name + "_fp32"), dtype=np.float32, shape=t.shape)
                new_nodes.append(gs.Node("Cast", model.unique_name(t.name + "_to_fp32"), attrs={"to": 1},
                                         inputs=[t], outputs=[new]))
                stats["casts_added"] += 1
                back[t.name] = new
            return back[t.name]

        model.toposort()
        for node in list(model.nodes):
            label = node.name or f"<{node.op}>"
            float_in = [t for t in node.inputs if t.name and is_f32(t)]
            float_out = [t for t in node.outputs if t.name and is_f32(t)]
            reason = ""
            if node.op == "Constant":
                continue  # consumers convert constants they read
            if not float_in and not float_out:
                reason = "no float32 tensors"
            elif node.op in self.keep_ops or node.name in self.keep_nodes:
                reason = "kept in float32 by option"
            elif (node.domain or "") not in ("", "ai.onnx"):
                reason = f"op in domain '{node.domain}'"
            elif any(isinstance(a, gs.Graph) for a in node.attrs.values()):
                reason = "has a subgraph (control flow kept in float32)"
            elif any(t.name in outer for t in node.outputs):
                reason = "output is read inside a subgraph"
            elif any(t.name and t.dtype is None and t.name not in types and model.constant_value(t) is None
                     for t in node.inputs):
                reason = "an input's dtype is unknown"
            elif node.op in ("Cast", "CastLike") or node.op in _TYPE_AGNOSTIC_INPUTS:
                reason = "type conversion op"
            if reason:
                if reason != "no float32 tensors" and reason != "type conversion op":
                    skipped.append((label, reason))
                stats["nodes_fp32"] += bool(float_in or float_out)
                if node.op not in _TYPE_AGNOSTIC_INPUTS:
                    for i, t in enumerate(node.inputs):
                        if t.name in converted:
                            node.inputs[i] = to_float(t)
                continue
            for i, t in enumerate(node.inputs):
                if t.name and is_f32(t):
                    node.inputs[i] = to_half(t)
            for t in float_out:
                t.dtype = np.float16
                converted.add(t.name)
            stats["nodes_fp16"] += 1
        # Graph outputs keep their float32 type and name: the float16 tensor is renamed, a Cast
        # produces the original name.
        for i, t in enumerate(list(model.graph.outputs)):
            if t.name in converted:
                name = t.name
                t.name = model.unique_name(name + "_fp16")
                out = gs.Variable(name, dtype=np.float32, shape=t.shape)
                new_nodes.append(gs.Node("Cast", model.unique_name(name + "_to_fp32"), attrs={"to": 1},
                                         inputs=[t], outputs=[out]))
                stats["casts_added"] += 1
                model.graph.outputs[i] = out
        model.graph.nodes.extend(new_nodes)
        model.invalidate()
        return PassResult(model, stats["nodes_fp16"] > 0, stats, skipped, warnings)


def _value_infos(proto):
    g = proto.graph
    return list(g.input) + list(g.output) + list(g.value_info)
