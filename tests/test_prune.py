"""passes/prune.py + passes/channel_groups.py: prune-channels.

Coupling rules are tested on hand-built graphs with one *dead* channel (zero in every weight of its
group, so its l1 importance is zero): pruning exactly that channel with reconstruction off must give the
original outputs (atol 1e-5), and the sliced weights must equal the original ones with that channel
deleted."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxslim_kit
from builders import FLOAT, assert_parity, fused_ops, init, make_model, rng, run_model
from onnxslim_kit.errors import InputError
from onnxslim_kit.ir import Model
from passes.channel_groups import analyze
from passes.reconstruct import LeastSquaresFit, conv_patches

MODELS = Path(__file__).resolve().parent.parent / "models"
EXACT = {"atol": 1e-5, "rtol": 1e-5}


def _prune(proto, *, tolerance=EXACT, calibration=None, **opts):
    opts = {"ratio": 0.1, "multiple": 1, "reconstruct": "false", **opts}
    spec = "prune-channels:" + ",".join(f"{k}={v}" for k, v in opts.items())
    return onnxslim_kit.optimize(proto, passes=[spec], tolerance=tolerance, calibration=calibration)


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """node name -> its weight (input 1), whether an initializer or a Constant node."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return {n.name: values[n.input[1]] for n in model.graph.node if len(n.input) > 1 and n.input[1] in values}


def _skips(report) -> dict[str, str]:
    return {c: r for c, r in report.passes[-1].skipped}


def _conv_w(r, m, c, k=3, dead_out=None, dead_in=None):
    w = (r.standard_normal((m, c, k, k)) * 0.3).astype(np.float32)
    if dead_out is not None:
        w[dead_out] = 0
    if dead_in is not None:
        w[:, dead_in] = 0
    return w


def _feeds(shape=(2, 3, 8, 8), seed=5):
    return {"x": rng(seed).standard_normal(shape).astype(np.float32)}


# -- coupling rules ---------------------------------------------------------------------------------
def test_prune_channels_conv_bn_relu_conv_is_exact_for_a_dead_channel():
    r = rng(0)
    b1 = r.standard_normal(10).astype(np.float32)
    b1[4] = 0
    inits = [init("w1", _conv_w(r, 10, 3, dead_out=4)), init("b1", b1),
             init("s", r.random(10).astype(np.float32) + 0.5), init("bb", r.random(10).astype(np.float32)),
             init("m", r.random(10).astype(np.float32)), init("v", r.random(10).astype(np.float32) + 0.5),
             init("w2", _conv_w(r, 6, 10, dead_in=4))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "s", "bb", "m", "v"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    proto = make_model(nodes, [("x", FLOAT, ["N", 3, 8, 8])], [("y", FLOAT, ["N", 6, 6, 6])], inits)
    out, report = _prune(proto)
    assert_parity(proto, out, _feeds())
    w = _weights(out)
    np.testing.assert_array_equal(w["conv1"], np.delete(numpy_helper.to_array(proto.graph.initializer[0]), 4, 0))
    np.testing.assert_array_equal(w["conv2"], np.delete(numpy_helper.to_array(proto.graph.initializer[6]), 4, 1))
    bn = next(n for n in out.graph.node if n.op_type == "BatchNormalization")
    assert [numpy_helper.to_array(t).shape for t in out.graph.initializer if t.name in bn.input[1:]] == [(9,)] * 4
    assert report.passes[-1].stats["channels_removed"] == 1


def test_prune_channels_residual_add_prunes_both_branches_together():
    r = rng(1)
    inits = [init("w1", _conv_w(r, 8, 3, dead_out=2)), init("w2", _conv_w(r, 8, 3, dead_out=2)),
             init("w3", _conv_w(r, 4, 8, dead_in=2))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="left", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w2"], ["b"], name="right", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["a", "b"], ["s"], name="join"),
             helper.make_node("Relu", ["s"], ["sr"], name="relu"),
             helper.make_node("Conv", ["sr", "w3"], ["y"], name="head")]
    proto = make_model(nodes, [("x", FLOAT, ["N", 3, 8, 8])], [("y", FLOAT, ["N", 4, 6, 6])], inits)
    an = analyze(Model.from_proto(proto))
    joined = [g for g in an.groups.values() if len(g.producers) == 2]
    assert len(joined) == 1 and {p.name for p in joined[0].producers} == {"left", "right"}
    out, _ = _prune(proto, ratio=0.125)
    assert_parity(proto, out, _feeds())
    w = _weights(out)
    assert w["left"].shape[0] == w["right"].shape[0] == w["head"].shape[1] == 7


def test_prune_channels_concat_offsets_the_consumer_slice():
    r = rng(2)
    inits = [init("w1", _conv_w(r, 8, 3)), init("w2", _conv_w(r, 8, 3, dead_out=5)),
             init("w3", _conv_w(r, 4, 16, dead_in=8 + 5))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w2"], ["b"], name="c2", pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
             helper.make_node("Conv", ["cat", "w3"], ["y"], name="c3")]
    proto = make_model(nodes, [("x", FLOAT, ["N", 3, 8, 8])], [("y", FLOAT, ["N", 4, 6, 6])], inits)
    out, _ = _prune(proto, ratio=0.0625, scope="global")  # exactly one of the 16 channels
    assert_parity(proto, out, _feeds())
    w = _weights(out)
    assert (w["c1"].shape[0], w["c2"].shape[0], w["c3"].shape[1]) == (8, 7, 15)
    np.testing.assert_array_equal(w["c3"], np.delete(numpy_helper.to_array(proto.graph.initializer[2]), 13, 1))


def test_prune_channels_depthwise_conv_follows_and_updates_group():
    r = rng(3)
    dw = (r.standard_normal((8, 1, 3, 3)) * 0.3).astype(np.float32)
    inits = [init("w1", _conv_w(r, 8, 3, k=1, dead_out=1)), init("dw", dw), init("dwb", np.zeros(8, np.float32)),
             init("w3", _conv_w(r, 4, 8, k=1, dead_in=1))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="expand"),
             helper.make_node("Clip", ["a", "", ""], ["a6"], name="relu6"),
             helper.make_node("Conv", ["a6", "dw", "dwb"], ["d"], name="dw", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["d", "w3"], ["y"], name="project")]
    proto = make_model(nodes, [("x", FLOAT, ["N", 3, 8, 8])], [("y", FLOAT, ["N", 4, 8, 8])], inits)
    out, _ = _prune(proto, ratio=0.125)
    assert_parity(proto, out, _feeds())
    node = next(n for n in out.graph.node if n.name == "dw")
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "group")) == 7
    assert _weights(out)["dw"].shape == (7, 1, 3, 3)


def test_prune_channels_flatten_into_gemm_removes_a_block_of_rows():
    r = rng(4)
    fc = (r.standard_normal((5, 8 * 4)) * 0.3).astype(np.float32)
    fc[:, 3 * 4:4 * 4] = 0
    inits = [init("w1", _conv_w(r, 8, 3, dead_out=3)), init("fc", fc), init("fcb", np.ones(5, np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv", strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ar"], name="relu"),
             helper.make_node("MaxPool", ["ar"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"], name="flat", axis=1),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], name="fc", transB=1)]
    proto = make_model(nodes, [("x", FLOAT, ["N", 3, 8, 8])], [("y", FLOAT, ["N", 5])], inits)
    out, _ = _prune(proto, ratio=0.125)
    assert_parity(proto, out, _feeds())
    np.testing.assert_array_equal(_weights(out)["fc"], np.delete(fc, range(12, 16), 1))


def _mlp_block(dead: int | None = 7, hidden: int = 16, reshape_heads: bool = False):
    """Transformer MLP: MatMul -> Add bias -> GELU (erf form) -> MatMul -> Add bias -> + residual."""
    r = rng(5)
    w1 = (r.standard_normal((8, hidden)) * 0.3).astype(np.float32)
    b1 = r.standard_normal(hidden).astype(np.float32)
    w2 = (r.standard_normal((hidden, 8)) * 0.3).astype(np.float32)
    if dead is not None:
        w1[:, dead] = 0
        b1[dead] = 0
        w2[dead] = 0
    inits = [init("w1", w1), init("b1", b1), init("w2", w2), init("b2", np.zeros(8, np.float32)),
             init("sqrt2", np.array(1.4142135, np.float32)), init("one", np.array(1.0, np.float32)),
             init("half", np.array(0.5, np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="up"),
             helper.make_node("Add", ["h0", "b1"], ["h"], name="up_bias"),
             helper.make_node("Div", ["h", "sqrt2"], ["g0"], name="g_div"),
             helper.make_node("Erf", ["g0"], ["g1"], name="g_erf"),
             helper.make_node("Add", ["g1", "one"], ["g2"], name="g_add"),
             helper.make_node("Mul", ["h", "g2"], ["g3"], name="g_mul"),
             helper.make_node("Mul", ["g3", "half"], ["g"], name="g_half")]
    if reshape_heads:
        inits.append(init("heads", np.array([0, 0, 2, hidden // 2], np.int64)))
        nodes.append(helper.make_node("Reshape", ["g", "heads"], ["gh"], name="split_heads"))
        return make_model(nodes, [("x", FLOAT, ["B", "S", 8])], [("gh", FLOAT, ["B", "S", 2, hidden // 2])], inits)
    nodes += [helper.make_node("MatMul", ["g", "w2"], ["o0"], name="down"),
              helper.make_node("Add", ["o0", "b2"], ["o1"], name="down_bias"),
              helper.make_node("Add", ["o1", "x"], ["y"], name="residual")]
    return make_model(nodes, [("x", FLOAT, ["B", "S", 8])], [("y", FLOAT, ["B", "S", 8])], inits)


def test_prune_channels_transformer_mlp_hidden_units():
    proto = _mlp_block()
    out, report = _prune(proto, ratio=1 / 16)
    assert_parity(proto, out, {"x": rng(6).standard_normal((2, 5, 8)).astype(np.float32)})
    w = _weights(out)
    assert w["up"].shape == (8, 15) and w["down"].shape == (15, 8)
    # the residual stream (down's outputs) joins the graph input: not prunable, and said so
    assert "not prunable" in _skips(report)["down"]


def test_prune_channels_squeeze_excitation_mul_joins_groups():
    r = rng(7)
    inits = [init("w1", _conv_w(r, 8, 3, dead_out=6)), init("se1", _conv_w(r, 4, 8, k=1, dead_in=6)),
             init("se2", _conv_w(r, 8, 4, k=1, dead_out=6)), init("w3", _conv_w(r, 4, 8, k=1, dead_in=6))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["a"], ["p"], name="gap"),
             helper.make_node("Conv", ["p", "se1"], ["s1"], name="se_reduce"),
             helper.make_node("Relu", ["s1"], ["s1r"], name="se_relu"),
             helper.make_node("Conv", ["s1r", "se2"], ["s2"], name="se_expand"),
             helper.make_node("HardSigmoid", ["s2"], ["s3"], name="se_gate"),
             helper.make_node("Mul", ["a", "s3"], ["m"], name="se_scale"),
             helper.make_node("Conv", ["m", "w3"], ["y"], name="project")]
    proto = make_model(nodes, [("x", FLOAT, ["N", 3, 8, 8])], [("y", FLOAT, ["N", 4, 8, 8])], inits)
    an = analyze(Model.from_proto(proto))
    assert any({p.name for p in g.producers} == {"conv", "se_expand"} for g in an.groups.values())
    out, _ = _prune(proto, ratio=0.125, protect="se_reduce")
    assert_parity(proto, out, _feeds())
    w = _weights(out)
    assert w["conv"].shape[0] == w["se_expand"].shape[0] == w["se_reduce"].shape[1] == w["project"].shape[1] == 7


def test_prune_channels_resize_pad_transpose_split_pass_channels_on():
    r = rng(8)
    inits = [init("w1", _conv_w(r, 4, 3, k=1, dead_out=0)), init("w2", _conv_w(r, 4, 3, k=1, dead_out=0)),
             init("scales", np.array([1, 1, 2, 2], np.float32)), init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
             init("split", np.array([4, 4], np.int64)),
             init("wa", _conv_w(r, 3, 4, k=1, dead_in=0)), init("wb", _conv_w(r, 3, 4, k=1, dead_in=0))]
    # The Split cuts between the two convs' segments of the Concat, so each piece keeps its own group.
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"),
             helper.make_node("Conv", ["x", "w2"], ["b"], name="c2"),
             helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
             helper.make_node("Resize", ["cat", "", "scales"], ["up"], name="up", mode="nearest"),
             helper.make_node("Pad", ["up", "pads"], ["pad"], name="pad"),
             helper.make_node("Split", ["pad", "split"], ["s0", "s1"], name="split", axis=1),
             helper.make_node("Conv", ["s0", "wa"], ["ya"], name="ca"),
             helper.make_node("Conv", ["s1", "wb"], ["yb"], name="cb")]
    proto = make_model(nodes, [("x", FLOAT, ["N", 3, 4, 4])], [("ya", FLOAT, None), ("yb", FLOAT, None)], inits)
    out, _ = _prune(proto, ratio=0.25, scope="local")
    assert_parity(proto, out, _feeds((2, 3, 4, 4)))
    w = _weights(out)
    assert w["c1"].shape[0] == w["c2"].shape[0] == w["ca"].shape[1] == w["cb"].shape[1] == 3


# -- unprunable cases (reasons asserted) --------------------------------------------------------------
def test_prune_channels_refuses_what_it_does_not_understand_with_reasons():
    r = rng(9)
    inits = [init("w1", _conv_w(r, 8, 3)), init("w2", _conv_w(r, 8, 3)), init("w3", _conv_w(r, 8, 3)),
             init("wg", _conv_w(r, 8, 4)), init("w4", _conv_w(r, 8, 3)), init("shape", np.array([0, 4, 2, -1], np.int64))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="to_output"),
             helper.make_node("Conv", ["x", "w2"], ["b"], name="to_lrn"),
             helper.make_node("LRN", ["b"], ["bl"], name="lrn", size=3),
             helper.make_node("Conv", ["x", "w3"], ["c"], name="to_grouped"),
             helper.make_node("Conv", ["c", "wg"], ["cg"], name="grouped", group=2),
             helper.make_node("Conv", ["x", "w4"], ["d"], name="to_reshape"),
             helper.make_node("Reshape", ["d", "shape"], ["dr"], name="mix")]
    proto = make_model(nodes, [("x", FLOAT, ["N", 3, 6, 6])],
                       [("a", FLOAT, None), ("bl", FLOAT, None), ("cg", FLOAT, None), ("dr", FLOAT, None)], inits)
    out, report = _prune(proto, ratio=0.5)
    skips = _skips(report)
    assert "reaches the graph output 'a'" in skips["to_output"]
    assert "LRN 'lrn', which the analysis does not understand" in skips["to_lrn"]
    assert "grouped convolution" in skips["to_grouped"]
    assert "mixes the channel axis" in skips["to_reshape"]
    assert report.passes[-1].stats["groups_pruned"] == 0
    assert not report.passes[-1].modified


def test_prune_channels_reshape_into_heads_is_unprunable():
    out, report = _prune(_mlp_block(dead=None, reshape_heads=True), ratio=0.25)
    assert "mixes the channel axis" in _skips(report)["up"]


def test_prune_channels_concat_with_a_dynamic_channel_input_is_refused():
    r = rng(10)
    inits = [init("w1", _conv_w(r, 8, 3)), init("w2", _conv_w(r, 4, 11))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["a", "z"], ["cat"], name="cat", axis=1),
             helper.make_node("Conv", ["cat", "w2"], ["y"], name="c2")]
    proto = make_model(nodes, [("x", FLOAT, ["N", 3, 6, 6]), ("z", FLOAT, ["N", "C", 6, 6])],
                       [("y", FLOAT, None)], inits)
    calib = {"x": rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32),
             "z": rng(2).standard_normal((2, 3, 6, 6)).astype(np.float32)}
    _, report = _prune(proto, ratio=0.5, calibration=calib)
    assert "size on the channel axis is unknown" in _skips(report)["conv"]


# -- amount options ---------------------------------------------------------------------------------
def _wide_chain(channels=32, depth=3, seed=11):
    r = rng(seed)
    inits, nodes, prev, c_in = [], [], "x", 3
    for i in range(depth):
        inits.append(init(f"w{i}", _conv_w(r, channels, c_in)))
        nodes += [helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        prev, c_in = f"r{i}", channels
    inits.append(init("head", _conv_w(r, 2, channels, k=1)))
    nodes.append(helper.make_node("Conv", [prev, "head"], ["y"], name="head"))
    return make_model(nodes, [("x", FLOAT, ["N", 3, 8, 8])], [("y", FLOAT, ["N", 2, 8, 8])], inits)


def test_prune_channels_rounds_kept_count_to_multiple_and_protects():
    proto = _wide_chain()
    out, report = _prune(proto, ratio=0.3, multiple=8, protect="conv1", tolerance={"cosine": 0.0})
    w = _weights(out)
    assert w["conv0"].shape[0] == 24  # 32 * 0.7 = 22.4 -> 24
    assert w["conv1"].shape[0] == 32 and w["conv2"].shape[1] == 32
    assert _skips(report)["conv1"] == "protected by option"
    onnx.checker.check_model(out, full_check=True)


def test_prune_channels_never_prunes_a_group_to_zero():
    out, _ = _prune(_wide_chain(channels=4), ratio=0.99, tolerance={"cosine": -1.0})
    assert all(w.shape[0] >= 1 for name, w in _weights(out).items() if name.startswith("conv"))
    assert _weights(out)["conv0"].shape[0] == 1


def test_prune_channels_target_macs_reaches_the_budget():
    from onnxslim_kit.metrics import model_stats

    proto = _wide_chain(channels=64)
    out, report = _prune(proto, target_macs=0.5, multiple=4, tolerance={"cosine": 0.0})
    before, after = model_stats(proto).macs, model_stats(out).macs
    assert after <= 0.5 * before
    assert after >= 0.3 * before  # the smallest ratio that meets it, not everything
    assert 0 < report.passes[-1].stats["ratio_searched"] < 0.95


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn", "random", "activation", "stability", "reconstruction"])
def test_prune_channels_every_criterion_finds_the_dead_channel(criterion):
    r = rng(12)
    w1 = _conv_w(r, 8, 3, dead_out=5)
    inits = [init("w1", w1), init("w2", _conv_w(r, 4, 8, dead_in=5)),
             init("s", np.where(np.arange(8) == 5, 0.0, 1.0).astype(np.float32)),
             init("bb", np.zeros(8, np.float32)), init("m", np.zeros(8, np.float32)), init("v", np.ones(8, np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["a", "s", "bb", "m", "v"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["ar"], name="relu"),
             helper.make_node("Conv", ["ar", "w2"], ["y"], name="conv2")]
    proto = make_model(nodes, [("x", FLOAT, ["N", 3, 8, 8])], [("y", FLOAT, ["N", 4, 6, 6])], inits)
    calib = {"x": rng(13).standard_normal((4, 3, 8, 8)).astype(np.float32)}
    tol = {"cosine": -1.0} if criterion == "random" else EXACT
    out, report = _prune(proto, ratio=0.125, criterion=criterion, calibration=calib, tolerance=tol)
    onnx.checker.check_model(out, full_check=True)
    assert _weights(out)["conv1"].shape[0] == 7
    if criterion != "random":
        np.testing.assert_array_equal(_weights(out)["conv1"], np.delete(w1, 5, 0))


def test_prune_channels_bad_options_are_usage_errors():
    with pytest.raises((InputError, ValueError)):
        _prune(_wide_chain(), ratio=1.5)
    with pytest.raises((InputError, ValueError)):
        _prune(_wide_chain(), criterion="magic")


# -- reconstruction -----------------------------------------------------------------------------------
def test_conv_patches_reproduce_onnxruntime_convolution():
    r = rng(14)
    x = r.standard_normal((2, 3, 9, 7)).astype(np.float32)
    w = r.standard_normal((4, 3, 3, 2)).astype(np.float32)
    attrs = {"strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2]}
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    proto = make_model([node], [("x", FLOAT, [2, 3, 9, 7])], [("y", FLOAT, None)], [init("w", w)])
    (ref,) = run_model(proto, {"x": x})
    rows = conv_patches(x, w.shape, attrs)
    got = (rows @ w.reshape(4, -1).T).reshape(ref.shape[0], ref.shape[2], ref.shape[3], 4).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_least_squares_fit_keeps_the_prior_when_the_refit_does_not_generalise():
    r = rng(15)
    prior = r.standard_normal((40, 3))
    fit = LeastSquaresFit()
    for _ in range(4):  # 4 samples for 40 features, targets unrelated to the inputs: pure noise to fit
        x = r.standard_normal((1, 40))
        fit.add(x, x @ prior + 5 * r.standard_normal((1, 3)))
    w, _ = fit.solve(prior)
    assert w is None or np.linalg.norm(w - prior) < 0.5 * np.linalg.norm(prior)
    good = LeastSquaresFit()
    true = r.standard_normal((6, 3))
    for _ in range(50):
        x = r.standard_normal((10, 6))
        good.add(x, x @ true)
    w, damping = good.solve(np.zeros((6, 3)))
    np.testing.assert_allclose(w, true, atol=1e-2)
    assert damping is not None


def _halves(name):
    data = np.load(MODELS / f"{name}.calib.npz")
    n = next(iter(data.values())).shape[0]
    return ({k: v[: n // 2] for k, v in data.items()}, {k: v[n // 2:] for k, v in data.items()})


def _cosine(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet_tiny", "mobilenetv2_tiny", "mobilenetv3_tiny", "det_head_tiny", "bert_tiny"])
def test_prune_channels_real_models_valid_smaller_and_reconstruction_helps(name):
    from onnxslim_kit.metrics import model_stats

    fit, held = _halves(name)
    src = onnx.load(str(MODELS / f"{name}.onnx"))
    results = {}
    for rc in ("false", "true"):
        out, report = onnxslim_kit.optimize(src, passes=["cleanup", f"prune-channels:ratio=0.5,reconstruct={rc}"],
                                            calibration=fit, tolerance={"cosine": 0.0})
        onnx.checker.check_model(out, full_check=True)
        ref, cand = run_model(src, held), run_model(out, held)
        results[rc] = min(_cosine(a, b) for a, b in zip(ref, cand))
        assert report.passes[-1].stats["groups_pruned"] >= 2
        assert model_stats(out).macs < 0.9 * model_stats(src).macs
        assert report.after.params < 0.9 * report.before.params
    assert results["true"] > results["false"], results  # on held-out samples, not the fitted ones


@pytest.mark.slow
def test_prune_channels_digits_cnn_accuracy_drop_at_most_one_point():
    data = np.load(MODELS / "digits_cnn.eval.npz")
    src = onnx.load(str(MODELS / "digits_cnn.onnx"))
    # 30% of the channels removed (multiple=1: no rounding to the CPU's channel block)
    out, report = onnxslim_kit.optimize(src, passes=["cleanup", "prune-channels:ratio=0.3,multiple=1"],
                                        calibration=str(MODELS / "digits_cnn.calib.npz"))
    acc = lambda m: float((run_model(m, {"image": data["image"]})[0].argmax(1) == data["labels"]).mean())  # noqa: E731
    assert report.passes[-1].stats["channels_removed"] >= 0.28 * report.passes[-1].stats["channels_before"]
    assert acc(src) - acc(out) <= 0.01


@pytest.mark.slow
def test_prune_channels_constant_node_weights_at_opset_11_and_external_data(tmp_path):
    for name in ("paddle_style_opset11", "mobilenetv2_tiny_dynamo"):
        out_path = tmp_path / f"{name}.onnx"
        _, report = onnxslim_kit.optimize(str(MODELS / f"{name}.onnx"), passes=["cleanup", "prune-channels:ratio=0.5"],
                                          calibration=str(MODELS / f"{name.replace('_dynamo', '')}.calib.npz"),
                                          output=str(out_path), tolerance={"cosine": 0.9})
        assert report.passes[-1].stats["groups_pruned"] >= 2
        onnx.checker.check_model(str(out_path), full_check=True)


# -- prune-weights ------------------------------------------------------------------------------------
def _linear(k=32, n=16, seed=16, const_feature=None):
    r = rng(seed)
    w = r.standard_normal((k, n)).astype(np.float32)
    inits = [init("w", w), init("b", r.standard_normal(n).astype(np.float32)),
             init("wc", r.standard_normal((4, 4, 3, 3)).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("Add", ["h", "b"], ["y"], name="fc_bias")]
    proto = make_model(nodes, [("x", FLOAT, ["N", k])], [("y", FLOAT, ["N", n])], inits[:2])
    calib = r.standard_normal((64, k)).astype(np.float32)
    if const_feature is not None:
        calib[:, const_feature] = 3.0
    return proto, w, {"x": calib}


def test_prune_weights_magnitude_zeroes_the_smallest_per_layer():
    proto, w, calib = _linear()
    out, report = onnxslim_kit.optimize(proto, passes=["prune-weights:sparsity=0.25,min_elements=16"],
                                        calibration=calib, tolerance={"cosine": 0.0})
    onnx.checker.check_model(out, full_check=True)
    new = _weights(out)["fc"]
    assert np.count_nonzero(new == 0) == w.size // 4
    assert np.abs(w[new == 0]).max() <= np.abs(w[new != 0]).min()
    np.testing.assert_array_equal(new[new != 0], w[new != 0])
    assert any("not time" in msg for msg in report.warnings)
    assert report.passes[-1].stats["sparsity"] == 0.25


def test_prune_weights_two_of_four_pattern_along_input_features():
    proto, w, calib = _linear()
    out, _ = onnxslim_kit.optimize(proto, passes=["prune-weights:pattern=2:4,min_elements=16"], calibration=calib,
                                   tolerance={"cosine": 0.0})
    new = _weights(out)["fc"]  # [K, N]: groups of 4 consecutive input features per output column
    nonzero = (new != 0).reshape(8, 4, 16).sum(axis=1)
    assert (nonzero == 2).all()


def test_prune_weights_stability_folds_a_constant_input_feature_into_the_bias_exactly():
    proto, w, calib = _linear(const_feature=5)
    # 1/32 of the weights: the 16 weights on feature 5 have zero input variance, so zero importance.
    out, report = onnxslim_kit.optimize(proto, passes=["prune-weights:sparsity=0.03125,criterion=stability,min_elements=16"],
                                        calibration=calib, tolerance=EXACT)
    new = _weights(out)["fc"]
    assert (new[5] == 0).all() and np.count_nonzero(new == 0) == 16
    assert_parity(proto, out, {"x": calib["x"][:8]}, atol=1e-4, rtol=1e-4)


def test_prune_weights_sparse_storage_is_smaller_and_survives_a_reload(tmp_path):
    proto, w, calib = _linear(k=128, n=64)
    dense, _ = onnxslim_kit.optimize(proto, passes=["prune-weights:sparsity=0.9,min_elements=16"], calibration=calib,
                                     tolerance={"cosine": 0.0})
    path = tmp_path / "sparse.onnx"
    sparse, report = onnxslim_kit.optimize(proto, passes=["prune-weights:sparsity=0.9,min_elements=16,sparse_storage=true"],
                                           calibration=calib, tolerance={"cosine": 0.0}, output=str(path))
    assert any(a.type == onnx.AttributeProto.SPARSE_TENSOR for n in sparse.graph.node for a in n.attribute)
    assert path.stat().st_size < 0.5 * dense.ByteSize()
    onnx.checker.check_model(str(path), full_check=True)
    feeds = {"x": calib["x"][:4]}
    np.testing.assert_array_equal(run_model(sparse, feeds)[0], run_model(dense, feeds)[0])
    again, _ = onnxslim_kit.optimize(str(path), passes=["cleanup"], calibration=calib)  # the IR keeps sparse values
    np.testing.assert_allclose(run_model(again, feeds)[0], run_model(dense, feeds)[0], atol=1e-5)
    # At 50% sparsity int64 indices would make it larger: stored dense, and said so.
    _, report = onnxslim_kit.optimize(proto, passes=["prune-weights:sparsity=0.5,min_elements=16,sparse_storage=true"],
                                      calibration=calib, tolerance={"cosine": 0.0})
    assert "would be larger" in _skips(report)["fc"]


def test_prune_weights_reads_models_with_sparse_initializers():
    proto, w, calib = _linear()
    w0 = w.copy()
    w0[w0 < 0.5] = 0
    idx = np.flatnonzero(w0)
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(w0.reshape(-1)[idx], "w"),
                                       numpy_helper.from_array(idx.astype(np.int64), "w_idx"), list(w0.shape))
    del proto.graph.initializer[0]
    proto.graph.sparse_initializer.append(sparse)
    out, _ = onnxslim_kit.optimize(proto, passes=["cleanup"], calibration=calib)
    np.testing.assert_array_equal(numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "w")), w0)
    assert not out.graph.sparse_initializer


def test_prune_weights_global_scope_and_skip_reasons():
    r = rng(17)
    inits = [init("w1", r.standard_normal((64, 64)).astype(np.float32) * 0.01),
             init("w2", r.standard_normal((64, 64)).astype(np.float32)),
             init("w3", r.standard_normal((64, 8)).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="small_weights"),
             helper.make_node("MatMul", ["a", "w2"], ["b"], name="big_weights"),
             helper.make_node("MatMul", ["b", "w3"], ["y"], name="tiny")]
    proto = make_model(nodes, [("x", FLOAT, ["N", 64])], [("y", FLOAT, ["N", 8])], inits)
    out, report = onnxslim_kit.optimize(proto, passes=["prune-weights:sparsity=0.5,scope=global,exclude=big_weights"],
                                        calibration={"x": r.standard_normal((4, 64)).astype(np.float32)},
                                        tolerance={"cosine": -1.0})
    skips = _skips(report)
    assert skips["big_weights"] == "excluded by option"
    assert "min_elements" in skips["tiny"]
    out2, _ = onnxslim_kit.optimize(proto, passes=["prune-weights:sparsity=0.5,scope=global"],
                                    tolerance={"cosine": -1.0})
    w = _weights(out2)
    # one threshold over both: the 100x smaller weights go first
    assert (w["small_weights"] == 0).mean() > 0.9 and (w["big_weights"] == 0).mean() < 0.1


@pytest.mark.slow
def test_prune_channels_then_quantize_int8_runs_integer_kernels(tmp_path):
    from onnxslim_kit.metrics import model_stats

    src = MODELS / "mobilenetv2_tiny.onnx"
    out, report = onnxslim_kit.optimize(src, passes=["cleanup", "prune-channels:ratio=0.5", "quantize-int8"],
                                        calibration=MODELS / "mobilenetv2_tiny.calib.npz")
    assert report.parity.ok and [p.name for p in report.passes] == ["cleanup", "prune-channels", "quantize-int8"]
    assert report.passes[1].stats["channels_removed"] > 0 and report.passes[2].stats["nodes_quantized"] > 10
    onnx.checker.check_model(out, full_check=True)
    assert model_stats(out).macs < 0.8 * model_stats(onnx.load(str(src))).macs
    fused = fused_ops(out, tmp_path)
    assert "Conv" not in fused and fused.count("QLinearConv") == sum(n.op_type == "Conv" for n in out.graph.node)


def test_prune_channels_layer_ratios_override_the_global_ratio():
    out, _ = _prune(_wide_chain(), ratio=0.25, multiple=1, layer_ratios="conv1=0.5", tolerance={"cosine": -1.0})
    w = _weights(out)
    assert (w["conv0"].shape[0], w["conv1"].shape[0], w["conv2"].shape[0]) == (24, 16, 24)
    with pytest.raises((InputError, ValueError)):
        _prune(_wide_chain(), layer_ratios="conv1")


def test_prune_channels_default_multiple_is_the_cpu_channel_block(monkeypatch):
    from onnxslim_kit import runtime
    from passes.prune import PruneChannels

    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert runtime.channel_block() == 16 and PruneChannels()._block == 16
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2"}))
    assert PruneChannels()._block == 8
    assert PruneChannels(multiple=4)._block == 4 and PruneChannels().multiple is None  # recipes stay portable


def test_prune_channels_resize_with_run_time_sizes_is_refused():
    r = rng(18)
    inits = [init("w1", _conv_w(r, 8, 3)), init("w2", _conv_w(r, 4, 8, k=1))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Shape", ["z"], ["zs"], name="shape"),
             helper.make_node("Resize", ["a", "", "", "zs"], ["up"], name="up", mode="nearest"),
             helper.make_node("Conv", ["up", "w2"], ["y"], name="c2")]
    proto = make_model(nodes, [("x", FLOAT, ["N", 3, 6, 6]), ("z", FLOAT, ["N", 8, 12, 12])], [("y", FLOAT, None)],
                       inits)
    calib = {"x": rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32),
             "z": rng(2).standard_normal((2, 8, 12, 12)).astype(np.float32)}
    _, report = _prune(proto, ratio=0.5, calibration=calib)
    assert "scales or sizes at run time" in _skips(report)["conv"]


def test_prune_channels_include_prunes_only_groups_of_the_named_layers():
    from builders import mlp_blocks

    proto = mlp_blocks(layers=2, hidden=16, opset=17)
    out, report = _prune(proto, ratio=0.25, include="up1", tolerance={"cosine": 0.5})
    w = _weights(out)
    assert w["up1"].shape == (16, 48) and w["down1"].shape == (48, 16)
    assert w["up0"].shape == (16, 64) and w["down0"].shape == (64, 16)  # group of up0 left alone
    assert "not in include" in _skips(report)["up0"]
    onnx.checker.check_model(out, full_check=True)
    feeds = {"x": rng(6).standard_normal((2, 5, 16)).astype(np.float32)}
    ref, got = run_model(proto, feeds)[0], run_model(out, feeds)[0]
    assert got.shape == ref.shape
    assert float(np.dot(ref.ravel(), got.ravel()) / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.9
    with pytest.raises(InputError, match="include: no node named 'nope'"):
        _prune(proto, include="nope")
