"""metrics.model_stats: params, MACs per node (hand-computed), bytes on disk, symbolic-dim defaults."""

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from builders import FLOAT, conv_bn_relu, init, make_model, rng, run_model
from onnxslim_kit.metrics import model_stats, node_macs

# conv_bn_relu(): Conv 3->8, 3x3, pad 1 on 8x8 -> [N, 8, 8, 8]; Gemm 8 -> 10.
CONV_MACS_PER_BATCH = 8 * 8 * 8 * 3 * 3 * 3
GEMM_MACS_PER_BATCH = 8 * 10
CONV_BN_RELU_PARAMS = (8 * 3 * 3 * 3 + 8) + 4 * 8 + (10 * 8 + 10)


def _checked(model):
    onnx.checker.check_model(model, full_check=True)
    return model


def test_metrics_conv_gemm_macs_with_default_batch():
    model = _checked(conv_bn_relu())
    stats = model_stats(model)
    # symbolic batch "N" is not pinned: the documented default batch 1 is used and reported
    assert stats.assumed_shapes == {"x": [1, 3, 8, 8]}
    assert stats.macs_per_node == {"conv": CONV_MACS_PER_BATCH, "fc": GEMM_MACS_PER_BATCH}
    assert stats.macs == CONV_MACS_PER_BATCH + GEMM_MACS_PER_BATCH
    assert stats.params == CONV_BN_RELU_PARAMS
    assert stats.nodes == 6 and stats.op_histogram["Conv"] == 1 and stats.op_histogram["Gemm"] == 1
    assert stats.opset == 17 and stats.unresolved == []
    assert stats.inputs == {"x": ["N", 3, 8, 8]}


def test_metrics_pinned_batch_scales_macs():
    stats = model_stats(_checked(conv_bn_relu()), {"x": [4, 3, 8, 8]})
    assert stats.assumed_shapes == {}
    assert stats.macs == 4 * (CONV_MACS_PER_BATCH + GEMM_MACS_PER_BATCH)


def test_metrics_attention_sized_batched_matmul():
    # q [B, H, S, D] x k^T [B, H, D, S] -> scores [B, H, S, S]; scores x v -> [B, H, S, D]
    b, h, s, d = 2, 4, 16, 8
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
        helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"], name="pv"),
    ]
    shape = [b, h, s, d]
    model = _checked(make_model(nodes, [("q", FLOAT, shape), ("k", FLOAT, shape), ("v", FLOAT, shape)],
                                [("ctx", FLOAT, shape)]))
    stats = model_stats(model)
    assert stats.macs_per_node == {"qk": b * h * s * s * d, "pv": b * h * s * d * s}
    assert stats.params == 0
    r = rng(1)
    feeds = {n: r.standard_normal(shape).astype(np.float32) for n in "qkv"}
    assert run_model(model, feeds)[0].shape == tuple(shape)


def test_metrics_symbolic_seq_dim_uses_documented_default():
    # x [batch, seq, 8] x W [8, 6]: batch -> 1, seq -> 16 (calibration defaults)
    w = init("w", rng().standard_normal((8, 6)).astype(np.float32))
    model = _checked(make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                                [("x", FLOAT, ["batch", "seq", 8])], [("y", FLOAT, ["batch", "seq", 6])], [w]))
    stats = model_stats(model)
    assert stats.assumed_shapes == {"x": [1, 16, 8]}
    assert stats.macs_per_node == {"mm": 1 * 16 * 8 * 6}
    assert model_stats(model, {"x": [3, 5, 8]}).macs == 3 * 5 * 8 * 6


def test_metrics_conv_transpose_and_gemm_trans_a():
    r = rng(2)
    wt = init("wt", r.standard_normal((4, 2, 3, 3)).astype(np.float32))  # C_in 4 -> C_out 2, 3x3
    a = init("a", r.standard_normal((5, 1)).astype(np.float32))  # transA: [K=5, M=1] -> A^T [1, 5]
    bmat = init("bmat", r.standard_normal((5, 7)).astype(np.float32))
    nodes = [
        helper.make_node("ConvTranspose", ["x", "wt"], ["up"], name="deconv", strides=[2, 2]),
        helper.make_node("Gemm", ["a", "bmat"], ["g"], name="gemm_ta", transA=1),
    ]
    model = _checked(make_model(nodes, [("x", FLOAT, [1, 4, 5, 5])], [("up", FLOAT, None), ("g", FLOAT, [1, 7])],
                                [wt, a, bmat]))
    stats = model_stats(model)
    assert stats.macs_per_node["deconv"] == (1 * 4 * 5 * 5) * 2 * 3 * 3
    assert stats.macs_per_node["gemm_ta"] == 1 * 7 * 5
    assert stats.outputs["up"] == [1, 2, 11, 11]


def test_metrics_counts_constant_node_weights_as_params():
    w = rng(3).standard_normal((4, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], name="w_const", value=numpy_helper.from_array(w, "w")),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    model = _checked(make_model(nodes, [("x", FLOAT, [2, 4])], [("y", FLOAT, [2, 3])]))
    stats = model_stats(model)
    assert stats.params == 12
    assert stats.macs_per_node == {"mm": 2 * 3 * 4}


def test_metrics_unresolved_when_dims_cannot_be_inferred():
    # Reshape to a runtime-computed shape: the MatMul's input rank is unknown to shape inference
    w = init("w", rng(4).standard_normal((4, 4)).astype(np.float32))
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["xr"], name="reshape"),
        helper.make_node("MatMul", ["xr", "w"], ["y"], name="mm"),
    ]
    model = _checked(make_model(nodes, [("x", FLOAT, [2, 4]), ("shape", TensorProto.INT64, [2])],
                                [("y", FLOAT, None)], [w]))
    stats = model_stats(model, observe=False)
    assert stats.unresolved == ["mm"] and stats.macs == 0


def test_metrics_observes_shapes_that_inference_cannot_propagate():
    # head dim = hidden / 2 computed by Div + Cast at run time: onnx data propagation stops there,
    # one onnxruntime run on the pinned/assumed shapes resolves the attention MatMul
    i64 = TensorProto.INT64
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"], name="shape"),
        helper.make_node("Gather", ["shp", "two"], ["hidden"], name="g_hidden", axis=0),
        helper.make_node("Cast", ["hidden"], ["hidden_f"], name="cast_f", to=TensorProto.FLOAT),
        helper.make_node("Div", ["hidden_f", "heads_f"], ["hd_f"], name="div"),
        helper.make_node("Cast", ["hd_f"], ["hd"], name="cast_i", to=i64),
        helper.make_node("Unsqueeze", ["hd", "zero"], ["hd1"], name="unsq"),
        helper.make_node("Concat", ["lead", "hd1"], ["new_shape"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "new_shape"], ["xr"], name="reshape"),  # [B, S, 2, D/2]
        helper.make_node("Transpose", ["xr"], ["q"], name="tq", perm=[0, 2, 1, 3]),  # [B, 2, S, D/2]
        helper.make_node("Transpose", ["xr"], ["kt"], name="tk", perm=[0, 2, 3, 1]),  # [B, 2, D/2, S]
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
    ]
    inits = [init("two", np.array(2, np.int64)), init("heads_f", np.array(2.0, np.float32)),
             init("zero", np.array([0], np.int64)), init("lead", np.array([0, 0, 2], np.int64))]
    model = _checked(make_model(nodes, [("x", FLOAT, ["B", "S", 8])], [("scores", FLOAT, None)], inits))
    assert model_stats(model, observe=False).unresolved == ["qk"]
    stats = model_stats(model, {"x": [1, 16, 8]})
    assert stats.unresolved == [] and stats.macs_per_node == {"qk": 1 * 2 * 16 * 16 * 4}
    x = rng(7).standard_normal((1, 16, 8)).astype(np.float32)
    assert run_model(model, {"x": x})[0].shape == (1, 2, 16, 16)


def test_metrics_file_bytes_include_external_data(tmp_path):
    model = conv_bn_relu(channels=64)
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=0)
    stats = model_stats(path)
    expected = path.stat().st_size + (tmp_path / "ext.data").stat().st_size
    assert stats.bytes == expected and (tmp_path / "ext.data").stat().st_size > 64 * 27 * 4
    assert stats.params == model_stats(model).params


def test_metrics_to_dict_is_json_serializable():
    stats = model_stats(conv_bn_relu())
    again = json.loads(json.dumps(stats.to_dict()))
    assert again["macs"] == stats.macs and again["macs_per_node"]["conv"] == CONV_MACS_PER_BATCH


def test_metrics_node_macs_zero_for_uncounted_ops_and_none_without_shapes():
    relu = helper.make_node("Relu", ["a"], ["b"])
    assert node_macs(relu, {"a": [1, 4], "b": [1, 4]}) == 0
    mm = helper.make_node("MatMul", ["a", "w"], ["b"])
    assert node_macs(mm, {"a": [1, "s", 4], "b": [1, "s", 3]}) is None
    assert node_macs(mm, {"a": [2, 3, 4], "b": [2, 3, 5]}) == 2 * 3 * 5 * 4


def test_metrics_constant_nodes_are_never_unresolved():
    # a Constant has no inputs: it costs no MACs and must not be listed as unresolved
    nodes = [
        helper.make_node("Constant", [], ["c"], name="c_const", value=numpy_helper.from_array(np.ones(4, np.float32))),
        helper.make_node("Add", ["x", "c"], ["y"], name="add"),
    ]
    model = _checked(make_model(nodes, [("x", FLOAT, [2, 4])], [("y", FLOAT, [2, 4])]))
    stats = model_stats(model)
    assert stats.unresolved == [] and stats.macs == 0 and stats.params == 4
    x = rng(6).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(run_model(model, {"x": x})[0], x + 1, atol=1e-6)


def test_paired_ratio_compares_within_rounds():
    """A burst of load in the second round slows both variants there: the per-round comparison still
    says 2x, where pooled medians across rounds would not."""
    from onnxslim_kit.runtime import paired_ratio, round_medians

    a = [2.0, 2.1, 1.9] + [20.0, 21.0, 19.0] + [2.0, 2.0, 2.2]
    b = [1.0, 1.1, 0.9] + [10.0, 10.5, 9.5] + [1.0, 1.0, 1.1]
    assert round_medians(a, 3) == [2.0, 20.0, 2.0]
    assert paired_ratio(a, b, 3) == 2.0
    # One sustained burst that hit only the candidate's round is outvoted by the other rounds.
    c = [2.0, 2.0, 2.0] + [9.0, 9.0, 9.0] + [2.0, 2.0, 2.0]
    d = [1.0, 1.0, 1.0] * 3
    assert paired_ratio(c, d, 3) == 2.0
