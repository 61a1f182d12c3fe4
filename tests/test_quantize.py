"""passes/quantize.py: quantize-dynamic."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from builders import FLOAT, fused_ops, init, make_model, rng, run_model
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


# ---------------------------------------------------------------- quantize-weights

from passes.quantize import dequantize_blocked, quantize_blocked  # noqa: E402


def _fc(opset):
    r = rng(3)
    inits = [init("w1", (r.standard_normal((128, 96)) * 0.1).astype(np.float32)),
             init("w2", (r.standard_normal((64, 96)) * 0.1).astype(np.float32)),
             init("b2", r.standard_normal(64).astype(np.float32)),
             init("s", np.array([-1, 96], np.int64))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
             helper.make_node("Reshape", ["h", "s"], ["h2"], name="rs"),
             helper.make_node("Gemm", ["h2", "w2", "b2"], ["y"], name="gemm", transB=1)]
    return make_model(nodes, [("x", FLOAT, ["B", 4, 128])], [("y", FLOAT, None)], inits, opset=opset)


def test_quantize_blocked_roundtrip_error_bounds():
    w = rng(0).standard_normal((70, 5)).astype(np.float32)  # K not a multiple of the block
    for bits, symmetric in [(4, True), (4, False), (8, True), (2, False)]:
        q, scale, zero = quantize_blocked(w, bits=bits, block_size=32, symmetric=symmetric)
        assert scale.shape == (3, 5) and (zero is None) == symmetric
        err = np.abs(dequantize_blocked(q, scale, zero, 32) - w)
        step = scale[np.arange(70) // 32]
        assert np.all(err <= step / 2 + 1e-6)  # rounding error at most half a step


@pytest.mark.parametrize("opset, spec, fmt, min_cos", [
    (17, "quantize-weights", "MatMulNBits", 0.99),
    (21, "quantize-weights", "DequantizeLinear", 0.99),
    (21, "quantize-weights:bits=8", "DequantizeLinear", 0.9999),
    (21, "quantize-weights:symmetric=false", "DequantizeLinear", 0.99),
    (25, "quantize-weights:bits=2,symmetric=false", "DequantizeLinear", 0.85),
])
def test_quantize_weights_formats_run_and_fuse(tmp_path, opset, spec, fmt, min_cos):
    proto = _fc(opset)
    model, records = Pipeline.from_specs([spec + ("," if ":" in spec else ":") + "min_elements=16"]).run(Model.from_proto(proto), PassContext())
    out = model.to_proto()
    onnx.checker.check_model(out, full_check=True)
    rec = records[0]
    assert rec.stats["nodes_quantized"] == 2
    ops = [n.op_type for n in out.graph.node]
    assert fmt in ops and "Gemm" not in ops
    x = rng(4).standard_normal((2, 4, 128)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    got = ort.InferenceSession(out.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert _cosine(run_model(proto, {"x": x})[0], got) > min_cos
    # onnxruntime runs every quantized weight through its n-bit kernel: no float MatMul left.
    fused = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    assert fused.count("MatMulNBits") == 2 and "MatMul" not in fused
    bits = int(spec.partition("bits=")[2][:1] or 4)
    assert rec.stats["weight_bytes_after"] < rec.stats["weight_bytes_before"] * (bits / 32 + 0.1)


def test_quantize_weights_int2_needs_opset_25():
    with pytest.raises(InputError, match="^quantize-weights: bits=2 needs opset >= 25"):
        Pipeline.from_specs(["quantize-weights:bits=2"]).run(Model.from_proto(_fc(21)), PassContext())


def test_quantize_weights_option_errors():
    with pytest.raises(InputError, match="power of two"):
        build_pass("quantize-weights", {"block_size": "24"})
    with pytest.raises(InputError, match="expected one of 4, 8, 2"):
        build_pass("quantize-weights", {"bits": "3"})


# ---------------------------------------------------------------- fp16

from builders import conv_bn_relu  # noqa: E402


def _attention_block():
    """LayerNorm -> MatMul -> Softmax -> MatMul with a residual Add: fp16 core, fp32 Softmax/LayerNorm."""
    r = rng(5)
    inits = [init("wq", (r.standard_normal((16, 16)) * 0.2).astype(np.float32)),
             init("g", np.ones(16, np.float32)), init("b", np.zeros(16, np.float32)),
             init("big", np.array([1e6], np.float32))]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], name="ln", axis=-1),
             helper.make_node("MatMul", ["ln", "wq"], ["q"], name="proj"),
             helper.make_node("Transpose", ["q"], ["kt"], name="tr", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
             helper.make_node("Div", ["scores", "big"], ["scaled"], name="div"),
             helper.make_node("Softmax", ["scaled"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "q"], ["ctx"], name="pv"),
             helper.make_node("Add", ["ctx", "x"], ["y"], name="residual"),
             helper.make_node("Shape", ["y"], ["y_shape"], name="shape")]
    return make_model(nodes, [("x", FLOAT, ["B", 6, 16])],
                      [("y", FLOAT, None), ("y_shape", onnx.TensorProto.INT64, None)], inits)


@pytest.mark.parametrize("builder, feeds", [
    (conv_bn_relu, {"x": (2, 3, 8, 8)}),
    (_attention_block, {"x": (2, 6, 16)}),
])
def test_fp16_converts_compute_and_keeps_float32_interface(builder, feeds):
    proto = builder()
    model, records = Pipeline.from_specs(["fp16"]).run(Model.from_proto(proto), PassContext())
    out = model.to_proto()
    onnx.checker.check_model(out, full_check=True)
    rec = records[0]
    assert rec.stats["nodes_fp16"] >= 3
    assert [(i.name, i.type.tensor_type.elem_type) for i in out.graph.input] == \
        [(i.name, i.type.tensor_type.elem_type) for i in proto.graph.input]
    assert [(o.name, o.type.tensor_type.elem_type) for o in out.graph.output] == \
        [(o.name, o.type.tensor_type.elem_type) for o in proto.graph.output]
    assert all(t.data_type != onnx.TensorProto.FLOAT or t.name in ("g", "b")
               for t in out.graph.initializer)  # weights are float16 (LayerNorm's stay float32)
    x = {k: rng(6).standard_normal(v).astype(np.float32) for k, v in feeds.items()}
    ref, got = run_model(proto, x), run_model(out, x)
    for a, b in zip(ref, got):
        assert a.shape == b.shape and a.dtype == b.dtype
        if a.dtype == np.float32:
            assert _cosine(a, b) > 0.9999
        else:
            np.testing.assert_array_equal(a, b)


def test_fp16_keeps_listed_ops_and_says_so():
    model, records = Pipeline.from_specs(["fp16"]).run(Model.from_proto(_attention_block()), PassContext())
    assert ("softmax", "kept in float32 by option") in records[0].skipped
    assert ("ln", "kept in float32 by option") in records[0].skipped
    ops = {n.name: n for n in model.to_proto().graph.node}
    assert ops["softmax"].input[0].endswith("_fp32")  # fed by a cast back to float32


def test_fp16_clips_out_of_range_constants_with_warning():
    model, records = Pipeline.from_specs(["fp16"]).run(Model.from_proto(_attention_block()), PassContext())
    assert records[0].stats["weights_clipped"] == 1
    assert any("beyond +-65504" in w for w in records[0].warnings)


# ---------------------------------------------------------------- quantize-int8 (static QDQ)

from pathlib import Path  # noqa: E402

import onnxslim_kit  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.mark.slow
@pytest.mark.parametrize("name, min_cos", [("resnet_tiny", 0.999), ("mobilenetv2_tiny", 0.999),
                                           ("mobilenetv3_tiny", 0.999), ("digits_cnn", 0.999),
                                           ("det_head_tiny", 0.999)])
def test_quantize_int8_cnn_becomes_integer_kernels(tmp_path, name, min_cos):
    proto, report = onnxslim_kit.optimize(MODELS / f"{name}.onnx", passes=["cleanup", "quantize-int8"],
                                          calibration=MODELS / f"{name}.calib.npz")
    rec = report.passes[1]
    assert rec.stats["nodes_quantized"] >= 3 and rec.stats["activations_folded"] >= 1
    assert rec.stats["int8_mac_share"] > 0.95 and rec.stats["cpu_int8_dot_product"] in (0, 1)
    assert report.parity.ok and all(o.cosine > min_cos for o in report.parity.outputs)
    onnx.checker.check_model(proto, full_check=True)
    fused = fused_ops(proto, tmp_path)
    assert any(t.data_type == onnx.TensorProto.INT32 for t in proto.graph.initializer)  # int32 biases
    convs = sum(1 for n in proto.graph.node if n.op_type == "Conv")
    # every quantized Conv runs as QLinearConv: no DQ -> float Conv left
    assert fused.count("QLinearConv") == convs and "Conv" not in fused
    # no float island anywhere (HardSwish, SE gates, Sigmoid heads, Flatten included): one Q per graph
    # input, one DQ per graph output except a Gemm head's (onnxruntime's QGemm writes float logits
    # itself), and no Transpose back to NCHW before a Flatten
    producer = {o: n for n in proto.graph.node for o in n.output}
    heads = sum(1 for o in proto.graph.output if producer[o.name].op_type in ("Gemm", "MatMul"))
    assert heads == (0 if name == "det_head_tiny" else 1)
    assert fused.count("QuantizeLinear") == len(proto.graph.input)
    assert fused.count("DequantizeLinear") == len(proto.graph.output) - heads
    assert fused.count("Transpose") == len(proto.graph.input) + len(proto.graph.output) - \
        sum(1 for n in proto.graph.node if n.op_type == "Flatten")


@pytest.mark.slow
def test_quantize_int8_bert_matmuls_become_qlinearmatmul(tmp_path):
    proto, report = onnxslim_kit.optimize(MODELS / "bert_tiny.onnx", passes=["cleanup", "quantize-int8"],
                                          calibration=MODELS / "bert_tiny.calib.npz")
    assert all(o.cosine >= 0.99 for o in report.parity.outputs)  # the bar for static int8 on BERT
    fused = fused_ops(proto, tmp_path)
    weight_matmuls = report.passes[1].stats["nodes_quantized"]
    assert fused.count("QLinearMatMul") + fused.count("MatMulIntegerToFloat") + fused.count("QGemm") >= weight_matmuls - 1
    assert ("/MatMul", "weight is not a constant float32 tensor") in report.passes[1].skipped or \
        any("weight is not a constant" in r for _, r in report.passes[1].skipped)


def test_quantize_int8_needs_calibration_and_warns_on_random(tmp_path):
    proto, report = onnxslim_kit.optimize(conv_bn_relu(), passes=["cleanup", "quantize-int8"])
    assert any("random" in w for w in report.warnings)
    rec = report.passes[1]
    assert rec.stats["activations_folded"] == 1  # the Relu after the conv is folded into its range
    assert "Relu" not in [n.op_type for n in proto.graph.node]


def test_quantize_int8_opset12_falls_back_to_per_tensor_and_says_so():
    proto, report = onnxslim_kit.optimize(conv_bn_relu(opset=12), passes=["cleanup", "quantize-int8"])
    assert any("per tensor" in w for w in report.passes[1].warnings)
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear":
            assert all(a.name != "axis" for a in node.attribute)
    onnx.checker.check_model(proto, full_check=True)


def test_quantize_int8_int8_symmetric_keeps_relu():
    proto, report = onnxslim_kit.optimize(conv_bn_relu(), passes=["cleanup", "quantize-int8:activation_type=int8"])
    assert "Relu" in [n.op_type for n in proto.graph.node]
    zps = [t for t in proto.graph.initializer if t.name.endswith("_zero_point") and "conv_out" in t.name]
    assert zps and all(t.data_type == onnx.TensorProto.INT8 for t in zps)


def test_quantize_int8_bias_overflow_raises_weight_scale():
    proto = conv_bn_relu()
    for t in proto.graph.initializer:
        if t.name == "conv.b":
            t.CopyFrom(onnx.numpy_helper.from_array(np.full(8, 1e9, np.float32), "conv.b"))
    # a 1e9 bias makes the conv output range useless for uint8 anyway: only the bias handling is checked
    out, report = onnxslim_kit.optimize(proto, passes=["quantize-int8"], check="off")
    assert report.passes[0].stats["bias_scales_raised"] > 0
    onnx.checker.check_model(out, full_check=True)
    runtime_out = run_model(out, {"x": rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)})[0]
    assert np.all(np.isfinite(runtime_out))
    for t in out.graph.initializer:
        if t.data_type == onnx.TensorProto.INT32:
            assert np.abs(onnx.numpy_helper.to_array(t).astype(np.int64)).max() < 2 ** 31 - 1


def test_quantize_int8_calibration_methods_clip_ranges_from_a_histogram():
    from passes.quantize import _mse_threshold_bins

    hist = np.zeros(2048, np.int64)
    hist[:200] = 100_000  # bulk of the data in the first 10% of the range
    hist[2047] = 1     # one far outlier
    assert 200 <= _mse_threshold_bins(hist, levels=255) < 600  # clips the outlier, keeps the bulk
    flat = np.full(2048, 10, np.int64)
    assert _mse_threshold_bins(flat, levels=255) == 2048  # nothing to gain from clipping uniform data


@pytest.mark.slow
@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
def test_quantize_int8_histogram_methods_keep_parity(method):
    proto, report = onnxslim_kit.optimize(MODELS / "bert_tiny.onnx",
                                          passes=["cleanup", f"quantize-int8:calibration={method}"],
                                          calibration=MODELS / "bert_tiny.calib.npz")
    assert all(o.cosine >= 0.999 for o in report.parity.outputs)


def test_quantize_dynamic_embedding_gather_stored_int8():
    r = rng(11)
    table = r.standard_normal((500, 32)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed", axis=0),
             helper.make_node("Relu", ["emb"], ["y"], name="relu")]
    proto = make_model(nodes, [("ids", onnx.TensorProto.INT64, ["B", 7])], [("y", FLOAT, ["B", 7, 32])],
                       [init("table", table)])
    out, rec = _run(proto)
    assert rec.stats["nodes_quantized"] == 1 and rec.stats["weight_bytes_after"] < table.nbytes / 3
    assert [n.op_type for n in out.graph.node] == ["Gather", "DequantizeLinear", "Relu"]
    ids = r.integers(0, 500, size=(3, 7)).astype(np.int64)
    ref, got = run_model(proto, {"ids": ids})[0], run_model(out, {"ids": ids})[0]
    assert np.abs(ref - got).max() <= np.abs(table).max() / 127 / 2 + 1e-6  # half a quantization step


@pytest.mark.slow
def test_quantize_int8_sensitivity_fallback_keeps_fewest_layers_in_float():
    src, calib = MODELS / "resnet_tiny.onnx", MODELS / "resnet_tiny.calib.npz"
    _, report = onnxslim_kit.optimize(src, passes=["cleanup", "quantize-int8:target_cosine=0.5"], calibration=calib)
    rec = report.passes[1]
    full = rec.stats["cosine_all_int8"]
    assert "nodes_kept_float" not in rec.stats and not any("sensitivity" in r for _, r in rec.skipped)
    target = full + (1 - full) * 0.3
    _, report = onnxslim_kit.optimize(src, passes=["cleanup", f"quantize-int8:target_cosine={target}"],
                                      calibration=calib)
    rec = report.passes[1]
    kept = rec.stats["nodes_kept_float"]
    assert 1 <= kept < rec.stats["nodes_quantized"] + kept
    assert rec.stats["cosine_after_fallback"] >= target
    assert sum("sensitivity fallback" in r for _, r in rec.skipped) == kept
    assert min(o.cosine for o in report.parity.outputs) >= target - 1e-6  # the gate measured it too


def test_quantize_int8_sensitivity_fallback_says_when_target_is_unreachable():
    _, report = onnxslim_kit.optimize(conv_bn_relu(), passes=["cleanup", "quantize-int8:target_cosine=1.0"])
    rec = report.passes[1]
    assert any("not reachable" in r for _, r in rec.skipped)


def test_quantize_int8_refuses_dynamically_quantized_model():
    dynamic, _ = onnxslim_kit.optimize(conv_bn_relu(), passes=["quantize-dynamic:min_elements=1"])
    assert "MatMulInteger" in [n.op_type for n in dynamic.graph.node]
    # before: the float Conv was quantized as well and the model silently mixed two recipes
    with pytest.raises(InputError, match="^quantize-int8: the model is already quantized .*MatMulInteger"):
        onnxslim_kit.optimize(dynamic, passes=["quantize-int8"])


@pytest.mark.parametrize("per_channel", [True, False])
def test_quantize_int8_bias_overflow_keeps_bias_value_when_scale_raised(per_channel):
    proto = conv_bn_relu()
    bias = np.linspace(-3e8, 3e8, 8).astype(np.float32)
    for t in proto.graph.initializer:
        if t.name == "conv.b":
            t.CopyFrom(onnx.numpy_helper.from_array(bias, "conv.b"))
    out, report = onnxslim_kit.optimize(  # align_channels off: the test reads the bias by its name
        proto, passes=[f"quantize-int8:per_channel={str(per_channel).lower()},align_channels=false"], check="off")
    assert report.passes[0].stats["bias_scales_raised"] > 0
    onnx.checker.check_model(out, full_check=True)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("conv.b"))
    b_q, b_scale = inits[dq.input[0]].astype(np.float64), inits[dq.input[1]].astype(np.float64)
    assert np.abs(b_q).max() < 2 ** 31 - 1
    # the int32 bias still represents the float bias (not clipped at the int32 limit)
    assert np.all(np.abs(b_q * b_scale - bias) <= np.broadcast_to(b_scale, bias.shape) / 2 + 1e-3 * np.abs(bias))


def test_quantize_int8_entropy_threshold_clips_outlier_not_bulk():
    from passes.quantize import _kl_window_fraction

    hist = np.zeros(2048, np.int64)
    hist[:300] = np.linspace(100_000, 1_000, 300).astype(np.int64)  # bulk in the first 15% of the range
    hist[2047] = 1                                                   # one far outlier
    bins = _kl_window_fraction(hist, zero_bin=0.0, levels=255) * 2048
    assert 255 <= bins < 700  # the outlier is clipped, the bulk kept
    flat = np.full(2048, 1_000, np.int64)
    assert _kl_window_fraction(flat, zero_bin=0.0, levels=255) == 1.0  # clipping uniform data only loses
    # signed window around a zero in the middle: the outliers on both sides are clipped symmetrically
    signed = np.zeros(2048, np.int64)
    signed[824:1224] = (100_000 * np.exp(-0.5 * ((np.arange(824, 1224) - 1024) / 60.0) ** 2)).astype(np.int64)
    signed[[0, 2047]] = 1
    f = _kl_window_fraction(signed, zero_bin=1024.0, levels=255)
    assert 124 / 1024 <= f < 0.5


@pytest.mark.parametrize("activation_type", ["uint8", "int8"])
def test_quantize_int8_entropy_ranges_respect_sign_and_zeros(activation_type):
    from passes.quantize import _RangeCollector

    r = rng(12)
    proto = make_model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                        helper.make_node("Neg", ["x"], ["n"], name="neg")],
                       [("x", FLOAT, ["B", 256])], [("r", FLOAT, None), ("n", FLOAT, None)])
    feeds = [{"x": r.standard_normal((16, 256)).astype(np.float32)} for _ in range(4)]
    ranges = _RangeCollector(proto, ["n", "r", "x"], {}, feeds, lambda it, _: it, "entropy", 99.9,
                             activation_type).ranges()
    lo, hi = ranges["r"]
    positives = np.concatenate([f["x"][f["x"] > 0] for f in feeds])
    # post-Relu: half the values are exact zeros; they must not pull the threshold to the bulk near 0
    assert lo == 0.0 and np.quantile(positives, 0.99) <= hi <= positives.max()
    for name in ("x", "n"):  # signed tensors keep their negative side under both activation types
        lo, hi = ranges[name]
        assert lo < -2.0 and hi > 2.0 and 0.5 < -lo / hi < 2.0


@pytest.mark.slow
def test_quantize_int8_entropy_keeps_digits_cnn_accuracy():
    src = MODELS / "digits_cnn.onnx"
    data = np.load(MODELS / "digits_cnn.eval.npz")
    accuracy = {}
    for method in ("minmax", "entropy"):
        proto, report = onnxslim_kit.optimize(src, passes=["cleanup", f"quantize-int8:calibration={method}"],
                                              calibration=MODELS / "digits_cnn.calib.npz")
        onnx.checker.check_model(proto, full_check=True)
        assert report.parity.ok and all(o.cosine > 0.9995 for o in report.parity.outputs)  # was 0.61 / 0.30
        accuracy[method] = float((run_model(proto, {"image": data["image"]})[0].argmax(-1) == data["labels"]).mean())
    assert accuracy["entropy"] >= accuracy["minmax"] - 0.005


def _zero_point_types(proto, tensor_prefix):
    return {onnx.TensorProto.DataType.Name(t.data_type) for t in proto.graph.initializer
            if t.name.startswith(tensor_prefix) and t.name.endswith("_zero_point")}


def _max_error(reference, candidate):
    x = rng(13).standard_normal((4, 3, 8, 8)).astype(np.float32)
    return float(np.abs(run_model(reference, {"x": x})[0] - run_model(candidate, {"x": x})[0]).max())


def test_quantize_int8_int16_activations_are_more_accurate_and_run_unfused(tmp_path):
    src = conv_bn_relu(opset=21)
    a8, _ = onnxslim_kit.optimize(src, passes=["cleanup", "quantize-int8"])
    a16, report = onnxslim_kit.optimize(src, passes=["cleanup", "quantize-int8:activation_type=int16"])
    onnx.checker.check_model(a16, full_check=True)
    assert report.parity.ok and report.passes[1].stats["nodes_quantized"] == 2
    assert _zero_point_types(a16, "conv_out") == _zero_point_types(a16, "x") == {"INT16"}
    assert "Relu" in [n.op_type for n in a16.graph.node]  # symmetric int16 does not clamp at zero
    # int8 weight rounding stays, the activation rounding (2^8 times finer) all but goes
    assert _max_error(src, a16) < 0.8 * _max_error(src, a8)
    fused = fused_ops(a16, tmp_path)
    # onnxruntime 1.32 (CPU) has no int16 QLinearConv/QGemm: it runs DQ -> float Conv/Gemm -> Q
    assert "Conv" in fused and "Gemm" in fused and "QLinearConv" not in fused


def test_quantize_int8_int16_nodes_widen_only_those_layers(tmp_path):
    src = conv_bn_relu(opset=21)
    out, report = onnxslim_kit.optimize(src, passes=["cleanup", "quantize-int8:int16_nodes=conv"])
    onnx.checker.check_model(out, full_check=True)
    assert report.parity.ok and report.passes[1].stats["nodes_quantized"] == 2
    assert _zero_point_types(out, "x") == {"INT16"} and _zero_point_types(out, "conv_out") == {"INT16"}
    assert _zero_point_types(out, "flat") == {"UINT8"}
    fused = fused_ops(out, tmp_path)
    assert "QGemm" in fused and "Conv" in fused  # the uint8 layer still fuses, the int16 one runs in float


@pytest.mark.parametrize("spec", ["quantize-int8:activation_type=int16", "quantize-int8:int16_nodes=conv"])
def test_quantize_int8_int16_needs_opset_21(spec):
    with pytest.raises(InputError, match=r"^quantize-int8: .*int16.* needs opset >= 21 .* the model has 17"):
        onnxslim_kit.optimize(conv_bn_relu(), passes=["cleanup", spec])


def test_quantize_int8_exclude_op_types_and_include_select_nodes(tmp_path):
    src = conv_bn_relu()
    out, report = onnxslim_kit.optimize(src, passes=["cleanup", "quantize-int8:exclude_op_types=Gemm"])
    onnx.checker.check_model(out, full_check=True)
    assert ("fc", "op type Gemm excluded by option") in report.passes[1].skipped and report.parity.ok
    fused = fused_ops(out, tmp_path)
    assert "QLinearConv" in fused and "Gemm" in fused and "QGemm" not in fused
    out, report = onnxslim_kit.optimize(src, passes=["cleanup", "quantize-int8:include=fc"])
    onnx.checker.check_model(out, full_check=True)
    assert ("conv", "not in include") in report.passes[1].skipped and report.parity.ok
    fused = fused_ops(out, tmp_path)
    assert "QGemm" in fused and "Conv" in fused and "QLinearConv" not in fused
    with pytest.raises(InputError, match="^quantize-int8: include: no node named 'nope'"):
        onnxslim_kit.optimize(src, passes=["cleanup", "quantize-int8:include=nope"])
    with pytest.raises(InputError, match="exclude_op_types: Relu is not quantized"):
        build_pass("quantize-int8", {"exclude_op_types": "Relu"})


def test_quantize_int8_conv_transpose_stays_float_with_reason():
    r = rng(14)
    inits = [init("up.w", (r.standard_normal((8, 4, 2, 2)) * 0.3).astype(np.float32)),  # [C_in, C_out/g, kH, kW]
             init("conv.w", (r.standard_normal((6, 4, 3, 3)) * 0.3).astype(np.float32))]
    nodes = [helper.make_node("ConvTranspose", ["x", "up.w"], ["up"], name="up", strides=[2, 2]),
             helper.make_node("Conv", ["up", "conv.w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    src = make_model(nodes, [("x", FLOAT, ["N", 8, 4, 4])], [("y", FLOAT, ["N", 6, 8, 8])], inits)
    out, report = onnxslim_kit.optimize(src, passes=["quantize-int8"])
    onnx.checker.check_model(out, full_check=True)
    rec = report.passes[0]
    assert ("up", "ConvTranspose kept in float: onnxruntime's CPU provider has no fused QDQ ConvTranspose kernel") \
        in rec.skipped
    assert rec.stats["nodes_quantized"] == 1 and report.parity.ok
    weights = {n.input[1] for n in out.graph.node if n.op_type == "ConvTranspose"}
    assert weights == {"up.w"}  # still the float weight


def _correlated_rows(seed, rows, k=64):
    r = rng(seed)
    mix = rng(99).standard_normal((8, k))  # the same 8-dimensional subspace for every seed
    return (r.standard_normal((rows, 8)) @ mix + 0.05 * r.standard_normal((rows, k))).astype(np.float32)


@pytest.mark.parametrize("bits, symmetric", [(4, True), (4, False), (8, True), (2, False)])
def test_quantize_weights_gptq_reduces_layer_output_error(bits, symmetric):
    from passes.quantize import gptq_blocked

    x = _correlated_rows(20, 2000).astype(np.float64)
    w = (rng(21).standard_normal((64, 32)) * 0.1).astype(np.float32)
    q, scale, zero = gptq_blocked(w, x.T @ x, bits=bits, block_size=16, symmetric=symmetric)
    rq, rscale, rzero = quantize_blocked(w, bits=bits, block_size=16, symmetric=symmetric)
    assert q.shape == rq.shape and scale.shape == rscale.shape and (zero is None) == (rzero is None)
    lo, hi = (-(2 ** (bits - 1) - 1) if bits > 2 else -1, 2 ** (bits - 1) - 1 if bits > 2 else 1) if symmetric \
        else (0, 2 ** bits - 1)
    assert q.min() >= lo and q.max() <= hi  # same integer grid as round-to-nearest

    def output_error(qq, ss, zz):
        return np.linalg.norm(x @ (dequantize_blocked(qq, ss, zz, 16) - w))

    assert output_error(q, scale, zero) < 0.5 * output_error(rq, rscale, rzero)


def test_quantize_weights_gptq_pass_lowers_output_error_on_held_out_data(tmp_path):
    r = rng(22)
    inits = [init("w1", (r.standard_normal((64, 48)) * 0.1).astype(np.float32)),
             init("w2", (r.standard_normal((48, 64)) * 0.1).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")]
    src = make_model(nodes, [("x", FLOAT, ["B", 64])], [("y", FLOAT, ["B", 64])], inits, opset=21)
    calib = [{"x": _correlated_rows(30 + i, 64)} for i in range(8)]
    held_out = _correlated_rows(50, 256)
    ref = run_model(src, {"x": held_out})[0]
    errors = {}
    for gptq in ("false", "true"):
        out, report = onnxslim_kit.optimize(src, passes=[f"quantize-weights:bits=4,block_size=16,min_elements=16,"
                                                         f"gptq={gptq}"], calibration=calib)
        onnx.checker.check_model(out, full_check=True)
        rec = report.passes[0]
        assert rec.stats["nodes_quantized"] == 2 and report.parity.ok
        errors[gptq] = float(np.linalg.norm(run_model(out, {"x": held_out})[0] - ref))
    assert rec.stats["gptq_layers"] == 2 and rec.stats["gptq_max_error_ratio"] < 0.7
    assert errors["true"] < 0.7 * errors["false"]


def test_quantize_weights_gptq_needs_calibration():
    with pytest.raises(InputError, match="^quantize-weights: gptq=true needs calibration data"):
        Pipeline.from_specs(["quantize-weights:gptq=true"]).run(Model.from_proto(_fc(21)), PassContext())


@pytest.mark.slow
def test_quantize_weights_gptq_improves_bert_tiny_int4():
    cosines = {}
    for gptq in ("false", "true"):
        proto, report = onnxslim_kit.optimize(MODELS / "bert_tiny.onnx",
                                              passes=["cleanup", f"quantize-weights:bits=4,gptq={gptq}"],
                                              calibration=MODELS / "bert_tiny.calib.npz")
        onnx.checker.check_model(proto, full_check=True)
        assert report.parity.ok
        cosines[gptq] = min(o.cosine for o in report.parity.outputs)
    assert 1 - cosines["true"] < 0.5 * (1 - cosines["false"])  # measured 0.99978 vs 0.99739 (pooled output)


def test_quantize_weights_exclude_op_types_and_include_select_nodes():
    proto = _fc(21)
    x = rng(4).standard_normal((2, 4, 128)).astype(np.float32)
    for spec, kept, reason in [("exclude_op_types=Gemm", "gemm", "op type Gemm excluded by option"),
                               ("include=gemm", "mm", "not in include")]:
        model, records = Pipeline.from_specs([f"quantize-weights:min_elements=16,{spec}"]).run(
            Model.from_proto(proto), PassContext())
        out = model.to_proto()
        onnx.checker.check_model(out, full_check=True)
        rec = records[0]
        assert rec.stats["nodes_quantized"] == 1 and (kept, reason) in rec.skipped
        ops = [n.op_type for n in out.graph.node]
        assert ops.count("DequantizeLinear") == 1 and ("Gemm" in ops) == (kept == "gemm")
        assert _cosine(run_model(proto, {"x": x})[0], run_model(out, {"x": x})[0]) > 0.99
    with pytest.raises(InputError, match="^quantize-weights: include: no node named 'nope'"):
        Pipeline.from_specs(["quantize-weights:include=nope"]).run(Model.from_proto(proto), PassContext())
    with pytest.raises(InputError, match="exclude_op_types: Conv is not quantized"):
        build_pass("quantize-weights", {"exclude_op_types": "Conv"})


def _conv_hardswish_se(opset=17):
    """Conv -> HardSwish -> SE gate (GAP -> Conv -> HardSigmoid(alpha 0.2) -> Mul) -> Conv."""
    r = rng(21)
    inits = [init("c1.w", (r.standard_normal((16, 3, 3, 3)) * 0.4).astype(np.float32)),
             init("c1.b", (r.standard_normal(16) * 0.3).astype(np.float32)),
             init("se.w", (r.standard_normal((16, 16, 1, 1)) * 0.3).astype(np.float32)),
             init("c2.w", (r.standard_normal((8, 16, 1, 1)) * 0.3).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("HardSwish", ["a"], ["h"], name="hswish"),
             helper.make_node("GlobalAveragePool", ["h"], ["p"], name="gap"),
             helper.make_node("Conv", ["p", "se.w"], ["s"], name="se"),
             helper.make_node("HardSigmoid", ["s"], ["g"], name="hsig", alpha=0.2, beta=0.5),
             helper.make_node("Mul", ["h", "g"], ["m"], name="gate"),
             helper.make_node("Conv", ["m", "c2.w"], ["y"], name="c2")]
    return make_model(nodes, [("x", FLOAT, ["N", 3, 12, 12])], [("y", FLOAT, ["N", 8, 12, 12])], inits, opset=opset)


def test_quantize_int8_hardswish_and_se_gate_run_without_float_ops(tmp_path):
    src = _conv_hardswish_se()
    feeds = {"x": rng(3).standard_normal((16, 3, 12, 12)).astype(np.float32)}
    np.savez(tmp_path / "calib.npz", **feeds)
    out, report = onnxslim_kit.optimize(src, passes=["quantize-int8"], calibration=tmp_path / "calib.npz")
    onnx.checker.check_model(out, full_check=True)
    rec = report.passes[0]
    assert rec.stats["activations_decomposed"] == 2 and rec.stats["rescales_dropped"] == 2
    assert report.parity.ok and report.parity.outputs[0].cosine > 0.999
    fused = fused_ops(out, tmp_path)
    # HardSwish = QLinearAdd (+3, clamped by the uint8 range) and QLinearMul; the SE gate's Mul runs on
    # uint8 too: one Q at the input, one DQ at the output, no float op in between
    assert not {"HardSwish", "HardSigmoid", "Mul", "Add", "Conv"} & set(fused)
    assert fused.count("QuantizeLinear") == 1 and fused.count("DequantizeLinear") == 1
    assert fused.count("QLinearConv") == 3 and fused.count("QLinearMul") == 2 and fused.count("QLinearAdd") == 2


def test_quantize_int8_decomposition_is_the_same_function_in_float():
    """Before Q/DQ go in, the rewrite alone (HardSwish -> x * Clip(x + 3, 0, 6) / 6, HardSigmoid ->
    Clip(x + beta/alpha, 0, 1/alpha) * alpha) computes what the original computes."""
    from passes.quantize import QuantizeInt8

    src = _conv_hardswish_se(opset=14)
    model = Model.from_proto(src)
    p = QuantizeInt8()
    skipped = []
    assert p._decompose(model, {n.name for n in p._select(model, [])}, skipped) == 2 and not skipped
    ops = [n.op for n in model.nodes]
    assert "HardSwish" not in ops and "HardSigmoid" not in ops and ops.count("Clip") == 2
    rewritten = model.to_proto()
    onnx.checker.check_model(rewritten, full_check=True)
    x = {"x": (rng(5).standard_normal((2, 3, 12, 12)) * 3).astype(np.float32)}  # well past both clamps
    np.testing.assert_allclose(run_model(rewritten, x)[0], run_model(src, x)[0], rtol=1e-5, atol=1e-5)


def test_quantize_int8_hardswish_excluded_or_fed_by_float_stays():
    src = _conv_hardswish_se()
    out, report = onnxslim_kit.optimize(src, passes=["quantize-int8:exclude_op_types=HardSwish+HardSigmoid"])
    assert "activations_decomposed" not in report.passes[0].stats and report.parity.ok
    assert {"HardSwish", "HardSigmoid"} <= {n.op_type for n in out.graph.node}
    assert ("hswish", "HardSwish kept in float (excluded by option)") in report.passes[0].skipped
    # the Conv before it kept in float: its HardSwish input is float, nothing to gain, left as it is
    out, report = onnxslim_kit.optimize(src, passes=["quantize-int8:exclude=c1"])
    assert "HardSwish" in {n.op_type for n in out.graph.node} and report.parity.ok


def _conv_flatten_gemm(trans_b=0, extra_reader=False):
    r = rng(8)
    inits = [init("c.w", (r.standard_normal((6, 3, 3, 3)) * 0.4).astype(np.float32)),
             init("fc.w", (r.standard_normal((10, 6 * 4 * 4) if trans_b else (6 * 4 * 4, 10)) * 0.2).astype(np.float32)),
             init("fc.b", (r.standard_normal(10) * 0.1).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "c.w"], ["a"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1),
             helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], name="fc", transB=trans_b)]
    outputs = [("y", FLOAT, ["N", 10])]
    if extra_reader:  # a reader that is not a weight product: the Flatten must stay NCHW
        nodes.append(helper.make_node("Relu", ["f"], ["f2"], name="reader"))
        outputs.append(("f2", FLOAT, ["N", 96]))
    return make_model(nodes, [("x", FLOAT, ["N", 3, 8, 8])], outputs, inits)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_quantize_int8_flatten_reads_nhwc_and_head_transpose_cancels(tmp_path, trans_b):
    src = _conv_flatten_gemm(trans_b)
    np.savez(tmp_path / "calib.npz", x=rng(4).standard_normal((16, 3, 8, 8)).astype(np.float32))
    out, report = onnxslim_kit.optimize(src, passes=["quantize-int8"], calibration=tmp_path / "calib.npz")
    onnx.checker.check_model(out, full_check=True)
    assert report.passes[0].stats["flatten_to_nhwc"] == 1
    assert report.parity.ok and report.parity.outputs[0].cosine > 0.999  # the weight rows follow the permutation
    fused = fused_ops(out, tmp_path)
    assert fused.count("Transpose") == 1 and "QGemm" in fused  # only the input's NCHW -> NHWC is left


def test_quantize_int8_flatten_with_other_readers_stays_nchw(tmp_path):
    src = _conv_flatten_gemm(extra_reader=True)
    out, report = onnxslim_kit.optimize(src, passes=["quantize-int8"])
    assert "flatten_to_nhwc" not in report.passes[0].stats and report.parity.ok
    assert not any(n.op_type == "Transpose" for n in out.graph.node)
    flatten = next(n.name for n in src.graph.node if n.op_type == "Flatten")
    assert any(name == flatten and "Flatten kept reading NCHW" in why for name, why in report.passes[0].skipped)


def test_quantize_int8_nhwc_flatten_rewrite_alone_is_exact():
    from passes.quantize import QuantizeInt8

    src = _conv_flatten_gemm(trans_b=1)
    model = Model.from_proto(src)
    p = QuantizeInt8()
    skipped = []
    assert p._nhwc_flatten(model, {n.name for n in p._select(model, [])}, skipped) == 1 and not skipped
    rewritten = model.to_proto()
    onnx.checker.check_model(rewritten, full_check=True)
    x = {"x": rng(6).standard_normal((3, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run_model(rewritten, x)[0], run_model(src, x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels, unaligned", [(24, 1), (32, 0)])
def test_quantize_int8_warns_about_int8_depthwise_convs(channels, unaligned):
    r = rng(9)
    inits = [init("pw.w", (r.standard_normal((channels, 3, 1, 1)) * 0.4).astype(np.float32)),
             init("dw.w", (r.standard_normal((channels, 1, 3, 3)) * 0.4).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "pw.w"], ["a"], name="pw"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "dw.w"], ["y"], name="dw", group=channels, pads=[1, 1, 1, 1])]
    src = make_model(nodes, [("x", FLOAT, ["N", 3, 8, 8])], [("y", FLOAT, ["N", channels, 8, 8])], inits)
    _, report = onnxslim_kit.optimize(src, passes=["quantize-int8"])
    stats = report.passes[0].stats
    assert stats["depthwise_int8"] == 1 and stats["depthwise_int8_unaligned"] == unaligned
    warning = [w for w in report.warnings if "depthwise" in w]
    x86 = __import__("platform").machine().lower() in ("x86_64", "amd64")  # the 16-channel kernel is x86's
    assert len(warning) == 1 and ("not a multiple of 16" in warning[0]) == (bool(unaligned) and x86)


def _pw_dw_pw(channels=24):
    r = rng(12)
    inits = [init("pw1.w", (r.standard_normal((channels, 8, 1, 1)) * 0.4).astype(np.float32)),
             init("pw1.b", (r.standard_normal(channels) * 0.2).astype(np.float32)),
             init("dw.w", (r.standard_normal((channels, 1, 3, 3)) * 0.4).astype(np.float32)),
             init("dw.b", (r.standard_normal(channels) * 0.2).astype(np.float32)),
             init("pw2.w", (r.standard_normal((8, channels, 1, 1)) * 0.3).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "pw1.w", "pw1.b"], ["a"], name="pw1"),
             helper.make_node("HardSwish", ["a"], ["h"], name="hs"),
             helper.make_node("Conv", ["h", "dw.w", "dw.b"], ["d"], name="dw", group=channels, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["d"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "pw2.w"], ["y"], name="pw2")]
    return make_model(nodes, [("x", FLOAT, ["N", 8, 10, 10])], [("y", FLOAT, ["N", 8, 10, 10])], inits, opset=14)


def test_quantize_int8_align_channels_pads_channels_with_zeros(tmp_path):
    from passes.channel_groups import analyze, pad_groups

    src = _pw_dw_pw(24)
    # the padding alone is the same function: 8 zero channels through pw1 -> dw -> pw2
    model = Model.from_proto(src)
    an = analyze(model)
    gid = next(g.gid for g in an.prunable() if any(p.name == "pw1" for p in g.producers))
    pad_groups(model, an, {gid: 8})
    padded = model.to_proto()
    onnx.checker.check_model(padded, full_check=True)
    shapes = {t.name: tuple(t.dims) for t in padded.graph.initializer}
    assert {(32, 8, 1, 1), (32, 1, 3, 3), (8, 32, 1, 1)} <= set(shapes.values())
    assert next(n for n in padded.graph.node if n.name == "dw").attribute[0].i == 32  # group follows
    x = {"x": rng(2).standard_normal((2, 8, 10, 10)).astype(np.float32)}
    np.testing.assert_allclose(run_model(padded, x)[0], run_model(src, x)[0], rtol=1e-5, atol=1e-5)
    # inside quantize-int8 (on by default on x86; forced here so the test runs everywhere)
    np.savez(tmp_path / "calib.npz", x=rng(3).standard_normal((16, 8, 10, 10)).astype(np.float32))
    out, report = onnxslim_kit.optimize(src, passes=["quantize-int8:align_channels=true"],
                                        calibration=tmp_path / "calib.npz")
    onnx.checker.check_model(out, full_check=True)
    stats = report.passes[0].stats
    assert stats["channels_added"] == 8 and stats["depthwise_int8_unaligned"] == 0
    assert report.parity.ok and report.parity.outputs[0].cosine > 0.999
    assert fused_ops(out, tmp_path).count("QLinearConv") == 3
    out, report = onnxslim_kit.optimize(src, passes=["quantize-int8:align_channels=false"],
                                        calibration=tmp_path / "calib.npz")
    assert "channels_added" not in report.passes[0].stats
    assert report.passes[0].stats["depthwise_int8_unaligned"] == 1


def test_quantize_int8_align_channels_leaves_groups_it_cannot_resize():
    # the depthwise output is the graph output: its channel count is part of the interface
    r = rng(13)
    inits = [init("pw.w", (r.standard_normal((24, 3, 1, 1)) * 0.4).astype(np.float32)),
             init("dw.w", (r.standard_normal((24, 1, 3, 3)) * 0.4).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "pw.w"], ["a"], name="pw"),
             helper.make_node("Conv", ["a", "dw.w"], ["y"], name="dw", group=24, pads=[1, 1, 1, 1])]
    src = make_model(nodes, [("x", FLOAT, ["N", 3, 8, 8])], [("y", FLOAT, ["N", 24, 8, 8])], inits)
    out, report = onnxslim_kit.optimize(src, passes=["quantize-int8:align_channels=true"])
    assert "channels_added" not in report.passes[0].stats and report.parity.ok
    assert any(c == "dw" and r.startswith("depthwise channels not aligned to 16 (")
               for c, r in report.passes[0].skipped)
    # a narrow dense Conv whose output is the graph output: left at 8 channels, with the reason
    nodes = [helper.make_node("Conv", ["x", "narrow.w"], ["y"], name="narrow")]
    src = make_model(nodes, [("x", FLOAT, ["N", 3, 8, 8])], [("y", FLOAT, ["N", 8, 8, 8])],
                     [init("narrow.w", (r.standard_normal((8, 3, 1, 1)) * 0.4).astype(np.float32))])
    out, report = onnxslim_kit.optimize(src, passes=["quantize-int8:align_channels=true"])
    assert "channels_added" not in report.passes[0].stats and report.parity.ok
    assert any(c == "narrow" and r.startswith("8 channels not widened to 16 (") and "graph output" in r
               for c, r in report.passes[0].skipped)


@pytest.mark.parametrize("act, kernel", [("LeakyRelu", "QLinearLeakyRelu"), ("Sigmoid", "QLinearSigmoid")])
def test_quantize_int8_lookup_table_activations_stay_integer(tmp_path, act, kernel):
    r = rng(17)
    inits = [init("c1.w", (r.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32)),
             init("c2.w", (r.standard_normal((8, 8, 1, 1)) * 0.4).astype(np.float32))]
    attrs = {"alpha": 0.1} if act == "LeakyRelu" else {}
    nodes = [helper.make_node("Conv", ["x", "c1.w"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node(act, ["a"], ["h"], name="act", **attrs),
             helper.make_node("Conv", ["h", "c2.w"], ["y"], name="c2")]
    src = make_model(nodes, [("x", FLOAT, ["N", 3, 8, 8])], [("y", FLOAT, ["N", 8, 8, 8])], inits)
    out, report = onnxslim_kit.optimize(src, passes=["quantize-int8"])
    onnx.checker.check_model(out, full_check=True)
    assert report.parity.ok
    fused = fused_ops(out, tmp_path)
    assert kernel in fused and act not in fused and fused.count("DequantizeLinear") == 1


def _lstm_model(directions=1, hidden=32, inp=16):
    r = rng(31)
    w = (r.standard_normal((directions, 4 * hidden, inp)) * 0.2).astype(np.float32)
    rr = (r.standard_normal((directions, 4 * hidden, hidden)) * 0.2).astype(np.float32)
    b = (r.standard_normal((directions, 8 * hidden)) * 0.1).astype(np.float32)
    direction = "bidirectional" if directions == 2 else "forward"
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["y", "y_h"], name="lstm", hidden_size=hidden,
                              direction=direction)]
    return make_model(nodes, [("x", FLOAT, ["T", "N", inp])],
                      [("y", FLOAT, ["T", directions, "N", hidden]), ("y_h", FLOAT, [directions, "N", hidden])],
                      [init("W", w), init("R", rr), init("B", b)])


@pytest.mark.parametrize("directions, per_channel", [(1, True), (2, True), (2, False)])
def test_quantize_dynamic_lstm_becomes_dynamic_quantize_lstm(tmp_path, directions, per_channel):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = _lstm_model(directions)
    x = {"x": rng(4).standard_normal((12, 2, 16)).astype(np.float32)}
    np.savez(tmp_path / "calib.npz", **x)
    out, report = onnxslim_kit.optimize(src, passes=[f"quantize-dynamic:per_channel={str(per_channel).lower()}"],
                                        calibration=tmp_path / "calib.npz")
    onnx.checker.check_model(out, full_check=True)
    assert report.passes[0].stats["nodes_quantized"] == 1 and report.parity.ok
    assert [n.op_type for n in out.graph.node] == ["DynamicQuantizeLSTM"]
    assert report.passes[0].stats["weight_bytes_after"] < report.passes[0].stats["weight_bytes_before"] / 3
    # as accurate as onnxruntime's own quantize_dynamic on the same model
    onnx.save(src, tmp_path / "src.onnx")
    quantize_dynamic(tmp_path / "src.onnx", tmp_path / "ort.onnx", weight_type=QuantType.QInt8, per_channel=per_channel)
    ref = run_model(src, x)
    ours_err = np.abs(run_model(out, x)[0] - ref[0]).max()
    ort_err = np.abs(run_model(onnx.load(tmp_path / "ort.onnx"), x)[0] - ref[0]).max()
    assert ours_err <= ort_err * 1.05 + 1e-6


def test_quantize_dynamic_lstm_excluded_stays_float():
    src = _lstm_model()
    for spec, reason in (("quantize-dynamic:exclude=lstm", "excluded by option"),):
        out, report = onnxslim_kit.optimize(src, passes=[spec])
        assert ("lstm", reason) in report.passes[0].skipped and out.graph.node[0].op_type == "LSTM"


def test_quantize_int8_align_channels_widens_narrow_dense_groups(tmp_path):
    """A Conv chain 8 channels wide gets 8 zero channels (onnxruntime's fast x86 int8 conv needs >= 16):
    same outputs, QLinearConv everywhere; with the sensitivity fallback nothing is padded (layers it keeps
    in float would carry the zero channels for nothing)."""
    src = conv_bn_relu(channels=8)
    out, report = onnxslim_kit.optimize(src, passes=["cleanup", "quantize-int8:align_channels=true"])
    onnx.checker.check_model(out, full_check=True)
    assert report.passes[1].stats["channels_added"] == 8 and report.parity.ok
    conv_w = next(n.input[1] for n in out.graph.node if n.op_type == "Conv")
    dq = next(n for n in out.graph.node if n.output[0] == conv_w)
    assert next(t for t in out.graph.initializer if t.name == dq.input[0]).dims[0] == 16
    assert "QLinearConv" in fused_ops(out, tmp_path)
    _, report = onnxslim_kit.optimize(src, passes=["cleanup", "quantize-int8:align_channels=true,target_cosine=0.9"])
    assert "channels_added" not in report.passes[1].stats


def test_quantize_int8_bias_add_after_matmul_runs_as_qlinearadd(tmp_path):
    """MatMul -> Add(bias vector): the bias is quantized as its own uint8 constant so onnxruntime runs
    the Add as QLinearAdd (as its own recipe does) instead of DQ -> float Add -> Q."""
    r = rng(23)
    inits = [init("w1", (r.standard_normal((32, 48)) * 0.2).astype(np.float32)),
             init("b1", (r.standard_normal(48) * 0.3).astype(np.float32)),
             init("w2", (r.standard_normal((48, 16)) * 0.2).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m"], name="mm1"),
             helper.make_node("Add", ["m", "b1"], ["a"], name="bias"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    src = make_model(nodes, [("x", FLOAT, ["N", 8, 32])], [("y", FLOAT, ["N", 8, 16])], inits)
    out, report = onnxslim_kit.optimize(src, passes=["quantize-int8"])
    onnx.checker.check_model(out, full_check=True)
    assert report.passes[0].stats["constants_quantized"] == 1 and report.parity.ok
    assert report.parity.outputs[0].cosine > 0.999
    fused = fused_ops(out, tmp_path)
    assert "QLinearAdd" in fused and "Add" not in fused


def _two_heads():
    """x -> MatMul(w1) -> Relu -> MatMul(w2) -> Softmax -> probs, and the same hidden -> Gemm -> logits."""
    r = rng(7)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["hr"], name="relu"),
             helper.make_node("MatMul", ["hr", "w2"], ["s"], name="mm2"),
             helper.make_node("Softmax", ["s"], ["probs"], name="softmax", axis=-1),
             helper.make_node("Gemm", ["hr", "w3", "b3"], ["logits"], name="head")]
    inits = [init("w1", r.standard_normal((64, 128)).astype(np.float32) * 0.1),
             init("w2", r.standard_normal((128, 32)).astype(np.float32) * 0.1),
             init("w3", r.standard_normal((128, 10)).astype(np.float32) * 0.1),
             init("b3", r.standard_normal(10).astype(np.float32))]
    return make_model(nodes, [helper.make_tensor_value_info("x", FLOAT, ["N", 64])],
                      [helper.make_tensor_value_info("probs", FLOAT, ["N", 32]),
                       helper.make_tensor_value_info("logits", FLOAT, ["N", 10])], inits)


def test_quantize_int8_gemm_matmul_outputs_read_by_float_ops_stay_float(tmp_path):
    proto = _two_heads()
    calib = {"x": rng(8).standard_normal((32, 64)).astype(np.float32)}
    out, report = onnxslim_kit.optimize(proto, passes=["quantize-int8"], calibration=calib)
    onnx.checker.check_model(out, full_check=True)
    producer = {o: n for n in out.graph.node for o in n.output}
    # The head's logits and the MatMul read by the float Softmax carry no Q -> DQ ...
    assert producer["logits"].op_type == "Gemm" and producer["probs"].op_type == "Softmax"
    softmax_in = producer["probs"].input[0]
    assert producer[softmax_in].op_type == "MatMul"
    # ... the hidden layer read by quantized nodes is quantized, with its Relu folded into the range.
    assert "relu" not in {n.name for n in out.graph.node}
    assert sum(n.op_type == "QuantizeLinear" for n in out.graph.node) == 2   # x and hr
    fused = fused_ops(out, tmp_path)
    assert "QGemm" in fused and "MatMulIntegerToFloat" in fused and "QLinearMatMul" in fused
    assert "Gemm" not in fused and "MatMul" not in fused
    assert fused.count("DequantizeLinear") == 0
    x = calib["x"]
    ref, got = run_model(proto, {"x": x}), run_model(out, {"x": x})
    for a, b in zip(ref, got):
        assert _cosine(a, b) > 0.999


@pytest.mark.slow
def test_quantize_int8_symmetric_activations_keep_gemm_before_relu_integer(tmp_path):
    """int8 activations cannot fold a Relu into the range: the Gemm before it keeps its output Q, or
    onnxruntime fuses Gemm + Relu into a float FusedGemm (the logits Gemm still writes float)."""
    proto, report = onnxslim_kit.optimize(MODELS / "digits_cnn.onnx", passes=["cleanup", "quantize-int8:activation_type=int8"],
                                          calibration=MODELS / "digits_cnn.calib.npz")
    fused = fused_ops(proto, tmp_path)
    assert fused.count("QGemm") == 2 and "FusedGemm" not in fused and "Gemm" not in fused
    assert report.parity.ok
    onnx.checker.check_model(proto, full_check=True)


def test_quantize_dynamic_tied_lstm_weights_are_quantized_once():
    """Two LSTMs reading the same W and R: one set of int8 weights, scales and zero points, both read it."""
    src = _lstm_model()
    first = src.graph.node[0]
    second = helper.make_node("LSTM", ["x", "W", "R", "B"], ["y2", "y2_h"], name="lstm2", hidden_size=32,
                              direction="forward")
    src.graph.node.append(second)
    y2 = src.graph.output.add()
    y2.CopyFrom(src.graph.output[0])
    y2.name = "y2"
    assert first.input[1:3] == second.input[1:3]
    x = {"x": rng(5).standard_normal((6, 2, 16)).astype(np.float32)}
    out, report = onnxslim_kit.optimize(src, passes=["quantize-dynamic"], calibration=x)
    onnx.checker.check_model(out, full_check=True)
    stats = report.passes[0].stats
    assert stats["nodes_quantized"] == 2 and stats["weights_quantized"] == 2 and report.parity.ok
    lstms = [n for n in out.graph.node if n.op_type == "DynamicQuantizeLSTM"]
    assert len(lstms) == 2 and list(lstms[0].input) == list(lstms[1].input)
    w_bytes = sum(onnx.numpy_helper.to_array(t).nbytes for t in src.graph.initializer if t.name in ("W", "R"))
    assert stats["weight_bytes_before"] == w_bytes
