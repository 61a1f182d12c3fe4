"""FIELD-NOTES.md items that concern cleanup, one test each. Items covered elsewhere point there:
1 Constant-node weights: test_cleanup.py::test_fold_batchnorm_with_constant_node_weights_paddle_style and
  test_real_models.py::test_real_model_paddle_style_constant_weights_get_folded;
2 opset 11/12: test_cleanup.py::test_cleanup_opsets; 4 stale value_info:
  test_ir.py::test_ir_export_drops_stale_value_info_and_reinfers; 6 metadata:
  test_cleanup.py::test_cleanup_preserves_metadata; 7 control flow:
  test_cleanup.py::test_cleanup_leaves_control_flow_bodies_and_keeps_outer_scope_values;
  8 legacy initializer inputs: test_cleanup.py::test_fold_constants_does_not_fold_legacy_initializer_inputs;
  9 Q/DQ: test_cleanup.py::test_fold_constants_never_folds_dequantize_linear; 10 external data:
  test_ir.py::test_ir_external_data_roundtrip_and_atomic_save and the dynamo model in test_real_models.py.
"""

import os

import numpy as np
import onnx
from onnx import helper

import onnxslim_kit
from builders import FLOAT, assert_parity, init, make_model, rng, run_model


def test_field_note_3_shape_inference_failure_does_not_stop_cleanup(tmp_path, monkeypatch):
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


def test_field_note_5_wrong_declared_output_shape_is_not_trusted():
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
