"""passes/quant_aids.py: cross-layer equalization (pass `equalize` and quantize-int8:equalize), bias
correction and SmoothQuant (quantize-int8 options)."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxslim_kit
from builders import FLOAT, assert_parity, fused_ops, init, make_model, rng, run_model
from onnxslim_kit.ir import Model
from onnxslim_kit.pass_base import PassContext
from onnxslim_kit.pipeline import Pipeline
from passes import quant_aids

MODELS = Path(__file__).resolve().parent.parent / "models"


def _conv_pair(act="Relu", *, seed=0):
    """Conv(3->8, 3x3) -> act -> Conv(8->4, 3x3); the first Conv's output channels span 1000x in range."""
    r = rng(seed)
    w1 = r.standard_normal((8, 3, 3, 3)).astype(np.float32) * np.logspace(-2, 1, 8, dtype=np.float32)[:, None, None, None]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1])]
    inits = [init("w1", w1), init("b1", r.standard_normal(8).astype(np.float32) * 0.1),
             init("w2", r.standard_normal((4, 8, 3, 3)).astype(np.float32) * 0.3),
             init("b2", r.standard_normal(4).astype(np.float32) * 0.1)]
    if act == "Clip":
        inits += [init("lo", np.array(0, np.float32)), init("hi", np.array(6, np.float32))]
        nodes.append(helper.make_node("Clip", ["h", "lo", "hi"], ["a"], name="relu6"))
    else:
        nodes.append(helper.make_node(act, ["h"], ["a"], name="act"))
    nodes.append(helper.make_node("Conv", ["a", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1]))
    return make_model(nodes, [("x", FLOAT, ["N", 3, 8, 8])], [("y", FLOAT, ["N", 4, 8, 8])], inits)


def _depthwise_chain(seed=0):
    """Conv 1x1 (4->8) -> Relu -> depthwise 3x3 (group 8, no bias) -> Relu -> Conv 1x1 (8->4)."""
    r = rng(seed)
    spread = np.logspace(-1.5, 1, 8, dtype=np.float32)
    inits = [init("pw1", r.standard_normal((8, 4, 1, 1)).astype(np.float32) * spread[:, None, None, None]),
             init("pb1", r.standard_normal(8).astype(np.float32)),
             init("dw", r.standard_normal((8, 1, 3, 3)).astype(np.float32) * spread[::-1, None, None, None]),
             init("pw2", r.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.5)]
    nodes = [helper.make_node("Conv", ["x", "pw1", "pb1"], ["h1"], name="expand"),
             helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
             helper.make_node("Conv", ["a1", "dw"], ["h2"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
             helper.make_node("Conv", ["a2", "pw2"], ["y"], name="project")]
    return make_model(nodes, [("x", FLOAT, ["N", 4, 6, 6])], [("y", FLOAT, ["N", 4, 6, 6])], inits)


def _imbalanced_block(seed=0):
    """Conv 1x1 (8->16) -> Relu -> depthwise 3x3 (group 16) -> Relu -> Conv 1x1 (16->8), the MobileNetV2
    inverted-residual body: the expansion's output channels (and so both Relu outputs) span ~300x in
    range, in shuffled order, and the projection reads the small channels with larger weights (as after
    BatchNorm folding), so a per-tensor activation grid is far too coarse for most channels."""
    r = rng(seed)
    spread = np.logspace(-2, 0.5, 16, dtype=np.float32)
    r.shuffle(spread)
    inits = [init("pw1", r.standard_normal((16, 8, 1, 1)).astype(np.float32) * spread[:, None, None, None]),
             init("pb1", (r.standard_normal(16) * spread).astype(np.float32)),
             init("dw", (r.standard_normal((16, 1, 3, 3)) * 0.5).astype(np.float32)),
             init("db", (r.standard_normal(16) * 0.1 * spread).astype(np.float32)),
             init("pw2", (r.standard_normal((8, 16, 1, 1)) * 0.3 / np.sqrt(spread)[None, :, None, None])
                  .astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "pw1", "pb1"], ["h1"], name="expand"),
             helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
             helper.make_node("Conv", ["a1", "dw", "db"], ["h2"], name="depthwise", group=16, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
             helper.make_node("Conv", ["a2", "pw2"], ["y"], name="project")]
    return make_model(nodes, [("x", FLOAT, ["N", 8, 6, 6])], [("y", FLOAT, ["N", 8, 6, 6])], inits)


def _block_calibration(batches=4):
    return [{"x": rng(10 + i).standard_normal((4, 8, 6, 6)).astype(np.float32)} for i in range(batches)]


def _channel_ranges(proto, names, feeds):
    """Per-channel max |x| of the named intermediate tensors."""
    probe = onnx.ModelProto.FromString(proto.SerializeToString())
    probe.graph.output.extend(helper.make_tensor_value_info(n, FLOAT, None) for n in names)
    outs = run_model(probe, feeds)[len(proto.graph.output):]
    return {n: np.abs(v).max(axis=(0, 2, 3)) for n, v in zip(names, outs)}


def _snr_db(ref, got):
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref.astype(np.float64) - got) ** 2)))


def _run_pass(proto, spec, calibration=None):
    ctx = PassContext(calibration=calibration, calibration_is_random=calibration is None)
    model, records = Pipeline.from_specs([spec]).run(Model.from_proto(proto), ctx)
    return model.to_proto(), records[0]


def _weights(proto):
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


def _node(proto, name):
    return next(n for n in proto.graph.node if n.name == name)


def _out_ranges(w):
    return np.abs(w.reshape(w.shape[0], -1)).max(axis=1)


def _in_ranges(w, group=1):
    cout, cin_g = w.shape[:2]
    v = np.abs(w.reshape(group, cout // group, cin_g, -1)).max(axis=(1, 3))
    return v.reshape(-1)


def test_equalize_conv_relu_conv_is_exact_and_equalizes_ranges():
    proto = _conv_pair()
    out, rec = _run_pass(proto, "equalize")
    assert rec.modified and rec.stats["pairs_equalized"] == 1
    w = _weights(out)
    w1, w2 = w[_node(out, "conv1").input[1]], w[_node(out, "conv2").input[1]]
    r1, r2 = _out_ranges(w1), _in_ranges(w2)
    # s_i = sqrt(r1_i r2_i) / r2_i makes both sides sqrt(r1_i r2_i): equal per channel
    np.testing.assert_allclose(r1, r2, rtol=1e-5)
    before = _weights(proto)
    np.testing.assert_allclose(r1, np.sqrt(_out_ranges(before["w1"]) * _in_ranges(before["w2"])), rtol=1e-5)
    assert r1.max() / r1.min() < _out_ranges(before["w1"]).max() / _out_ranges(before["w1"]).min() / 10
    x = rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert_parity(proto, out, {"x": x}, atol=1e-4, rtol=1e-4)


def test_equalize_depthwise_chain_is_exact_and_converges():
    proto = _depthwise_chain()
    out, rec = _run_pass(proto, "equalize")
    assert rec.stats["pairs_equalized"] == 2 and rec.stats["equalize_sweeps"] > 1
    assert rec.stats["weight_range_spread_after"] < rec.stats["weight_range_spread_before"]
    w = _weights(out)
    pw1, dw, pw2 = (w[_node(out, n).input[1]] for n in ("expand", "depthwise", "project"))
    # a bias was rescaled with its channel; the depthwise Conv (no bias) got none
    assert len(_node(out, "depthwise").input) == 2
    # at the fixed point every pair is balanced: out-range of the first == in-range of the second
    np.testing.assert_allclose(_out_ranges(pw1), _in_ranges(dw, group=8), rtol=1e-3)
    np.testing.assert_allclose(_out_ranges(dw), _in_ranges(pw2), rtol=1e-3)
    x = rng(2).standard_normal((3, 4, 6, 6)).astype(np.float32)
    assert_parity(proto, out, {"x": x}, atol=1e-4, rtol=1e-4)


def test_equalize_skips_clip_pair_with_reason():
    out, rec = _run_pass(_conv_pair("Clip"), "equalize")
    assert not rec.modified and rec.stats["pairs_equalized"] == 0
    reasons = dict(rec.skipped)
    assert "Clip" in reasons["conv1"] and "scale-equivariant" in reasons["conv1"]
    assert reasons["conv2"] == "not equalized: output is a graph output or read by a subgraph"
    onnx.checker.check_model(out, full_check=True)


def _biased_layer(op):
    """A layer whose input has a large mean (5) and whose weight has one outlier, so per-tensor int8
    rounding is coarse and its error shifts every output by E[x] . (W_q - W)."""
    r = rng(3)
    if op == "Gemm":
        w = r.standard_normal((16, 64)).astype(np.float32) * 0.05
        w[0, 0] = 2.0
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="layer", transB=1)]
        inits = [init("w", w), init("b", np.zeros(16, np.float32))]
        shape_in, shape_out = ["N", 64], ["N", 16]
    else:  # Conv without a bias: bias correction adds one. No padding: zero-padded borders see fewer
        # taps, so there the per-channel correction is only approximate.
        w = r.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.05
        w[0, 0, 0, 0] = 2.0
        nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="layer")]
        inits = [init("w", w)]
        shape_in, shape_out = ["N", 8, 6, 6], ["N", 16, 4, 4]
    proto = make_model(nodes, [("x", FLOAT, shape_in)], [("y", FLOAT, shape_out)], inits)
    data = [{"x": (5.0 + rng(10 + i).standard_normal([8] + shape_in[1:])).astype(np.float32)} for i in range(4)]
    return proto, data


@pytest.mark.parametrize("op", ["Gemm", "Conv"])
def test_quantize_int8_bias_correction_moves_output_mean_to_float(op):
    proto, data = _biased_layer(op)
    x = np.concatenate([d["x"] for d in data])
    ref = run_model(proto, {"x": x})[0]
    shifts = {}
    for spec in ("quantize-int8:per_channel=false", "quantize-int8:per_channel=false,bias_correction=true"):
        out, rec = _run_pass(proto, spec, calibration=data)
        got = run_model(out, {"x": x})[0]
        axes = tuple(i for i in range(ref.ndim) if i != 1)
        shifts[spec] = np.abs((got - ref).mean(axis=axes))  # per output channel
    plain, corrected = shifts.values()
    assert rec.stats["biases_corrected"] == 1
    assert corrected.mean() < 0.3 * plain.mean()
    assert (corrected < plain).mean() >= 0.75
    layer = _node(out, "layer")
    assert len(layer.input) == 3 and layer.input[2]  # the Conv got a bias (now int32 + DequantizeLinear)
    onnx.checker.check_model(out, full_check=True)


def _smooth_model(layernorm: bool):
    """[LayerNormalization ->] MatMul(64 -> 32) + bias Add; the MatMul input has 4 outlier channels
    (50x); with the LayerNorm, its output also feeds a residual Add, so no fold: a Mul is inserted."""
    r = rng(4)
    gamma = np.ones(64, np.float32)
    gamma[:4] = 50.0
    inits = [init("w", r.standard_normal((64, 32)).astype(np.float32) * 0.1),
             init("bias", r.standard_normal(32).astype(np.float32) * 0.1),
             init("gamma", gamma), init("beta", r.standard_normal(64).astype(np.float32) * 0.1)]
    nodes = []
    src = "x"
    if layernorm:
        nodes.append(helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1))
        src = "ln"
    else:
        inits = inits[:2]
    nodes += [helper.make_node("MatMul", [src, "w"], ["mm"], name="mm"),
              helper.make_node("Add", ["mm", "bias"], ["y"], name="bias_add")]
    return make_model(nodes, [("x", FLOAT, ["N", 5, 64])], [("y", FLOAT, ["N", 5, 32])], inits)


def _smooth_data(layernorm: bool, n=4):
    out = []
    for i in range(n):
        x = rng(20 + i).standard_normal((4, 5, 64)).astype(np.float32)
        if not layernorm:
            x[..., :4] *= 50.0
        out.append({"x": x})
    return out


def _cosine(a, b):
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("layernorm", [True, False])
def test_smoothquant_is_exact_in_float(layernorm):
    proto = _smooth_model(layernorm)
    model = Model.from_proto(proto)
    skipped = []
    stats = quant_aids.smooth_quant(model, PassContext(calibration=_smooth_data(layernorm)), 0.5, ["mm"], skipped)
    assert stats["matmuls_smoothed"] == 1 and not skipped
    assert stats["smooth_folded_into_layernorm" if layernorm else "smooth_mul_inserted"] == 1
    out = model.to_proto()
    x = _smooth_data(layernorm, 1)[0]["x"]
    assert_parity(proto, out, {"x": x}, atol=1e-4, rtol=1e-4)
    if layernorm:  # the division went into the LayerNorm's scale: outlier channels are no longer outliers
        gamma = _weights(out)[_node(out, "ln").input[1]]
        assert gamma[:4].max() / gamma[4:].mean() < 50.0 / 2


def test_smoothquant_layernorm_with_residual_inserts_mul():
    proto = _smooth_model(True)
    g = proto.graph  # the LayerNorm output also feeds a residual Add: gamma cannot carry 1/s
    g.node.append(helper.make_node("Add", ["ln", "x"], ["res"], name="residual"))
    g.output.append(helper.make_tensor_value_info("res", FLOAT, ["N", 5, 64]))
    model = Model.from_proto(proto)
    stats = quant_aids.smooth_quant(model, PassContext(calibration=_smooth_data(True)), 0.5, ["mm"], [])
    assert stats["smooth_mul_inserted"] == 1 and stats["smooth_folded_into_layernorm"] == 0
    assert_parity(proto, model.to_proto(), _smooth_data(True, 1)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layernorm", [True, False])
def test_quantize_int8_smoothquant_improves_cosine_with_outlier_channels(layernorm):
    proto = _smooth_model(layernorm)
    data = _smooth_data(layernorm)
    x = np.concatenate([d["x"] for d in data])
    ref = run_model(proto, {"x": x})[0]
    cos = {}
    for spec in ("quantize-int8", "quantize-int8:smoothquant=0.5"):
        out, rec = _run_pass(proto, spec, calibration=data)
        cos[spec] = _cosine(ref, run_model(out, {"x": x})[0])
        onnx.checker.check_model(out, full_check=True)
    assert rec.stats["matmuls_smoothed"] == 1
    plain, smooth = cos.values()
    assert 1 - smooth < 0.5 * (1 - plain), cos


def test_quantize_int8_smoothquant_rejects_alpha_out_of_range():
    with pytest.raises(Exception, match="alpha"):
        Pipeline.from_specs(["quantize-int8:smoothquant=1.5"])


@pytest.mark.slow
def test_quantize_int8_equalize_on_trained_mobilenet_keeps_integer_kernels(tmp_path):
    src, calib = MODELS / "mobilenetv2_digits.onnx", MODELS / "mobilenetv2_digits.calib.npz"
    proto, report = onnxslim_kit.optimize(src, passes=["cleanup", "quantize-int8:equalize=true,bias_correction=true,"
                                                                  "per_channel=false"], calibration=calib)
    rec = report.passes[1]
    assert rec.stats["pairs_equalized"] >= 10 and rec.stats["biases_corrected"] >= 10
    assert report.parity.ok and all(o.cosine > 0.999 for o in report.parity.outputs)
    onnx.checker.check_model(proto, full_check=True)
    convs = sum(1 for n in proto.graph.node if n.op_type == "Conv")
    fused = fused_ops(proto, tmp_path)
    assert fused.count("QLinearConv") == convs and "Conv" not in fused
    data = np.load(MODELS / "mobilenetv2_digits.eval.npz")
    logits = run_model(proto, {"image": data["image"]})[0]
    assert (logits.argmax(1) == data["labels"]).mean() >= 0.98


@pytest.mark.slow
def test_equalize_trained_mobilenet_passes_exact_parity_gate():
    src = MODELS / "mobilenetv2_digits.onnx"
    proto, report = onnxslim_kit.optimize(src, passes=["cleanup", "equalize"],
                                          calibration=MODELS / "mobilenetv2_digits.calib.npz")
    rec = report.passes[1]
    assert rec.stats["pairs_equalized"] >= 10
    assert any("feeds Add" in reason for _, reason in rec.skipped)  # residual branches stay as they are
    assert report.parity.ok
    onnx.checker.check_model(proto, full_check=True)


@pytest.mark.slow
def test_smoothquant_bert_is_exact_in_float_and_shares_one_scale_for_qkv():
    from onnxslim_kit.calibration import input_specs, load_calibration

    proto = onnx.load(MODELS / "bert_tiny.onnx")
    data = list(load_calibration(MODELS / "bert_tiny.calib.npz", input_specs(proto)))
    model = Model.from_proto(proto)
    names = [n.name for n in model.nodes if n.op == "MatMul" and model.constant_value(n.inputs[1]) is not None]
    skipped = []
    stats = quant_aids.smooth_quant(model, PassContext(calibration=data), 0.5, names, skipped)
    assert stats["matmuls_smoothed"] == len(names)
    # Q, K, V (and the MLP up-projection) read LayerNorm outputs that also feed residual Adds: one Mul
    # per shared input, fewer Muls than smoothed MatMuls
    assert stats["smooth_mul_inserted"] + stats["smooth_folded_into_layernorm"] < stats["matmuls_smoothed"]
    out = model.to_proto()
    assert_parity(proto, out, data[0], atol=1e-4, rtol=1e-3)


def test_quantize_int8_bias_correction_undone_for_layers_kept_in_float():
    from builders import conv_bn_relu

    biases = {}
    for spec in ("quantize-int8:target_cosine=1.0", "quantize-int8:target_cosine=1.0,bias_correction=true"):
        proto, report = onnxslim_kit.optimize(conv_bn_relu(), passes=["cleanup", spec], check="off")
        rec = report.passes[1]
        assert rec.stats["nodes_kept_float"] == 2  # unreachable target: every compute node stays float
        w = _weights(proto)
        biases[spec] = {n.name: w[n.input[2]] for n in proto.graph.node if n.op_type in ("Conv", "Gemm")}
        onnx.checker.check_model(proto, full_check=True)
    assert rec.stats["biases_corrected"] == 2
    plain, corrected = biases.values()
    assert plain.keys() == corrected.keys() and len(plain) == 2
    for name in plain:  # float layers must not carry a correction for rounding they never get
        np.testing.assert_array_equal(corrected[name], plain[name])


@pytest.mark.slow
def test_quantize_int8_smoothquant_bert_keeps_integer_matmuls(tmp_path):
    fused = {}
    for spec in ("quantize-int8", "quantize-int8:smoothquant=0.5"):
        proto, report = onnxslim_kit.optimize(MODELS / "bert_tiny.onnx", passes=["cleanup", spec],
                                              calibration=MODELS / "bert_tiny.calib.npz")
        assert report.parity.ok and all(o.cosine >= 0.99 for o in report.parity.outputs)
        onnx.checker.check_model(proto, full_check=True)
        fused[spec] = fused_ops(proto, tmp_path)
    assert report.passes[1].stats["matmuls_smoothed"] >= 12
    plain, smooth = fused.values()
    # the inserted Muls run in float before the Q/DQ: every MatMul still becomes an integer kernel
    assert smooth.count("QLinearMatMul") == plain.count("QLinearMatMul") >= 12
    assert smooth.count("QGemm") == plain.count("QGemm")


def test_equalize_activations_is_exact_and_flattens_channel_ranges():
    proto, calib = _imbalanced_block(), _block_calibration()
    out, rec = _run_pass(proto, "equalize:mode=activations", calibration=calib)
    assert rec.modified and rec.stats["pairs_equalized"] == 2
    x = {"x": rng(99).standard_normal((8, 8, 6, 6)).astype(np.float32)}
    assert_parity(proto, out, x, atol=1e-5, rtol=1e-5)
    before = _channel_ranges(proto, ["a1", "a2"], calib[0])
    after = _channel_ranges(out, ["a1", "a2"], calib[0])
    for name in ("a1", "a2"):  # the per-tensor grid now fits every channel far better
        spread_before = before[name].max() / np.median(before[name])
        spread_after = after[name].max() / np.median(after[name])
        assert spread_before > 10 and spread_after < spread_before / 4, (name, spread_before, spread_after)
    assert rec.stats["activation_range_spread_after"] < rec.stats["activation_range_spread_before"] / 4


def test_equalize_activations_alpha_one_equalizes_rms_outright():
    proto, calib = _imbalanced_block(), _block_calibration()
    out, rec = _run_pass(proto, "equalize:mode=activations,alpha=1.0", calibration=calib)
    assert rec.stats["pairs_equalized"] == 2 and rec.stats["equalize_alpha_mean"] == 1.0
    probe = onnx.ModelProto.FromString(out.SerializeToString())
    probe.graph.output.extend(helper.make_tensor_value_info(n, FLOAT, None) for n in ("a1", "a2"))
    every = {"x": np.concatenate([f["x"] for f in calib])}
    for v in run_model(probe, every)[1:]:  # a = 1: every channel's RMS over the calibration data is equal
        rms = np.sqrt((v.astype(np.float64) ** 2).mean(axis=(0, 2, 3)))
        assert rms.max() / rms.min() < 1.001, rms
    assert_parity(proto, out, calib[1], atol=1e-5, rtol=1e-5)


def test_quantize_int8_equalize_activations_improves_snr_and_keeps_qlinearconv(tmp_path):
    proto, calib = _imbalanced_block(), _block_calibration()
    x = {"x": rng(99).standard_normal((32, 8, 6, 6)).astype(np.float32)}  # held out from calibration
    ref = run_model(proto, x)[0]
    snr = {}
    for spec in ("quantize-int8", "quantize-int8:equalize=activations"):
        out, report = onnxslim_kit.optimize(proto, passes=[spec], calibration=calib, check="off")
        onnx.checker.check_model(out, full_check=True)
        fused = fused_ops(out, tmp_path)
        assert fused.count("QLinearConv") == 3 and "Conv" not in fused  # every Conv an integer kernel
        snr[spec] = _snr_db(ref, run_model(out, x)[0])
    assert report.passes[0].stats["pairs_equalized"] == 2
    assert snr["quantize-int8:equalize=activations"] > snr["quantize-int8"] + 6, snr


def test_equalize_activations_leaves_balanced_pair_alone_with_reason():
    """Channels alike (each output of conv1 a permutation of the same filter over i.i.d. inputs): no
    rescaling is expected to lower the int8 noise, so none is made."""
    r = rng(6)
    base = r.standard_normal(8).astype(np.float32)
    w1 = np.stack([np.roll(base, k) for k in range(8)])[:, :, None, None]
    w2 = np.sign(r.standard_normal((4, 8, 1, 1))).astype(np.float32) * 0.5
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1"),
             helper.make_node("Relu", ["h"], ["a"], name="act"),
             helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2")]
    proto = make_model(nodes, [("x", FLOAT, ["N", 8, 6, 6])], [("y", FLOAT, ["N", 4, 6, 6])],
                       [init("w1", w1), init("w2", w2)])
    calib = [{"x": rng(5 + i).standard_normal((8, 8, 6, 6)).astype(np.float32)} for i in range(3)]
    out, rec = _run_pass(proto, "equalize:mode=activations", calibration=calib)
    assert "expected quantization noise" in dict(rec.skipped)["conv1"]
    assert not rec.modified and rec.stats["pairs_equalized"] == 0
    after = _weights(out)
    for name, value in _weights(proto).items():
        np.testing.assert_array_equal(after[name], value)
    onnx.checker.check_model(out, full_check=True)


def test_equalize_activations_needs_calibration_and_keeps_weights_mode_default():
    with pytest.raises(Exception, match="alpha"):
        Pipeline.from_specs(["equalize:alpha=0.5"])  # alpha belongs to mode=activations
    pipeline = Pipeline.from_specs(["equalize:mode=activations"])
    assert "calibration" in pipeline.passes[0].needs
    assert Pipeline.from_specs(["equalize"]).passes[0].needs == frozenset()
    # quantize-int8: equalize=true is still the weight-range CLE
    out, rec = _run_pass(_depthwise_chain(), "quantize-int8:equalize=true",
                         calibration=[{"x": rng(4).standard_normal((2, 4, 6, 6)).astype(np.float32)}])
    assert rec.stats["pairs_equalized"] == 2 and "equalize_sweeps" in rec.stats
    onnx.checker.check_model(out, full_check=True)


def test_quantize_int8_equalize_both_runs_weight_cle_then_activation_step(tmp_path):
    proto, calib = _imbalanced_block(), _block_calibration()
    x = {"x": rng(98).standard_normal((32, 8, 6, 6)).astype(np.float32)}
    ref = run_model(proto, x)[0]
    plain, _ = onnxslim_kit.optimize(proto, passes=["quantize-int8"], calibration=calib, check="off")
    out, report = onnxslim_kit.optimize(proto, passes=["quantize-int8:equalize=both"], calibration=calib, check="off")
    stats = report.passes[0].stats
    assert stats["pairs_equalized"] == 2 and stats["equalize_sweeps"] >= 1  # the weight CLE ran
    assert "pairs_equalized_activations" in stats                          # then the activation step
    onnx.checker.check_model(out, full_check=True)
    assert fused_ops(out, tmp_path).count("QLinearConv") == 3
    assert _snr_db(ref, run_model(out, x)[0]) > _snr_db(ref, run_model(plain, x)[0]) + 6


def test_equalize_activations_is_exact_through_leaky_relu_and_skips_clip():
    calib = [{"x": rng(20 + i).standard_normal((2, 3, 8, 8)).astype(np.float32)} for i in range(2)]
    proto = _conv_pair("LeakyRelu")
    out, rec = _run_pass(proto, "equalize:mode=activations,alpha=1.0", calibration=calib)
    assert rec.stats["pairs_equalized"] == 1  # LeakyRelu(x / s) = LeakyRelu(x) / s for s > 0
    assert_parity(proto, out, {"x": rng(21).standard_normal((2, 3, 8, 8)).astype(np.float32)}, atol=1e-4, rtol=1e-4)
    out, rec = _run_pass(_conv_pair("Clip"), "equalize:mode=activations", calibration=calib)
    assert not rec.modified and "scale-equivariant" in dict(rec.skipped)["conv1"]


def test_quantize_int8_equalize_true_in_a_toml_recipe_is_still_the_weight_cle(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[[pass]]\nname = "quantize-int8"\nequalize = true\n\n'
                      '[[pass]]\nname = "equalize"\nmode = "activations"\n')
    quantize, equalize = Pipeline.from_recipe(recipe).passes
    assert quantize.options()["equalize"] == "true" and quantize._equalize_mode == "weights"
    assert equalize.options()["mode"] == "activations"
