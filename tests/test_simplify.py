"""passes/simplify.py: each rewrite positive (parity + checker), negative with its reason."""

import numpy as np
import pytest
from onnx import TensorProto, helper

import passes.simplify  # noqa: F401 - registers the passes
from builders import FLOAT, assert_parity, init, make_model, rng
from onnxslim_kit.ir import Model
from onnxslim_kit.pass_base import PassContext
from onnxslim_kit.pipeline import Pipeline

INT64 = TensorProto.INT64


def _run(proto, spec):
    model, records = Pipeline.from_specs([spec]).run(Model.from_proto(proto), PassContext())
    return model.to_proto(), records[0]


def _ops(proto):
    return [n.op_type for n in proto.graph.node]


def _conv_then(op, factor, *, transpose=False, group=1, bias=True, opset=17):
    r = rng(1)
    cin, cout = 4, 6
    if transpose:
        w = r.standard_normal((cin, cout // group, 3, 3)).astype(np.float32)
    else:
        w = r.standard_normal((cout, cin // group, 3, 3)).astype(np.float32)
    inits = [init("w", w), init("f", factor)]
    conv_in = ["x", "w"]
    if bias:
        inits.append(init("b", r.standard_normal(cout).astype(np.float32)))
        conv_in.append("b")
    conv = "ConvTranspose" if transpose else "Conv"
    nodes = [helper.make_node(conv, conv_in, ["c"], name="conv", group=group),
             helper.make_node(op, ["c", "f"], ["y"], name="affine")]
    return make_model(nodes, [("x", FLOAT, ["N", cin, 5, 5])], [("y", FLOAT, None)], inits, opset=opset)


def _x(shape, seed=0):
    return rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("op", ["Add", "Mul"])
@pytest.mark.parametrize("transpose, group, bias", [(False, 1, True), (False, 2, False), (True, 2, True)])
def test_fuse_conv_affine_folds_per_channel_constant(op, transpose, group, bias):
    factor = (rng(2).standard_normal((6, 1, 1)) + 2).astype(np.float32)
    proto = _conv_then(op, factor, transpose=transpose, group=group, bias=bias)
    out, rec = _run(proto, "fuse-conv-affine")
    assert rec.stats["affine_fused"] == 1
    assert _ops(out) == ["ConvTranspose" if transpose else "Conv"]
    assert [o.name for o in out.graph.output] == ["y"]
    assert_parity(proto, out, {"x": _x((2, 4, 5, 5))}, atol=1e-5, rtol=1e-5)


def test_fuse_conv_affine_scalar_factor():
    proto = _conv_then("Mul", np.full((1, 1, 1, 1), 0.5, np.float32))
    out, rec = _run(proto, "fuse-conv-affine")
    assert rec.stats["affine_fused"] == 1
    assert_parity(proto, out, {"x": _x((1, 4, 5, 5))})


def test_fuse_conv_affine_skips_non_channel_constant_with_reason():
    proto = _conv_then("Add", np.ones((1, 1, 1, 3), np.float32))
    out, rec = _run(proto, "fuse-conv-affine")
    assert not rec.modified and _ops(out) == ["Conv", "Add"]
    assert rec.skipped == [("conv", "Add constant of shape (1, 1, 1, 3) is not per-channel for this Conv")]


def test_fuse_conv_affine_skips_shared_weight():
    proto = _conv_then("Mul", np.full((6, 1, 1), 2, np.float32))
    proto.graph.node.append(helper.make_node("Conv", ["x", "w"], ["c2"], name="conv2"))
    proto.graph.output.append(helper.make_tensor_value_info("c2", FLOAT, ["N", 6, 3, 3]))
    out, rec = _run(proto, "fuse-conv-affine")
    assert ("conv", "Mul after Conv: weight is shared with another node") in rec.skipped
    assert_parity(proto, out, {"x": _x((1, 4, 5, 5))})


def _pad_conv(pads, value=0.0, mode="constant", opset=17):
    w = rng(3).standard_normal((2, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Pad", ["x", "pads", "v"], ["p"], name="pad", mode=mode),
             helper.make_node("Conv", ["p", "w"], ["y"], name="conv", pads=[1, 0, 1, 0])]
    inits = [init("w", w), init("pads", np.array(pads, np.int64)), init("v", np.array(value, np.float32))]
    return make_model(nodes, [("x", FLOAT, [1, 3, 6, 6])], [("y", FLOAT, None)], inits, opset=opset)


def test_fuse_pad_conv_adds_spatial_pads():
    proto = _pad_conv([0, 0, 1, 2, 0, 0, 3, 0])
    out, rec = _run(proto, "fuse-pad-conv")
    assert rec.stats["pads_fused"] == 1 and _ops(out) == ["Conv"]
    conv = out.graph.node[0]
    assert list(next(a for a in conv.attribute if a.name == "pads").ints) == [2, 2, 4, 0]
    assert_parity(proto, out, {"x": _x((1, 3, 6, 6))})


@pytest.mark.parametrize("pads, value, mode, reason", [
    ([0, 1, 1, 1, 0, 0, 1, 1], 0.0, "constant", "Pad touches the batch or channel axis"),
    ([0, 0, 1, 1, 0, 0, 1, 1], 1.0, "constant", "pad value is not zero"),
    ([0, 0, 1, 1, 0, 0, 1, 1], 0.0, "reflect", "Pad mode reflect is not constant"),
    ([0, 0, -1, 0, 0, 0, 0, 0], 0.0, "constant", "negative pads (cropping)"),
])
def test_fuse_pad_conv_skips_with_reason(pads, value, mode, reason):
    proto = _pad_conv(pads, value, mode)
    out, rec = _run(proto, "fuse-pad-conv")
    assert rec.skipped == [("pad", reason)] and _ops(out) == ["Pad", "Conv"]


def _matmul_add(a_shape, bias_shape):
    r = rng(4)
    inits = [init("w", r.standard_normal((8, 5)).astype(np.float32)),
             init("b", r.standard_normal(bias_shape).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["a", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["y"], name="add")]
    return make_model(nodes, [("a", FLOAT, a_shape)], [("y", FLOAT, None)], inits)


def test_fuse_gemm_rank2_matmul_add():
    proto = _matmul_add(["N", 8], [5])
    out, rec = _run(proto, "fuse-gemm")
    assert _ops(out) == ["Gemm"] and [o.name for o in out.graph.output] == ["y"]
    assert_parity(proto, out, {"a": _x((3, 8))})


def test_fuse_gemm_skips_rank3_activation():
    proto = _matmul_add(["N", 4, 8], [5])
    out, rec = _run(proto, "fuse-gemm")
    assert rec.skipped == [("mm", "MatMul input is not known to be rank 2 (Gemm needs 2-D)")]
    assert _ops(out) == ["MatMul", "Add"]


def test_fuse_gemm_skips_non_row_bias():
    proto = _matmul_add(["N", 8], [3, 5])
    out, rec = _run(proto, "fuse-gemm")
    assert rec.skipped == [("mm", "bias of shape (3, 5) is not a row vector of 5")]


def _dynamic_batch_reshape():
    """x[N, 4, 6] -> Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [24])) -> Reshape([-1, 6, 4])."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "i0"], ["n"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"], name="unsq"),
        helper.make_node("Concat", ["n1", "c24"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["r1"], name="reshape1"),
        helper.make_node("Reshape", ["r1", "t2"], ["y"], name="reshape2"),
    ]
    inits = [init("i0", np.array(0, np.int64)), init("ax0", np.array([0], np.int64)),
             init("c24", np.array([24], np.int64)), init("t2", np.array([-1, 6, 4], np.int64))]
    proto = make_model(nodes, [("x", FLOAT, ["N", 4, 6])], [("y", FLOAT, None)], inits,
                       value_info=[("n1", INT64, [1])])
    return proto


def test_fuse_reshape_constant_target_and_chain():
    proto = _dynamic_batch_reshape()
    out, rec = _run(proto, "fuse-reshape")
    assert rec.stats["reshape_chains_collapsed"] == 1 and rec.stats["reshape_shapes_made_constant"] == 1
    assert _ops(out) == ["Reshape"]
    for batch in (1, 3):  # still correct for every batch size
        assert_parity(proto, out, {"x": _x((batch, 4, 6))})


def test_fuse_reshape_keeps_zero_copying_target():
    nodes = [helper.make_node("Reshape", ["x", "t1"], ["r1"], name="r1"),
             helper.make_node("Reshape", ["r1", "t2"], ["y"], name="r2")]
    inits = [init("t1", np.array([2, 12], np.int64)), init("t2", np.array([0, 3, 4], np.int64))]
    proto = make_model(nodes, [("x", FLOAT, [2, 3, 4])], [("y", FLOAT, None)], inits)
    out, rec = _run(proto, "fuse-reshape")
    assert rec.skipped == [("r2", "target shape copies dims (0) from the inner Reshape")]
    assert len(out.graph.node) == 2


@pytest.mark.parametrize("p1, p2, expected", [([0, 2, 1, 3], [0, 2, 1, 3], []),
                                              ([0, 2, 1, 3], [0, 1, 3, 2], ["Transpose"])])
def test_fuse_transpose_composes_or_removes(p1, p2, expected):
    nodes = [helper.make_node("Relu", ["x"], ["x1"], name="relu"),
             helper.make_node("Transpose", ["x1"], ["t"], name="t1", perm=p1),
             helper.make_node("Transpose", ["t"], ["t2out"], name="t2", perm=p2),
             helper.make_node("Neg", ["t2out"], ["y"], name="neg")]
    proto = make_model(nodes, [("x", FLOAT, [1, 2, 3, 4])], [("y", FLOAT, None)])
    out, rec = _run(proto, "fuse-transpose")
    assert _ops(out) == ["Relu"] + expected + ["Neg"]
    assert_parity(proto, out, {"x": _x((1, 2, 3, 4))})


@pytest.mark.parametrize("opset", [11, 17])
def test_fuse_unsqueeze_merges_chain(opset):
    if opset < 13:
        nodes = [helper.make_node("Unsqueeze", ["x"], ["u1"], name="u1", axes=[0, 2]),
                 helper.make_node("Unsqueeze", ["u1"], ["y"], name="u2", axes=[1, 4])]
        inits = []
    else:
        nodes = [helper.make_node("Unsqueeze", ["x", "a1"], ["u1"], name="u1"),
                 helper.make_node("Unsqueeze", ["u1", "a2"], ["y"], name="u2")]
        inits = [init("a1", np.array([0, 2], np.int64)), init("a2", np.array([1, 4], np.int64))]
    proto = make_model(nodes, [("x", FLOAT, [3, 5])], [("y", FLOAT, None)], inits, opset=opset)
    out, rec = _run(proto, "fuse-unsqueeze")
    assert rec.stats["unsqueezes_merged"] == 1 and _ops(out) == ["Unsqueeze"]
    assert_parity(proto, out, {"x": _x((3, 5))})


def test_fuse_unsqueeze_reduce_keepdims():
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], name="mean", axes=[2], keepdims=0),
             helper.make_node("Unsqueeze", ["m", "ax"], ["y"], name="unsq")]
    proto = make_model(nodes, [("x", FLOAT, [2, 3, 4])], [("y", FLOAT, None)],
                       [init("ax", np.array([2], np.int64))], opset=17)
    out, rec = _run(proto, "fuse-unsqueeze")
    assert rec.stats["reduce_keepdims"] == 1 and _ops(out) == ["ReduceMean"]
    assert [o.name for o in out.graph.output] == ["y"]
    assert_parity(proto, out, {"x": _x((2, 3, 4))})


def test_fuse_concat_inlines_nested_and_drops_single():
    nodes = [helper.make_node("Concat", ["a", "b"], ["ab"], name="inner", axis=1),
             helper.make_node("Concat", ["ab", "c"], ["abc"], name="outer", axis=1),
             helper.make_node("Concat", ["abc"], ["one"], name="single", axis=0),
             helper.make_node("Relu", ["one"], ["y"], name="relu")]
    proto = make_model(nodes, [("a", FLOAT, [2, 1]), ("b", FLOAT, [2, 2]), ("c", FLOAT, [2, 3])],
                       [("y", FLOAT, None)])
    out, rec = _run(proto, "fuse-concat")
    assert rec.stats["concats_inlined"] == 1 and rec.stats["concats_removed"] == 1
    assert _ops(out) == ["Concat", "Relu"]
    assert_parity(proto, out, {"a": _x((2, 1)), "b": _x((2, 2), 1), "c": _x((2, 3), 2)})


def test_fuse_concat_keeps_inner_with_other_axis():
    nodes = [helper.make_node("Concat", ["a", "a"], ["aa"], name="inner", axis=0),
             helper.make_node("Concat", ["aa", "b"], ["y"], name="outer", axis=1)]
    proto = make_model(nodes, [("a", FLOAT, [1, 2]), ("b", FLOAT, [2, 2])], [("y", FLOAT, None)])
    out, rec = _run(proto, "fuse-concat")
    assert not rec.modified and len(out.graph.node) == 2


def test_fuse_conv_affine_add_with_shared_bias_keeps_other_user_intact():
    proto = _conv_then("Add", (rng(2).standard_normal((6, 1, 1))).astype(np.float32))
    proto.graph.node.append(helper.make_node("Mul", ["b", "b"], ["b_user"], name="other"))
    proto.graph.output.append(helper.make_tensor_value_info("b_user", FLOAT, [6]))
    out, rec = _run(proto, "fuse-conv-affine")
    assert rec.stats["affine_fused"] == 1
    assert_parity(proto, out, {"x": _x((2, 4, 5, 5))})


def test_fuse_reshape_allowzero_left_alone_with_reason():
    nodes = [helper.make_node("Reshape", ["x", "t1"], ["r1"], name="r1"),
             helper.make_node("Reshape", ["r1", "t2"], ["y"], name="r2", allowzero=1)]
    inits = [init("t1", np.array([2, 12], np.int64)), init("t2", np.array([2, 3, 4], np.int64))]
    proto = make_model(nodes, [("x", FLOAT, [2, 3, 4])], [("y", FLOAT, [2, 3, 4])], inits, opset=14)
    out, rec = _run(proto, "fuse-reshape")
    assert ("r2", "allowzero=1: a 0 in the target shape means a real 0") in rec.skipped
    assert len(out.graph.node) == 2
