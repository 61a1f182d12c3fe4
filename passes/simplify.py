"""Exact algebraic simplifications that exporters leave behind (cleanup family, part 2).

Each pass matches a small pattern rooted at one op type, checks every condition that makes the rewrite
exact, and either rewrites or records why it left the candidate alone:

- ``fuse-conv-affine``: Conv/ConvTranspose followed by a per-channel constant Add (-> bias) or Mul
  (-> scaled weights and bias).
- ``fuse-pad-conv``: a zero constant Pad on spatial axes folded into the Conv's ``pads``.
- ``fuse-gemm``: MatMul of a rank-2 activation with a constant 2-D weight plus a constant bias -> Gemm.
- ``fuse-reshape``: Reshape->Reshape chains, and a Reshape whose target shape is a Concat of constants
  and one dynamic single-element value (the Shape->Gather->Unsqueeze->Concat idiom of dynamic-batch
  exports) -> a constant target shape with -1 in that place.
- ``fuse-transpose``: Transpose->Transpose composed into one (or removed when the identity).
- ``fuse-unsqueeze``: Unsqueeze->Unsqueeze merged; ReduceX(keepdims=0)->Unsqueeze(same axes) ->
  ReduceX(keepdims=1).
- ``fuse-concat``: a Concat feeding only another Concat on the same axis is inlined; a one-input
  Concat is removed.

None of these touches nodes inside control-flow bodies; weights are never modified in place.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_kit.ir import Model
from onnxslim_kit.pass_base import Pass, PassContext, PassResult
from onnxslim_kit.registry import register_pass

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------

def _label(node: gs.Node) -> str:
    return node.name or f"<{node.op}>"


def _sole_consumer(model: Model, tensor: gs.Tensor) -> gs.Node | None:
    """The only consumer of ``tensor`` when it has exactly one and is not a graph output."""
    users = model.consumers(tensor)
    if len(users) != 1 or model.is_graph_output(tensor):
        return None
    return users[0]


def _const(model: Model, name: str, value: np.ndarray) -> gs.Constant:
    return gs.Constant(model.unique_name(name), np.array(value, copy=True))


def _bypass(model: Model, node: gs.Node, source: gs.Tensor) -> bool:
    """Make consumers of ``node``'s single output read ``source``; False if the output name must stay."""
    return model.replace_all_uses(node.outputs[0], source)


def _ints_attr_or_input(model: Model, node: gs.Node, attr: str, input_index: int) -> list[int] | None:
    """Axes-like values stored as an attribute (old opsets) or a constant input (new opsets)."""
    if attr in node.attrs:
        return [int(v) for v in node.attrs[attr]]
    if len(node.inputs) > input_index and node.inputs[input_index].name:
        value = model.constant_value(node.inputs[input_index])
        return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]
    return None


def _rank(tensor: gs.Tensor) -> int | None:
    return len(tensor.shape) if tensor.shape is not None else None


# ----------------------------------------------------------------------------------------------
# fuse-conv-affine
# ----------------------------------------------------------------------------------------------

@register_pass
class FuseConvAffine(Pass):
    """Fold a per-channel constant Add or Mul after Conv/ConvTranspose into its weights and bias."""

    name = "fuse-conv-affine"
    summary = "Conv/ConvTranspose + per-channel constant Add/Mul -> Conv with new bias/weights (exact)"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        skipped: list[tuple[str, str]] = []
        fused = 0
        for conv in list(model.nodes):
            if conv.op not in ("Conv", "ConvTranspose") or not model.has_node(conv):
                continue
            reason = self._try(model, conv)
            if reason is None:
                fused += 1
            elif reason:
                skipped.append((_label(conv), reason))
        return PassResult(model, fused > 0, {"affine_fused": fused}, skipped)

    def _try(self, model: Model, conv: gs.Node) -> str | None:
        """None on success, '' when there is no candidate, else the reason to skip."""
        nxt = _sole_consumer(model, conv.outputs[0])
        if nxt is None or nxt.op not in ("Add", "Mul") or len(nxt.inputs) != 2:
            return ""
        other = nxt.inputs[1] if nxt.inputs[0] is conv.outputs[0] else nxt.inputs[0]
        factor = model.constant_value(other)
        if factor is None:
            return ""
        weight = model.constant_value(conv.inputs[1])
        if weight is None:
            return f"{nxt.op} after {conv.op}: weight is not constant"
        if nxt.op == "Mul" and len(model.consumers(conv.inputs[1])) > 1:
            # Scaling would need a private copy of a tied weight: keep the tying (and the file size).
            return f"{nxt.op} after {conv.op}: weight is shared with another node"
        bias = None
        if len(conv.inputs) > 2 and conv.inputs[2].name:
            bias = model.constant_value(conv.inputs[2])
            if bias is None:
                return f"{nxt.op} after {conv.op}: bias is not constant"
        # A shared bias is fine: the fused bias is a new tensor, the other users keep the old one.
        group = int(conv.attrs.get("group", 1))
        out_channels = weight.shape[0] if conv.op == "Conv" else weight.shape[1] * group
        per_channel = _per_channel(factor, out_channels, weight.ndim)
        if per_channel is None:
            return f"{nxt.op} constant of shape {tuple(factor.shape)} is not per-channel for this {conv.op}"
        if not np.issubdtype(weight.dtype, np.floating) or factor.dtype != weight.dtype:
            return f"{nxt.op} constant dtype {factor.dtype} differs from the weight's {weight.dtype}"
        new_bias = np.zeros(out_channels, weight.dtype) if bias is None else bias.astype(weight.dtype)
        if nxt.op == "Add":
            new_bias = new_bias + per_channel
            new_weight = None
        else:
            new_bias = new_bias * per_channel
            if conv.op == "Conv":
                new_weight = weight * per_channel.reshape((-1,) + (1,) * (weight.ndim - 1))
            else:  # ConvTranspose weight is [C_in, C_out/group, k...]
                scale = per_channel.reshape(group, -1)
                cin_per_group = weight.shape[0] // group
                expanded = np.repeat(scale, cin_per_group, axis=0)  # [C_in, C_out/group]
                new_weight = weight * expanded.reshape(expanded.shape + (1,) * (weight.ndim - 2))
        if not model.replace_all_uses(nxt.outputs[0], conv.outputs[0]):
            return f"{nxt.op} output is a graph output that cannot be renamed"
        if new_weight is not None:
            conv.inputs[1] = _const(model, conv.inputs[1].name + "_fused", new_weight.astype(weight.dtype))
        bias_const = _const(model, (conv.name or "conv") + "_bias", new_bias.astype(weight.dtype))
        if len(conv.inputs) > 2:
            conv.inputs[2] = bias_const
        else:
            conv.inputs.append(bias_const)
        model.remove_nodes([nxt])
        return None


def _per_channel(factor: np.ndarray, channels: int, weight_rank: int) -> np.ndarray | None:
    """The factor as a [C] vector when it broadcasts along the channel axis only (NC... layout)."""
    spatial = weight_rank - 2
    shape = factor.shape
    if factor.size == 1 and len(shape) <= 2 + spatial:
        return np.full(channels, factor.reshape(-1)[0], factor.dtype)
    if len(shape) == spatial + 1 and shape[0] == channels and all(d == 1 for d in shape[1:]):
        return factor.reshape(-1)
    if len(shape) == spatial + 2 and shape[0] == 1 and shape[1] == channels and all(d == 1 for d in shape[2:]):
        return factor.reshape(-1)
    return None


# ----------------------------------------------------------------------------------------------
# fuse-pad-conv
# ----------------------------------------------------------------------------------------------

@register_pass
class FusePadConv(Pass):
    """Fold a constant-mode, zero-valued Pad on spatial axes into the following Conv."""

    name = "fuse-pad-conv"
    summary = "Pad(constant 0, spatial axes) + Conv -> Conv with pads (exact)"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        skipped: list[tuple[str, str]] = []
        fused = 0
        for pad in list(model.nodes):
            if pad.op != "Pad" or not model.has_node(pad):
                continue
            conv = _sole_consumer(model, pad.outputs[0])
            if conv is None or conv.op != "Conv" or conv.inputs[0] is not pad.outputs[0]:
                continue
            reason = self._check(model, pad, conv)
            if reason:
                skipped.append((_label(pad), reason))
                continue
            pads = self._pads(model, pad)
            rank = len(pads) // 2
            spatial = rank - 2
            conv_pads = [int(p) for p in conv.attrs.get("pads", [0] * (2 * spatial))]
            new = [conv_pads[i] + pads[2 + i] for i in range(spatial)] + \
                  [conv_pads[spatial + i] + pads[rank + 2 + i] for i in range(spatial)]
            conv.attrs["pads"] = new
            conv.inputs[0] = pad.inputs[0]
            model.remove_nodes([pad])
            fused += 1
        return PassResult(model, fused > 0, {"pads_fused": fused}, skipped)

    @staticmethod
    def _pads(model: Model, pad: gs.Node) -> list[int] | None:
        return _ints_attr_or_input(model, pad, "pads", 1)

    def _check(self, model: Model, pad: gs.Node, conv: gs.Node) -> str:
        if pad.attrs.get("mode", "constant") not in ("constant", b"constant"):
            return f"Pad mode {pad.attrs.get('mode')} is not constant"
        if conv.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            return "Conv uses auto_pad"
        pads = self._pads(model, pad)
        if pads is None:
            return "pads are not constant"
        if len(pad.inputs) > 3 and pad.inputs[3].name:
            return "Pad has an axes input"
        if len(pads) % 2 or len(pads) < 6:
            return f"unexpected pads length {len(pads)}"
        if any(p < 0 for p in pads):
            return "negative pads (cropping)"
        rank = len(pads) // 2
        if pads[0] or pads[1] or pads[rank] or pads[rank + 1]:
            return "Pad touches the batch or channel axis"
        value = None
        if "value" in pad.attrs:
            value = np.asarray(pad.attrs["value"])
        elif len(pad.inputs) > 2 and pad.inputs[2].name:
            value = model.constant_value(pad.inputs[2])
            if value is None:
                return "pad value is not constant"
        if value is not None and np.any(value != 0):
            return "pad value is not zero"
        return ""


# ----------------------------------------------------------------------------------------------
# fuse-gemm
# ----------------------------------------------------------------------------------------------

@register_pass
class FuseGemm(Pass):
    """MatMul(rank-2 activation, constant 2-D weight) followed by Add(constant bias) -> one Gemm."""

    name = "fuse-gemm"
    summary = "MatMul (2-D) + constant Add -> Gemm (exact)"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        skipped: list[tuple[str, str]] = []
        fused = 0
        for mm in list(model.nodes):
            if mm.op != "MatMul" or not model.has_node(mm):
                continue
            add = _sole_consumer(model, mm.outputs[0])
            if add is None or add.op != "Add":
                continue
            bias_t = add.inputs[1] if add.inputs[0] is mm.outputs[0] else add.inputs[0]
            bias = model.constant_value(bias_t)
            weight = model.constant_value(mm.inputs[1])
            if bias is None or weight is None:
                continue
            a = mm.inputs[0]
            if _rank(a) != 2:
                skipped.append((_label(mm), "MatMul input is not known to be rank 2 (Gemm needs 2-D)"))
                continue
            if weight.ndim != 2 or not np.issubdtype(weight.dtype, np.floating):
                skipped.append((_label(mm), "weight is not a 2-D float matrix"))
                continue
            n = weight.shape[1]
            if bias.dtype != weight.dtype or bias.ndim > 2 or (bias.size not in (1, n)) or \
                    (bias.ndim == 2 and bias.shape[0] != 1):
                skipped.append((_label(mm), f"bias of shape {tuple(bias.shape)} is not a row vector of {n}"))
                continue
            out = add.outputs[0]
            gemm_out = gs.Variable(model.unique_name((mm.name or "gemm") + "_out"), dtype=out.dtype,
                                   shape=out.shape)
            c = _const(model, (mm.name or "gemm") + "_bias", np.broadcast_to(bias.reshape(-1), (n,)))
            gemm = gs.Node("Gemm", name=model.unique_name((mm.name or "matmul") + "_gemm"),
                           inputs=[a, mm.inputs[1], c], outputs=[gemm_out])
            model.graph.nodes.append(gemm)
            if not model.replace_all_uses(out, gemm_out):
                gemm.inputs.clear()
                gemm.outputs.clear()
                model.graph.nodes.remove(gemm)
                skipped.append((_label(add), "Add output is a graph output that cannot be renamed"))
                continue
            model.remove_nodes([mm, add])
            fused += 1
        return PassResult(model, fused > 0, {"gemm_fused": fused}, skipped)


# ----------------------------------------------------------------------------------------------
# fuse-reshape
# ----------------------------------------------------------------------------------------------

@register_pass
class FuseReshape(Pass):
    """Collapse Reshape chains and make Concat-built target shapes constant (one -1 for the dynamic dim)."""

    name = "fuse-reshape"
    summary = "Reshape->Reshape chains and Concat-built Reshape shapes -> one Reshape with a constant shape"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        skipped: list[tuple[str, str]] = []
        chains = shapes = 0
        for node in list(model.nodes):
            if node.op != "Reshape" or not model.has_node(node):
                continue
            if int(node.attrs.get("allowzero", 0)):
                skipped.append((_label(node), "allowzero=1: a 0 in the target shape means a real 0"))
                continue
            target = model.constant_value(node.inputs[1])
            if target is None:
                reason = self._const_shape_from_concat(model, node)
                if reason is None:
                    shapes += 1
                    target = model.constant_value(node.inputs[1])
                elif reason:
                    skipped.append((_label(node), reason))
            # Reshape(Reshape(x, s1), s2) == Reshape(x, s2) when s2 has no 0 (0 copies a dim of its input).
            src = model.producer(node.inputs[0])
            if target is not None and src is not None and src.op == "Reshape" and \
                    not int(src.attrs.get("allowzero", 0)):
                if np.any(np.asarray(target) == 0):
                    skipped.append((_label(node), "target shape copies dims (0) from the inner Reshape"))
                    continue
                node.inputs[0] = src.inputs[0]
                chains += 1
        return PassResult(model, bool(chains or shapes),
                          {"reshape_chains_collapsed": chains, "reshape_shapes_made_constant": shapes}, skipped)

    @staticmethod
    def _const_shape_from_concat(model: Model, reshape: gs.Node) -> str | None:
        concat = model.producer(reshape.inputs[1])
        if concat is None or concat.op != "Concat":
            return ""
        parts: list[np.ndarray | None] = [model.constant_value(t) for t in concat.inputs]
        dynamic = [i for i, p in enumerate(parts) if p is None]
        if len(dynamic) != 1:
            return "" if len(dynamic) == 0 else "more than one dynamic dim in the target shape"
        var = concat.inputs[dynamic[0]]
        position = sum(int(np.asarray(p).size) for p in parts[:dynamic[0]])
        values = [int(v) for p in parts if p is not None for v in np.asarray(p).reshape(-1)]
        copies = _copies_input_dim(model, var, reshape.inputs[0], position)
        if not copies and (var.shape is None or list(var.shape) != [1]):
            return "dynamic part of the target shape is not known to hold one value"
        if copies:
            fill = 0  # Reshape's 0 copies the same dim of its input: exactly the dynamic value
        elif -1 in values:
            return "target shape already has a -1 and the dynamic dim is not a copy of an input dim"
        else:
            fill = -1
        new = []
        for i, p in enumerate(parts):
            new.extend([fill] if p is None else [int(v) for v in np.asarray(p).reshape(-1)])
        reshape.inputs[1] = _const(model, (reshape.name or "reshape") + "_shape", np.array(new, np.int64))
        return None


def _copies_input_dim(model: Model, value: gs.Tensor, data: gs.Tensor, position: int) -> bool:
    """True when ``value`` is Unsqueeze(Gather(Shape(data), position)) or Slice(Shape(data), position,
    position+1): the dynamic entry of a target shape that repeats the input's own dim."""
    node = model.producer(value)
    if node is not None and node.op == "Unsqueeze":
        axes = _ints_attr_or_input(model, node, "axes", 1)
        if axes not in ([0], [-1]):
            return False
        node = model.producer(node.inputs[0])
        if node is None or node.op != "Gather" or int(node.attrs.get("axis", 0)) != 0:
            return False
        idx = model.constant_value(node.inputs[1])
        if idx is None or np.asarray(idx).size != 1 or int(np.asarray(idx).reshape(-1)[0]) != position:
            return False
    elif node is not None and node.op == "Slice":
        starts = model.constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        ends = model.constant_value(node.inputs[2]) if len(node.inputs) > 2 else None
        if starts is None or ends is None or [int(v) for v in np.asarray(starts).reshape(-1)] != [position] \
                or [int(v) for v in np.asarray(ends).reshape(-1)] != [position + 1] or len(node.inputs) > 4:
            return False
    else:
        return False
    shape = model.producer(node.inputs[0])
    return shape is not None and shape.op == "Shape" and shape.inputs[0] is data and \
        not shape.attrs.get("start") and shape.attrs.get("end") is None


# ----------------------------------------------------------------------------------------------
# fuse-transpose
# ----------------------------------------------------------------------------------------------

@register_pass
class FuseTranspose(Pass):
    """Compose Transpose->Transpose into one Transpose, or drop it when the composition is the identity."""

    name = "fuse-transpose"
    summary = "Transpose->Transpose composed (removed when identity)"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        skipped: list[tuple[str, str]] = []
        composed = removed = 0
        for node in list(model.nodes):
            if node.op != "Transpose" or not model.has_node(node):
                continue
            src = model.producer(node.inputs[0])
            if src is None or src.op != "Transpose":
                continue
            p1, p2 = src.attrs.get("perm"), node.attrs.get("perm")
            if p1 is None or p2 is None:
                skipped.append((_label(node), "Transpose without explicit perm"))
                continue
            perm = [int(p1[i]) for i in p2]
            if perm == list(range(len(perm))):
                if _bypass(model, node, src.inputs[0]):
                    model.remove_nodes([node])
                    removed += 1
                else:
                    skipped.append((_label(node), "output is a graph output that cannot be renamed"))
                continue
            node.inputs[0] = src.inputs[0]
            node.attrs["perm"] = perm
            composed += 1
        return PassResult(model, bool(composed or removed),
                          {"transposes_composed": composed, "transposes_removed": removed}, skipped)


# ----------------------------------------------------------------------------------------------
# fuse-unsqueeze
# ----------------------------------------------------------------------------------------------

_REDUCE_OPS = {"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
               "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}


@register_pass
class FuseUnsqueeze(Pass):
    """Merge Unsqueeze->Unsqueeze; turn ReduceX(keepdims=0)->Unsqueeze(same axes) into keepdims=1."""

    name = "fuse-unsqueeze"
    summary = "Unsqueeze->Unsqueeze merged; Reduce(keepdims=0)+Unsqueeze -> Reduce(keepdims=1)"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        skipped: list[tuple[str, str]] = []
        merged = reduces = 0
        opset = model.opset
        for node in list(model.nodes):
            if node.op != "Unsqueeze" or not model.has_node(node):
                continue
            axes = _ints_attr_or_input(model, node, "axes", 1)
            src = model.producer(node.inputs[0])
            if src is None:
                continue
            if axes is None:
                if src.op == "Unsqueeze" or src.op in _REDUCE_OPS:
                    skipped.append((_label(node), "axes are not constant"))
                continue
            if src.op == "Unsqueeze":
                inner = _ints_attr_or_input(model, src, "axes", 1)
                rank_in = _rank(src.inputs[0])
                if inner is None or rank_in is None or any(a < 0 for a in inner + axes):
                    skipped.append((_label(node), "axes not constant and non-negative with a known rank"))
                    continue
                # Positions in the final output: outer axes are final; inner axes shift past them.
                final = sorted(axes)
                inner_final = []
                free = [i for i in range(rank_in + len(inner) + len(axes)) if i not in final]
                for a in sorted(inner):
                    inner_final.append(free[a])
                merged_axes = sorted(final + inner_final)
                node.inputs[0] = src.inputs[0]
                _set_axes(model, node, merged_axes, opset)
                merged += 1
            elif src.op in _REDUCE_OPS and int(src.attrs.get("keepdims", 1)) == 0:
                raxes = _ints_attr_or_input(model, src, "axes", 1)
                rank_in = _rank(src.inputs[0])
                if raxes is None or rank_in is None:
                    skipped.append((_label(node), f"{src.op} axes or input rank unknown"))
                    continue
                raxes = sorted(a % rank_in for a in raxes)
                if sorted(a % rank_in for a in axes) != raxes:
                    continue
                if len(model.consumers(src.outputs[0])) != 1 or model.is_graph_output(src.outputs[0]):
                    skipped.append((_label(node), f"{src.op} output has other consumers"))
                    continue
                reduced_shape = src.outputs[0].shape
                src.outputs[0].shape = node.outputs[0].shape  # keepdims=1 gives the Unsqueeze's shape
                if not model.replace_all_uses(node.outputs[0], src.outputs[0]):
                    src.outputs[0].shape = reduced_shape
                    skipped.append((_label(node), "output is a graph output that cannot be renamed"))
                    continue
                src.attrs["keepdims"] = 1
                model.remove_nodes([node])
                reduces += 1
        return PassResult(model, bool(merged or reduces),
                          {"unsqueezes_merged": merged, "reduce_keepdims": reduces}, skipped)


def _set_axes(model: Model, node: gs.Node, axes: list[int], opset: int) -> None:
    if opset < 13:
        node.attrs["axes"] = axes
    else:
        node.inputs[1] = _const(model, (node.name or "unsqueeze") + "_axes", np.array(axes, np.int64))


# ----------------------------------------------------------------------------------------------
# fuse-concat
# ----------------------------------------------------------------------------------------------

@register_pass
class FuseConcat(Pass):
    """Inline a Concat whose only consumer is a Concat on the same axis; drop one-input Concats."""

    name = "fuse-concat"
    summary = "nested Concat on the same axis inlined; single-input Concat removed"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        skipped: list[tuple[str, str]] = []
        inlined = removed = 0
        for node in list(model.nodes):
            if node.op != "Concat" or not model.has_node(node):
                continue
            if len(node.inputs) == 1:
                if _bypass(model, node, node.inputs[0]):
                    model.remove_nodes([node])
                    removed += 1
                else:
                    skipped.append((_label(node), "output is a graph output that cannot be renamed"))
                continue
            axis = int(node.attrs.get("axis", 0))
            new_inputs: list[gs.Tensor] = []
            changed = False
            for t in node.inputs:
                src = model.producer(t)
                if src is not None and src.op == "Concat" and _sole_consumer(model, t) is node and \
                        int(src.attrs.get("axis", 0)) == axis and node.inputs.count(t) == 1:
                    new_inputs.extend(src.inputs)
                    changed = True
                else:
                    new_inputs.append(t)
            if changed and axis < 0 and any(_rank(t) is None for t in new_inputs):
                skipped.append((_label(node), "negative axis with unknown input ranks"))
                continue
            if changed:
                node.inputs.clear()
                node.inputs.extend(new_inputs)
                inlined += 1
        return PassResult(model, bool(inlined or removed),
                          {"concats_inlined": inlined, "concats_removed": removed}, skipped)
