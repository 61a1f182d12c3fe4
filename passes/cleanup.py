"""Exact cleanup passes and the default ``cleanup`` pipeline.

- ``fold-constants``: evaluate nodes whose inputs are all constant (weights as initializers or as
  ``Constant`` nodes), fold Shape/Size/Gather-of-Shape where the dims involved are static, and turn
  ``Constant`` nodes into initializers. Never folds Q/DQ, random ops, control flow or custom domains.
- ``remove-identity``: Identity, inference Dropout, Cast to the same type.
- ``fold-batchnorm``: Conv/ConvTranspose/Gemm/MatMul followed by BatchNormalization.
- ``cse``: common-subexpression elimination.
- ``merge-initializers``: identical constant tensors become one (weight tying).
- ``eliminate-dead``: dead nodes and unused initializers.
- ``cleanup``: all of the above plus the ``fuse-*`` simplifications, to a fixed point.

Nodes inside If/Loop/Scan bodies and local functions are left as they are; values those bodies
read from the outer graph are never removed or renamed.
"""

from __future__ import annotations

import collections
import hashlib
import logging
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from onnxslim_kit.ir import Model
from onnxslim_kit.pass_base import Pass, PassContext, PassResult
from onnxslim_kit.registry import get_pass, register_pass
from onnxslim_kit.shapes import elem_type

logger = logging.getLogger(__name__)

NEVER_FOLD = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial",
    "If", "Loop", "Scan", "SequenceConstruct", "SequenceEmpty", "Optional",
}


# Ops that build large tensors from tiny inputs.
_EXPANDING = {"ConstantOfShape", "Expand", "Tile", "Range", "EyeLike"}


def _label(node: gs.Node) -> str:
    return node.name or f"<{node.op}>"


def _has_subgraph(node: gs.Node) -> bool:
    return any(isinstance(a, gs.Graph) or (isinstance(a, (list, tuple)) and any(isinstance(x, gs.Graph) for x in a))
               for a in node.attrs.values())


def _static_shapes(model: Model) -> dict[str, list[int | None]]:
    """Shapes from onnx shape inference on the model as declared (no pinned dims: folding must stay
    valid for every input size the model accepts)."""
    shapes: dict[str, list[int | None]] = {}
    for name, vi in model.value_infos().items():
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            shapes[name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                            for d in tt.shape.dim]
    return shapes


# ----------------------------------------------------------------------------------------------
# fold-constants
# ----------------------------------------------------------------------------------------------

@register_pass
class FoldConstants(Pass):
    """Evaluate nodes whose inputs are all constants; fold static Shape/Size/Gather(Shape).

    Options:
        max_bytes: do not fold a node whose outputs would exceed this many bytes
        max_expand_bytes: do not fold ConstantOfShape/Expand/Tile/Range results above this many bytes
            (they are built from a few bytes; storing them grows the file)
        fold_shapes: fold Shape/Size (and Gather on a Shape) where the dims involved are static
    """

    name = "fold-constants"
    summary = "constant folding (size-limited; never Q/DQ or random ops) and static Shape folding"

    def __init__(self, *, max_bytes: int = 4 * 1024 * 1024, max_expand_bytes: int = 64 * 1024,
                 fold_shapes: bool = True):
        self.max_bytes = max_bytes
        self.max_expand_bytes = max_expand_bytes
        self.fold_shapes = fold_shapes

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        skipped: list[tuple[str, str]] = []
        stats = {"constants_folded": 0, "shapes_folded": 0, "constant_nodes_to_initializers": 0}
        # Shapes are read for Shape/Size nodes only (and a Gather reading a Shape): a graph without
        # them skips the shape inference.
        wanted = self.fold_shapes and any(n.op in ("Shape", "Size") for n in model.nodes)
        shapes = _static_shapes(model) if wanted else {}
        outer = model.outer_scope_names()
        doomed: list[gs.Node] = []
        for node in list(model.nodes):
            if any(t.name in outer for t in node.outputs):
                if node.op == "Constant" or all(model.constant_value(t) is not None for t in node.inputs if t.name):
                    skipped.append((_label(node), "output is read inside a subgraph (kept as it is)"))
                continue
            if node.op == "Constant" and (node.domain or "") in ("", "ai.onnx"):
                value = model.constant_value(node.outputs[0])
                if value is not None and self._replace(model, node, [value], skipped):
                    doomed.append(node)
                    stats["constant_nodes_to_initializers"] += 1
                continue
            values = self._shape_values(model, node, shapes) if self.fold_shapes else None
            if values is not None:
                if self._replace(model, node, values, skipped):
                    doomed.append(node)
                    stats["shapes_folded"] += 1
                continue
            inputs = [t for t in node.inputs if t.name]
            if not inputs or any(model.constant_value(t) is None for t in inputs):
                continue
            if node.op in NEVER_FOLD or (node.domain or "") not in ("", "ai.onnx") or _has_subgraph(node):
                skipped.append((_label(node), f"{node.op} is never folded (quantization, random, control "
                                              f"flow or custom-domain op)"))
                continue
            try:
                values = _evaluate(model, node)
            except Exception as exc:  # noqa: BLE001 - the reference evaluator raises many types
                skipped.append((_label(node), f"evaluation failed: {type(exc).__name__}: {str(exc)[:120]}"))
                continue
            size = sum(v.nbytes for v in values)
            if size > self.max_bytes:
                skipped.append((_label(node), f"result is {size} bytes > max_bytes={self.max_bytes}"))
                continue
            if node.op in _EXPANDING and size > self.max_expand_bytes:
                skipped.append((_label(node), f"{node.op} would store {size} bytes built from a few "
                                              f"(max_expand_bytes={self.max_expand_bytes}): kept to keep the file small"))
                continue
            if self._replace(model, node, values, skipped):
                doomed.append(node)
                stats["constants_folded"] += 1
        model.remove_nodes(doomed)
        return PassResult(model, bool(doomed), stats, skipped)

    @staticmethod
    def _replace(model: Model, node: gs.Node, values: list[np.ndarray], skipped) -> bool:
        outs = [t for t in node.outputs]
        if any(model.is_graph_output(t) for t in outs):
            skipped.append((_label(node), "output is a graph output (kept as computed, not an initializer)"))
            return False
        for t, value in zip(outs, values):
            if not t.name:
                continue
            const = gs.Constant(model.unique_name(t.name + "_folded") if t.name in model.meta.initializer_inputs
                                else t.name, np.array(value, copy=True))
            t.name = model.unique_name(t.name + "_unfolded") if const.name == t.name else t.name
            for user in list(t.outputs):
                for i, inp in enumerate(user.inputs):
                    if inp is t:
                        user.inputs[i] = const
        model.invalidate()
        return True

    @staticmethod
    def _shape_values(model: Model, node: gs.Node, shapes) -> list[np.ndarray] | None:
        if node.op == "Shape":
            dims = shapes.get(node.inputs[0].name)
            if dims is None:
                return None
            rank = len(dims)
            start = int(node.attrs.get("start", 0))
            end = node.attrs.get("end")
            start = max(0, start + rank if start < 0 else start)
            end = rank if end is None else int(end)
            end = min(rank, end + rank if end < 0 else end)
            picked = dims[start:end]
            if any(d is None for d in picked):
                return None
            return [np.array(picked, np.int64)]
        if node.op == "Size":
            dims = shapes.get(node.inputs[0].name)
            if dims is None or any(d is None for d in dims):
                return None
            return [np.array(int(np.prod(dims)), np.int64)]
        if node.op == "Gather" and int(node.attrs.get("axis", 0)) == 0:
            src = model.producer(node.inputs[0])
            idx = model.constant_value(node.inputs[1])
            if src is None or src.op != "Shape" or idx is None or src.attrs.get("start") or src.attrs.get("end"):
                return None
            dims = shapes.get(src.inputs[0].name)
            if dims is None:
                return None
            try:
                picked = np.array(dims, dtype=object)[np.asarray(idx, np.int64)]
            except IndexError:
                return None
            flat = np.asarray(picked, dtype=object).reshape(-1)
            if any(d is None for d in flat):
                return None
            return [np.asarray(picked, dtype=np.int64).reshape(np.shape(idx))]
        return None


def _evaluate(model: Model, node: gs.Node) -> list[np.ndarray]:
    """Run one node on its constant inputs with onnx's reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" if t.name else "" for i, t in enumerate(node.inputs)]
    outs = [f"out{i}" for i in range(len(node.outputs))]
    attrs = {}
    for key, value in node.attrs.items():
        if isinstance(value, gs.Constant):
            value = numpy_helper.from_array(np.asarray(value.values), key)
        elif isinstance(value, gs.Tensor):
            raise ValueError(f"attribute {key} is a tensor reference")
        attrs[key] = value
    onnx_node = helper.make_node(node.op, names, outs, domain=node.domain or "", **attrs)
    inits = [numpy_helper.from_array(np.asarray(model.constant_value(t)), n)
             for t, n in zip(node.inputs, names) if n]
    graph = helper.make_graph([onnx_node], "fold", [], [helper.make_value_info(o, onnx.TypeProto()) for o in outs],
                              initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", model.opset)])
    proto.ir_version = 10
    results = ReferenceEvaluator(proto).run(None, {})
    return [np.asarray(r) for r in results]


# ----------------------------------------------------------------------------------------------
# remove-identity
# ----------------------------------------------------------------------------------------------

_CAST_TO_NUMPY = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64,
                  9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


@register_pass
class RemoveIdentity(Pass):
    """Remove Identity, inference-mode Dropout and Cast to the type the input already has."""

    name = "remove-identity"
    summary = "Identity, inference Dropout and same-type Cast removed (graph output names kept)"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        skipped: list[tuple[str, str]] = []
        doomed: list[gs.Node] = []
        infos = None
        for node in list(model.nodes):
            if node.op == "Identity":
                pass
            elif node.op == "Dropout":
                if len(node.outputs) > 1 and node.outputs[1].name and (model.consumers(node.outputs[1])
                                                                       or model.is_graph_output(node.outputs[1])):
                    skipped.append((_label(node), "Dropout mask output is used"))
                    continue
                if len(node.inputs) > 2 and node.inputs[2].name:
                    mode = model.constant_value(node.inputs[2])
                    if mode is None or bool(np.asarray(mode).reshape(-1)[0]):
                        skipped.append((_label(node), "Dropout training_mode is not constant false"))
                        continue
            elif node.op == "Cast":
                if infos is None:
                    infos = model.value_infos()
                if elem_type(infos, node.inputs[0].name) != int(node.attrs.get("to", 0)):
                    continue
            else:
                continue
            src = node.inputs[0]
            out = node.outputs[0]
            if model.is_graph_input(src) and model.is_graph_output(out):
                skipped.append((_label(node), "connects a graph input to a graph output (both names must stay)"))
                continue
            if not model.replace_all_uses(out, src):
                skipped.append((_label(node), "output is a graph output and the input cannot take its name"))
                continue
            doomed.append(node)
        model.remove_nodes(doomed)
        return PassResult(model, bool(doomed), {"identities_removed": len(doomed)}, skipped)


# ----------------------------------------------------------------------------------------------
# fold-batchnorm
# ----------------------------------------------------------------------------------------------

@register_pass
class FoldBatchNorm(Pass):
    """Fold BatchNormalization into the preceding Conv, ConvTranspose, Gemm or MatMul."""

    name = "fold-batchnorm"
    summary = "Conv/ConvTranspose/Gemm/MatMul + BatchNormalization folded into the weights (exact)"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        skipped: list[tuple[str, str]] = []
        folded = 0
        shapes: dict[str, list[int | None]] = {}  # filled on first need (one shape inference per run)
        for bn in list(model.nodes):
            if bn.op != "BatchNormalization" or not model.has_node(bn):
                continue
            prod = model.producer(bn.inputs[0])
            if prod is None or prod.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                continue
            reason = self._fold(model, prod, bn, shapes)
            if reason:
                skipped.append((_label(bn), reason))
            else:
                folded += 1
        return PassResult(model, folded > 0, {"batchnorms_folded": folded}, skipped)

    @staticmethod
    def _rank(model: Model, tensor: gs.Tensor, shapes: dict) -> int | None:
        if tensor.shape is not None:
            return len(tensor.shape)
        if not shapes:
            shapes.update(_static_shapes(model))
        dims = shapes.get(tensor.name)
        return None if dims is None else len(dims)

    def _fold(self, model: Model, prod: gs.Node, bn: gs.Node, shapes: dict) -> str:
        if int(bn.attrs.get("training_mode", 0)):
            return "BatchNormalization in training mode"
        if any(t.name and (model.consumers(t) or model.is_graph_output(t)) for t in bn.outputs[1:]):
            return "BatchNormalization running-stat outputs are used"
        if len(model.consumers(prod.outputs[0])) != 1 or model.is_graph_output(prod.outputs[0]):
            return f"{prod.op} output has other consumers"
        params = [model.constant_value(t) for t in bn.inputs[1:5]]
        if any(p is None for p in params):
            return "BatchNormalization parameters are not constant"
        gamma, beta, mean, var = (np.asarray(p, np.float64) for p in params)
        eps = float(bn.attrs.get("epsilon", 1e-5))
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
        w = model.constant_value(prod.inputs[1])
        if w is None:
            return f"{prod.op} weight is not constant"
        if not np.issubdtype(w.dtype, np.floating):
            return f"{prod.op} weight dtype {w.dtype} is not float"
        if len(model.consumers(prod.inputs[1])) > 1:
            return f"{prod.op} weight is shared with another node"
        bias_t = prod.inputs[2] if len(prod.inputs) > 2 and prod.inputs[2].name else None
        bias = None
        if bias_t is not None:
            bias = model.constant_value(bias_t)
            if bias is None:
                return f"{prod.op} bias is not constant"
            if len(model.consumers(bias_t)) > 1:
                return f"{prod.op} bias is shared with another node"
        c = scale.shape[0]
        dtype = w.dtype
        if prod.op == "Conv":
            if w.shape[0] != c:
                return f"channel count mismatch ({w.shape[0]} vs {c})"
            new_w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
        elif prod.op == "ConvTranspose":
            group = int(prod.attrs.get("group", 1))
            if w.shape[1] * group != c:
                return f"channel count mismatch ({w.shape[1] * group} vs {c})"
            per = np.repeat(scale.reshape(group, -1), w.shape[0] // group, axis=0)
            new_w = w * per.reshape(per.shape + (1,) * (w.ndim - 2))
        else:
            if prod.op == "MatMul" and self._rank(model, bn.inputs[0], shapes) != 2:
                return "MatMul output is not known to be 2-D [batch, features]"
            if prod.op == "Gemm":
                if float(prod.attrs.get("alpha", 1.0)) != 1.0 or float(prod.attrs.get("beta", 1.0)) != 1.0:
                    return "Gemm with alpha/beta != 1"
                trans_b = int(prod.attrs.get("transB", 0))
                new_w = w * (scale[:, None] if trans_b else scale[None, :])
            else:
                if w.ndim != 2:
                    return "MatMul weight is not 2-D"
                new_w = w * scale[None, :]
            if new_w.shape[1 - int(prod.attrs.get("transB", 0)) if prod.op == "Gemm" else 1] != c:
                return f"feature count mismatch with BatchNormalization ({c})"
        if bias is not None and bias.size not in (1, c):
            return f"{prod.op} bias of shape {tuple(bias.shape)} is not per-channel"
        base = np.zeros(c) if bias is None else np.broadcast_to(np.asarray(bias, np.float64).reshape(-1), (c,))
        new_b = (base * scale + shift).astype(dtype)
        if not model.replace_all_uses(bn.outputs[0], prod.outputs[0]):
            return "BatchNormalization output is a graph output that cannot be renamed"
        prod.inputs[1] = gs.Constant(model.unique_name(prod.inputs[1].name + "_bn"), new_w.astype(dtype))
        b_const = gs.Constant(model.unique_name((prod.name or prod.op.lower()) + "_bn_bias"), new_b)
        if prod.op == "MatMul":
            out = prod.outputs[0]
            mm_out = gs.Variable(model.unique_name(out.name + "_matmul"), dtype=out.dtype, shape=out.shape)
            prod.outputs[0] = mm_out
            model.graph.nodes.append(gs.Node("Add", model.unique_name((prod.name or "matmul") + "_bn_add"),
                                             inputs=[mm_out, b_const], outputs=[out]))
        elif bias_t is not None:
            prod.inputs[2] = b_const
        else:
            prod.inputs.append(b_const)
        model.remove_nodes([bn])
        return ""


# ----------------------------------------------------------------------------------------------
# cse
# ----------------------------------------------------------------------------------------------

_NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli",
                     "Multinomial", "Dropout"}


def _attr_key(value: Any) -> Any:
    if isinstance(value, gs.Constant):
        arr = np.asarray(value.values)
        return ("tensor", arr.dtype.str, arr.shape, hashlib.sha1(arr.tobytes()).hexdigest())
    if isinstance(value, (list, tuple)):
        return tuple(_attr_key(v) for v in value)
    if isinstance(value, float):
        return ("f", value)
    if isinstance(value, (str, bytes, int, bool)) or value is None:
        return value
    return repr(value)


@register_pass
class CommonSubexpressions(Pass):
    """Merge nodes with the same op, attributes and inputs (deterministic ops without subgraphs)."""

    name = "cse"
    summary = "common-subexpression elimination"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        skipped: list[tuple[str, str]] = []
        seen: dict[Any, gs.Node] = {}
        doomed: list[gs.Node] = []
        outer = model.outer_scope_names()
        for node in model.nodes:
            if node.op in _NONDETERMINISTIC or _has_subgraph(node) or not node.outputs:
                continue
            key = (node.op, node.domain or "", tuple(id(t) for t in node.inputs), len(node.outputs),
                   tuple(sorted((k, _attr_key(v)) for k, v in node.attrs.items())))
            keeper = seen.get(key)
            if keeper is None:
                seen[key] = node
                continue
            if any(t.name in outer for t in node.outputs):
                skipped.append((_label(node), "output is read inside a subgraph"))
                continue
            if any(model.is_graph_output(t) for t in node.outputs):
                skipped.append((_label(node), f"duplicate of {_label(keeper)} but its output is a graph output"))
                continue
            for mine, theirs in zip(node.outputs, keeper.outputs):
                model.replace_all_uses(mine, theirs)
            doomed.append(node)
        model.remove_nodes(doomed)
        return PassResult(model, bool(doomed), {"duplicates_merged": len(doomed)}, skipped)


# ----------------------------------------------------------------------------------------------
# merge-initializers
# ----------------------------------------------------------------------------------------------

@register_pass
class MergeInitializers(Pass):
    """Identical constant tensors (dtype, shape and bytes) become one shared tensor."""

    name = "merge-initializers"
    summary = "duplicate initializers merged (weight tying)"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        groups: dict[Any, gs.Constant] = {}
        merged = saved = 0
        overridable = set(model.meta.initializer_inputs)
        candidates = []
        for name, t in list(model.tensors().items()):
            if not isinstance(t, gs.Constant) or name in overridable or model.is_graph_input(t) or \
                    model.is_graph_output(t):
                continue
            arr = np.asarray(t.values)
            candidates.append((t, arr))
        # Only tensors that share dtype and shape with another can be merged: hash those alone.
        alike = collections.Counter((arr.dtype.str, arr.shape) for _, arr in candidates)
        for t, arr in candidates:
            if alike[(arr.dtype.str, arr.shape)] < 2:
                continue
            key = (arr.dtype.str, arr.shape, hashlib.sha256(arr.tobytes()).digest())
            keeper = groups.get(key)
            if keeper is None:
                groups[key] = t
                continue
            if not np.array_equal(np.asarray(keeper.values), arr, equal_nan=arr.dtype.kind == "f"):
                continue
            for user in list(t.outputs):
                for i, inp in enumerate(user.inputs):
                    if inp is t:
                        user.inputs[i] = keeper
            merged += 1
            saved += arr.nbytes
        model.invalidate()
        return PassResult(model, merged > 0, {"initializers_merged": merged, "bytes_saved": saved}, [])


# ----------------------------------------------------------------------------------------------
# eliminate-dead
# ----------------------------------------------------------------------------------------------

@register_pass
class EliminateDead(Pass):
    """Remove nodes whose outputs nobody reads, and unused initializers."""

    name = "eliminate-dead"
    summary = "dead nodes and unused initializers removed"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        stats = model.cleanup()
        return PassResult(model, any(stats.values()), stats, [])


# ----------------------------------------------------------------------------------------------
# freeze-initializer-inputs
# ----------------------------------------------------------------------------------------------

@register_pass
class FreezeInitializerInputs(Pass):
    """Treat initializers that are also graph inputs (IR < 4 exports) as constants and drop them from
    the inputs. This changes the model's interface, so it only runs when asked for (FIELD-NOTES 8)."""

    name = "freeze-initializer-inputs"
    summary = "initializers listed as graph inputs become plain constants (changes the inputs; opt-in)"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        names = list(model.meta.initializer_inputs)
        model.meta.initializer_inputs = []
        model.meta.input_order = [n for n in model.meta.input_order if n not in set(names)]
        return PassResult(model, bool(names), {"inputs_frozen": len(names)}, [])


# ----------------------------------------------------------------------------------------------
# cleanup: the default pipeline
# ----------------------------------------------------------------------------------------------

CLEANUP_STEPS = ("fold-constants", "remove-identity", "fold-batchnorm", "fuse-conv-affine", "fuse-pad-conv",
                 "fuse-gemm", "fuse-reshape", "fuse-transpose", "fuse-unsqueeze", "fuse-concat", "cse",
                 "merge-initializers", "eliminate-dead")


@register_pass
class Cleanup(Pass):
    """Every exact cleanup rewrite, repeated until a round changes nothing.

    Options:
        fold_constants: constant and static-shape folding
        remove_identity: Identity/Dropout/same-type Cast removal
        fold_batchnorm: BatchNormalization folding into Conv/Gemm/MatMul
        fuse: the fuse-* simplifications (conv affine, pad, gemm, reshape/transpose/unsqueeze/concat chains)
        cse: common-subexpression elimination
        merge_initializers: duplicate weight merging
        max_bytes: constant-folding size limit per node (bytes)
        max_expand_bytes: size limit for folding ConstantOfShape/Expand/Tile/Range results (bytes)
        max_rounds: stop after this many rounds even if something still changes
    """

    name = "cleanup"
    summary = "default pipeline: all exact cleanup and simplification rewrites to a fixed point"

    def __init__(self, *, fold_constants: bool = True, remove_identity: bool = True, fold_batchnorm: bool = True,
                 fuse: bool = True, cse: bool = True, merge_initializers: bool = True,
                 max_bytes: int = 4 * 1024 * 1024, max_expand_bytes: int = 64 * 1024, max_rounds: int = 8):
        self.fold_constants, self.remove_identity, self.fold_batchnorm = fold_constants, remove_identity, fold_batchnorm
        self.fuse, self.cse, self.merge_initializers = fuse, cse, merge_initializers
        self.max_bytes, self.max_expand_bytes, self.max_rounds = max_bytes, max_expand_bytes, max_rounds

    def steps(self) -> list[Pass]:
        enabled = {"fold-constants": self.fold_constants, "remove-identity": self.remove_identity,
                   "fold-batchnorm": self.fold_batchnorm, "cse": self.cse,
                   "merge-initializers": self.merge_initializers, "eliminate-dead": True}
        out = []
        for name in CLEANUP_STEPS:
            if enabled.get(name, self.fuse if name.startswith("fuse-") else True):
                cls = get_pass(name)
                out.append(cls(max_bytes=self.max_bytes, max_expand_bytes=self.max_expand_bytes)
                           if name == "fold-constants" else cls())
        return out

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        stats: dict[str, float] = {"nodes_before": len(model.nodes)}
        skipped: dict[tuple[str, str], None] = {}
        warnings: list[str] = []
        modified = False
        ordered = False
        rounds = 0
        for rounds in range(1, self.max_rounds + 1):
            changed = False
            for step in self.steps():
                result = step.run(model, ctx)
                model = result.model
                # After the first step the graph is in order; a step that reports no change left it as
                # it was (the Pass contract), so only a modifying step needs the sort again.
                if result.modified or not ordered:
                    model.toposort()
                    ordered = True
                changed |= result.modified
                for key, value in result.stats.items():
                    if isinstance(value, (int, float)):
                        stats[key] = stats.get(key, 0) + value
                for cand, reason in result.skipped:
                    skipped[(cand, f"{step.name}: {reason}")] = None
                warnings.extend(result.warnings)
            modified |= changed
            if not changed:
                break
        stats = {k: v for k, v in stats.items() if v or k == "nodes_before"}
        stats["rounds"] = rounds
        stats["nodes_after"] = len(model.nodes)
        stats["nodes_removed"] = stats["nodes_before"] - stats["nodes_after"]
        for node in model.nodes:
            if _has_subgraph(node):
                skipped[(_label(node), "cleanup: nodes inside its subgraphs are left untouched")] = None
        return PassResult(model, modified, stats, list(skipped), warnings)
