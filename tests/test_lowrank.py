"""passes/lowrank.py: svd."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxslim_kit
from builders import FLOAT, init, make_model, rng, run_model
from onnxslim_kit.errors import InputError
from onnxslim_kit.pipeline import build_pass
from passes.lowrank import factorize, gram_cholesky, refit_second_factor

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
