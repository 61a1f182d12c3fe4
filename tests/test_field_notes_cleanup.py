"""FIELD-NOTES items that concern cleanup, each run through onnxslim_kit.pipeline.Pipeline on an ir.Model,
exported with to_proto(), then onnx.checker full check + onnxruntime parity."""

import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

import onnxslim_kit
from builders import FLOAT, assert_parity, conv_bn_relu, init, make_model, rng, run_model
from onnxslim_kit.ir import Model
from onnxslim_kit.pass_base import PassContext
from onnxslim_kit.pipeline import Pipeline


def _clean(proto_or_model, spec="cleanup"):
    model = proto_or_model if isinstance(proto_or_model, Model) else Model.from_proto(proto_or_model)
    out, records = Pipeline.from_specs([spec]).run(model, PassContext())
    return out.to_proto(), records


def _x(shape, seed=0):
    return rng(seed).standard_normal(shape).astype(np.float32)


def test_field_note_1_constant_node_weights_are_folded_into_conv():
    proto = conv_bn_relu()
    graph = proto.graph
    consts = [helper.make_node("Constant", [], [t.name], name="c_" + t.name, value=t) for t in graph.initializer]
    rest = list(graph.node)
    del graph.initializer[:]
    del graph.node[:]
    graph.node.extend(consts + rest)  # paddle-style: every weight is a Constant node, no initializers
    out, _ = _clean(proto)
    assert "BatchNormalization" not in [n.op_type for n in out.graph.node]
    assert_parity(proto, out, {"x": _x((2, 3, 8, 8))}, atol=1e-4)


def test_field_note_2_opset_11_model_is_cleaned_and_stays_opset_11():
    proto = conv_bn_relu(opset=11)
    out, _ = _clean(proto)
    assert out.opset_import[0].version == 11
    assert "BatchNormalization" not in [n.op_type for n in out.graph.node]
    assert_parity(proto, out, {"x": _x((1, 3, 8, 8))}, atol=1e-4)


def test_field_note_4_stale_value_info_does_not_survive():
    nodes = [helper.make_node("Identity", ["x"], ["a"], name="id"),
             helper.make_node("Relu", ["a"], ["y"], name="relu")]
    stale = [helper.make_tensor_value_info("a", FLOAT, [7, 7, 7])]  # wrong: a is [2, 3]
    proto = make_model(nodes, [("x", FLOAT, [2, 3])], [("y", FLOAT, [2, 3])], value_info=stale)
    out, _ = _clean(proto)
    for vi in out.graph.value_info:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        assert dims != [7, 7, 7], vi.name
    onnx.shape_inference.infer_shapes(out, strict_mode=True)
    assert_parity(proto, out, {"x": _x((2, 3))})


def test_field_note_5_wrong_declared_output_shape_output_unchanged():
    nodes = [helper.make_node("Transpose", ["x"], ["t"], name="t", perm=[1, 0, 2]),
             helper.make_node("Identity", ["t"], ["y"], name="id")]
    proto = make_model(nodes, [("x", FLOAT, [1, 5, 4])], [("y", FLOAT, [1, "seqlen"])])
    x = _x((1, 5, 4))
    out, _ = _clean(proto)
    assert [o.name for o in out.graph.output] == ["y"]
    onnx.checker.check_model(out)  # no full_check: the input model's own declaration fails it too
    got, ref = run_model(out, {"x": x})[0], run_model(proto, {"x": x})[0]
    assert got.shape == ref.shape == (5, 1, 4)  # observed shape, not the declared [1, seqlen]
    np.testing.assert_array_equal(got, ref)


def test_field_note_6_metadata_survives_pipeline():
    proto = conv_bn_relu()
    onnx.helper.set_model_props(proto, {"labels": "cat,dog"})
    proto.doc_string, proto.producer_name, proto.producer_version = "doc", "paddle2onnx", "1.2"
    proto.graph.doc_string = "graph doc"
    out, _ = _clean(proto)
    assert {p.key: p.value for p in out.metadata_props} == {"labels": "cat,dog"}
    assert (out.doc_string, out.producer_name, out.producer_version) == ("doc", "paddle2onnx", "1.2")
    assert out.graph.doc_string == "graph doc"
    assert_parity(proto, out, {"x": _x((1, 3, 8, 8))}, atol=1e-4)


def test_field_note_7_if_branches_keep_outer_scope_weight():
    w = np.arange(3, dtype=np.float32)
    then_g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["o1"], name="then_add")], "then", [],
                               [helper.make_tensor_value_info("o1", FLOAT, [3])])
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "w"], ["o2"], name="else_sub")], "else", [],
                               [helper.make_tensor_value_info("o2", FLOAT, [3])])
    nodes = [helper.make_node("Identity", ["w0"], ["w"], name="id_w"),
             helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    proto = make_model(nodes, [("x", FLOAT, [3]), ("c", onnx.TensorProto.BOOL, [])], [("y", FLOAT, [3])],
                       [init("w0", w)])
    out, _ = _clean(proto)
    for cond in (True, False):
        assert_parity(proto, out, {"x": _x((3,)), "c": np.array(cond)})


def test_field_note_8_legacy_initializer_inputs_not_folded_and_overridable():
    nodes = [helper.make_node("Mul", ["k", "k"], ["k2"], name="sq"),
             helper.make_node("Add", ["x", "k2"], ["y"], name="add")]
    proto = make_model(nodes, [("x", FLOAT, [3]), ("k", FLOAT, [3])], [("y", FLOAT, [3])],
                       [init("k", np.ones(3, np.float32))], opset=9, ir_version=3)
    proto.ir_version = 3
    out, _ = _clean(proto)
    assert "Mul" in [n.op_type for n in out.graph.node]
    assert "k" in [i.name for i in out.graph.input]
    assert_parity(proto, out, {"x": _x((3,))})  # onnxruntime refuses to override k in an IR-3 model
    feeds = {"x": _x((3,)), "k": np.array([2, 3, 4], np.float32)}
    assert out.ir_version >= 4  # written overridable: the value fed for k is used
    np.testing.assert_allclose(run_model(out, feeds)[0], feeds["x"] + feeds["k"] ** 2, atol=1e-6)


def test_field_note_9_qdq_never_folded():
    q = numpy_helper.from_array(np.array([1, -2, 3], np.int8), "wq")
    nodes = [helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["w"], name="dq"),
             helper.make_node("Add", ["x", "w"], ["y"], name="add")]
    proto = make_model(nodes, [("x", FLOAT, [3])], [("y", FLOAT, [3])],
                       [q, init("s", np.array(0.5, np.float32)), init("z", np.array(0, np.int8))])
    out, records = _clean(proto)
    assert "DequantizeLinear" in [n.op_type for n in out.graph.node]
    assert any("DequantizeLinear" in reason or "quant" in reason.lower()
               for r in records for _, reason in getattr(r, "skipped", []))
    assert_parity(proto, out, {"x": _x((3,))})


def test_field_note_10_external_data_model_cleaned(tmp_path):
    proto = conv_bn_relu(channels=16)
    path = tmp_path / "m.onnx"
    onnx.save(onnx.ModelProto.FromString(proto.SerializeToString()), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    assert (tmp_path / "m.onnx.data").exists()
    out, _ = _clean(Model.load(path))
    assert "BatchNormalization" not in [n.op_type for n in out.graph.node]
    assert_parity(proto, out, {"x": _x((1, 3, 8, 8))}, atol=1e-4)


def test_field_note_3_shape_inference_failure_still_cleans(monkeypatch):
    nodes = [helper.make_node("Identity", ["x"], ["x1"], name="id"),
             helper.make_node("Mul", ["two", "two"], ["four"], name="const_mul"),
             helper.make_node("Add", ["x1", "four"], ["y"], name="add")]
    proto = make_model(nodes, [("x", FLOAT, ["N", 3])], [("y", FLOAT, ["N", 3])],
                       [init("two", np.full(3, 2, np.float32))])

    def fail(*args, **kwargs):
        raise onnx.shape_inference.InferenceError("[ShapeInferenceError] simulated failure")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", fail)
    out, _ = _clean(proto)
    monkeypatch.undo()
    assert [n.op_type for n in out.graph.node] == ["Add"]
    assert_parity(proto, out, {"x": _x((2, 3))})


# Through the public API (parity gate included)

def test_field_note_3_optimize_leaves_no_files_when_shape_inference_fails(tmp_path, monkeypatch):
    """onnx shape inference raises (simulated) on a model with an Identity and a foldable constant."""
    nodes = [helper.make_node("Identity", ["x"], ["x1"], name="id"),
             helper.make_node("Mul", ["two", "two"], ["four"], name="const_mul"),
             helper.make_node("Relu", ["x1"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "four"], ["y"], name="add")]
    proto = make_model(nodes, [("x", FLOAT, ["N", 3])], [("y", FLOAT, ["N", 3])],
                       [init("two", np.full(3, 2, np.float32))])
    # Make onnx's shape inference raise for every call, as it does on many real models.
    def fail(*args, **kwargs):
        raise onnx.shape_inference.InferenceError("[ShapeInferenceError] simulated failure")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", fail)
    monkeypatch.chdir(tmp_path)
    out, report = onnxslim_kit.optimize(proto)
    assert [n.op_type for n in out.graph.node] == ["Relu", "Add"] and report.parity.ok
    assert os.listdir(tmp_path) == []  # no temp model or weight copy left in the working directory
    monkeypatch.undo()
    assert_parity(proto, out, {"x": rng(0).standard_normal((2, 3)).astype(np.float32)})


def test_field_note_5_parity_gate_compares_observed_shapes():
    """Declared [1, seqlen], produced [T, 1, C]: the rewrite must keep what is produced."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], name="t", perm=[1, 0, 2]),
             helper.make_node("Identity", ["t"], ["y"], name="id")]
    proto = make_model(nodes, [("x", FLOAT, [1, 5, 4])], [("y", FLOAT, [1, "seqlen"])])
    x = rng(1).standard_normal((1, 5, 4)).astype(np.float32)
    assert run_model(proto, {"x": x})[0].shape == (5, 1, 4)  # the declaration is wrong
    out, report = onnxslim_kit.optimize(proto, calibration={"x": x})
    assert report.parity.ok
    assert report.parity.outputs[0].ref_shape == report.parity.outputs[0].cand_shape
    assert run_model(out, {"x": x})[0].shape == (5, 1, 4)
    np.testing.assert_array_equal(run_model(out, {"x": x})[0], run_model(proto, {"x": x})[0])
