"""passes/lowrank.py: svd."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxslim_kit
from builders import FLOAT, assert_parity, init, make_model, rng, run_model
from onnxslim_kit.errors import InputError
from onnxslim_kit.pipeline import build_pass
from passes.reconstruct import as_rows
from passes.lowrank import error_profile, factorize, gram_cholesky, refit_second_factor, shrink_gram

MODELS = Path(__file__).resolve().parent.parent / "models"


def test_svd_factorization_is_exact_at_full_rank_plain_and_whitened():
    r = rng(0)
    w = r.standard_normal((48, 32))
    x = r.standard_normal((500, 48)) * np.linspace(0.1, 3, 48)
    chol = gram_cholesky(x.T @ x, 1e-9)
    for c in (None, chol):
        a, b = factorize(w, 32, chol=c)
        np.testing.assert_allclose(a @ b, w, atol=1e-8)


def test_svd_whitening_minimises_output_error_not_weight_error():
    r = rng(1)
    w = r.standard_normal((64, 64))
    x = r.standard_normal((2000, 64)) * np.geomspace(0.01, 10, 64)  # very uneven input channels
    gram = x.T @ x
    a_p, b_p = factorize(w, 16)
    a_w, b_w = factorize(w, 16, chol=gram_cholesky(gram, 1e-9))
    out_err = lambda a, b: np.linalg.norm(x @ (w - a @ b))  # noqa: E731
    w_err = lambda a, b: np.linalg.norm(w - a @ b)  # noqa: E731
    assert out_err(a_w, b_w) < 0.5 * out_err(a_p, b_p)
    assert w_err(a_p, b_p) <= w_err(a_w, b_w)  # plain SVD is the best for the weight error
    b_r = refit_second_factor(a_p, w, gram, 1e-9)  # refitting B against the outputs only helps
    assert out_err(a_p, b_r) <= out_err(a_p, b_p) + 1e-9


def _mlp(k=128, n=128):
    r = rng(2)
    inits = [init("w1", (r.standard_normal((k, n)) * 0.1).astype(np.float32)),
             init("w2", (r.standard_normal((n, k)) * 0.1).astype(np.float32)),
             init("b2", r.standard_normal(n).astype(np.float32)),
             init("small", r.standard_normal((k, 4)).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["hr"], name="relu"),
             helper.make_node("Gemm", ["hr", "w2", "b2"], ["y"], name="fc2", transB=1),
             helper.make_node("MatMul", ["x", "small"], ["y2"], name="tiny")]
    return make_model(nodes, [("x", FLOAT, ["N", k])], [("y", FLOAT, ["N", n]), ("y2", FLOAT, ["N", 4])], inits)


def test_svd_rewrites_matmul_and_gemm_and_skips_with_reasons():
    proto = _mlp()
    out, report = onnxslim_kit.optimize(proto, passes=["svd:rank_ratio=0.25,whiten=false"],
                                        tolerance={"cosine": 0.0})
    rec = report.passes[0]
    assert rec.stats["layers_factored"] == 2 and rec.stats["params_after"] <= rec.stats["params_before"] / 2
    assert ("tiny", "weight has 512 elements < min_size=4096") in rec.skipped
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("MatMul") == 4 and ops.count("Gemm") == 1  # fc1: 2 MatMuls; fc2: MatMul + Gemm; tiny
    onnx.checker.check_model(out, full_check=True)
    assert report.after.macs < report.before.macs * 0.6
    x = rng(3).standard_normal((5, 128)).astype(np.float32)
    got = run_model(out, {"x": x})
    assert got[0].shape == (5, 128) and got[1].shape == (5, 4)


def test_svd_never_applies_a_factorization_that_saves_nothing():
    out, report = onnxslim_kit.optimize(_mlp(), passes=["svd:rank_ratio=0.75,whiten=false"])
    rec = report.passes[0]
    assert rec.stats["layers_factored"] == 0 and not rec.modified
    assert any("would not save" in reason for _, reason in rec.skipped)
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Relu", "Gemm", "MatMul"]


def test_svd_option_errors():
    for key, value, message in [("rank_ratio", "0", "rank_ratio"), ("energy", "1.5", "energy"),
                                ("max_error", "0", "max_error"), ("budget", "1.5", "budget"),
                                ("rank_by", "both", "expected one of auto, weights, outputs"),
                                ("whiten", "maybe", "expected one of auto, true, false")]:
        with pytest.raises(InputError, match=message):
            build_pass("svd", {key: value})


@pytest.mark.slow
def test_svd_whitened_beats_plain_on_bert_at_the_same_rank():
    calib = MODELS / "bert_tiny.calib.npz"
    cos = {}
    for whiten in ("false", "true"):
        _, report = onnxslim_kit.optimize(MODELS / "bert_tiny.onnx", calibration=calib,
                                          passes=["cleanup", f"svd:rank_ratio=0.25,whiten={whiten}"],
                                          tolerance={"cosine": 0.0})
        assert report.passes[1].stats["layers_factored"] == 13
        cos[whiten] = min(o.cosine for o in report.parity.outputs)
    assert cos["true"] > 0.99 and cos["true"] - cos["false"] > 0.05


@pytest.mark.slow
def test_svd_then_int8_pipeline(tmp_path):
    _, report = onnxslim_kit.optimize(MODELS / "bert_tiny.onnx", calibration=MODELS / "bert_tiny.calib.npz",
                                      passes=["cleanup", "svd:rank_ratio=0.25", "quantize-int8"],
                                      output=tmp_path / "b.onnx", tolerance={"cosine": 0.98})
    assert report.written and [r.name for r in report.passes] == ["cleanup", "svd", "quantize-int8"]
    assert report.passes[1].stats["layers_factored"] > 0 and report.passes[2].stats["nodes_quantized"] > 0
    assert report.after.bytes < report.before.bytes / 2


def _low_rank(r, shape, rank):
    """A random matrix of exactly ``rank`` (so a rank-``rank`` factorization is exact)."""
    return (r.standard_normal((shape[0], rank)) @ r.standard_normal((rank, shape[1])) * 0.1).astype(np.float32)


def _every_kind():
    """One candidate of each kind, each weight of true rank 8: MatMul on batched (3-D) activations, MatMul
    with the constant on the left, Gemm with transA/transB/alpha/beta and a bias, Conv 1x1 with stride and
    pads, Conv 3x3 with stride/pads/dilations, plus a depthwise Conv (never factored)."""
    r = rng(4)
    inits = [init("w_mm", _low_rank(r, (64, 96), 8)),
             init("w_left", _low_rank(r, (80, 16), 8)),
             init("w_gemm", _low_rank(r, (96, 64), 8)),       # [N, K] read with transB=1
             init("c_gemm", r.standard_normal(96).astype(np.float32)),
             init("w_c1", _low_rank(r, (96, 64), 8).reshape(96, 64, 1, 1)),
             init("b_c1", r.standard_normal(96).astype(np.float32)),
             init("w_c3", _low_rank(r, (80, 16 * 9), 8).reshape(80, 16, 3, 3)),
             init("b_c3", r.standard_normal(80).astype(np.float32)),
             init("w_dw", r.standard_normal((16, 1, 3, 3)).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "w_mm"], ["y_mm"], name="mm"),                # [2, 5, 64] @ [64, 96]
             helper.make_node("MatMul", ["w_left", "s"], ["y_left"], name="left"),         # [80, 16] @ [3, 16, 7]
             helper.make_node("Gemm", ["a", "w_gemm", "c_gemm"], ["y_gemm"], name="gemm",  # a: [64, 6], transA
                              transA=1, transB=1, alpha=0.5, beta=2.0),
             helper.make_node("Conv", ["img", "w_c1", "b_c1"], ["y_c1"], name="conv1x1",
                              kernel_shape=[1, 1], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["img16", "w_c3", "b_c3"], ["y_c3"], name="conv3x3",
                              kernel_shape=[3, 3], strides=[2, 1], pads=[2, 1, 2, 0], dilations=[2, 1]),
             helper.make_node("Conv", ["img16", "w_dw"], ["y_dw"], name="depthwise", kernel_shape=[3, 3],
                              group=16, pads=[1, 1, 1, 1])]
    inputs = [("x", FLOAT, [2, 5, 64]), ("s", FLOAT, [3, 16, 7]), ("a", FLOAT, [64, 6]),
              ("img", FLOAT, [2, 64, 9, 9]), ("img16", FLOAT, [2, 16, 10, 10])]
    outputs = [(o, FLOAT, None) for o in ("y_mm", "y_left", "y_gemm", "y_c1", "y_c3", "y_dw")]
    return make_model(nodes, inputs, outputs, inits)


def _feeds(proto, seed):
    r = rng(seed)
    return {i.name: r.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in proto.graph.input}


@pytest.mark.parametrize("whiten,refit", [("false", "false"), ("true", "false"), ("true", "true")])
def test_svd_every_candidate_kind_exact_at_full_rank(whiten, refit):
    proto = _every_kind()
    calib = [_feeds(proto, seed) for seed in range(3)]
    spec = f"svd:energy=1.0,whiten={whiten},refit={refit},min_size=256,damping=1e-9"  # ridge ~0: exact refit
    out, report = onnxslim_kit.optimize(proto, passes=[spec], calibration=calib,
                                        tolerance={"atol": 1e-4, "rtol": 1e-4})
    rec = report.passes[0]
    assert rec.stats["layers_factored"] == 5 and rec.stats["whitened"] == (whiten == "true")
    assert ("depthwise", "depthwise Conv (group=16): not factored") in rec.skipped
    weights = {t.name: list(t.dims) for t in out.graph.initializer}
    assert weights["mm_A"] == [64, 8] and weights["mm_B"] == [8, 96]      # stored as read: no Transpose
    assert weights["left_A"] == [8, 16] and weights["left_B"] == [80, 8]
    assert weights["gemm_A"] == [64, 8] and weights["gemm_B"] == [8, 96]
    assert weights["conv1x1_A"] == [8, 64, 1, 1] and weights["conv1x1_B"] == [96, 8, 1, 1]
    assert weights["conv3x3_A"] == [8, 16, 3, 3] and weights["conv3x3_B"] == [80, 8, 1, 1]
    assert "Transpose" not in [n.op_type for n in out.graph.node]
    assert_parity(proto, out, _feeds(proto, 9), atol=1e-4, rtol=1e-4)


def test_svd_skips_a_factorization_without_mac_saving_with_its_reason():
    r = rng(5)
    inits = [init("w", r.standard_normal((64, 64)).astype(np.float32)),
             init("k", r.standard_normal((32, 32, 1, 1)).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="square"),
             helper.make_node("Conv", ["img", "k"], ["z"], name="conv", kernel_shape=[1, 1])]
    proto = make_model(nodes, [("x", FLOAT, [4, 64]), ("img", FLOAT, [1, 32, 6, 6])],
                       [("y", FLOAT, [4, 64]), ("z", FLOAT, [1, 32, 6, 6])], inits)
    out, report = onnxslim_kit.optimize(proto, passes=["svd:rank_ratio=0.5,whiten=false,min_size=256"])
    rec = report.passes[0]
    assert not rec.modified and rec.stats["layers_factored"] == 0
    assert rec.skipped == [
        ("square", "rank 32 of 64x64 would not save 25% of the MACs (4096 vs 4096 per output position)"),
        ("conv", "rank 16 of 32x32 would not save 25% of the MACs (1024 vs 1024 per output position)")]
    onnx.checker.check_model(out, full_check=True)
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Conv"]


def _conv_model(w, **attrs):
    proto = make_model([helper.make_node("Conv", ["img", "w"], ["y"], name="conv", **attrs)],
                       [("img", FLOAT, [2, w.shape[1], 9, 9])], [("y", FLOAT, None)], [init("w", w)])
    return proto


def test_svd_conv_input_rows_match_what_the_conv_reads():
    """The whitening statistics of a Conv are built from the rows the Conv really multiplies: im2col
    patches (stride, asymmetric pads, dilation) and, for 1x1, only the strided pixels."""
    from passes.lowrank import _conv_rows

    r = rng(6)
    x = r.standard_normal((2, 4, 9, 9)).astype(np.float32)
    w = r.standard_normal((5, 4, 3, 3)).astype(np.float32)
    y = run_model(_conv_model(w, kernel_shape=[3, 3], strides=[2, 1], pads=[2, 1, 0, 2], dilations=[1, 2]),
                  {"img": x})[0]
    rows = _conv_rows(x, ("im2col", (3, 3), (2, 1), (2, 1, 0, 2), (1, 2)))
    np.testing.assert_allclose(rows @ w.reshape(5, -1).T, as_rows(y, 1), atol=1e-4)
    w1 = r.standard_normal((5, 4, 1, 1)).astype(np.float32)
    y1 = run_model(_conv_model(w1, kernel_shape=[1, 1], strides=[2, 2], pads=[1, 1, 1, 1]), {"img": x})[0]
    rows1 = _conv_rows(x, ("conv1x1", (2, 2), (1, 1, 1, 1)))
    np.testing.assert_allclose(rows1 @ w1.reshape(5, 4).T, as_rows(y1[:, :, 1:5, 1:5], 1), atol=1e-4)


def _skewed_mlp(seed=7):
    """Two MatMuls whose inputs have very uneven channel scales (whitening matters) and calibration data."""
    r = rng(seed)
    scale = np.geomspace(0.05, 5, 96).astype(np.float32)
    q1, _ = np.linalg.qr(r.standard_normal((96, 96)))
    q2, _ = np.linalg.qr(r.standard_normal((128, 96)))
    w1 = (q1 * np.geomspace(1, 0.01, 96)) @ q2.T  # decaying spectrum: low ranks are worth something
    inits = [init("w1", w1.astype(np.float32)),
             init("w2", (r.standard_normal((128, 96)) * 0.1).astype(np.float32)),
             init("scale", scale)]
    nodes = [helper.make_node("Mul", ["x", "scale"], ["xs"], name="scale_in"),
             helper.make_node("MatMul", ["xs", "w1"], ["h"], name="fc1"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")]
    proto = make_model(nodes, [("x", FLOAT, ["N", 96])], [("y", FLOAT, ["N", 96]), ("h", FLOAT, ["N", 128])], inits)
    calib = {"x": r.standard_normal((64, 96)).astype(np.float32)}
    return proto, calib


@pytest.mark.parametrize("whiten", ["false", "true"])
def test_svd_max_error_is_met_by_the_smallest_rank_on_calibration_data(whiten):
    proto, calib = _skewed_mlp()
    out, report = onnxslim_kit.optimize(proto, passes=[f"svd:max_error=0.3,whiten={whiten},exclude=fc2"],
                                        calibration=calib, tolerance={"cosine": 0.0})
    rec = report.passes[0]
    assert rec.stats["layers_factored"] == 1
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    rank = weights["fc1_A"].shape[1]
    ref = run_model(proto, calib)[1]
    got = run_model(out, calib)[1]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 0.3
    # one rank step lower (same factorization) would break the bound: the rank is the smallest one
    w1 = next(onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == "w1").astype(np.float64)
    xs = calib["x"].astype(np.float64) * np.geomspace(0.05, 5, 96)
    chol = gram_cholesky(xs.T @ xs, 1e-4) if whiten == "true" else None
    a, b = factorize(w1, rank - 8, chol=chol)
    assert np.linalg.norm(xs @ (w1 - a @ b)) / np.linalg.norm(xs @ w1) > 0.3
    assert_parity(out, out, calib)


def test_svd_error_profile_predicts_the_output_error_of_plain_and_whitened_factors():
    r = rng(8)
    w = r.standard_normal((40, 30))
    x = r.standard_normal((300, 40)) * np.geomspace(0.1, 10, 40)
    gram = x.T @ x
    for chol in (None, gram_cholesky(gram, 1e-9)):
        q, total = error_profile(w, gram, chol)
        assert total == pytest.approx(np.linalg.norm(x @ w) ** 2)
        for rank in (5, 17):
            a, b = factorize(w, rank, chol=chol)
            assert np.linalg.norm(x @ (w - a @ b)) ** 2 == pytest.approx(np.sum(q[rank:]), rel=1e-6)


def test_svd_budget_spreads_ranks_and_reaches_the_parameter_target():
    proto, calib = _skewed_mlp()
    out, report = onnxslim_kit.optimize(proto, passes=["svd:budget=0.5,whiten=true"], calibration=calib,
                                        tolerance={"cosine": 0.0})
    rec = report.passes[0]
    before = 96 * 128 * 2
    assert rec.stats["candidate_params_before"] == before
    weights = {t.name: list(t.dims) for t in out.graph.initializer}
    factored = sum(int(np.prod(d)) for n, d in weights.items() if n.endswith(("_A", "_B")))
    left = sum(int(np.prod(d)) for n, d in weights.items() if n in ("w1", "w2"))
    assert factored + left == rec.stats["candidate_params_after"] <= 0.5 * before
    assert rec.stats["candidate_params_after"] > 0.4 * before  # stops once the budget is met
    assert all(d[-1] >= 8 for n, d in weights.items() if n.endswith("_A"))
    assert_parity(out, out, calib)


@pytest.mark.slow
def test_svd_whitened_beats_plain_at_the_same_ranks_on_the_digits_cnn():
    """rank_by=outputs gives plain and whitened SVD the same ranks (Conv kxk, Gemm head): whitening alone
    must keep the logits, the embedding and the held-out accuracy clearly closer to the original."""
    data = np.load(MODELS / "digits_cnn_wide.eval.npz")
    results = {}
    for whiten in ("false", "true"):
        out, report = onnxslim_kit.optimize(MODELS / "digits_cnn_wide.onnx",
                                            calibration=MODELS / "digits_cnn_wide.calib.npz",
                                            passes=["cleanup", f"svd:energy=0.95,rank_by=outputs,whiten={whiten}"],
                                            tolerance={"cosine": 0.0})
        rec = report.passes[1]
        ranks = sorted((t.name, list(t.dims)) for t in out.graph.initializer if t.name.endswith(("_A", "_B")))
        logits = run_model(out, {"image": data["image"]})[0]
        accuracy = (logits.argmax(1) == data["labels"]).mean()
        results[whiten] = (ranks, [o.cosine for o in report.parity.outputs], accuracy)
        assert rec.stats["layers_factored"] == 3 and {n.op_type for n in out.graph.node} >= {"Conv", "Gemm", "MatMul"}
        onnx.checker.check_model(out, full_check=True)
    (ranks_p, cos_p, acc_p), (ranks_w, cos_w, acc_w) = results["false"], results["true"]
    assert ranks_p == ranks_w
    assert all(w > 0.97 and (1 - w) < 0.5 * (1 - p) for p, w in zip(cos_p, cos_w))
    assert acc_w > acc_p + 0.02


@pytest.mark.slow
def test_svd_cleanup_svd_int8_pipeline_on_the_digits_cnn_passes_its_gate(tmp_path):
    _, report = onnxslim_kit.optimize(MODELS / "digits_cnn_wide.onnx",
                                      calibration=MODELS / "digits_cnn_wide.calib.npz",
                                      passes=["cleanup", "svd:energy=0.95", "quantize-int8"],
                                      output=tmp_path / "c.onnx")
    assert report.written and [r.name for r in report.passes] == ["cleanup", "svd", "quantize-int8"]
    assert report.passes[1].stats["layers_factored"] == 3 and report.passes[2].stats["nodes_quantized"] > 0
    assert report.parity.ok and report.after.bytes < report.before.bytes / 10
    assert report.after.macs < report.before.macs / 2
    out = onnx.load(tmp_path / "c.onnx")
    onnx.checker.check_model(out, full_check=True)
    data = np.load(MODELS / "digits_cnn_wide.eval.npz")
    assert (run_model(out, {"image": data["image"]})[0].argmax(1) == data["labels"]).mean() > 0.95


def test_svd_wide_kxk_conv_is_factored_plain_with_a_note_when_whitening_is_too_costly():
    r = rng(9)
    w = _low_rank(r, (16, 128 * 9), 8).reshape(16, 128, 3, 3)  # C*k*k = 1152 > 1024
    proto = _conv_model(w, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    calib = [{"img": r.standard_normal((2, 128, 9, 9)).astype(np.float32)}]
    out, report = onnxslim_kit.optimize(proto, passes=["svd:energy=1.0,whiten=true"], calibration=calib,
                                        tolerance={"atol": 1e-4, "rtol": 1e-4})
    rec = report.passes[0]
    assert rec.stats["layers_factored"] == 1
    assert "svd: conv: not whitened (C*k*k=1152 > 1024: im2col Gram too large); plain SVD" in rec.warnings
    assert_parity(proto, out, calib[0], atol=1e-4, rtol=1e-4)


def test_svd_gemm_with_trans_a_is_left_alone_before_opset_11():
    r = rng(10)
    w = _low_rank(r, (64, 96), 8)
    nodes = [helper.make_node("Gemm", ["a", "w", "c"], ["y"], name="gemm", transA=1)]
    proto = make_model(nodes, [("a", FLOAT, [64, 6])], [("y", FLOAT, [6, 96])],
                       [init("w", w), init("c", np.zeros(96, np.float32))], opset=10)
    out, report = onnxslim_kit.optimize(proto, passes=["svd:energy=1.0,whiten=false"])
    rec = report.passes[0]
    assert not rec.modified and rec.skipped == [
        ("gemm", "Gemm with transA at opset 10: the first factor would need a bias input (optional only from opset 11)")]
    assert_parity(proto, out, {"a": r.standard_normal((64, 6)).astype(np.float32)})


def test_svd_left_matmul_on_a_vector_and_constant_only_matmul():
    r = rng(11)
    inits = [init("w", _low_rank(r, (96, 64), 8)), init("k1", r.standard_normal((4, 4)).astype(np.float32)),
             init("k2", r.standard_normal((4, 4)).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["w", "v"], ["y"], name="left_vec"),   # [96, 64] @ [64]
             helper.make_node("MatMul", ["k1", "k2"], ["z"], name="consts")]
    proto = make_model(nodes, [("v", FLOAT, [64])], [("y", FLOAT, [96]), ("z", FLOAT, [4, 4])], inits)
    calib = [{"v": r.standard_normal(64).astype(np.float32)} for _ in range(80)]
    out, report = onnxslim_kit.optimize(proto, passes=["svd:energy=1.0,whiten=true,min_size=16,damping=1e-9"],
                                        calibration=calib, tolerance={"atol": 1e-4, "rtol": 1e-4})
    rec = report.passes[0]
    assert rec.stats["layers_factored"] == 1
    assert rec.skipped == [("consts", "both inputs are constant (fold them with cleanup)")]
    assert_parity(proto, out, calib[0], atol=1e-4, rtol=1e-4)


def test_svd_include_factors_only_the_named_layers():
    proto = _mlp()
    out, report = onnxslim_kit.optimize(proto, passes=["svd:rank_ratio=0.25,whiten=false,include=fc2"],
                                        tolerance={"cosine": 0.0})
    rec = report.passes[0]
    assert rec.stats["layers_factored"] == 1
    assert ("fc1", "not in include") in rec.skipped
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("MatMul") == 3 and ops.count("Gemm") == 1  # fc1 and tiny as before; fc2 factored
    assert "fc1" in [n.name for n in out.graph.node]
    onnx.checker.check_model(out, full_check=True)
    x = rng(3).standard_normal((5, 128)).astype(np.float32)
    ref, got = run_model(proto, {"x": x}), run_model(out, {"x": x})
    np.testing.assert_array_equal(got[1], ref[1])  # 'tiny' untouched
    cos = float(np.dot(ref[0].ravel(), got[0].ravel()) / np.linalg.norm(ref[0]) / np.linalg.norm(got[0]))
    assert cos > 0.3  # rank 32 of 128 on random weights: lossy but the same function family
    with pytest.raises(InputError, match="include: no node named 'nope'"):
        onnxslim_kit.optimize(proto, passes=["svd:include=nope"])


def test_svd_shrink_gram_trusts_many_rows_and_doubts_few():
    r = rng(11)
    cov = np.diag(np.geomspace(1.0, 0.05, 32))
    many = r.standard_normal((4000, 32)) @ np.sqrt(cov)
    few = many[:6]
    for x, lo, hi in ((many, 0.0, 0.02), (few, 0.2, 1.0)):
        g = x.T @ x
        fourth = float(np.sum(np.sum(x * x, axis=1) ** 2))
        shrunk, delta = shrink_gram(g, len(x), fourth)
        assert lo <= delta <= hi
        assert np.isclose(np.trace(shrunk), np.trace(g))            # the total energy is kept
        assert np.linalg.eigvalsh(shrunk).min() > 0                   # full rank: every direction counts


@pytest.mark.slow
def test_svd_energy_whitening_from_few_rows_holds_on_new_inputs():
    """bert_tiny's pooler Gemm reads one CLS vector per sample: fitted on 8 samples (8 rows for 128
    features), the raw Gram matrix has no energy where those 8 did not go and energy=0.99 kept the
    pooled output's cosine at 0.81 on the 8 other samples. The shrunk estimate sees that 99% of the
    pooler's output energy needs a rank that saves nothing (so it is left alone) and the outputs hold."""
    data = dict(np.load(MODELS / "bert_tiny.calib.npz"))
    fit = {k: v[:8] for k, v in data.items()}
    out, report = onnxslim_kit.optimize(MODELS / "bert_tiny.onnx", passes=["cleanup", "svd:energy=0.99"],
                                        calibration=fit, tolerance={"cosine": 0.0})
    assert report.passes[1].stats["layers_factored"] >= 1
    original = onnx.load(MODELS / "bert_tiny.onnx")
    for i in range(8, 16):
        feed = {k: v[i:i + 1] for k, v in data.items()}
        for a, b in zip(run_model(original, feed), run_model(out, feed)):
            a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
            assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.99
    onnx.checker.check_model(out, full_check=True)
