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

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_kit.ir import Model
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
        for node in list(model.nodes):
            if node.op not in self.op_types:
                continue
            label = node.name or f"<{node.op}>"
            if node.name in self.exclude:
                skipped.append((label, "excluded by option"))
                continue
            plan = self._match(model, node)
            if isinstance(plan, str):
                skipped.append((label, plan))
                continue
            weight_t, weight, bias_t = plan
            if weight.size < self.min_elements:
                skipped.append((label, f"weight has {weight.size} elements < min_elements={self.min_elements}"))
                continue
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

    def _match(self, model: Model, node: gs.Node):
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
