"""Coupled-channel analysis for structured pruning (after torch-pruning's DependencyGraph, on ONNX).

Every prunable producer (Conv/ConvTranspose with group 1, Gemm, MatMul with a constant weight) starts a
*group*: a set of output channels that must be removed together. Walking the graph forward, every
tensor that carries such channels gets a *channel space*: the axis the channels live on, the list of
segments (group, length) laid out along that axis (Concat places several groups side by side), and a
block size (Flatten/Reshape into a Gemm turns one channel into ``block`` consecutive features).

Ops that keep channels aligned pass the space on (activations, BatchNorm, pooling, Resize, Pad,
depthwise Conv, per-channel constants, Transpose); a binary op joining two carrying tensors (a residual
Add, an SE Mul) merges their groups; the weights that read the channels (next Conv's axis 1, Gemm rows)
are recorded as *slices* to apply. Anything the analysis does not understand makes every group it
touches unprunable, with the reason. The analysis never changes the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_kit.ir import Model

UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Softplus",
    "Softsign", "Mish", "Gelu", "Erf", "Exp", "Log", "Neg", "Abs", "Sqrt", "Reciprocal", "Identity", "Dropout",
    "Cast", "Floor", "Ceil", "Round", "Sign", "ThresholdedRelu", "Sin", "Cos", "Swish",
}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Sum", "Mean", "Where"}
POOL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceProd"}


@dataclass(frozen=True)
class Space:
    """Where channels live in one tensor: ``axis`` (non-negative, of a tensor of ``rank``), the groups laid
    out along it, and how many consecutive features one channel occupies (``block``)."""

    axis: int
    rank: int
    segments: tuple[tuple[int, int], ...]   # (group id, channel count) in order along the axis
    block: int = 1

    @property
    def size(self) -> int:
        return sum(n for _, n in self.segments) * self.block


@dataclass
class Slice:
    """Take the kept channels of ``space`` along ``axis`` of input ``index`` of ``node`` (a constant)."""

    node: gs.Node
    index: int
    axis: int
    space: Space
    role: str            # "out" (producer's own channels), "in" (a consumer's input channels), "param"


@dataclass
class Group:
    gid: int
    channels: int
    producers: list[gs.Node] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        names = [p.name or p.op for p in self.producers]
        return names[0] + (f" (+{len(names) - 1} joined)" if len(names) > 1 else "") if names else f"group {self.gid}"


@dataclass
class Analysis:
    groups: dict[int, Group]                 # root id -> group (after merging)
    slices: list[Slice]
    spaces: dict[str, Space]                 # tensor name -> space (segments use root ids)
    sinks: list[tuple[gs.Node, Space]]       # layers whose input channels are pruned (reconstruction)
    fixes: list[tuple[str, gs.Node, Space]]  # ("group", depthwise conv, its space), ("split"/"reshape", ...)

    def prunable(self) -> list[Group]:
        return [g for g in self.groups.values() if not g.reasons]


class _UnionFind:
    def __init__(self):
        self.parent: dict[int, int] = {}

    def add(self, x: int) -> None:
        self.parent.setdefault(x, x)

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)
        return min(ra, rb)


def _static_shape(infos, tensor: gs.Tensor) -> list | None:
    if isinstance(tensor, gs.Constant):
        return list(tensor.shape)
    vi = infos.get(tensor.name)
    if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def weight_layout(model: Model, node: gs.Node) -> tuple[int, int] | None:
    """(output-channel axis, input-channel axis) of a prunable layer's constant weight, or None."""
    if len(node.inputs) < 2:
        return None
    w = model.constant_value(node.inputs[1])
    if w is None or w.dtype != np.float32:
        return None
    if node.op == "Conv" and w.ndim >= 3 and int(node.attrs.get("group", 1)) == 1:
        return 0, 1
    if node.op == "ConvTranspose" and w.ndim >= 3 and int(node.attrs.get("group", 1)) == 1:
        return 1, 0
    if node.op == "Gemm" and w.ndim == 2 and not node.attrs.get("transA", 0):
        return (0, 1) if node.attrs.get("transB", 0) else (1, 0)
    if node.op == "MatMul" and w.ndim == 2:
        return 1, 0
    return None


def is_depthwise(model: Model, node: gs.Node) -> bool:
    if node.op != "Conv" or len(node.inputs) < 2:
        return False
    w = model.constant_value(node.inputs[1])
    g = int(node.attrs.get("group", 1))
    return w is not None and g > 1 and w.shape[0] == g and w.shape[1] == 1


def analyze(model: Model) -> Analysis:
    """Find the coupled-channel groups of ``model`` (topologically sorted first)."""
    model.toposort()
    infos = model.value_infos()
    uf = _UnionFind()
    groups: dict[int, Group] = {}
    spaces: dict[str, Space] = {}
    slices: list[Slice] = []
    sinks: list[tuple[gs.Node, Space]] = []
    fixes: list[tuple[str, gs.Node, Space]] = []
    outer = model.outer_scope_names()

    def new_group(channels: int, producer: gs.Node | None = None, reason: str | None = None) -> int:
        gid = len(groups)
        uf.add(gid)
        groups[gid] = Group(gid, channels, [producer] if producer is not None else [])
        if reason:
            groups[gid].reasons.append(reason)
        return gid

    def block(space: Space, reason: str) -> None:
        for gid, _ in space.segments:
            groups[uf.find(gid)].reasons.append(reason)

    def rank_of(t: gs.Tensor) -> int | None:
        shape = _static_shape(infos, t)
        return None if shape is None else len(shape)

    def const_channel_dim(value: np.ndarray, space: Space, out_rank: int) -> int | None:
        """Axis of a broadcast constant that lines up with the channel axis; None when it broadcasts."""
        axis = space.axis - (out_rank - value.ndim)
        if axis < 0 or value.shape[axis] == 1:
            return None
        return axis

    for node in list(model.nodes):
        label = f"{node.op} '{node.name}'"
        carried = [(i, spaces[t.name]) for i, t in enumerate(node.inputs) if t.name in spaces]
        layout = weight_layout(model, node)
        if not carried:
            if layout is not None:
                w = model.constant_value(node.inputs[1])
                out = node.outputs[0]
                rank = rank_of(out) or (w.ndim if node.op in ("Conv", "ConvTranspose") else None)
                if rank is None:
                    continue
                axis = 1 if node.op in ("Conv", "ConvTranspose") else rank - 1
                gid = new_group(int(w.shape[layout[0]]), node)
                space = Space(axis, rank, ((gid, int(w.shape[layout[0]])),))
                spaces[out.name] = space
                slices.append(Slice(node, 1, layout[0], space, "out"))
                if len(node.inputs) > 2 and node.inputs[2].name:
                    if model.constant_value(node.inputs[2]) is None:
                        block(space, f"{label} has a bias that is not constant")
                    else:
                        bias = model.constant_value(node.inputs[2])
                        if bias.ndim == 1 and bias.shape[0] == space.size:
                            slices.append(Slice(node, 2, 0, space, "param"))
                        elif bias.size != 1:
                            block(space, f"{label} bias of shape {list(bias.shape)} does not follow the channels")
            continue

        # -- a node reading carried channels -------------------------------------------------------
        def passthrough(space: Space, outputs=None) -> None:
            for o in (outputs if outputs is not None else node.outputs):
                if o.name:
                    spaces[o.name] = space

        def refuse(reason: str) -> None:
            for _, s in carried:
                block(s, reason)

        if any(node.attrs.get(k) is not None and isinstance(node.attrs.get(k), gs.Graph) for k in node.attrs):
            refuse(f"read inside the subgraph of {label}")
            continue

        if layout is not None and carried[0][0] == 0 and len(carried) == 1:
            space = carried[0][1]
            w = model.constant_value(node.inputs[1])
            in_axis = layout[1]
            ok = True
            if node.op in ("Conv", "ConvTranspose"):
                ok = space.axis == 1 and space.block == 1
            elif node.op == "Gemm":
                ok = space.axis == 1 and space.rank == 2
            else:  # MatMul
                ok = space.axis == space.rank - 1
            if not ok or w.shape[in_axis] != space.size:
                refuse(f"{label} reads the channels on an axis it does not reduce over")
            else:
                slices.append(Slice(node, 1, in_axis, space, "in"))
                sinks.append((node, space))
            # The layer's own outputs start a new group either way.
            out = node.outputs[0]
            rank = rank_of(out) or space.rank
            axis = 1 if node.op in ("Conv", "ConvTranspose") else rank - 1
            n_out = int(w.shape[layout[0]])
            gid = new_group(n_out, node)
            own = Space(axis, rank, ((gid, n_out),))
            spaces[out.name] = own
            slices.append(Slice(node, 1, layout[0], own, "out"))
            if len(node.inputs) > 2 and node.inputs[2].name:
                bias = model.constant_value(node.inputs[2])
                if bias is None:
                    block(own, f"{label} has a bias that is not constant")
                elif bias.ndim == 1 and bias.shape[0] == n_out:
                    slices.append(Slice(node, 2, 0, own, "param"))
                elif bias.size != 1:
                    block(own, f"{label} bias of shape {list(bias.shape)} does not follow the channels")
            continue

        space = carried[0][1]
        op = node.op
        if op in UNARY and len(carried) == 1 and carried[0][0] == 0:
            passthrough(space)
        elif op == "Clip" and carried[0][0] == 0 and len(carried) == 1 and all(
                not t.name or (model.constant_value(t) is not None and model.constant_value(t).size == 1)
                for t in node.inputs[1:]):
            passthrough(space)
        elif op in ("BatchNormalization", "InstanceNormalization") and carried[0][0] == 0 and len(carried) == 1:
            if space.axis != 1 or space.block != 1:
                refuse(f"{label} normalizes over axis 1, not the channel axis")
                continue
            params = [i for i in range(1, len(node.inputs)) if node.inputs[i].name]
            if any(model.constant_value(node.inputs[i]) is None for i in params):
                refuse(f"{label} has parameters that are not constant")
                continue
            slices.extend(Slice(node, i, 0, space, "param") for i in params)
            passthrough(space, node.outputs[:1])
            if len(node.outputs) > 1 and any(o.name for o in node.outputs[1:]):
                refuse(f"{label} in training mode (running statistics outputs)")
        elif is_depthwise(model, node) and carried[0][0] == 0 and len(carried) == 1:
            if space.axis != 1 or space.block != 1:
                refuse(f"{label} (depthwise) does not read the channels on axis 1")
                continue
            slices.append(Slice(node, 1, 0, space, "param"))
            if len(node.inputs) > 2 and node.inputs[2].name:
                if model.constant_value(node.inputs[2]) is None:
                    refuse(f"{label} has a bias that is not constant")
                    continue
                slices.append(Slice(node, 2, 0, space, "param"))
            fixes.append(("group", node, space))
            passthrough(space)
        elif op == "Conv":
            refuse(f"{label} is a grouped convolution (group={node.attrs.get('group', 1)}) that is not depthwise")
        elif op in BINARY:
            out_rank = rank_of(node.outputs[0])
            if out_rank is None:
                refuse(f"{label}: output rank unknown")
                continue
            merged: Space | None = None
            failed = None
            for i, t in enumerate(node.inputs):
                if not t.name:
                    continue
                s = spaces.get(t.name)
                if s is not None:
                    aligned = s.axis + (out_rank - s.rank)
                    s_out = Space(aligned, out_rank, s.segments, s.block)
                    if merged is None:
                        merged = s_out
                    elif (merged.axis, merged.block, [n for _, n in merged.segments]) != \
                            (s_out.axis, s_out.block, [n for _, n in s_out.segments]):
                        failed = f"{label} joins tensors whose channels are laid out differently"
                    else:
                        for (a, _), (b, _) in zip(merged.segments, s_out.segments):
                            uf.union(a, b)
                        merged = Space(merged.axis, out_rank, tuple((uf.find(a), n) for a, n in merged.segments),
                                       merged.block)
            if failed:
                refuse(failed)
                continue
            for i, t in enumerate(node.inputs):
                if not t.name or t.name in spaces:
                    continue
                value = model.constant_value(t)
                if value is not None:
                    axis = const_channel_dim(value, merged, out_rank)
                    if axis is None:
                        continue
                    if value.shape[axis] != merged.size or value.dtype != np.float32:
                        failed = f"{label} has a constant of shape {list(value.shape)} that does not follow the channels"
                    elif model.is_graph_output(t) or t.name in outer:
                        failed = f"{label} has a per-channel constant that is also read elsewhere"
                    else:
                        slices.append(Slice(node, i, axis, merged, "param"))
                else:
                    shape = _static_shape(infos, t)
                    axis = None if shape is None else merged.axis - (out_rank - len(shape))
                    if shape is None or (axis >= 0 and shape[axis] != 1):
                        failed = f"{label} joins the channels with '{t.name}', whose channels are not prunable"
            if failed:
                refuse(failed)
                continue
            passthrough(merged)
        elif op in POOL or op in ("Resize", "Upsample", "Pad"):
            if carried[0][0] != 0 or len(carried) != 1:
                refuse(f"{label} reads the channels as a parameter")
                continue
            if op == "Pad":
                pads = model.constant_value(node.inputs[1]) if len(node.inputs) > 1 else np.asarray(
                    node.attrs.get("pads", []))
                axes = model.constant_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
                if pads is None or (len(node.inputs) > 3 and node.inputs[3].name and axes is None):
                    refuse(f"{label} pads are not constant")
                    continue
                axes = list(range(space.rank)) if axes is None else [int(a) % space.rank for a in axes]
                half = len(pads) // 2
                if space.axis in axes and (pads[axes.index(space.axis)] or pads[half + axes.index(space.axis)]):
                    refuse(f"{label} pads the channel axis")
                    continue
            if op in ("Resize", "Upsample"):
                scales = None
                for t in node.inputs[1:]:
                    v = model.constant_value(t) if t.name else None
                    if t.name and v is None:
                        refuse(f"{label} takes its scales or sizes at run time")
                        break
                    if v is not None and v.size == space.rank and v.dtype != np.int64:
                        scales = v
                    if v is not None and v.size == space.rank and v.dtype == np.int64:  # sizes
                        refuse(f"{label} resizes to constant sizes that include the channel count")
                        break
                else:
                    if scales is not None and float(scales[space.axis]) != 1.0:
                        refuse(f"{label} scales the channel axis")
                        continue
                    passthrough(space, node.outputs[:1])
                continue
            if space.axis != 1:
                refuse(f"{label} pools a tensor whose channels are not on axis 1")
                continue
            passthrough(space, node.outputs[:1])
            if len(node.outputs) > 1 and any(o.name for o in node.outputs[1:]):
                refuse(f"{label} returns indices")
        elif op in REDUCE:
            axes = node.attrs.get("axes")
            if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
                axes = model.constant_value(node.inputs[1])
            if axes is None or carried[0][0] != 0:
                refuse(f"{label} reduces over axes that are not constant")
                continue
            axes = sorted(int(a) % space.rank for a in np.atleast_1d(axes))
            if space.axis in axes or space.block != 1:
                refuse(f"{label} reduces over the channel axis")
                continue
            if node.attrs.get("keepdims", 1):
                passthrough(space)
            else:
                shift = sum(1 for a in axes if a < space.axis)
                passthrough(Space(space.axis - shift, space.rank - len(axes), space.segments, space.block))
        elif op == "Transpose" and carried[0][0] == 0:
            perm = node.attrs.get("perm") or list(range(space.rank))[::-1]
            passthrough(Space(list(perm).index(space.axis), space.rank, space.segments, space.block))
        elif op in ("Softmax", "LogSoftmax") and carried[0][0] == 0:
            axis = int(node.attrs.get("axis", -1 if model.opset >= 13 else 1)) % space.rank
            if axis == space.axis or (model.opset < 13 and axis <= space.axis):
                refuse(f"{label} normalizes over the channel axis")
                continue
            passthrough(space)
        elif op == "Flatten" and carried[0][0] == 0:
            shape = _static_shape(infos, node.inputs[0])
            axis = int(node.attrs.get("axis", 1)) % max(space.rank, 1)
            if shape is None or any(d is None for d in shape[space.axis + 1:]):
                refuse(f"{label}: the dims after the channel axis are not static")
                continue
            if space.axis < axis:
                refuse(f"{label} folds the channel axis into the batch")
                continue
            inner = int(np.prod(shape[space.axis + 1:], dtype=np.int64)) if space.axis + 1 < len(shape) else 1
            outer_dims = shape[axis:space.axis]
            if any(d != 1 for d in outer_dims):
                refuse(f"{label} mixes the channel axis with other dims")
                continue
            passthrough(Space(1, 2, space.segments, space.block * inner))
        elif op == "Reshape" and carried[0][0] == 0:
            shape_in = _static_shape(infos, node.inputs[0])
            target = model.constant_value(node.inputs[1])
            if shape_in is None or target is None or any(d is None for d in shape_in[space.axis + 1:]):
                refuse(f"{label}: shapes are not static")
                continue
            inner = int(np.prod(shape_in[space.axis + 1:], dtype=np.int64)) if space.axis + 1 < len(shape_in) else 1
            # Supported: [N, C, ...] -> [N, C*inner] (into a Gemm/MatMul), batch dim kept as 0/-1/N.
            if space.axis == 1 and len(target) == 2 and (target[1] == -1 or target[1] == space.size * inner // space.block):
                if target[1] != -1:
                    fixes.append(("reshape", node, Space(1, 2, space.segments, space.block * inner)))
                passthrough(Space(1, 2, space.segments, space.block * inner))
            else:
                refuse(f"{label} mixes the channel axis with other dims")
        elif op == "Concat":
            axis = int(node.attrs.get("axis", 0))
            out_rank = rank_of(node.outputs[0]) or space.rank
            axis %= out_rank
            if axis != space.axis:
                first = None
                for i, t in enumerate(node.inputs):
                    s = spaces.get(t.name)
                    if s is None:
                        first = "mixed"
                        break
                    if first is None:
                        first = s
                    elif [n for _, n in s.segments] != [n for _, n in first.segments] or s.axis != first.axis:
                        first = "mixed"
                        break
                    else:
                        for (a, _), (b, _) in zip(first.segments, s.segments):
                            uf.union(a, b)
                if first == "mixed":
                    refuse(f"{label} concatenates along another axis with tensors whose channels differ")
                    continue
                passthrough(Space(first.axis, first.rank, tuple((uf.find(a), n) for a, n in first.segments),
                                  first.block))
                continue
            segments: list[tuple[int, int]] = []
            blk = space.block
            bad = None
            for t in node.inputs:
                s = spaces.get(t.name)
                if s is not None:
                    if s.block != blk:
                        bad = f"{label} concatenates channel blocks of different sizes"
                    segments.extend(s.segments)
                    continue
                shape = _static_shape(infos, t)
                if shape is None or shape[axis] is None or shape[axis] % blk:
                    bad = f"{label} concatenates '{t.name}' whose size on the channel axis is unknown"
                    break
                gid = new_group(shape[axis] // blk, None, f"not produced by a prunable layer ('{t.name}')")
                segments.append((gid, shape[axis] // blk))
            if bad:
                refuse(bad)
                continue
            passthrough(Space(axis, out_rank, tuple(segments), blk))
        elif op == "Split" and carried[0][0] == 0:
            axis = int(node.attrs.get("axis", 0)) % space.rank
            if axis != space.axis:
                passthrough(space)
                continue
            sizes = node.attrs.get("split")
            if sizes is None and len(node.inputs) > 1 and node.inputs[1].name:
                sizes = model.constant_value(node.inputs[1])
            if sizes is None:
                refuse(f"{label} splits the channel axis into sizes that are not constant")
                continue
            sizes = [int(s) for s in np.atleast_1d(sizes)]
            # Every piece must be made of whole segments.
            bounds, pos = [], 0
            for _, n in space.segments:
                pos += n * space.block
                bounds.append(pos)
            pieces, start, seg_i, ok = [], 0, 0, True
            for size in sizes:
                stop = start + size
                if stop not in bounds and stop != 0:
                    ok = False
                    break
                segs = []
                while seg_i < len(space.segments) and (bounds[seg_i] <= stop):
                    segs.append(space.segments[seg_i])
                    seg_i += 1
                pieces.append(segs)
                start = stop
            if not ok or any(not p for p in pieces):
                refuse(f"{label} splits the channel axis inside a group")
                continue
            for o, segs in zip(node.outputs, pieces):
                if o.name:
                    spaces[o.name] = Space(axis, space.rank, tuple(segs), space.block)
            fixes.append(("split", node, space))
        else:
            refuse(f"read by {label}, which the analysis does not understand")

    # Graph outputs and values read by subgraphs keep every channel.
    for name, space in spaces.items():
        tensor = model.tensors().get(name)
        if tensor is not None and model.is_graph_output(tensor):
            block(space, f"reaches the graph output '{name}'")
        elif name in outer:
            block(space, f"'{name}' is read inside a subgraph")

    # Merge groups by root.
    merged: dict[int, Group] = {}
    for gid, g in groups.items():
        root = uf.find(gid)
        tgt = merged.setdefault(root, Group(root, g.channels))
        if g.channels != tgt.channels:
            tgt.reasons.append("joined groups have different channel counts")
        tgt.producers.extend(g.producers)
        tgt.reasons.extend(r for r in g.reasons if r not in tgt.reasons)

    def canon(space: Space) -> Space:
        return Space(space.axis, space.rank, tuple((uf.find(g), n) for g, n in space.segments), space.block)

    for s in slices:
        s.space = canon(s.space)
    spaces = {k: canon(v) for k, v in spaces.items()}
    sinks = [(n, canon(s)) for n, s in sinks]
    fixes = [(k, n, canon(s)) for k, n, s in fixes]
    return Analysis(merged, slices, spaces, sinks, fixes)


def kept_indices(space: Space, kept: dict[int, np.ndarray]) -> np.ndarray:
    """Indices along the channel axis (expanded by block) that survive, given each group's kept channels."""
    parts, offset = [], 0
    for gid, n in space.segments:
        idx = kept.get(gid)
        parts.append((np.arange(n) if idx is None else idx) + offset)
        offset += n
    idx = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if space.block == 1:
        return idx
    return (idx[:, None] * space.block + np.arange(space.block)[None, :]).reshape(-1)


def channel_values(space: Space, gid: int, vector: np.ndarray) -> np.ndarray:
    """The part of a per-position vector (length ``space.size``) that belongs to group ``gid``, one value per
    channel (blocks summed)."""
    out, offset = None, 0
    for g, n in space.segments:
        if g == gid:
            part = vector[offset * space.block:(offset + n) * space.block].reshape(n, space.block).sum(axis=1)
            out = part if out is None else out + part
        offset += n
    return out


def padded_indices(space: Space, pads: dict[int, int]) -> np.ndarray:
    """Source index of every position along the channel axis (expanded by block) after ``pads[gid]`` new
    channels are appended to each group's segment; -1 marks a new position."""
    parts, offset = [], 0
    for gid, n in space.segments:
        parts.append(np.arange(n) + offset)
        parts.append(np.full(pads.get(gid, 0), -1))
        offset += n
    idx = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if space.block == 1:
        return idx
    return np.where(idx[:, None] < 0, -1, idx[:, None] * space.block + np.arange(space.block)[None, :]).reshape(-1)


def resize_groups(model: Model, an: Analysis, groups, indices, suffix: str) -> None:
    """Rewrite every weight, parameter, attribute and shape constant tied to ``groups`` so each channel
    axis holds ``indices(space)``: source positions, -1 for a new channel (zero weights; parameters 0,
    or 1 where 0 would divide: Div, Pow). Pruning passes the kept positions, padding appends -1s.
    Weights are replaced, never modified in place."""
    groups = set(groups)

    def touched(space: Space) -> bool:
        return bool({g for g, _ in space.segments} & groups)

    for s in an.slices:
        if not touched(s.space):
            continue
        value = np.asarray(model.constant_value(s.node.inputs[s.index]))
        idx = indices(s.space)
        fill = 1.0 if s.role == "param" and s.node.op in ("Div", "Pow") else 0.0
        moved = np.moveaxis(value, s.axis, 0)
        out = np.full((len(idx),) + moved.shape[1:], fill, dtype=value.dtype)
        out[idx >= 0] = moved[idx[idx >= 0]]
        base = (s.node.name or s.node.op.lower()) + f"_{suffix}{s.index}"
        s.node.inputs[s.index] = gs.Constant(model.unique_name(base), np.ascontiguousarray(np.moveaxis(out, 0, s.axis)))
    for kind, node, space in an.fixes:
        if not touched(space):
            continue
        if kind == "group":
            node.attrs["group"] = int(len(indices(space)))
        elif kind == "reshape":
            target = model.constant_value(node.inputs[1]).copy()
            target[1] = len(indices(an.spaces[node.outputs[0].name]))
            node.inputs[1] = gs.Constant(model.unique_name((node.name or "reshape") + "_shape"), target)
        elif kind == "split":
            sizes = [len(indices(an.spaces[o.name])) for o in node.outputs]
            if "split" in node.attrs:
                node.attrs["split"] = sizes
            else:
                node.inputs[1] = gs.Constant(model.unique_name((node.name or "split") + "_sizes"),
                                             np.asarray(sizes, np.int64))
    tensors = model.tensors()
    for name, space in an.spaces.items():
        t = tensors.get(name)
        if isinstance(t, gs.Variable) and touched(space) and not model.is_graph_output(t) \
                and not model.is_graph_input(t):
            t.shape = None
    model.invalidate()


def pad_groups(model: Model, an: Analysis, pads: dict[int, int]) -> None:
    """The inverse of pruning: append ``pads[gid]`` channels to each group. New producer channels and
    new consumer inputs get zero weights, so the new channels carry a constant and contribute nothing:
    the same function, every new value finite."""
    pads = {g: n for g, n in pads.items() if n > 0}
    resize_groups(model, an, pads, lambda space: padded_indices(space, pads), "padded")
