"""Every registered pass on a model with If and Loop subgraphs that read outer-scope values: the result
is valid, computes the same outputs (within the pass's own bound), and the subgraphs survive."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxslim_kit
from builders import FLOAT, init, make_model, rng, run_model
from onnxslim_kit.registry import available_passes

INT64 = TensorProto.INT64


def control_flow_model():
    r = rng(0)
    w = (r.standard_normal((64, 64)) * 0.1).astype(np.float32)
    then_g = helper.make_graph([helper.make_node("MatMul", ["h", "w_then"], ["t_out"], name="then_mm")], "then", [],
                               [helper.make_tensor_value_info("t_out", FLOAT, ["N", 64])],
                               initializer=[init("w_then", w)])
    else_g = helper.make_graph([helper.make_node("Neg", ["h"], ["e_out"], name="else_neg")], "else", [],
                               [helper.make_tensor_value_info("e_out", FLOAT, ["N", 64])])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
         helper.make_node("MatMul", ["acc_in", "w_loop"], ["mm"], name="body_mm"),  # outer-scope weight
         helper.make_node("Add", ["mm", "h"], ["acc_out"], name="body_add")],        # outer-scope activation
        "body",
        [helper.make_tensor_value_info("i", INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", FLOAT, ["N", 64])])
    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["h0"], name="proj"),
        helper.make_node("Relu", ["h0"], ["h"], name="relu"),
        helper.make_node("Identity", ["h"], ["h_alias"], name="alias"),
        helper.make_node("If", ["cond"], ["branch"], name="branch", then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trips", "", "h_alias"], ["looped"], name="loop", body=body),
        helper.make_node("Add", ["branch", "looped"], ["y"], name="join"),
    ]
    inits = [init("w_in", (r.standard_normal((32, 64)) * 0.2).astype(np.float32)),
             init("w_loop", (r.standard_normal((64, 64)) * 0.1).astype(np.float32)),
             init("trips", np.array(3, np.int64))]
    return make_model(nodes, [("x", FLOAT, ["N", 32]), ("cond", TensorProto.BOOL, [])], [("y", FLOAT, ["N", 64])],
                      inits)


PASSES = sorted(name for name in available_passes() if not name.startswith("test-"))


@pytest.mark.parametrize("name", PASSES)
def test_every_pass_on_if_and_loop_model(name):
    proto = control_flow_model()
    onnx.checker.check_model(proto, full_check=True)
    x = rng(1).standard_normal((4, 32)).astype(np.float32)
    feeds = [{"x": x, "cond": np.array(True)}, {"x": x, "cond": np.array(False)}]
    spec = {"svd": "svd:rank_ratio=0.25,min_size=1024", "quantize-weights": "quantize-weights:min_elements=1024"}
    out, report = onnxslim_kit.optimize(proto, passes=[spec.get(name, name)], calibration=feeds,
                                        tolerance={"cosine": 0.95} if report_is_lossy(name) else None)
    assert report.parity.ok
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for n in out.graph.node]
    assert "If" in ops and "Loop" in ops
    for feed in feeds:
        ref, got = run_model(proto, feed)[0], run_model(out, feed)[0]
        assert ref.shape == got.shape
        cos = float((ref * got).sum() / (np.linalg.norm(ref) * np.linalg.norm(got)))
        assert cos > 0.95


def report_is_lossy(name):
    from onnxslim_kit.registry import get_pass

    return get_pass(name).tolerance.lossy


def test_cleanup_on_control_flow_keeps_outer_scope_values_and_says_so():
    out, report = onnxslim_kit.optimize(control_flow_model())
    rec = report.passes[0]
    assert ("branch", "cleanup: nodes inside its subgraphs are left untouched") in rec.skipped
    assert ("loop", "cleanup: nodes inside its subgraphs are left untouched") in rec.skipped
    from onnxslim_kit.ir import iter_model_tensors

    names = [t.name for t in iter_model_tensors(out)]
    assert names.count("w_loop") == 1  # read only inside the Loop body: kept once, same name
