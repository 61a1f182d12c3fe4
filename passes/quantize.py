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
import platform
from typing import Any, Literal

import ml_dtypes  # ships with onnx: numpy dtypes for int4/int2
import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from onnxslim_kit.errors import InputError
from onnxslim_kit.ir import Model, tensor_from_array
from onnxslim_kit.pass_base import Pass, PassContext, PassResult, Tolerance, require_nodes
from onnxslim_kit.registry import register_pass
from onnxslim_kit.shapes import elem_type, input_dims, with_outputs
from passes import quant_aids

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


# Ops that mean the model is already quantized: quantizing it again would mix recipes (FIELD-NOTES 9).
_QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                  "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearAveragePool",
                  "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QGemm",
                  "QAttention", "QEmbedLayerNormalization", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM",
                  "MatMulIntegerToFloat", "MatMulNBits", "MatMulBnb4", "GatherBlockQuantized")


def refuse_quantized(model: Model) -> None:
    """InputError when the model (or a subgraph) already holds quantized ops (FIELD-NOTES 9: onnxruntime's
    static quantizer crashes on such models and its dynamic one silently does nothing)."""
    found: dict[str, int] = {}
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        for node in graph.nodes:
            if node.op in _QUANTIZED_OPS:
                found[node.op] = found.get(node.op, 0) + 1
            stack.extend(a for a in node.attrs.values() if isinstance(a, gs.Graph))
    if found:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(found.items(), key=lambda kv: -kv[1])[:4])
        raise InputError(f"the model is already quantized ({ops}); run quantization passes on its float original")


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



def _weight_candidates(model: Model, op_types, exclude, min_elements: int, skipped: list, *,
                       exclude_op_types=(), include=None):
    """MatMul/Gemm nodes with a constant float32 2-D weight: yields (node, weight tensor, weight as
    [K, N], bias tensor or None); every node left alone goes into ``skipped`` with its reason."""
    for node in list(model.nodes):
        if node.op not in op_types:
            continue
        label = node.name or f"<{node.op}>"
        if node.name in exclude:
            skipped.append((label, "excluded by option"))
            continue
        if node.op in exclude_op_types:
            skipped.append((label, f"op type {node.op} excluded by option"))
            continue
        if include is not None and node.name not in include:
            skipped.append((label, "not in include"))
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
    """Dynamic int8: int8 weights, uint8 activations quantized at run time (MatMul, Gemm and LSTM).

    Options:
        per_channel: one weight scale per output column (true) or one per tensor (false)
        reduce_range: 7-bit weights (for CPUs without VNNI dot-product instructions)
        op_types: which ops to quantize, '+'-separated (MatMul+Gemm+Gather+LSTM; Gather = embedding
            tables, stored int8 and dequantized after the lookup; LSTM = onnxruntime's
            com.microsoft.DynamicQuantizeLSTM with int8 W and R)
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
        self.op_types = list(op_types) if op_types else ["MatMul", "Gemm", "Gather", "LSTM"]
        unknown = set(self.op_types) - {"MatMul", "Gemm", "Gather", "LSTM"}
        if unknown:
            raise ValueError(f"op_types: unsupported {', '.join(sorted(unknown))} (MatMul, Gemm, Gather, LSTM)")
        self.exclude = list(exclude) if exclude else []
        self.min_elements = min_elements
        self.min_cosine = min_cosine
        self.tolerance = Tolerance(min_cosine=min_cosine)

    def requires(self, model: Model, ctx: PassContext) -> None:
        refuse_quantized(model)
        if model.opset < 10:
            raise InputError(f"opset {model.opset} has no MatMulInteger/DynamicQuantizeLinear (needs >= 10)")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        skipped: list[tuple[str, str]] = []
        # (weight tensor id, layout) -> (quantized, zero point, scales): tied weights quantized once
        cache: dict[tuple[int, str], tuple[gs.Constant, gs.Constant, np.ndarray]] = {}
        done = 0
        weight_bytes_before = weight_bytes_after = 0
        for node, weight_t, weight, bias_t in _weight_candidates(model, self.op_types, self.exclude,
                                                                self.min_elements, skipped):
            key = (id(weight_t), "KxN" if node.op == "MatMul" or not node.attrs.get("transB", 0) else "NxK")
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
        if "Gather" in self.op_types:
            for node in list(model.nodes):
                if node.op != "Gather" or node.name in self.exclude:
                    continue
                table = model.constant_value(node.inputs[0])
                label = node.name or "<Gather>"
                if table is None or table.dtype != np.float32:
                    continue  # index arithmetic on shapes, not an embedding table
                if table.size < self.min_elements:
                    skipped.append((label, f"table has {table.size} elements < min_elements={self.min_elements}"))
                    continue
                key = (id(node.inputs[0]), "table")  # embedding tables: per tensor, once
                if key not in cache:
                    q, scale = quantize_weight_symmetric(table, axis=None, reduce_range=self.reduce_range)
                    cache[key] = (gs.Constant(model.unique_name(node.inputs[0].name + "_quantized"), q),
                                  gs.Constant(model.unique_name(node.inputs[0].name + "_zero_point"),
                                              np.zeros((), np.int8)), scale)
                    weight_bytes_before += table.nbytes
                    weight_bytes_after += q.nbytes + scale.nbytes
                q_t, zp_t, scale = cache[key]
                out = node.outputs[0]
                looked_up = gs.Variable(model.unique_name(out.name + "_int8"), dtype=np.int8)
                node.inputs[0] = q_t
                node.outputs[0] = looked_up
                s_t = gs.Constant(model.unique_name(out.name + "_scale"), np.array(scale[0], np.float32))
                model.graph.nodes.append(gs.Node("DequantizeLinear", model.unique_name(label + "_dq"),
                                                 inputs=[looked_up, s_t, zp_t], outputs=[out]))
                done += 1
            model.invalidate()
        # (W or R tensor id) -> its quantized, scale and zero-point constants: tied LSTM weights once too
        lstm_cache: dict[int, list[gs.Constant]] = {}
        if "LSTM" in self.op_types:
            for node in list(model.nodes):
                if node.op == "LSTM" and (node.domain or "") in ("", "ai.onnx"):
                    saved = self._lstm(model, node, skipped, lstm_cache)
                    if saved:
                        done += 1
                        weight_bytes_before += saved[0]
                        weight_bytes_after += saved[1]
        for node in model.nodes:
            if node.op == "Attention" and node.domain == "com.microsoft":
                skipped.append((node.name or "<Attention>", "com.microsoft Attention kept in float (not quantized "
                                                             "by this pass; export the unfused MatMuls instead)"))
        stats = {"nodes_quantized": done, "weights_quantized": len(cache) + len(lstm_cache),
                 "weight_bytes_before": weight_bytes_before, "weight_bytes_after": weight_bytes_after}
        return PassResult(model, done > 0, stats, skipped)

    def _lstm(self, model: Model, node: gs.Node, skipped: list, cache: dict[int, list[gs.Constant]]
              ) -> tuple[int, int] | None:
        """LSTM -> com.microsoft.DynamicQuantizeLSTM: W [dirs, 4H, in] and R [dirs, 4H, H] quantized to
        int8 (symmetric, one scale per gate row, or per direction), stored transposed as the contrib op
        reads them ([dirs, in, 4H], [dirs, H, 4H]); the input is quantized at run time inside the op."""
        label = node.name or "<LSTM>"
        if node.name in self.exclude:
            skipped.append((label, "excluded by option"))
            return None
        if int(node.attrs.get("layout", 0)) != 0:
            skipped.append((label, "LSTM with layout=1 kept in float (DynamicQuantizeLSTM reads layout 0)"))
            return None
        w, r = (model.constant_value(node.inputs[i]) if len(node.inputs) > i else None for i in (1, 2))
        if w is None or r is None or w.dtype != np.float32 or r.dtype != np.float32 or w.ndim != 3 or r.ndim != 3:
            skipped.append((label, "LSTM weights W/R are not constant 3-D float32 tensors"))
            return None
        if w.size + r.size < self.min_elements:
            skipped.append((label, f"weights have {w.size + r.size} elements < min_elements={self.min_elements}"))
            return None
        base = node.name or model.unique_name("lstm")
        new_inputs = [node.inputs[0]]
        scales = []
        before = after = 0
        for index, name, value in ((1, "W", w), (2, "R", r)):
            key = id(node.inputs[index])
            if key not in cache:
                dirs, rows, cols = value.shape
                flat = value.reshape(dirs * rows, cols) if self.per_channel else value.reshape(dirs, rows * cols)
                q, scale = quantize_weight_symmetric(flat, axis=0, reduce_range=self.reduce_range)
                q = q.reshape(dirs, rows, cols).transpose(0, 2, 1)
                shape = (dirs, rows) if self.per_channel else (dirs,)
                cache[key] = [
                    gs.Constant(model.unique_name(f"{base}_{name}_quantized"), np.ascontiguousarray(q)),
                    gs.Constant(model.unique_name(f"{base}_{name}_scale"), scale.reshape(shape).astype(np.float32)),
                    gs.Constant(model.unique_name(f"{base}_{name}_zero_point"), np.zeros(shape, np.int8))]
                before += value.nbytes
                after += value.size + cache[key][1].values.nbytes
            new_inputs.append(cache[key][0])
            scales += cache[key][1:]
        for i in range(3, 8):  # B, sequence_lens, initial_h, initial_c, P
            new_inputs.append(node.inputs[i] if len(node.inputs) > i else gs.Variable.empty())
        attrs = {k: v for k, v in node.attrs.items() if k != "layout"}
        quant = gs.Node("DynamicQuantizeLSTM", model.unique_name(base + "_quant"), attrs=attrs,
                        inputs=new_inputs + scales, outputs=list(node.outputs), domain="com.microsoft")
        node.inputs.clear()
        node.outputs.clear()
        model.graph.nodes.remove(node)
        model.graph.nodes.append(quant)
        model.invalidate()
        return before, after

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


def gptq_blocked(weight: np.ndarray, hessian: np.ndarray, *, bits: int, block_size: int, symmetric: bool,
                 damping: float = 0.01) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """GPTQ (Frantar et al. 2022) for a [K, N] weight of ``y = x @ W``: quantize the input rows of W in
    order, block by block (each block's scales from its current, error-updated rows), and spread every
    row's rounding error over the rows not yet quantized, weighted by the inverse Hessian H = X^T X of
    the layer input, so that ``x @ W_q`` stays close to ``x @ W``. Same return values as
    :func:`quantize_blocked`."""
    from .reconstruct import gram_cholesky

    k, n = weight.shape
    w = weight.astype(np.float64).copy()
    h = np.asarray(hessian, np.float64).copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0  # an input that is always zero: its weight row is irrelevant
    w[dead] = 0.0
    chol = gram_cholesky(h, damping)                        # L L^T = H + damping * mean(diag H) * I
    inv_l = np.linalg.inv(chol)
    upper = np.linalg.cholesky(inv_l.T @ inv_l).T           # U^T U = H^-1, upper triangular
    qmax = 2 ** (bits - 1) - 1 if bits > 2 else 1
    levels = 2 ** bits - 1
    q = np.zeros((k, n), np.int16)
    blocks = -(-k // block_size)
    scales = np.zeros((blocks, n), np.float32)
    zeros = None if symmetric else np.zeros((blocks, n), np.int16)
    for b, b0 in enumerate(range(0, k, block_size)):
        b1 = min(b0 + block_size, k)
        _, scale, zero = quantize_blocked(w[b0:b1].astype(np.float32), bits=bits, block_size=block_size,
                                          symmetric=symmetric)
        scale, zero = scale[0].astype(np.float64), None if zero is None else zero[0]
        scales[b] = scale
        if zeros is not None:
            zeros[b] = zero
        err = np.zeros((b1 - b0, n))
        for i in range(b0, b1):
            row = w[i]
            if symmetric:
                qi = np.clip(np.rint(row / scale), -qmax, qmax)
                deq = qi * scale
            else:
                qi = np.clip(np.rint(row / scale) + zero, 0, levels)
                deq = (qi - zero) * scale
            q[i] = qi
            e = (row - deq) / upper[i, i]
            w[i + 1:b1] -= np.outer(upper[i, i + 1:b1], e)
            err[i - b0] = e
        w[b1:] -= upper[b0:b1, b1:].T @ err
    return q, scales, zeros


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
        gptq: GPTQ error-compensating rounding from the layer inputs' second moments (needs calibration
            data; same format and size, lower output error than round-to-nearest)
        gptq_damping: GPTQ Hessian damping, as a fraction of its mean diagonal
        exclude: node names to keep in float, '+'-separated
        exclude_op_types: op types to keep in float, '+'-separated (MatMul, Gemm)
        include: only these node names are quantized, '+'-separated
        min_elements: skip weights smaller than this many elements
        min_cosine: parity bound this pass promises on the final outputs
    """

    name = "quantize-weights"
    summary = "weight-only blocked int4/int8/int2 for MatMul/Gemm (DequantizeLinear or MatMulNBits)"
    tolerance = Tolerance(min_cosine=0.98)

    def __init__(self, *, bits: Literal[4, 8, 2] = 4, block_size: int = 32, symmetric: bool = True,
                 format: Literal["auto", "dq", "matmulnbits"] = "auto", accuracy_level: int = 4,
                 exclude: list[str] | None = None, min_elements: int = 4096, min_cosine: float = 0.98,
                 gptq: bool = False, gptq_damping: float = 0.01, exclude_op_types: list[str] | None = None,
                 include: list[str] | None = None):
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size {block_size}: must be a power of two >= 16")
        if bits == 2 and format == "matmulnbits":
            raise ValueError("bits=2 is only available as DequantizeLinear (format=dq, opset >= 25)")
        self.bits, self.block_size, self.symmetric = bits, block_size, symmetric
        self.format, self.accuracy_level = format, accuracy_level
        if gptq_damping <= 0:
            raise ValueError("gptq_damping must be > 0")
        self.gptq, self.gptq_damping = gptq, gptq_damping
        self.exclude = list(exclude) if exclude else []
        self.exclude_op_types = list(exclude_op_types) if exclude_op_types else []
        unknown = set(self.exclude_op_types) - {"MatMul", "Gemm"}
        if unknown:
            raise ValueError(f"exclude_op_types: {', '.join(sorted(unknown))} is not quantized by this pass "
                             f"(MatMul, Gemm)")
        self.include = list(include) if include else None
        self.min_elements = min_elements
        self.min_cosine = min_cosine
        self.tolerance = Tolerance(min_cosine=min_cosine)

    def reads_calibration(self) -> bool:
        return bool(self.gptq)

    def requires(self, model: Model, ctx: PassContext) -> None:
        refuse_quantized(model)
        if self.gptq and ctx.calibration is None:
            raise InputError("gptq=true needs calibration data (--calib)")
        require_nodes(model, self.include)

    def _resolve_format(self, opset: int) -> str:
        if self.format == "dq" or (self.format == "auto" and opset >= _DQ_MIN_OPSET[self.bits]):
            if opset < _DQ_MIN_OPSET[self.bits]:
                raise InputError(f"bits={self.bits} as DequantizeLinear needs opset >= {_DQ_MIN_OPSET[self.bits]}, "
                                 f"the model has {opset}")
            return "dq"
        if self.bits == 2:
            raise InputError(f"bits=2 needs opset >= 25 (INT2 DequantizeLinear); the model has {opset}")
        return "matmulnbits"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        fmt = self._resolve_format(model.opset)
        skipped: list[tuple[str, str]] = []
        cache: dict[tuple[int, bool], Any] = {}  # (weight id, transposed) -> dequantized weight / NBits inputs
        stats = {"nodes_quantized": 0, "weights_quantized": 0, "weight_bytes_before": 0,
                 "weight_bytes_after": 0, "max_weight_rel_error": 0.0}
        warnings = []
        if fmt == "matmulnbits":
            warnings.append("quantize-weights: using com.microsoft.MatMulNBits (runs in onnxruntime only); "
                            "opset >= 21 models get standard DequantizeLinear")
        candidates = list(_weight_candidates(model, ("MatMul", "Gemm"), self.exclude, self.min_elements, skipped,
                                             exclude_op_types=self.exclude_op_types, include=self.include))
        hessians = self._hessians(model, candidates, ctx, warnings) if self.gptq and candidates else {}
        for node, weight_t, weight, bias_t in candidates:
            label = node.name or f"<{node.op}>"
            k, n = weight.shape
            if fmt == "matmulnbits" and k % self.block_size:
                skipped.append((label, f"K={k} is not a multiple of block_size={self.block_size}"))
                continue
            key = (id(weight_t), node.op == "Gemm" and bool(node.attrs.get("transB", 0)))
            if self.gptq and key not in cache:
                q, scale, zero = gptq_blocked(weight, hessians[key], bits=self.bits, block_size=self.block_size,
                                              symmetric=self.symmetric, damping=self.gptq_damping)
                self._gptq_stats(stats, weight, hessians[key], q, scale, zero)
            elif self.gptq:
                q, scale, zero = None, None, None  # tied weight: already quantized for every user at once
            else:
                q, scale, zero = quantize_blocked(weight, bits=self.bits, block_size=self.block_size,
                                                  symmetric=self.symmetric)
            if q is not None:
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

    def _hessians(self, model: Model, candidates, ctx: PassContext, warnings: list) -> dict:
        """X^T X of each candidate weight's input(s), streamed over the calibration data; a weight shared
        by several MatMuls gets the sum over its users (it must serve all their inputs)."""
        from .reconstruct import as_rows, stream_activations

        if ctx.calibration_is_random:
            warnings.append("quantize-weights: gptq Hessians come from seeded random data; pass --calib")
        names = sorted({node.inputs[0].name for node, *_ in candidates})
        grams: dict[str, np.ndarray] = {}
        for acts in stream_activations(model, names, ctx, "quantize-weights: gptq input statistics"):
            for name, x in acts.items():
                x = as_rows(x)
                grams[name] = grams.get(name, 0) + x.T @ x
        out: dict = {}
        for node, weight_t, _, _ in candidates:
            key = (id(weight_t), node.op == "Gemm" and bool(node.attrs.get("transB", 0)))
            out[key] = out.get(key, 0) + grams[node.inputs[0].name]
        return out

    def _gptq_stats(self, stats: dict, weight, hessian, q, scale, zero) -> None:
        """Layer output error tr(E^T H E) of GPTQ relative to round-to-nearest (< 1: GPTQ is better)."""
        rtn = dequantize_blocked(*quantize_blocked(weight, bits=self.bits, block_size=self.block_size,
                                                   symmetric=self.symmetric), self.block_size) - weight
        gptq = dequantize_blocked(q, scale, zero, self.block_size) - weight

        def output_error(e):
            e = e.astype(np.float64)
            return float(np.sum(e * (hessian @ e)))

        ratio = output_error(gptq) / max(output_error(rtn), 1e-30)
        stats["gptq_layers"] = stats.get("gptq_layers", 0) + 1
        stats["gptq_max_error_ratio"] = max(stats.get("gptq_max_error_ratio", 0.0), round(ratio, 6))

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

    def requires(self, model: Model, ctx: PassContext) -> None:
        refuse_quantized(model)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        infos = model.value_infos()

        def is_f32(t: gs.Tensor) -> bool:
            if isinstance(t, gs.Constant):
                return np.asarray(t.values).dtype == np.float32
            if model.constant_value(t) is not None:
                return model.constant_value(t).dtype == np.float32
            return elem_type(infos, t.name) == TensorProto.FLOAT or \
                (t.dtype is not None and np.dtype(t.dtype) == np.float32)

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
            elif any(t.name and t.dtype is None and not elem_type(infos, t.name) and model.constant_value(t) is None
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


# ----------------------------------------------------------------------------------------------
# quantize-int8: static QDQ
# ----------------------------------------------------------------------------------------------

_COMPUTE_OPS = ("Conv", "MatMul", "Gemm")
# Embedding lookups (Gather on a constant float32 [rows, hidden] table) quantize-int8 stores int8 and runs as
# com.microsoft.GatherBlockQuantized: the output stays float, so no Q/DQ placement depends on them.
_EMBED_OPS = ("Gather",)
_EMBED_BLOCKS = (128, 64, 32, 16)  # GatherBlockQuantized: a power of two >= 16; the largest dividing hidden
_EMBED_MIN_ELEMENTS = 1024  # quantize-dynamic's min_elements default: below it the contrib op saves < 3 KB
# Compute ops onnxruntime fuses with DQ inputs and a float output (QGemm, MatMulIntegerToFloat): their
# output needs no Q unless a quantized node reads it. Conv has no such kernel (QLinearConv writes int8).
_FLOAT_OUTPUT_OPS = ("MatMul", "Gemm")
# ... when nothing reads it but graph outputs and these float ops. Not an activation such as the Relu
# int8 activations cannot fold: onnxruntime then fuses Gemm + Relu into a float FusedGemm instead.
_FLOAT_OUTPUT_READERS = ("Softmax", "LogSoftmax", "Tanh", "LayerNormalization", "ArgMax", "TopK")
# Ops onnxruntime runs on quantized tensors when every float input and output carries a Q/DQ pair
# (Sigmoid and LeakyRelu as 256-entry lookup tables: QLinearSigmoid, QLinearLeakyRelu).
_QUANT_FRIENDLY = ("Add", "Mul", "AveragePool", "GlobalAveragePool", "Concat", "Sigmoid", "LeakyRelu")
# Float activations onnxruntime has no integer kernel for: rewritten (before planning) into Add / Clip /
# Mul, which it runs on uint8 (QLinearAdd, range clamp, QLinearMul, and a scale change): see _decompose.
_DECOMPOSED = ("HardSwish", "HardSigmoid")
_REMOVABLE_ACTIVATIONS = ("Relu", "Clip")
# Data-movement ops: the output keeps the input's scale and zero point (no requantization), so
# onnxruntime drops their Q/DQ pair or runs them on uint8 directly. Only input 0 is data.
_SHARE_SCALE = ("Resize", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "MaxPool")


def quantize_rows_blocked(table: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric uint8 quantization of a [rows, hidden] table in blocks of ``block_size`` along hidden:
    (uint8 values [rows, hidden], float32 scales and uint8 zero points [rows, hidden / block_size]);
    quantize-weights' blocked quantizer on the transposed table.

    Each block's grid spans [min(lo, 0), max(hi, 0)]: all 255 steps cover the block's real range (a
    symmetric grid with zero point 128 spends half of its steps on the side a lopsided block does not
    use), and 0.0 stays exact (padding rows are zero vectors)."""
    q, scale, zero = quantize_blocked(table.astype(np.float32).T, bits=8, block_size=block_size, symmetric=False)
    return (np.ascontiguousarray(q.T).astype(np.uint8), np.ascontiguousarray(scale.T),
            np.ascontiguousarray(zero.T).astype(np.uint8))


def _fed_by(model: Model, tensor: gs.Tensor, compute: set[str], depth: int = 8) -> bool:
    """Whether ``tensor`` comes from one of the ``compute`` nodes (this pass quantizes them) through ops
    that stay quantized after it (Add/Mul/pools/Concat, data movement, Relu/Clip, HardSwish parts)."""
    src = tensor.inputs[0] if tensor.inputs else None
    if src is None or depth == 0:
        return False
    if src.name in compute:
        return True
    if src.op in _QUANT_FRIENDLY + _SHARE_SCALE + _REMOVABLE_ACTIVATIONS + _DECOMPOSED:
        return any(_fed_by(model, t, compute, depth - 1) for t in src.inputs if model.constant_value(t) is None)
    return False


def _constant_operand(model: Model, node: gs.Node) -> tuple[int, np.ndarray] | None:
    """(index, value) of the one finite float32 constant input of a binary node whose other input is an
    activation (a scalar, or e.g. a MatMul's bias vector); None otherwise."""
    if len(node.inputs) != 2:
        return None
    values = [model.constant_value(t) for t in node.inputs]
    if (values[0] is None) == (values[1] is None):
        return None
    i = 0 if values[0] is not None else 1
    v = np.asarray(values[i])
    if v.dtype != np.float32 or not v.size or not np.isfinite(v).all():
        return None
    return i, v


def _scalar_operand(model: Model, node: gs.Node) -> tuple[int, float] | None:
    """(index, value) of a non-zero scalar :func:`_constant_operand`; None otherwise."""
    operand = _constant_operand(model, node)
    if operand is None or operand[1].size != 1 or float(operand[1].reshape(-1)[0]) == 0.0:
        return None
    return operand[0], float(operand[1].reshape(-1)[0])


def _rescale(model: Model, node: gs.Node) -> tuple[gs.Tensor, float] | None:
    """(activation, factor) of ``Mul(x, c)`` with a scalar constant c > 0: quantized, its output holds
    the same integers as x read with scale * c, so the Mul itself can go."""
    if node.op != "Mul":
        return None
    operand = _scalar_operand(model, node)
    if operand is None or operand[1] <= 0.0:
        return None
    return node.inputs[1 - operand[0]], operand[1]



def _x86() -> bool:
    """MLAS's x86 int8 convolution kernels (what align_channels and its pre-flight note are about)."""
    return platform.machine().lower() in ("x86_64", "amd64")


class _RangeCollector:
    """Streams per-tensor statistics over calibration feeds: running min/max, and for percentile a
    fixed-bin histogram of |x| collected in a second pass (memory stays bounded: FIELD-NOTES 14)."""

    BINS = 2048

    def __init__(self, model_proto, names: list[str], infos, data, track, method: str, percentile: float,
                 activation_type: str = "uint8"):
        from onnxslim_kit.runtime import make_session

        # Threads: the process default (optimize() halves it while the parity reference runs meanwhile).
        self.session = make_session(with_outputs(model_proto, names, infos), optimize=False)
        self.names = names
        self.data = data
        self.track = track
        self.method = method
        self.percentile = percentile
        self.activation_type = activation_type

    def _runs(self, label):
        index = {o.name: i for i, o in enumerate(self.session.get_outputs())}
        for feed in self.track(self.data, label):
            outs = self.session.run(None, feed)
            yield {n: outs[index[n]] if n in index else feed[n] for n in self.names}  # graph inputs: the feed

    def ranges(self) -> dict[str, tuple[float, float]]:
        lo = {n: np.inf for n in self.names}
        hi = {n: -np.inf for n in self.names}
        for values in self._runs("calibrating ranges"):
            for n, v in values.items():
                if v.size:
                    lo[n] = min(lo[n], float(v.min()))
                    hi[n] = max(hi[n], float(v.max()))
        if self.method == "minmax":
            return {n: (lo[n], hi[n]) for n in self.names}
        if self.method == "entropy":
            return self._entropy_ranges(lo, hi)
        amax = {n: max(abs(lo[n]), abs(hi[n]), 1e-12) for n in self.names}
        hist = {n: np.zeros(self.BINS, np.int64) for n in self.names}
        for values in self._runs("calibrating histograms"):
            for n, v in values.items():
                hist[n] += np.histogram(np.abs(v), bins=self.BINS, range=(0.0, amax[n]))[0]
        out = {}
        for n in self.names:
            h = hist[n]
            if self.method == "percentile":
                cdf = np.cumsum(h)
                total = cdf[-1] if cdf.size and cdf[-1] else 1
                idx = int(np.searchsorted(cdf, total * self.percentile / 100.0))
                bins = min(idx + 1, self.BINS)
            else:
                bins = _mse_threshold_bins(h, levels=255 if lo[n] >= 0 else 127)
            clip = amax[n] * bins / self.BINS
            out[n] = (max(lo[n], -clip), min(hi[n], clip))
        return out


    def _entropy_ranges(self, lo: dict, hi: dict) -> dict[str, tuple[float, float]]:
        """KL-divergence (TensorRT-style) clipping on the grid the tensor is really quantized to:
        one-sided tensors (min >= 0, e.g. after Relu) get a histogram of x on [0, max] and 255 levels
        (uint8) or 127 (the positive half of symmetric int8); signed tensors get |x| with 127 levels for
        symmetric int8, and a signed histogram of x on [min, max] with a window shrunk towards zero and
        255 levels for asymmetric uint8. Histogram ranges come from the min/max pass and stay fixed, so
        batches add counts to the same bins. Exact zeros are not counted."""
        signed_window = {n for n in self.names if lo[n] < 0 < hi[n] and self.activation_type == "uint8"}
        finite = [n for n in self.names if np.isfinite(lo[n]) and np.isfinite(hi[n])]
        edges = {}
        for n in finite:  # a tensor with Inf/NaN keeps its min/max (quantization falls back for it)
            if lo[n] >= 0:
                edges[n] = (0.0, max(hi[n], 1e-12))
            elif n in signed_window:
                edges[n] = (lo[n], hi[n])
            else:
                edges[n] = (0.0, max(-lo[n], hi[n], 1e-12))
        hist = {n: np.zeros(self.BINS, np.int64) for n in finite}
        for values in self._runs("calibrating histograms"):
            for n, v in values.items():
                if n not in hist:
                    continue
                x = v if lo[n] >= 0 or n in signed_window else np.abs(v)
                # exact zeros (half of a post-Relu tensor) sit on the grid exactly and cost nothing;
                # left in, their spike in bin 0 pulls the threshold down to make that bin narrow
                hist[n] += np.histogram(x[x != 0], bins=self.BINS, range=edges[n])[0]
        out = {n: (lo[n], hi[n]) for n in self.names if n not in hist}
        for n in finite:
            a, b = edges[n]
            if n in signed_window:
                zero = -a / (b - a) * self.BINS
                f = _kl_window_fraction(hist[n], zero_bin=zero, levels=255)
                out[n] = (lo[n] * f, hi[n] * f)
            else:
                levels = 255 if lo[n] >= 0 and self.activation_type == "uint8" else 127
                if self.activation_type == "int16":
                    levels = 32767  # finer than the histogram: entropy keeps the full range
                f = _kl_window_fraction(hist[n], zero_bin=0.0, levels=levels)
                clip = b * f
                out[n] = (max(lo[n], -clip), min(hi[n], clip))
        return out


def _kl_divergence_window(hist: np.ndarray, start: int, stop: int, levels: int) -> float:
    """KL(P || Q): P = hist[start:stop] with the mass outside folded into the edge bins (what clipping
    does to the data); Q = the window's own counts, without the clipped mass, quantized to ``levels``
    equal-width steps, each step's mass spread over its non-empty bins. Leaving the clipped mass out of
    Q is what makes clipping cost something: with it folded into both, a window of ``levels`` bins would
    always score zero."""
    inside = hist[start:stop].astype(np.float64)
    p = inside.copy()
    p[0] += hist[:start].sum()
    p[-1] += hist[stop:].sum()
    if p.sum() <= 0 or inside.sum() <= 0:
        return np.inf
    width = p.size
    step_of = np.minimum((np.arange(width) * levels) // width, levels - 1)
    nonzero = inside > 0
    step_mass = np.bincount(step_of, weights=inside, minlength=levels)
    step_count = np.bincount(step_of, weights=nonzero.astype(np.float64), minlength=levels)
    q = np.where(nonzero, step_mass[step_of] / np.maximum(step_count[step_of], 1), 0.0)
    p, q = p / p.sum(), q / q.sum()
    used = p > 0
    q = np.maximum(q[used], 1e-8)  # an edge bin holding only clipped mass: heavily penalised, not infinite
    return float(np.sum(p[used] * np.log(p[used] / q)))


def _kl_window_fraction(hist: np.ndarray, *, zero_bin: float, levels: int, steps: int = 128) -> float:
    """Fraction f in (0, 1] of the histogram's range to keep: the window [zero - f*zero, zero +
    f*(n - zero)] (bins) with the smallest KL divergence to its ``levels``-step quantized version. The
    window never has fewer bins than levels (finer than the grid it models would be meaningless)."""
    n = hist.size
    if hist.sum() == 0:
        return 1.0
    best_f, best_kl = 1.0, np.inf
    for f in np.linspace(min(1.0, levels / n), 1.0, steps):
        start = int(np.floor(zero_bin - f * zero_bin))
        stop = int(np.ceil(zero_bin + f * (n - zero_bin)))
        start, stop = max(start, 0), min(max(stop, start + levels), n)
        kl = _kl_divergence_window(hist, start, stop, levels)
        if kl < best_kl - 1e-12:
            best_f, best_kl = float(f), kl
    return best_f


def _mse_threshold_bins(hist: np.ndarray, *, levels: int, step: int = 16) -> int:
    """Clipping threshold (in bins) minimising the expected quantization MSE of |x|: rounding noise
    step^2/12 inside the range, squared distance to the threshold outside it."""
    n = hist.size
    centers = np.arange(n) + 0.5
    best, best_err = n, np.inf
    for t in range(max(step, 32), n + 1, step):
        q_step = t / levels
        inside = hist[:t].sum() * q_step ** 2 / 12.0
        outside = float(np.sum(hist[t:] * (centers[t:] - t) ** 2))
        err = inside + outside
        if err < best_err:
            best, best_err = t, err
    return best


@register_pass
class QuantizeInt8(Pass):
    """Static int8 QDQ: calibrated activation ranges, per-channel int8 weights, int32 bias, placed so
    that onnxruntime's CPU QDQ fusions produce integer kernels (QLinearConv, QLinearMatMul, QGemm).

    Options:
        calibration: activation range method: minmax, percentile of |x|, or mse (the clipping that
            minimises the expected quantization MSE, from a streamed histogram), or entropy (the
            KL-divergence threshold, TensorRT-style, on the tensor's real quantization grid)
        percentile: percentile of |x| kept by the percentile method
        activation_type: uint8 (asymmetric, the fast U8S8 flavour on x86), int8 (symmetric), or int16
            (symmetric A16W8, opset >= 21; onnxruntime's CPU provider runs it as DQ -> float op -> Q,
            not as an integer kernel: for accuracy studies and accelerators, not CPU speed)
        int16_nodes: compute node names whose input and output activations are int16 while the rest
            use activation_type ('+'-separated; opset >= 21)
        per_channel: one weight scale per output channel (needs opset >= 13; per-tensor below)
        reduce_range: 7-bit weights (for CPUs without VNNI)
        op_types: ops to quantize, '+'-separated (Conv+MatMul+Gemm+Gather; Gather = embedding tables:
            a Gather along axis 0 of a constant float32 2-D table of >= 1024 elements becomes
            com.microsoft.GatherBlockQuantized with asymmetric uint8 blocks of 128/64/32/16 along the
            hidden axis; its output stays float)
        exclude: node names kept in float, '+'-separated
        exclude_op_types: op types kept in float, '+'-separated (compute ops, Gather, Add, pools, Concat,
            data-movement ops), e.g. Gemm
        include: only these compute / embedding Gather node names are quantized ('+'-separated;
            Add/pool/Concat between quantized tensors follow them)
        keep_first_last: keep the first and last compute node in float
        target_cosine: sensitivity fallback: keep the fewest, most sensitive layers in float until the
            outputs' cosine vs the float model reaches this (measured on the calibration data)
        equalize: cross-layer equalization of Conv -> Relu -> Conv pairs first (exact): true or weights
            equalizes their weight ranges (helps most with per_channel=false); activations equalizes the
            per-channel ranges of the tensor between them (calibrated) against the second Conv's weights,
            per pair as far as it lowers the expected int8 noise (helps the per-tensor activation grid);
            both: weights, then activations
        bias_correction: subtract the expected output shift caused by weight rounding from each bias
            (input means from the calibration data)
        smoothquant: SmoothQuant alpha (e.g. 0.5) for MatMul/Gemm inputs: activation outliers moved
            into the weights (folded into a preceding LayerNormalization, else a Mul is inserted)
        min_cosine: parity bound this pass promises on the final outputs
        align_channels: pad channel groups with zero channels (the same function) where onnxruntime's
            fast x86 int8 convolution kernels need it: depthwise groups to a multiple of 16, groups of
            dense Convs narrower than 16 channels to 16 (default: on x86 CPUs; only groups that
            prune-channels could also resize)
    """

    name = "quantize-int8"
    summary = "static int8 QDQ (calibrated) for Conv/MatMul/Gemm (+Add, pooling, Concat) fused by onnxruntime"
    needs = frozenset({"calibration"})
    tolerance = Tolerance(min_cosine=0.99)

    def __init__(self, *, calibration: Literal["minmax", "percentile", "mse", "entropy"] = "minmax",
                 percentile: float = 99.999,
                 activation_type: Literal["uint8", "int8", "int16"] = "uint8", per_channel: bool = True,
                 reduce_range: bool = False, op_types: list[str] | None = None, exclude: list[str] | None = None,
                 keep_first_last: bool = False, target_cosine: float | None = None,
                 equalize: Literal["false", "true", "weights", "activations", "both"] = "false",
                 bias_correction: bool = False, smoothquant: float | None = None, min_cosine: float = 0.99,
                 int16_nodes: list[str] | None = None, exclude_op_types: list[str] | None = None,
                 include: list[str] | None = None, align_channels: bool | None = None):
        self.calibration, self.percentile = calibration, percentile
        self.align_channels = align_channels
        if smoothquant is not None and not 0.0 <= smoothquant <= 1.0:
            raise ValueError("smoothquant (alpha) must be in [0, 1]")
        if isinstance(equalize, bool):  # Python callers: equalize=True is the weight CLE
            equalize = "true" if equalize else "false"
        if equalize not in ("false", "true", "weights", "activations", "both"):
            raise ValueError("equalize must be false, true (= weights), weights, activations or both")
        self.equalize = equalize
        self._equalize_mode = {"false": None, "true": "weights"}.get(equalize, equalize)
        self.bias_correction, self.smoothquant = bias_correction, smoothquant
        if target_cosine is not None and not 0.0 < target_cosine <= 1.0:
            raise ValueError("target_cosine must be in (0, 1]")
        self.target_cosine = target_cosine
        if not 50.0 < percentile <= 100.0:
            raise ValueError("percentile must be in (50, 100]")
        self.activation_type, self.per_channel, self.reduce_range = activation_type, per_channel, reduce_range
        self.op_types = list(op_types) if op_types else list(_COMPUTE_OPS + _EMBED_OPS)
        unknown = set(self.op_types) - set(_COMPUTE_OPS + _EMBED_OPS)
        if unknown:
            raise ValueError(f"op_types: unsupported {', '.join(sorted(unknown))} "
                             f"({'+'.join(_COMPUTE_OPS + _EMBED_OPS)})")
        self.exclude = list(exclude) if exclude else []
        self.int16_nodes = list(int16_nodes) if int16_nodes else []
        self.exclude_op_types = list(exclude_op_types) if exclude_op_types else []
        known = set(_COMPUTE_OPS + _EMBED_OPS + _QUANT_FRIENDLY + _SHARE_SCALE + _DECOMPOSED)
        unknown = set(self.exclude_op_types) - known
        if unknown:
            raise ValueError(f"exclude_op_types: {', '.join(sorted(unknown))} is not quantized by this pass "
                             f"(one of {'+'.join(sorted(known))})")
        self.include = list(include) if include else None
        self.keep_first_last = keep_first_last
        self.min_cosine = min_cosine
        self.tolerance = Tolerance(min_cosine=min_cosine)

    def requires(self, model: Model, ctx: PassContext) -> None:
        refuse_quantized(model)
        if (self.activation_type == "int16" or self.int16_nodes) and model.opset < 21:
            what = "activation_type=int16" if self.activation_type == "int16" else "int16_nodes"
            raise InputError(f"{what} needs opset >= 21 (int16 QuantizeLinear/DequantizeLinear); the model has "
                             f"{model.opset}")
        names = {n.name for n in model.nodes}
        for option, wanted in (("include", self.include or []), ("int16_nodes", self.int16_nodes)):
            missing = [n for n in wanted if n not in names]
            if missing:
                raise InputError(f"{option}: no node named {', '.join(repr(n) for n in missing[:5])} in the model")

    # -- selection --------------------------------------------------------------------------------
    def _select(self, model: Model, skipped: list) -> list[gs.Node]:
        compute = []
        for node in model.nodes:
            if node.op == "ConvTranspose" and model.constant_value(node.inputs[1]) is not None:
                # measured with onnxruntime 1.32 (CPU): QDQ around ConvTranspose is not fused (uint8, int8,
                # per channel on axis 1 or per tensor): it would run DQ -> float ConvTranspose, slower
                skipped.append((node.name or "<ConvTranspose>", "ConvTranspose kept in float: onnxruntime's CPU "
                                                                "provider has no fused QDQ ConvTranspose kernel"))
                continue
            if node.op not in self.op_types or node.op not in _COMPUTE_OPS:
                continue
            label = node.name or f"<{node.op}>"
            if any(isinstance(a, gs.Graph) for a in node.attrs.values()):
                continue
            if node.name in self.exclude:
                skipped.append((label, "excluded by option"))
                continue
            if node.op in self.exclude_op_types:
                skipped.append((label, f"op type {node.op} excluded by option"))
                continue
            if self.include is not None and node.name not in self.include:
                skipped.append((label, "not in include"))
                continue
            w = model.constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
            if w is None or w.dtype != np.float32:
                skipped.append((label, "weight is not a constant float32 tensor"))
                continue
            if node.op == "MatMul" and w.ndim != 2:
                skipped.append((label, f"MatMul weight is {w.ndim}-D"))
                continue
            if node.op == "Gemm" and (node.attrs.get("transA", 0) or float(node.attrs.get("alpha", 1.0)) != 1.0
                                      or float(node.attrs.get("beta", 1.0)) != 1.0):
                skipped.append((label, "Gemm with transA or alpha/beta != 1"))
                continue
            if len(node.inputs) > 2 and node.inputs[2].name and model.constant_value(node.inputs[2]) is None:
                skipped.append((label, "bias is not constant"))
                continue
            compute.append(node)
        if self.keep_first_last and compute:
            for node in {id(compute[0]): compute[0], id(compute[-1]): compute[-1]}.values():
                skipped.append((node.name or node.op, "kept in float (keep_first_last)"))
            compute = compute[1:-1] if len(compute) > 1 else []
        return compute

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        skipped: list[tuple[str, str]] = []
        warnings: list[str] = []
        if ctx.calibration_is_random:
            warnings.append("quantize-int8: activation ranges come from seeded random data; pass --calib")
        if model.opset < 10:
            raise InputError(f"opset {model.opset} has no QuantizeLinear (needs >= 10)")
        per_channel = self.per_channel
        if per_channel and model.opset < 13:
            per_channel = False
            warnings.append(f"quantize-int8: opset {model.opset} has no per-channel DequantizeLinear; weights are "
                            f"quantized per tensor (upgrade the model to opset >= 13 for per-channel)")
        model.toposort()
        for node in model.nodes:  # the plan refers to nodes by name (it is re-applied to copies)
            if not node.name:
                node.name = model.unique_name(node.op.lower())
        stats_extra, undo = self._accuracy_aids(model, ctx, per_channel, skipped)
        # Layout rewrites for the compute nodes this pass quantizes (the same function each time; they
        # change no compute node's name or weight type, so one selection serves all three).
        chosen = {n.name for n in self._select(model, [])}
        counts = {"activations_decomposed": self._decompose(model, chosen, skipped),
                  "channels_added": self._align_channels(model, chosen, skipped),
                  "flatten_to_nhwc": self._nhwc_flatten(model, chosen, skipped) if self.activation_type != "int16" else 0}
        stats_extra.update({key: n for key, n in counts.items() if n})
        plan = self._plan(model, ctx, skipped)
        if plan is None:  # the aids may still have rewritten weights (exactly): say so
            aided = any(stats_extra.get(k) for k in ("pairs_equalized", "matmuls_smoothed", "biases_corrected"))
            embed = self._embeddings(model, skipped)
            return PassResult(model, aided or embed["gathers_quantized"] > 0,
                              {"nodes_quantized": 0, **stats_extra, **embed}, skipped, warnings)
        excluded: set[str] = set()
        if self.target_cosine is not None:
            excluded = self._sensitivity_fallback(plan, ctx, per_channel, skipped, stats_extra)
            quant_aids.undo_bias_correction(model, undo, excluded)  # float layers keep their own bias
        compute = [n for n in plan["compute"] if n not in excluded]
        from passes.channel_groups import is_depthwise

        names = set(compute)
        depthwise = [n for n in model.nodes if n.name in names and is_depthwise(model, n)]  # weights still float
        stats = self._apply(model, plan, excluded, per_channel)
        stats.update(stats_extra)
        stats.update(self._preflight(plan["proto"], compute, ctx, warnings, depthwise))
        # After the Q/DQ placement (which the float-output lookups do not affect), so that a table a
        # quantized tied head no longer reads in float is seen as free to go.
        stats.update(self._embeddings(model, skipped))
        modified = stats["nodes_quantized"] > 0 or stats["activations_quantized"] > 0 or stats["gathers_quantized"] > 0
        return PassResult(model, modified, stats, skipped, warnings)

    def _accuracy_aids(self, model: Model, ctx: PassContext, per_channel: bool, skipped: list):
        """Equalization and SmoothQuant (before ranges are calibrated), then bias correction against the
        weights exactly as _quantize_weights will round them (passes/quant_aids.py)."""
        stats: dict[str, float] = {}
        undo: dict = {}
        if self._equalize_mode:
            pairs = quant_aids.find_cle_pairs(model, skipped)  # once: the weight step keeps the nodes
        if self._equalize_mode in ("weights", "both"):
            stats.update(quant_aids.equalize(model, skipped, pairs=pairs))
        if self._equalize_mode in ("activations", "both"):
            both = self._equalize_mode == "both"
            act_stats = quant_aids.equalize_activations(model, ctx, skipped, per_channel=per_channel, pairs=pairs,
                                                        note="activation step of equalize=both: " if both else "")
            if both:
                act_stats["pairs_equalized_activations"] = act_stats.pop("pairs_equalized")
            stats.update(act_stats)
        if self.smoothquant is not None:
            names = [n.name for n in self._select(model, []) if n.op in ("MatMul", "Gemm")]
            stats.update(quant_aids.smooth_quant(model, ctx, self.smoothquant, names, skipped))
        if self.bias_correction:
            def fake_quant(w, axis):
                q, scale = quantize_weight_symmetric(w, axis=axis if per_channel else None,
                                                     reduce_range=self.reduce_range)
                shape = [1] * w.ndim
                if per_channel:
                    shape[axis] = -1
                return q.astype(np.float32) * scale.reshape(shape)

            names = [n.name for n in self._select(model, [])]
            bias_stats, undo = quant_aids.correct_biases(model, ctx, names, fake_quant, skipped)
            stats.update(bias_stats)
        return stats, undo

    def _plan(self, model: Model, ctx: PassContext, skipped: list) -> dict | None:
        """Which nodes and tensors to quantize, with calibrated quantization parameters, by name."""
        compute = self._select(model, skipped)
        if not compute:
            return None
        # The calibration model; nothing below changes the graph, so its types come from it too.
        proto = model.to_proto(value_info="drop")
        infos = model.value_infos(export=proto)

        def is_float(t: gs.Tensor) -> bool:
            return elem_type(infos, t.name) == TensorProto.FLOAT

        kept = []
        for n in compute:
            if is_float(n.inputs[0]):
                kept.append(n)
            else:
                skipped.append((n.name, "input is not known to be float32"))
        compute = kept
        if not compute:
            return None
        selected = {id(n) for n in compute}
        # Friendly ops between quantized tensors run quantized too (QLinearAdd, QLinearConcat, pools).
        for node in model.nodes:
            if node.op in _QUANT_FRIENDLY and node.name not in self.exclude and \
                    node.op not in self.exclude_op_types and \
                    (all(model.constant_value(t) is None and is_float(t) for t in node.inputs) or
                     (node.op == "Add" and _constant_operand(model, node) is not None)) and \
                    all(is_float(t) for t in node.outputs):
                selected.add(id(node))
        # Data-movement ops next to quantized nodes carry the quantized tensor through.
        produced = {t.name for n in model.nodes if id(n) in selected for t in n.outputs}
        consumed = {t.name for n in model.nodes if id(n) in selected for t in n.inputs}
        for node in model.nodes:
            if node.op in _REMOVABLE_ACTIVATIONS and node.inputs[0].name in produced:
                produced.add(node.outputs[0].name)  # folded into its producer's range (_fold_pairs)
            if node.op in _SHARE_SCALE and node.name not in self.exclude and node.op not in self.exclude_op_types and \
                    is_float(node.inputs[0]) and \
                    model.constant_value(node.inputs[0]) is None and \
                    (node.inputs[0].name in produced or node.outputs[0].name in consumed):
                selected.add(id(node))
                produced.add(node.outputs[0].name)
            elif _rescale(model, node) is not None and node.name not in self.exclude and \
                    "Mul" not in self.exclude_op_types and _rescale(model, node)[0].name in produced and \
                    not model.is_graph_output(node.outputs[0]):
                selected.add(id(node))  # x * c (c > 0): the same integers, read with scale * c
                produced.add(node.outputs[0].name)
        nodes = [n for n in model.nodes if id(n) in selected]
        plan = {"compute": [n.name for n in compute], "selected": [n.name for n in nodes], "proto": proto}
        tensors = self._tensors(model, nodes, self._fold_pairs(model, nodes))
        collector = _RangeCollector(plan["proto"], sorted(tensors), infos, ctx.calibration, ctx.track, self.calibration,
                                    self.percentile, self.activation_type)
        ranges = collector.ranges()
        del collector
        wide = self._wide_tensors(nodes)
        qparams = {name: self._activation_qparams(*ranges[name], wide=name in wide) for name in tensors}
        for node in nodes:  # topological order: chains of data-movement ops share one scale
            if node.op in _SHARE_SCALE and node.inputs[0].name in qparams and node.outputs[0].name in qparams:
                qparams[node.outputs[0].name] = qparams[node.inputs[0].name]
            elif node.op == "Mul" and _rescale(model, node) is not None:
                x, factor = _rescale(model, node)
                if x.name in qparams and node.outputs[0].name in qparams:
                    scale, zp = qparams[x.name]
                    qparams[node.outputs[0].name] = (float(scale * factor), zp)
        plan["qparams"] = qparams
        return plan

    def _fold_pairs(self, model: Model, nodes: list[gs.Node]) -> dict[str, gs.Node]:
        """Relu/Clip(0, x) right after a compute node or Add: its range replaces the node's output range
        and the activation is removed (uint8 quantization clamps at zero exactly)."""
        pairs: dict[str, gs.Node] = {}
        if self.activation_type != "uint8":
            return pairs
        outer = model.outer_scope_names()  # values read by subgraphs are not quantized: Relu must stay
        wide = self._wide_tensors(nodes)  # symmetric int16 does not clamp at zero: its Relu must stay
        for node in nodes:
            if node.op not in _COMPUTE_OPS + ("Add",):  # residual Add -> Relu folds like Conv -> Relu
                continue
            if node.outputs[0].name in wide or any(u.outputs[0].name in wide for u in model.consumers(node.outputs[0])):
                continue
            users = model.consumers(node.outputs[0])
            if len(users) == 1 and users[0].op in _REMOVABLE_ACTIVATIONS and \
                    not model.is_graph_output(node.outputs[0]) and self._clip_low_is_zero(model, users[0]) \
                    and users[0].outputs[0].name not in outer and node.outputs[0].name not in outer:
                pairs[node.name] = users[0]
        return pairs

    def _wide_tensors(self, nodes: list[gs.Node]) -> set[str]:
        """Activation tensors quantized to int16 because an ``int16_nodes`` compute node reads or writes them."""
        wanted = set(self.int16_nodes)
        return {t.name for n in nodes if n.name in wanted and n.op in _COMPUTE_OPS
                for t in (n.inputs[0], n.outputs[0])}

    @staticmethod
    def _tensors(model: Model, nodes: list[gs.Node], fold: dict[str, gs.Node]) -> dict[str, gs.Tensor]:
        """Every float activation input and output of the selected nodes (after activation folding),
        except the output of a Gemm / MatMul read only by graph outputs and ``_FLOAT_OUTPUT_READERS``
        (logits, a projection into Softmax / LayerNormalization): onnxruntime runs DQ -> Gemm / MatMul
        with a float output as QGemm / MatMulIntegerToFloat writing float directly, so a Q -> DQ there
        would only add an op and the output's rounding error."""
        outer = model.outer_scope_names()
        selected = {id(n) for n in nodes}
        tensors: dict[str, gs.Tensor] = {}
        for node in nodes:
            for t in node.inputs[:1] if node.op in _COMPUTE_OPS + _SHARE_SCALE else node.inputs:
                if model.constant_value(t) is None and t.name and t.name not in outer:
                    tensors[t.name] = t
            out = fold[node.name].outputs[0] if node.name in fold else node.outputs[0]
            if node.op in _FLOAT_OUTPUT_OPS and node.name not in fold and \
                    all(u.op in _FLOAT_OUTPUT_READERS and id(u) not in selected for u in model.consumers(out)):
                continue
            if out.name not in outer:
                tensors[out.name] = out
        return tensors

    def _apply(self, model: Model, plan: dict, excluded: set[str], per_channel: bool) -> dict:
        """Insert Q/DQ and quantized weights for the planned nodes except ``excluded`` compute nodes."""
        wanted = set(plan["selected"]) - excluded
        nodes = [n for n in model.nodes if n.name in wanted]
        fold = self._fold_pairs(model, nodes)
        tensors = self._tensors(model, nodes, fold)
        qparams = plan["qparams"]
        for name, act in fold.items():  # the compute node now writes the activation's output tensor
            node = next(n for n in nodes if n.name == name)
            out = act.outputs[0]
            act.outputs.clear()
            act.inputs.clear()
            model.graph.nodes.remove(act)
            node.outputs[0] = out
        stats = {"nodes_quantized": 0, "activations_quantized": 0, "activations_folded": len(fold), "rescales_dropped": 0,
                 "weights_quantized": 0, "bias_scales_raised": 0}
        in_scales = {n.name: qparams[n.inputs[0].name][0] for n in nodes
                     if n.op in _COMPUTE_OPS and n.inputs[0].name in qparams}
        # Q/DQ on activations: every consumer reads the dequantized value.
        for name, t in tensors.items():
            if name not in qparams:
                continue
            scale, zp = qparams[name]
            s_t = tensor_from_array(model.unique_name(name + "_scale"), np.array(scale, np.float32))
            act_dtype = zp.dtype if isinstance(zp, np.generic) else self._act_dtype()  # int16 zero points are typed
            z_t = tensor_from_array(model.unique_name(name + "_zero_point"), np.array(zp, dtype=act_dtype))
            q = gs.Variable(model.unique_name(name + "_quantized"), dtype=act_dtype, shape=t.shape)
            dq = gs.Variable(model.unique_name(name + "_dequantized"), dtype=np.float32, shape=t.shape)
            users = list(t.outputs)
            model.graph.nodes.append(gs.Node("QuantizeLinear", model.unique_name(name + "_Q"),
                                             inputs=[t, s_t, z_t], outputs=[q]))
            model.graph.nodes.append(gs.Node("DequantizeLinear", model.unique_name(name + "_DQ"),
                                             inputs=[q, s_t, z_t], outputs=[dq]))
            for user in users:
                for i, inp in enumerate(user.inputs):
                    if inp is t:
                        user.inputs[i] = dq
            for i, out in enumerate(list(model.graph.outputs)):
                if out is t:  # the graph output becomes the DQ (name kept), so the producer fuses too
                    dq_name, t.name = t.name, model.unique_name(t.name + "_float")
                    dq.name = dq_name
                    model.graph.outputs[i] = dq
            stats["activations_quantized"] += 1
        for node in nodes:
            if node.op == "Add" and _constant_operand(model, node) is not None:
                self._quantize_operand(model, node, stats)
        for node in nodes:
            if node.op == "Mul" and _rescale(model, node) is not None:
                self._drop_rescale(model, node, stats)
        # Weights (per channel) and bias (int32, scale = input scale x weight scale).
        for node in nodes:
            if node.op in _COMPUTE_OPS:
                self._quantize_weights(model, node, in_scales.get(node.name), per_channel, stats)
                stats["nodes_quantized"] += 1
        model.invalidate()
        return stats

    def _sensitivity_fallback(self, plan: dict, ctx: PassContext, per_channel: bool, skipped: list,
                              stats: dict) -> set[str]:
        """Keep the fewest compute nodes in float that bring the outputs' cosine to ``target_cosine``:
        measure each node alone (the model with only that node in float), then exclude the most
        sensitive first, verifying each step end to end."""
        from onnxslim_kit.parity import ParityChecker

        checker = ParityChecker(plan["proto"], ctx.calibration)
        target = Tolerance(min_cosine=self.target_cosine)

        def cosine(excluded: set[str]) -> float:
            trial = Model.from_proto(plan["proto"])
            self._apply(trial, plan, excluded, per_channel)
            report = checker.check(trial.to_proto(value_info="drop"), target)
            return min((m.cosine for m in report.outputs), default=0.0) if not report.error else 0.0

        full = cosine(set())
        stats["cosine_all_int8"] = round(full, 6)
        if full >= self.target_cosine:
            return set()
        gain = {name: cosine({name}) for name in ctx.track(plan["compute"], "sensitivity")}
        excluded: set[str] = set()
        reached = full
        for name in sorted(gain, key=lambda n: -gain[n]):
            excluded.add(name)
            reached = cosine(excluded)
            skipped.append((name, f"kept in float by the sensitivity fallback (cosine {gain[name]:.5f} with only "
                                  f"this node in float, {full:.5f} with none)"))
            if reached >= self.target_cosine:
                break
        stats["nodes_kept_float"] = len(excluded)
        stats["cosine_after_fallback"] = round(reached, 6)
        if reached < self.target_cosine:
            skipped.append(("quantize-int8", f"target_cosine {self.target_cosine} not reachable: {reached:.6f} with "
                                             f"every compute node in float (Add/pool/Concat stay quantized)"))
        return excluded

    @staticmethod
    def _preflight(proto, compute: list[str], ctx: PassContext, warnings: list[str], depthwise: list[gs.Node]
                   ) -> dict:
        """What share of the model's MACs now runs in int8, whether the CPU has int8 dot products, and
        the int8 ``depthwise`` Convs (how many of them not 16-channel aligned)."""
        from onnxslim_kit.metrics import model_macs
        from onnxslim_kit.runtime import cpu_int8_dot_product

        out = {}
        try:
            macs_per_node, _ = model_macs(proto, ctx.input_shapes)
            names = set(compute)
            int8 = sum(m for name, m in macs_per_node.items() if name in names)
            total = int(sum(macs_per_node.values()))
            if total:
                out["int8_mac_share"] = round(int8 / total, 4)
        except Exception as exc:  # noqa: BLE001 - a report figure must not fail the pass
            logger.info("MAC share not computed: %s", exc)
        isa = cpu_int8_dot_product()
        out["cpu_int8_dot_product"] = int(isa is not None)
        unaligned = sum(int(n.attrs.get("group", 1)) % 16 != 0 for n in depthwise)
        depthwise = len(depthwise)
        if depthwise:
            out["depthwise_int8"] = depthwise
            out["depthwise_int8_unaligned"] = unaligned
            align = "" if not unaligned or not _x86() else (
                f"; {unaligned} of them have a channel count that is not a multiple of 16, which onnxruntime's "
                f"faster x86 int8 depthwise kernel needs (measured: 72 channels 19 us, 80 channels 14 us)")
            warnings.append(f"quantize-int8: {depthwise} depthwise Conv layer(s) run in int8: onnxruntime's int8 "
                            f"depthwise kernels measured 1.3-2.5x slower than its fp32 ones on an AVX-512 CPU{align}; "
                            f"depthwise-heavy models may not get faster: check with 'onnxslim-kit bench'")
        if isa is None:
            warnings.append("quantize-int8: this CPU has no int8 dot-product instructions (VNNI/AMX/Arm dot); "
                            "int8 may be slower than fp32 here: check with 'onnxslim-kit bench'")
        return out

    # -- embedding tables -----------------------------------------------------------------------
    def _embeddings(self, model: Model, skipped: list) -> dict:
        """Gather(table, ids) on a constant float32 [rows, hidden] table along axis 0 ->
        com.microsoft.GatherBlockQuantized(uint8 table, ids, scales, zero points): gather_axis=0,
        quantize_axis=1, bits=8, block_size the largest of 128/64/32/16 dividing hidden (onnxruntime
        1.32, 1000x128 table, 32 ids: 8.0 us vs 5.7 us fp32 Gather; a Gather then DequantizeLinear is
        two kernels). Negative ids work as in Gather; an id outside the table gives a zero row where
        Gather raises (onnxruntime 1.32). The output stays float. A table shared by several
        Gathers is quantized once. A table something else still reads in float (a tied head this pass
        kept in float, a Gather left alone, a subgraph) is left as it is: an int8 copy next to the float
        table would make the model larger."""
        stats = {"gathers_quantized": 0, "embedding_tables_quantized": 0, "embedding_bytes_before": 0,
                 "embedding_bytes_after": 0}
        if "Gather" not in self.op_types:
            return stats
        tables: dict[int, tuple[gs.Tensor, np.ndarray, int, list[gs.Node]]] = {}
        for node in model.nodes:
            table = model.embedding_table(node)
            if table is None:
                continue  # not a Gather, index arithmetic on shapes, or a lookup in an activation
            label = node.name or "<Gather>"
            if table.dtype != np.float32:
                skipped.append((label, f"embedding table is {table.dtype}, not float32: kept as it is"))
                continue
            if node.name in self.exclude:
                skipped.append((label, "excluded by option"))
                continue
            if "Gather" in self.exclude_op_types:
                skipped.append((label, "op type Gather excluded by option"))
                continue
            if self.include is not None and node.name not in self.include:
                skipped.append((label, "not in include"))
                continue
            axis = int(node.attrs.get("axis", 0))
            if axis not in (0, -2):
                skipped.append((label, f"embedding Gather along axis {axis} kept in float (GatherBlockQuantized "
                                       f"is used for row lookups, axis 0)"))
                continue
            if table.size < _EMBED_MIN_ELEMENTS:
                skipped.append((label, f"table has {table.size} elements < {_EMBED_MIN_ELEMENTS}: kept in float"))
                continue
            block = next((b for b in _EMBED_BLOCKS if table.shape[1] % b == 0), None)
            if block is None:
                skipped.append((label, f"table hidden size {table.shape[1]} is not a multiple of 16 (the smallest "
                                       f"GatherBlockQuantized block): kept in float"))
                continue
            tables.setdefault(id(node.inputs[0]), (node.inputs[0], table, block, []))[3].append(node)
        if not tables:
            return stats
        outer = model.outer_scope_names()
        for tensor, table, block, gathers in tables.values():
            mine = {id(g) for g in gathers}
            others = [u.name or u.op for u in model.consumers(tensor) if id(u) not in mine]
            if model.is_graph_output(tensor):
                others.append("a graph output")
            if tensor.name in outer:
                others.append("a subgraph")
            if others:
                for g in gathers:
                    skipped.append((g.name or "<Gather>", f"table {tensor.name} is also read in float by "
                                                          f"{', '.join(others[:3])}: kept in float (an int8 copy "
                                                          f"next to the float table would add bytes)"))
                continue
            q, scale, zero = quantize_rows_blocked(table, block)
            base = tensor.name or "embedding"
            q_t = tensor_from_array(model.unique_name(base + "_quantized"), q)
            s_t = tensor_from_array(model.unique_name(base + "_scale"), scale)
            z_t = tensor_from_array(model.unique_name(base + "_zero_point"), zero)
            for g in gathers:
                name = g.name
                quant = gs.Node("GatherBlockQuantized", name, domain="com.microsoft",
                                attrs={"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": 8},
                                inputs=[q_t, g.inputs[1], s_t, z_t], outputs=list(g.outputs))
                g.inputs.clear()
                g.outputs.clear()
                at = next(i for i, n in enumerate(model.graph.nodes) if n is g)
                model.graph.nodes[at] = quant  # same place, same name
                stats["gathers_quantized"] += 1
            stats["embedding_tables_quantized"] += 1
            stats["embedding_bytes_before"] += int(table.nbytes)
            stats["embedding_bytes_after"] += int(q.nbytes + scale.nbytes + zero.nbytes)
        model.invalidate()
        return stats

    # -- float activations onnxruntime has no integer kernel for ---------------------------------
    def _decompose(self, model: Model, chosen: set[str], skipped: list) -> int:
        """HardSwish(x) -> Mul(Mul(x, Clip(Add(x, 3), 0, 6)), 1/6) and HardSigmoid(x) ->
        Mul(Clip(Add(x, beta/alpha), 0, 1/alpha), alpha), where x comes from a node this pass quantizes.

        Same function in float (to rounding). Quantized, onnxruntime runs the Add as QLinearAdd, the
        Clip disappears into the uint8 range of the Add's output (zero point 0, top of the range at most
        the Clip's bound), the x * t product as QLinearMul, and the scalar Mul becomes a change of scale
        between a Q and the next DQ: no float op left (before: DQ -> HardSigmoid -> Mul -> Q, measured
        ~4 kernel launches each; fp32 fuses them into the Conv). uint8 activations only."""
        if self.activation_type != "uint8" or self.int16_nodes:
            return 0
        count = 0
        for node in list(model.nodes):
            if node.op not in _DECOMPOSED or (node.domain or "") not in ("", "ai.onnx"):
                continue
            if node.name in self.exclude or node.op in self.exclude_op_types:
                skipped.append((node.name, f"{node.op} kept in float (excluded by option)"))
                continue
            x, y = node.inputs[0], node.outputs[0]
            if not _fed_by(model, x, chosen):
                skipped.append((node.name, f"{node.op} kept in float: its input is not quantized"))
                continue
            if node.op == "HardSwish":
                alpha, beta, times_x = 1.0 / 6.0, 0.5, True
            else:
                alpha, beta, times_x = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5)), False
                if not alpha > 0.0:
                    skipped.append((node.name, "HardSigmoid with alpha <= 0 kept in float"))
                    continue
            base = node.name or model.unique_name(node.op.lower())

            def const(suffix, value):
                return tensor_from_array(model.unique_name(f"{base}_{suffix}"), np.array(value, np.float32))

            def var(suffix):
                return gs.Variable(model.unique_name(f"{base}_{suffix}"), dtype=np.float32, shape=x.shape)

            shifted, clipped = var("shifted"), var("clipped")
            new = [gs.Node("Add", model.unique_name(base + "_add"), inputs=[x, const("offset", beta / alpha)],
                           outputs=[shifted])]
            if model.opset >= 11:
                new.append(gs.Node("Clip", model.unique_name(base + "_clip"),
                                   inputs=[shifted, const("low", 0.0), const("high", 1.0 / alpha)], outputs=[clipped]))
            else:
                new.append(gs.Node("Clip", model.unique_name(base + "_clip"), attrs={"min": 0.0, "max": 1.0 / alpha},
                                   inputs=[shifted], outputs=[clipped]))
            gated = clipped
            if times_x:
                gated = var("gated")
                new.append(gs.Node("Mul", model.unique_name(base + "_mul"), inputs=[x, clipped], outputs=[gated]))
            node.inputs.clear()
            node.outputs.clear()
            model.graph.nodes.remove(node)
            new.append(gs.Node("Mul", model.unique_name(base + "_scale"), inputs=[gated, const("alpha", alpha)],
                               outputs=[y]))
            model.graph.nodes.extend(new)
            count += 1
        if count:
            model.invalidate()
            model.toposort()
        return count

    def _align_channels(self, model: Model, chosen: set[str], skipped: list) -> int:
        """Zero channels appended (channel_groups.pad_groups: the same function) where onnxruntime's x86
        int8 convolution kernels (MLAS ConvSym) need a channel count they otherwise fall back from:
        - the channel group of a quantized depthwise Conv, up to a multiple of 16 (tools/bench_depthwise.py:
          120 channels 22 us, 128 channels 9.6 us per 5x5 layer);
        - a group produced by quantized dense Convs with fewer than 16 channels, up to 16 (a chain of 3x3
          Convs at 32x32: 8 channels 30.7 us, 16 channels 21.3 us per layer).
        Only groups prune-channels could also resize (their channel count is not part of the interface).
        Returns the number of channels added."""
        from passes.channel_groups import analyze, is_depthwise, pad_groups

        on = self.align_channels
        if on is None:
            on = _x86()
        if not on or self.activation_type == "int16" or self.int16_nodes or self.target_cosine is not None:
            return 0  # target_cosine: the fallback may keep padded layers in float (slower, for nothing)
        depthwise = [n for n in model.nodes if n.name in chosen and is_depthwise(model, n)
                     and int(n.attrs.get("group", 1)) % 16]
        narrow = [n for n in model.nodes if n.name in chosen and n.op == "Conv"
                  and int(n.attrs.get("group", 1)) == 1 and model.constant_value(n.inputs[1]).shape[0] < 16]
        if not depthwise and not narrow:
            return 0
        an = analyze(model)
        pads: dict[int, int] = {}
        spaces = {id(node): space for kind, node, space in an.fixes if kind == "group"}
        for node in depthwise:
            space = spaces.get(id(node))
            gid = space.segments[-1][0] if space is not None and space.block == 1 else None
            group = an.groups.get(gid) if gid is not None else None
            if group is None or group.reasons:
                why = "; ".join(group.reasons) if group is not None and group.reasons else "channels not traced"
                skipped.append((node.name, f"depthwise channels not aligned to 16 ({why})"))
                continue
            pads.setdefault(gid, (-space.size) % 16)
        owner = {id(p): g for g in an.groups.values() for p in g.producers}
        for node in narrow:
            group = owner.get(id(node))
            if group is not None and group.gid in pads:
                continue
            why = ("channels not traced" if group is None else "; ".join(group.reasons) if group.reasons else
                   "a Conv sharing its channels stays in float" if not all(p.name in chosen for p in group.producers)
                   else "")
            if why:
                skipped.append((node.name, f"{int(model.constant_value(node.inputs[1]).shape[0])} channels not "
                                           f"widened to 16 ({why})"))
                continue
            pads[group.gid] = 16 - group.channels if group.channels < 16 else 0
        pads = {g: n for g, n in pads.items() if n}
        if not pads:
            return 0
        pad_groups(model, an, pads)
        model.toposort()
        return int(sum(pads.values()))

    def _nhwc_flatten(self, model: Model, chosen: set[str], skipped: list) -> int:
        """Flatten(axis=1) of an NCHW activation this pass quantizes -> Transpose(to NHWC) -> Flatten, with
        the rows of the Gemm/MatMul weights that read it permuted to match (the same function).

        onnxruntime runs QLinearConv and the uint8 pools in NHWC and puts a Transpose back to NCHW before
        a Flatten; the Transpose written here cancels it, so the quantized graph has no Transpose at the
        head (measured: resnet_tiny 2 -> 1 Transpose in onnxruntime's optimized graph). A 1x1 spatial
        input (after GlobalAveragePool) needs no weight change; otherwise every reader must be a
        MatMul / Gemm(transA=0) whose constant weight nobody else reads."""
        infos = None
        count = 0
        for node in list(model.nodes):
            if node.op != "Flatten" or int(node.attrs.get("axis", 1)) != 1:
                continue
            x = node.inputs[0]
            if not _fed_by(model, x, chosen):
                continue  # a float Flatten: not a candidate
            if node.name in self.exclude:
                skipped.append((node.name, "Flatten kept reading NCHW (excluded by option)"))
                continue
            infos = infos if infos is not None else model.value_infos()
            dims = input_dims(infos[x.name]) if x.name in infos else []
            if len(dims) != 4 or not all(isinstance(d, int) for d in dims[1:]):
                skipped.append((node.name, "Flatten kept reading NCHW (input not 4-D with static C, H, W)"))
                continue
            c, h, w = dims[1:]
            new_weights = []
            if h * w > 1:
                order = np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).reshape(-1)
                for user in model.consumers(node.outputs[0]):
                    weight = model.constant_value(user.inputs[1]) if len(user.inputs) > 1 else None
                    if user.op not in ("MatMul", "Gemm") or user.inputs[0] is not node.outputs[0] or \
                            weight is None or weight.ndim != 2 or user.attrs.get("transA", 0) or \
                            len(user.inputs[1].outputs) != 1:
                        new_weights = None
                        break
                    axis = 1 if user.op == "Gemm" and user.attrs.get("transB", 0) else 0
                    if weight.shape[axis] != c * h * w:
                        new_weights = None
                        break
                    new_weights.append((user, np.take(weight, order, axis=axis)))
                if new_weights is None or model.is_graph_output(node.outputs[0]):
                    skipped.append((node.name, "Flatten kept reading NCHW (its output is a graph output, or a "
                                               "reader is not a MatMul/Gemm with its own constant weight)"))
                    continue
            for user, value in new_weights:
                user.inputs[1] = tensor_from_array(model.unique_name(user.inputs[1].name + "_nhwc"), value)
            base = node.name or "flatten"
            t = gs.Variable(model.unique_name(base + "_nhwc"), dtype=np.float32, shape=[dims[0], h, w, c])
            model.graph.nodes.append(gs.Node("Transpose", model.unique_name(base + "_to_nhwc"),
                                             attrs={"perm": [0, 2, 3, 1]}, inputs=[x], outputs=[t]))
            node.inputs[0] = t
            count += 1
        if count:
            model.invalidate()
            model.toposort()
        return count

    def _quantize_operand(self, model: Model, node: gs.Node, stats) -> None:
        """The constant of a quantized Add (a scalar, or a bias vector after a MatMul) becomes DQ of its
        own integers, as QLinearAdd needs (onnxruntime's recipe does the same): per tensor, over the
        constant's own range (a scalar sits at one end of it, exactly)."""
        i, value = _constant_operand(model, node)
        other = node.inputs[1 - i]
        dq = other.inputs[0] if other.inputs else None
        if dq is None or dq.op != "DequantizeLinear":
            return
        zp_dtype = np.asarray(model.constant_value(dq.inputs[2])).dtype
        info = np.iinfo(zp_dtype)
        value = value.astype(np.float64)
        if info.min == 0:  # uint8, asymmetric
            lo, hi = min(float(value.min()), 0.0), max(float(value.max()), 0.0)
            scale = (hi - lo) / info.max or 1.0
            zp = int(np.clip(round(-lo / scale), 0, info.max))
        else:
            scale, zp = float(np.abs(value).max()) / info.max or 1.0, 0
        q = np.clip(np.rint(value / scale) + zp, info.min, info.max).astype(zp_dtype)
        base = node.inputs[i].name or node.name
        q_t = tensor_from_array(model.unique_name(base + "_quantized"), q)
        s_t = tensor_from_array(model.unique_name(base + "_scale"), np.array(scale, np.float32))
        z_t = tensor_from_array(model.unique_name(base + "_zero_point"), np.array(zp, zp_dtype))
        out = gs.Variable(model.unique_name(base + "_dequantized"), dtype=np.float32, shape=list(value.shape))
        model.graph.nodes.append(gs.Node("DequantizeLinear", model.unique_name(base + "_DQ"),
                                         inputs=[q_t, s_t, z_t], outputs=[out]))
        node.inputs[i] = out
        stats["constants_quantized"] = stats.get("constants_quantized", 0) + 1

    @staticmethod
    def _drop_rescale(model: Model, node: gs.Node, stats) -> None:
        """DQ(x) -> Mul(c) -> Q(scale * c) -> DQ: the Q gives back x's integers, so the DQ after it reads
        x's Q output directly (with the scale times c) and the Mul and that Q go."""
        x, _ = _rescale(model, node)
        out = node.outputs[0]
        dq_in = x.inputs[0] if x.inputs else None
        users = list(out.outputs)
        if dq_in is None or dq_in.op != "DequantizeLinear" or len(users) != 1 or users[0].op != "QuantizeLinear":
            return
        q_out = users[0]
        q_int = dq_in.inputs[0]
        for dq_out in list(q_out.outputs[0].outputs):
            dq_out.inputs[0] = q_int
        q_out.inputs.clear()
        q_out.outputs.clear()
        node.inputs.clear()
        node.outputs.clear()
        model.graph.nodes.remove(q_out)
        model.graph.nodes.remove(node)
        stats["rescales_dropped"] += 1

    # -- helpers ------------------------------------------------------------------------------------
    def _act_dtype(self):
        return {"uint8": np.uint8, "int8": np.int8, "int16": np.int16}[self.activation_type]

    def _activation_qparams(self, lo: float, hi: float, wide: bool = False) -> tuple[float, int]:
        if not np.isfinite(lo) or not np.isfinite(hi):
            lo, hi = 0.0, 1.0
        if wide or self.activation_type == "int16":  # symmetric int16 (A16W8): the zero point carries the type
            return float(max(abs(lo), abs(hi)) / 32767.0 or 1.0), np.int16(0)
        if self.activation_type == "uint8":
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            scale = (hi - lo) / 255.0 or 1.0
            zp = int(np.clip(round(-lo / scale), 0, 255))
            return float(scale), zp
        amax = max(abs(lo), abs(hi))
        return float(amax / 127.0 or 1.0), 0

    @staticmethod
    def _clip_low_is_zero(model: Model, act: gs.Node) -> bool:
        if act.op == "Relu":
            return True
        low = act.attrs.get("min")
        if low is None and len(act.inputs) > 1 and act.inputs[1].name:
            value = model.constant_value(act.inputs[1])
            low = None if value is None else float(np.asarray(value).reshape(-1)[0])
        return low is not None and float(low) == 0.0

    def _quantize_weights(self, model: Model, node: gs.Node, in_scale: float | None, per_channel: bool,
                          stats) -> None:
        w = model.constant_value(node.inputs[1])
        if node.op == "Conv":
            axis = 0
        elif node.op == "Gemm":
            axis = 0 if node.attrs.get("transB", 0) else 1
        else:
            axis = 1
        bias = None
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias = np.asarray(model.constant_value(node.inputs[2]), np.float32)
        q, w_scale = quantize_weight_symmetric(w, axis=axis if per_channel else None, reduce_range=self.reduce_range)
        if bias is not None and in_scale is not None:
            # int32 bias with scale in_scale * w_scale must not overflow (FIELD-NOTES 13): raise the
            # weight scale of channels whose bias would, and requantize them.
            limit = 2 ** 31 - 1
            per = np.broadcast_to(w_scale, bias.shape) if w_scale.size == 1 else w_scale
            needed = np.abs(bias) / (in_scale * limit)
            if np.any(per < needed):
                stats["bias_scales_raised"] += int(np.sum(per < needed))
                new_scale = np.maximum(per, needed * 1.01).astype(np.float32)
                if w_scale.size == 1:
                    new_scale = np.array([new_scale.max()], np.float32)
                shape = [1] * w.ndim
                if w_scale.size > 1:
                    shape[axis] = -1
                q = np.clip(np.rint(w / new_scale.reshape(shape)), -127, 127).astype(np.int8)
                w_scale = new_scale
        base = node.inputs[1].name
        w_q = tensor_from_array(model.unique_name(base + "_quantized"), q)
        ws = w_scale if per_channel else np.array(w_scale[0], np.float32)
        s_t = tensor_from_array(model.unique_name(base + "_scale"), ws.astype(np.float32))
        z_t = tensor_from_array(model.unique_name(base + "_zero_point"), np.zeros(ws.shape, np.int8))
        w_dq = gs.Variable(model.unique_name(base + "_dequantized"), dtype=np.float32, shape=list(w.shape))
        attrs = {"axis": axis} if per_channel else {}
        model.graph.nodes.append(gs.Node("DequantizeLinear", model.unique_name(base + "_DQ"),
                                         inputs=[w_q, s_t, z_t], outputs=[w_dq], attrs=attrs))
        node.inputs[1] = w_dq
        stats["weights_quantized"] += 1
        if bias is None or in_scale is None:
            return
        b_scale = (in_scale * np.broadcast_to(w_scale, bias.shape)).astype(np.float32)
        b_q = np.clip(np.rint(bias / b_scale), -(2 ** 31 - 1), 2 ** 31 - 1).astype(np.int32)
        bname = node.inputs[2].name
        bq_t = tensor_from_array(model.unique_name(bname + "_quantized"), b_q)
        bs = b_scale if per_channel else np.array(b_scale.reshape(-1)[0], np.float32)
        bs_t = tensor_from_array(model.unique_name(bname + "_scale"), bs)
        bz_t = tensor_from_array(model.unique_name(bname + "_zero_point"), np.zeros(bs.shape, np.int32))
        b_dq = gs.Variable(model.unique_name(bname + "_dequantized"), dtype=np.float32, shape=list(bias.shape))
        battrs = {"axis": 0} if per_channel else {}
        model.graph.nodes.append(gs.Node("DequantizeLinear", model.unique_name(bname + "_DQ"),
                                         inputs=[bq_t, bs_t, bz_t], outputs=[b_dq], attrs=battrs))
        node.inputs[2] = b_dq
