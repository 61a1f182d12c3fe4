"""passes/quantize.py: quantize-dynamic."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from builders import FLOAT, init, make_model, rng, run_model
from onnxslim_kit.errors import InputError
from onnxslim_kit.ir import Model
from onnxslim_kit.pass_base import PassContext
from onnxslim_kit.pipeline import Pipeline, build_pass
from passes.quantize import quantize_weight_symmetric


def _mlp(shared=False):
    r = rng(0)
    inits = [init("w1", (r.standard_normal((64, 128)) * 0.1).astype(np.float32)),
             init("w2", (r.standard_normal((32, 128)) * 0.1).astype(np.float32)),
             init("b2", r.standard_normal(32).astype(np.float32)),
             init("s", np.array([-1, 128], np.int64)),
             init("tiny", r.standard_normal((4, 4)).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["hr"], name="relu"),
             helper.make_node("Reshape", ["hr", "s"], ["h2"], name="rs"),
             helper.make_node("Gemm", ["h2", "w2", "b2"], ["g"], name="gemm", transB=1),
             helper.make_node("Transpose", ["g"], ["g_t"], name="tr", perm=[1, 0]),
             helper.make_node("MatMul", ["g", "g_t"], ["att"], name="act_x_act")]
    outputs = [("att", FLOAT, None)]
    if shared:  # a second MatMul reading the same weight: quantized once, shared
        nodes.append(helper.make_node("MatMul", ["x", "w1"], ["h_again"], name="mm_tied"))
        outputs.append(("h_again", FLOAT, None))
    return make_model(nodes, [("x", FLOAT, ["B", 5, 64])], outputs, inits)


def _run(proto, spec="quantize-dynamic"):
    model, records = Pipeline.from_specs([spec]).run(Model.from_proto(proto), PassContext())
    out = model.to_proto()
    onnx.checker.check_model(out, full_check=True)
    return out, records[0]


def _cosine(a, b):
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


def test_quantize_weight_symmetric_per_channel_roundtrip():
    w = np.array([[1.0, -0.5], [-2.0, 0.25], [0.0, 0.0]], np.float32)
    q, scale = quantize_weight_symmetric(w, axis=1)
    np.testing.assert_allclose(scale, [2 / 127, 0.5 / 127])
    assert q.dtype == np.int8 and q[1, 0] == -127 and q[0, 1] == -127
    assert np.abs(q * scale - w).max() <= scale.max() / 2 + 1e-7
    q7, s7 = quantize_weight_symmetric(w, axis=None, reduce_range=True)
    assert np.abs(q7).max() == 63 and s7.shape == (1,)


def test_quantize_dynamic_rewrites_matmul_and_gemm_and_ort_fuses_them(tmp_path):
    proto = _mlp()
    out, rec = _run(proto)
    assert rec.stats["nodes_quantized"] == 2
    assert ("act_x_act", "second input is not a constant weight (activation x activation MatMul)") in rec.skipped
    assert rec.stats["weight_bytes_after"] < rec.stats["weight_bytes_before"] / 3
    x = rng(1).standard_normal((2, 5, 64)).astype(np.float32)
    ref = run_model(proto, {"x": x})[0]
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    got = ort.InferenceSession(out.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.shape == ref.shape
    assert _cosine(ref, got) > 0.999
    fused = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    # onnxruntime turns both rewrites into its integer kernel; no float MatMul/Gemm is left for them.
    assert fused.count("DynamicQuantizeMatMul") + fused.count("MatMulIntegerToFloat") == 2
    assert "Gemm" not in fused


def test_quantize_dynamic_tied_weight_is_quantized_once():
    out, rec = _run(_mlp(shared=True))
    assert rec.stats["nodes_quantized"] == 3 and rec.stats["weights_quantized"] == 2
    users = [n for n in out.graph.node if n.op_type == "MatMulInteger" and n.input[1].startswith("w1")]
    assert len(users) == 2 and users[0].input[1] == users[1].input[1]


def test_quantize_dynamic_skips_small_and_excluded_with_reason():
    out, rec = _run(_mlp(), "quantize-dynamic:exclude=mm,min_elements=5000")
    assert ("mm", "excluded by option") in rec.skipped
    assert ("gemm", "weight has 4096 elements < min_elements=5000") in rec.skipped
    assert not rec.modified
    assert [n.op_type for n in out.graph.node].count("MatMulInteger") == 0


def test_quantize_dynamic_rejects_unknown_op_type():
    with pytest.raises(InputError, match="unsupported Conv"):
        build_pass("quantize-dynamic", {"op_types": "Conv"})


def test_quantize_dynamic_keeps_graph_output_names():
    r = rng(2)
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [("x", FLOAT, [3, 64])],
                       [("y", FLOAT, [3, 32])], [init("w", r.standard_normal((64, 32)).astype(np.float32))])
    out, rec = _run(proto)
    assert [o.name for o in out.graph.output] == ["y"]
    x = r.standard_normal((3, 64)).astype(np.float32)
    assert _cosine(run_model(proto, {"x": x})[0], run_model(out, {"x": x})[0]) > 0.999
