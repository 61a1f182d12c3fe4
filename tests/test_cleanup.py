"""passes/cleanup.py: every rewrite positive (parity + checker) and negative with its reason."""

import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from builders import FLOAT, assert_parity, conv_bn_relu, init, make_model, relu_chain, rng
from onnxslim_kit.ir import Model
from onnxslim_kit.pass_base import PassContext
from onnxslim_kit.pipeline import Pipeline

INT64 = TensorProto.INT64


def _run(proto, spec="cleanup"):
    model, records = Pipeline.from_specs([spec]).run(Model.from_proto(proto), PassContext())
    return model.to_proto(), records[0]


def _ops(proto):
    return [n.op_type for n in proto.graph.node]


def _x(shape, seed=0):
    return rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------- fold-constants

def test_fold_constants_folds_constant_subgraph_and_constant_nodes():
    nodes = [
        helper.make_node("Constant", [], ["c"], value=helper.make_tensor("cv", FLOAT, [4], [1, 2, 3, 4])),
        helper.make_node("Mul", ["c", "two"], ["c2"], name="mul_const"),
        helper.make_node("Sqrt", ["c2"], ["c3"], name="sqrt_const"),
        helper.make_node("Add", ["x", "c3"], ["y"], name="add"),
    ]
    proto = make_model(nodes, [("x", FLOAT, [4])], [("y", FLOAT, [4])], [init("two", np.full(4, 2, np.float32))])
    out, rec = _run(proto, "fold-constants")
    assert _ops(out) == ["Add"]
    assert rec.stats["constants_folded"] == 2 and rec.stats["constant_nodes_to_initializers"] == 1
    assert_parity(proto, out, {"x": _x(4)})


def test_fold_constants_never_folds_dequantize_linear():
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], name="dq"),
             helper.make_node("Add", ["x", "w"], ["y"], name="add")]
    proto = make_model(nodes, [("x", FLOAT, [4])], [("y", FLOAT, [4])],
                       [init("q", np.arange(4, dtype=np.int8)), init("s", np.array(0.5, np.float32))])
    out, rec = _run(proto, "fold-constants")
    assert _ops(out) == ["DequantizeLinear", "Add"]
    assert rec.skipped == [("dq", "DequantizeLinear is never folded (quantization, random, control flow or "
                                  "custom-domain op)")]


def test_fold_constants_respects_size_limit():
    nodes = [helper.make_node("Tile", ["w", "reps"], ["big"], name="tile"),
             helper.make_node("Add", ["x", "big"], ["y"], name="add")]
    proto = make_model(nodes, [("x", FLOAT, [64, 64])], [("y", FLOAT, [64, 64])],
                       [init("w", np.ones((1, 64), np.float32)), init("reps", np.array([64, 1], np.int64))])
    out, rec = _run(proto, "fold-constants:max_bytes=1000")
    assert ("tile", "result is 16384 bytes > max_bytes=1000") in rec.skipped
    assert "Tile" in _ops(out)


def _shape_chain(batch):
    """Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), Unsqueeze(Gather(Shape(x), 1) * 2), [-1]))."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "i0"], ["d0"], name="g0", axis=0),
        helper.make_node("Gather", ["s", "i1"], ["d1"], name="g1", axis=0),
        helper.make_node("Unsqueeze", ["d0", "ax"], ["u0"], name="u0"),
        helper.make_node("Unsqueeze", ["d1", "ax"], ["u1"], name="u1"),
        helper.make_node("Concat", ["u0", "u1", "minus1"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape"),
    ]
    inits = [init("i0", np.array(0, np.int64)), init("i1", np.array(1, np.int64)),
             init("ax", np.array([0], np.int64)), init("minus1", np.array([-1], np.int64))]
    return make_model(nodes, [("x", FLOAT, [batch, 3, 4, 5])], [("y", FLOAT, [batch, 3, 20])], inits)


def test_fold_constants_collapses_static_shape_chain():
    proto = _shape_chain(2)
    out, rec = _run(proto)
    assert _ops(out) == ["Reshape"]
    assert list(onnx.numpy_helper.to_array(out.graph.initializer[0])) == [2, 3, -1]
    assert_parity(proto, out, {"x": _x((2, 3, 4, 5))})


def test_fold_constants_keeps_dynamic_batch_but_folds_static_dims():
    proto = _shape_chain("N")
    out, rec = _run(proto)
    # The batch dim stays computed at run time (now a -1 in a constant target); nothing is baked in.
    assert "Reshape" in _ops(out) and len(out.graph.node) <= 4
    for batch in (1, 3):
        assert_parity(proto, out, {"x": _x((batch, 3, 4, 5))})


def test_fold_constants_does_not_fold_legacy_initializer_inputs():
    nodes = [helper.make_node("Mul", ["w", "two"], ["w2"], name="mul"),
             helper.make_node("Add", ["x", "w2"], ["y"], name="add")]
    proto = make_model(nodes, [("x", FLOAT, [3]), ("w", FLOAT, [3])], [("y", FLOAT, [3])],
                       [init("w", np.ones(3, np.float32)), init("two", np.full(3, 2, np.float32))])
    out, rec = _run(proto)
    assert _ops(out) == ["Mul", "Add"]
    assert [i.name for i in out.graph.input] == ["x", "w"]
    assert_parity(proto, out, {"x": _x(3), "w": _x(3, 1)})


# ---------------------------------------------------------------- remove-identity

def test_remove_identity_removes_identity_dropout_and_same_type_cast():
    nodes = [helper.make_node("Identity", ["x"], ["a"], name="id"),
             helper.make_node("Dropout", ["a"], ["b"], name="drop"),
             helper.make_node("Cast", ["b"], ["c"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Identity", ["r"], ["y"], name="id_out")]
    proto = make_model(nodes, [("x", FLOAT, [2, 3])], [("y", FLOAT, [2, 3])])
    out, rec = _run(proto, "remove-identity")
    assert _ops(out) == ["Relu"] and rec.stats["identities_removed"] == 4
    assert [o.name for o in out.graph.output] == ["y"]
    assert_parity(proto, out, {"x": _x((2, 3))})


def test_remove_identity_keeps_input_to_output_identity_and_used_dropout_mask():
    nodes = [helper.make_node("Identity", ["x"], ["y"], name="passthrough"),
             helper.make_node("Dropout", ["x"], ["d", "mask"], name="drop")]
    proto = make_model(nodes, [("x", FLOAT, [2])], [("y", FLOAT, [2]), ("d", FLOAT, [2]),
                                                    ("mask", TensorProto.BOOL, [2])])
    out, rec = _run(proto, "remove-identity")
    assert ("passthrough", "connects a graph input to a graph output (both names must stay)") in rec.skipped
    assert ("drop", "Dropout mask output is used") in rec.skipped
    assert len(out.graph.node) == 2


# ---------------------------------------------------------------- fold-batchnorm

def _bn(c, prefix="bn"):
    r = rng(7)
    return [init(f"{prefix}.s", (1 + 0.3 * r.standard_normal(c)).astype(np.float32)),
            init(f"{prefix}.b", (0.1 * r.standard_normal(c)).astype(np.float32)),
            init(f"{prefix}.m", (0.1 * r.standard_normal(c)).astype(np.float32)),
            init(f"{prefix}.v", (0.5 + r.random(c)).astype(np.float32))]


@pytest.mark.parametrize("group, bias", [(1, True), (1, False), (4, True)])
def test_fold_batchnorm_conv(group, bias):
    r = rng(8)
    inits = [init("w", r.standard_normal((8, 8 // group, 3, 3)).astype(np.float32))] + _bn(8)
    conv_in = ["x", "w"]
    if bias:
        inits.append(init("b", r.standard_normal(8).astype(np.float32)))
        conv_in.append("b")
    nodes = [helper.make_node("Conv", conv_in, ["c"], name="conv", group=group, pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "bn.s", "bn.b", "bn.m", "bn.v"], ["y"], name="bn")]
    proto = make_model(nodes, [("x", FLOAT, ["N", 8, 6, 6])], [("y", FLOAT, ["N", 8, 6, 6])], inits)
    out, rec = _run(proto, "fold-batchnorm")
    assert _ops(out) == ["Conv"] and rec.stats["batchnorms_folded"] == 1
    assert_parity(proto, out, {"x": _x((2, 8, 6, 6))})


@pytest.mark.parametrize("op, trans_b", [("Gemm", 0), ("Gemm", 1), ("MatMul", 0)])
def test_fold_batchnorm_gemm_and_matmul(op, trans_b):
    r = rng(9)
    w = r.standard_normal((6, 5) if trans_b else (5, 6)).astype(np.float32)
    attrs = {"transB": trans_b} if op == "Gemm" else {}
    nodes = [helper.make_node(op, ["x", "w"], ["h"], name="fc", **attrs),
             helper.make_node("BatchNormalization", ["h", "bn.s", "bn.b", "bn.m", "bn.v"], ["y"], name="bn")]
    proto = make_model(nodes, [("x", FLOAT, ["N", 5])], [("y", FLOAT, ["N", 6])], [init("w", w)] + _bn(6))
    out, rec = _run(proto, "fold-batchnorm")
    assert "BatchNormalization" not in _ops(out)
    assert_parity(proto, out, {"x": _x((3, 5))})


def test_fold_batchnorm_with_constant_node_weights_paddle_style():
    """FIELD-NOTES 1: every weight is a Constant node, no initializers."""
    proto = conv_bn_relu()
    const_nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in proto.graph.initializer]
    del proto.graph.initializer[:]
    nodes = const_nodes + list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    onnx.checker.check_model(proto, full_check=True)
    out, rec = _run(proto)
    assert _ops(out) == ["Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"]
    assert rec.stats["batchnorms_folded"] == 1
    assert_parity(proto, out, {"x": _x((2, 3, 8, 8))})


def test_fold_batchnorm_skips_shared_conv_weight():
    proto = conv_bn_relu()
    proto.graph.node.append(helper.make_node("Conv", ["x", "conv.w"], ["other"], name="conv2", pads=[1, 1, 1, 1]))
    proto.graph.output.append(helper.make_tensor_value_info("other", FLOAT, ["N", 8, 8, 8]))
    out, rec = _run(proto, "fold-batchnorm")
    assert ("bn", "Conv weight is shared with another node") in rec.skipped
    assert_parity(proto, out, {"x": _x((1, 3, 8, 8))})


# ---------------------------------------------------------------- cse / merge-initializers

def test_cse_merges_duplicate_branches():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r1"),
             helper.make_node("Relu", ["x"], ["b"], name="r2"),
             helper.make_node("Transpose", ["a"], ["ta"], name="t1", perm=[1, 0]),
             helper.make_node("Transpose", ["b"], ["tb"], name="t2", perm=[1, 0]),
             helper.make_node("Add", ["ta", "tb"], ["y"], name="add")]
    proto = make_model(nodes, [("x", FLOAT, [2, 3])], [("y", FLOAT, [3, 2])])
    out, rec = _run(proto)
    assert _ops(out) == ["Relu", "Transpose", "Add"]
    assert_parity(proto, out, {"x": _x((2, 3))})


def test_cse_keeps_duplicates_that_are_graph_outputs():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r1"), helper.make_node("Relu", ["x"], ["b"], name="r2")]
    proto = make_model(nodes, [("x", FLOAT, [2])], [("a", FLOAT, [2]), ("b", FLOAT, [2])])
    out, rec = _run(proto, "cse")
    assert ("r2", "duplicate of r1 but its output is a graph output") in rec.skipped
    assert len(out.graph.node) == 2


def test_merge_initializers_ties_identical_weights():
    w = rng(10).standard_normal((4, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="m1"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="m2")]
    proto = make_model(nodes, [("x", FLOAT, [2, 4])], [("y", FLOAT, [2, 4])], [init("w1", w), init("w2", w.copy())])
    out, rec = _run(proto, "merge-initializers")
    assert rec.stats["initializers_merged"] == 1 and len(out.graph.initializer) == 1
    assert_parity(proto, out, {"x": _x((2, 4))})


# ---------------------------------------------------------------- cleanup pipeline

def test_cleanup_is_fast_on_2000_node_chain():
    proto = relu_chain(2000, reverse=True)
    start = time.perf_counter()
    out, rec = _run(proto)
    elapsed = time.perf_counter() - start
    assert len(out.graph.node) == 2000 and not rec.modified
    assert elapsed < 60  # generous: guards against quadratic behaviour, not a benchmark


def test_cleanup_options_disable_steps():
    out, rec = _run(conv_bn_relu(), "cleanup:fold_batchnorm=false")
    assert "BatchNormalization" in _ops(out)


def test_cleanup_leaves_control_flow_bodies_and_keeps_outer_scope_values():
    then_g = helper.make_graph([helper.make_node("Identity", ["scaled"], ["t_out"], name="then_id")], "then", [],
                               [helper.make_tensor_value_info("t_out", FLOAT, [2])])
    else_g = helper.make_graph([helper.make_node("Neg", ["scaled"], ["e_out"], name="else_neg")], "else", [],
                               [helper.make_tensor_value_info("e_out", FLOAT, [2])])
    nodes = [helper.make_node("Mul", ["x", "two"], ["scaled"], name="mul"),
             helper.make_node("Identity", ["scaled"], ["unused_alias"], name="dead_id"),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    proto = make_model(nodes, [("x", FLOAT, [2]), ("cond", TensorProto.BOOL, [])], [("y", FLOAT, [2])],
                       [init("two", np.full(2, 2, np.float32))])
    out, rec = _run(proto)
    assert _ops(out) == ["Mul", "If"]
    assert ("branch", "cleanup: nodes inside its subgraphs are left untouched") in rec.skipped
    for cond in (True, False):
        assert_parity(proto, out, {"x": _x(2), "cond": np.array(cond)})


def test_cleanup_preserves_metadata():
    proto = conv_bn_relu()
    proto.doc_string = "model doc"
    proto.producer_name, proto.producer_version = "paddle2onnx", "1.2"
    proto.metadata_props.add(key="character_dict", value="a b c")
    out, _ = _run(proto)
    assert (out.doc_string, out.producer_name, out.producer_version) == ("model doc", "paddle2onnx", "1.2")
    assert [(p.key, p.value) for p in out.metadata_props] == [("character_dict", "a b c")]


@pytest.mark.parametrize("opset", [11, 12, 13, 17, 21])
def test_cleanup_opsets(opset):
    proto = conv_bn_relu(opset=opset)
    out, rec = _run(proto)
    assert rec.stats["batchnorms_folded"] == 1
    assert out.opset_import[0].version == opset
    assert_parity(proto, out, {"x": _x((2, 3, 8, 8))})


def test_cleanup_result_independent_of_node_order_reversed_input():
    proto = conv_bn_relu()
    shuffled = onnx.ModelProto.FromString(proto.SerializeToString())
    nodes = list(shuffled.graph.node)[::-1]
    del shuffled.graph.node[:]
    shuffled.graph.node.extend(nodes)
    out_a, _ = _run(proto)
    out_b, _ = _run(shuffled)
    assert [n.op_type for n in out_a.graph.node] == [n.op_type for n in out_b.graph.node]
    assert "BatchNormalization" not in [n.op_type for n in out_b.graph.node]
    x = rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert_parity(proto, out_b, {"x": x}, atol=1e-4)


def test_cleanup_removes_identities_in_2000_node_chain():
    nodes = []
    prev = "x"
    for i in range(1000):
        nodes.append(helper.make_node("Relu", [prev], [f"r{i}"], name=f"relu{i}"))
        nodes.append(helper.make_node("Identity", [f"r{i}"], [f"i{i}"], name=f"id{i}"))
        prev = f"i{i}"
    nodes.append(helper.make_node("Relu", [prev], ["y"], name="last"))
    proto = make_model(nodes, [("x", FLOAT, [2, 4])], [("y", FLOAT, [2, 4])])
    out, rec = _run(proto)
    assert len(out.graph.node) == 1001 and rec.modified
    assert all(n.op_type == "Relu" for n in out.graph.node)
    assert_parity(proto, out, {"x": rng(4).standard_normal((2, 4)).astype(np.float32)})
