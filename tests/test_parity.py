"""Parity gate: metrics on hand-computed arrays, tolerance semantics, broken models, locate, NaN rules."""

from __future__ import annotations

import json
from pathlib import Path
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxslim_kit.parity as parity_mod
from builders import FLOAT, conv_bn_relu, make_model, run_model
from onnxslim_kit.calibration import input_specs, load_calibration, random_calibration
from onnxslim_kit.errors import InputError
from onnxslim_kit.ir import Model
from onnxslim_kit.parity import ParityChecker, compare, metrics_for
from onnxslim_kit.pass_base import EXACT, Tolerance

TIGHT = Tolerance(atol=1e-5, rtol=1e-5)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _with_weight(model: onnx.ModelProto, name: str, edit) -> onnx.ModelProto:
    out = _copy(model)
    for i, t in enumerate(out.graph.initializer):
        if t.name == name:
            arr = numpy_helper.to_array(t).copy()
            edit(arr)
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, name))
            return out
    raise KeyError(name)


def _data(model, n=4, seed=0):
    return random_calibration(input_specs(model), num_samples=n, seed=seed)


def _unary_model(ops: list[str], dtype=FLOAT) -> onnx.ModelProto:
    """x [2, 3] -> ops[0] -> ops[1] ... -> y."""
    names = ["x"] + [f"t{i}" for i in range(len(ops) - 1)] + ["y"]
    nodes = [helper.make_node(op, [names[i]], [names[i + 1]], name=f"{op.lower()}_{i}") for i, op in enumerate(ops)]
    return make_model(nodes, [("x", dtype, [2, 3])], [("y", dtype, [2, 3])])


# -- metrics on hand-computed arrays ---------------------------------------------------------------

def test_metrics_hand_computed_values():
    ref = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    cand = np.array([[1.0, 2.0, 3.0, 5.0]], np.float32)
    m = metrics_for("y", [ref], [cand], Tolerance(atol=0.5))
    assert m.max_abs == pytest.approx(1.0)
    assert m.max_rel == pytest.approx(1.0 / (4.0 + parity_mod.REL_EPS))
    assert m.cosine == pytest.approx(34.0 / math.sqrt(30.0 * 39.0), rel=1e-12)
    assert m.snr_db == pytest.approx(10 * math.log10(30.0), rel=1e-12)
    assert m.top1 == 1.0                                       # argmax 3 in both rows
    assert not m.ok and m.reason.startswith("max_abs 1 > atol 0.5") and "1 of 4 elements" in m.reason
    assert m.ref_shape == (1, 4) and m.cand_dtype == "float32"


def test_metrics_stream_over_batches_like_one_concatenated_array():
    r = np.random.default_rng(0)
    refs = [r.standard_normal((2, 5)).astype(np.float32) for _ in range(3)]
    cands = [a + r.standard_normal(a.shape).astype(np.float32) * 0.1 for a in refs]
    streamed = metrics_for("y", refs, cands, EXACT)
    whole = metrics_for("y", [np.concatenate(refs)], [np.concatenate(cands)], EXACT)
    a = np.concatenate(refs).astype(np.float64).ravel()
    b = np.concatenate(cands).astype(np.float64).ravel()
    assert streamed.cosine == pytest.approx(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), rel=1e-12)
    assert streamed.snr_db == pytest.approx(10 * math.log10(float(a @ a) / float((a - b) @ (a - b))), rel=1e-12)
    for key in ("max_abs", "max_rel", "cosine", "snr_db", "top1"):
        assert getattr(streamed, key) == pytest.approx(getattr(whole, key), rel=1e-12)


def test_metrics_equal_and_zero_vectors():
    x = np.array([[0.5, -1.0]], np.float32)
    same = metrics_for("y", [x], [x.copy()], TIGHT)
    assert same.ok and same.reason == "" and same.max_abs == 0.0 and same.cosine == 1.0
    assert same.snr_db == math.inf
    zeros = np.zeros((1, 2), np.float32)
    both_zero = metrics_for("y", [zeros], [zeros.copy()], TIGHT)
    assert both_zero.cosine == 1.0 and both_zero.snr_db == math.inf and both_zero.ok
    one_zero = metrics_for("y", [zeros], [x], Tolerance(min_cosine=0.5))
    assert one_zero.cosine == 0.0 and one_zero.snr_db == -math.inf
    assert not one_zero.ok and one_zero.reason == "cosine 0.000000 < 0.5"


def test_top1_only_for_rank2_class_scores():
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], np.float32)
    cand = np.array([[1.0, 3.0, 2.0], [3.0, 2.0, 1.0]], np.float32)
    m = metrics_for("scores", [ref], [cand], Tolerance(min_top1=0.9))
    assert m.top1 == 0.5 and not m.ok and m.reason == "top1 0.5000 < 0.9"
    assert metrics_for("s", [ref[None]], [cand[None]], Tolerance(min_top1=0.9)).top1 is None      # rank 3
    single = metrics_for("s", [ref[:, :1]], [cand[:, :1]], Tolerance(min_top1=0.9))
    assert single.top1 is None and single.ok                   # [batch, 1]: no classes, top1 not applied


def test_exact_tolerance_is_elementwise_atol_plus_rtol_times_ref():
    ref = np.array([10.0, 0.0, -4.0], np.float32)
    tol = Tolerance(atol=0.1, rtol=0.1)
    assert metrics_for("y", [ref], [np.array([10.9, 0.09, -4.45], np.float32)], tol).ok
    bad = metrics_for("y", [ref], [np.array([10.9, 0.2, -4.45], np.float32)], tol)
    assert not bad.ok and "at 1 of 3 elements" in bad.reason                # 0.2 > 0.1 + 0.1*0
    assert bad.max_abs == pytest.approx(0.9, abs=1e-6)                      # the worst is still within


def test_lossy_tolerance_checks_cosine_snr_top1():
    r = np.random.default_rng(1)
    ref = r.standard_normal((8, 10)).astype(np.float32)
    cand = ref + 0.01 * r.standard_normal(ref.shape).astype(np.float32)
    m = metrics_for("y", [ref], [cand], Tolerance(min_cosine=0.999, min_snr_db=30.0, min_top1=0.9))
    assert m.ok and m.cosine > 0.999 and 35.0 < m.snr_db < 45.0
    assert not metrics_for("y", [ref], [cand], Tolerance(min_snr_db=50.0)).ok
    assert not metrics_for("y", [ref], [cand], EXACT).ok


def test_nan_in_same_positions_is_equal_but_nan_only_in_candidate_fails():
    ref = np.array([1.0, np.nan, np.inf, 2.0], np.float32)
    same = metrics_for("y", [ref], [ref.copy()], TIGHT)
    assert same.ok and same.max_abs == 0.0 and same.cosine == 1.0
    cand = np.array([1.0, np.nan, np.inf, np.nan], np.float32)
    bad = metrics_for("y", [ref], [cand], TIGHT)
    assert not bad.ok and bad.reason == "NaN/inf mismatch at 1 position(s), 1 NaN only in the candidate"
    fixed = metrics_for("y", [ref], [np.array([1.0, 0.0, np.inf, 2.0], np.float32)], TIGHT)
    assert not fixed.ok and fixed.reason == "NaN/inf mismatch at 1 position(s)"
    flipped = metrics_for("y", [ref], [np.array([1.0, np.nan, -np.inf, 2.0], np.float32)], Tolerance())
    assert not flipped.ok


def test_non_float_outputs_compare_exactly():
    ref = np.array([[3, 1, 4, 1]], np.int64)
    assert metrics_for("idx", [ref], [ref.copy()], TIGHT).agreement == 1.0
    cand = np.array([[3, 1, 4, 2]], np.int64)
    m = metrics_for("idx", [ref], [cand], Tolerance(atol=10.0))             # atol does not loosen ints
    assert not m.ok and m.reason == "1 of 4 values differ (exact compare for int64)"
    assert m.agreement == 0.75 and m.max_abs == 1.0 and m.top1 is None
    assert metrics_for("idx", [ref], [cand], Tolerance(min_cosine=0.9, min_top1=0.7)).ok
    assert not metrics_for("idx", [ref], [cand], Tolerance(min_cosine=0.9)).ok
    flags = np.array([True, False])
    assert not metrics_for("b", [flags], [~flags], TIGHT).ok


def test_shape_and_dtype_mismatch_fail_with_reason():
    ref = np.zeros((1, 10), np.float32)
    m = metrics_for("logits", [ref], [np.zeros((1, 9), np.float32)], Tolerance())
    assert not m.ok and m.reason == "shape (1,10) != (1,9)" and m.cand_shape == (1, 9)
    d = metrics_for("logits", [ref], [np.zeros((1, 10), np.float16)], Tolerance(min_cosine=0.0))
    assert not d.ok and d.reason == "dtype float32 != float16"
    assert json.dumps(m.to_dict(), allow_nan=False)                         # NaN metrics -> null


# -- checking models ----------------------------------------------------------------------------------

def test_identical_model_passes_and_report_is_valid_json():
    model = conv_bn_relu()
    report = compare(model, _copy(model), _data(model), TIGHT)
    assert report.ok and report.failures() == [] and report.num_batches == 4
    assert [o.name for o in report.outputs] == ["logits"]
    assert report.outputs[0].snr_db > 100
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d["ok"] is True and d["data_source"] == "random(seed=0, samples=4)"
    assert d["tolerance"] == {"atol": 1e-5, "rtol": 1e-5}
    summary = report.summary()
    assert summary.startswith("parity ok") and "\n" not in summary


def test_broken_weight_fails_naming_the_output_and_locate_names_the_node():
    model = conv_bn_relu()
    broken = _with_weight(model, "conv.w", lambda w: w.__setitem__((2, 1, 1, 1), w[2, 1, 1, 1] + 2.0))
    onnx.checker.check_model(broken, full_check=True)
    checker = ParityChecker(model, _data(model))
    report = checker.check(broken, EXACT)
    assert not report.ok
    assert len(report.failures()) == 1 and report.failures()[0].startswith("logits: max_abs")
    assert report.summary().startswith("parity FAILED") and "logits" in report.summary()
    loc = checker.locate(broken, EXACT)
    assert loc is not None and (loc.node_name, loc.op_type, loc.tensor_name) == ("conv", "Conv", "conv_out")
    assert loc.checked_tensors == 6 and not loc.metrics.ok
    assert "'conv'" in loc.summary() and json.dumps(loc.to_dict(), allow_nan=False)
    assert checker.locate(_copy(model), EXACT) is None


def test_swapped_op_is_located_at_that_node():
    model = conv_bn_relu()
    swapped = _copy(model)
    relu = next(n for n in swapped.graph.node if n.name == "relu")
    relu.op_type = "LeakyRelu"
    relu.attribute.append(helper.make_attribute("alpha", 0.5))
    onnx.checker.check_model(swapped, full_check=True)
    checker = ParityChecker(model, _data(model))
    assert not checker.check(swapped, EXACT).ok
    loc = checker.locate(swapped, EXACT)
    assert (loc.node_name, loc.op_type, loc.tensor_name) == ("relu", "LeakyRelu", "relu_out")


def test_small_weight_noise_passes_lossy_tolerance_but_not_exact():
    model = conv_bn_relu()
    noisy = _with_weight(model, "fc.w", lambda w: w.__iadd__(
        np.random.default_rng(5).standard_normal(w.shape).astype(np.float32) * 1e-3))
    onnx.checker.check_model(noisy, full_check=True)
    checker = ParityChecker(model, _data(model, n=8))
    lossy = checker.check(noisy, Tolerance(min_cosine=0.999, min_snr_db=30.0))
    assert lossy.ok, lossy.summary()
    assert not checker.check(noisy, TIGHT).ok


def test_observed_shape_mismatch_is_caught():
    model = conv_bn_relu()
    cand = _with_weight(model, "fc.w", lambda w: None)
    fc_w = next(t for t in cand.graph.initializer if t.name == "fc.w")
    fc_w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(fc_w)[:9].copy(), "fc.w"))
    fc_b = next(t for t in cand.graph.initializer if t.name == "fc.b")
    fc_b.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(fc_b)[:9].copy(), "fc.b"))
    cand.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 9
    onnx.checker.check_model(cand, full_check=True)
    report = compare(model, cand, _data(model, n=2), Tolerance(min_cosine=0.0))
    assert not report.ok and report.failures() == ["logits: shape (1,10) != (1,9)"]


def test_dtype_mismatch_is_caught():
    model = _unary_model(["Relu"])
    cand = make_model([helper.make_node("Relu", ["x"], ["r"]),
                       helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT16)],
                      [("x", FLOAT, [2, 3])], [("y", TensorProto.FLOAT16, [2, 3])])
    onnx.checker.check_model(cand, full_check=True)
    report = compare(model, cand, _data(model, n=1), Tolerance(min_cosine=0.9))
    assert not report.ok and report.failures() == ["y: dtype float32 != float16"]


def test_nan_model_outputs_follow_nan_rules():
    ref = _unary_model(["Log"])                          # NaN for negative inputs
    data = _data(ref, n=2)
    assert any(np.isnan(run_model(ref, f)[0]).any() for f in data)
    assert compare(ref, _unary_model(["Log"]), data, TIGHT).ok
    finite = _unary_model(["Abs", "Sqrt"])
    nan_cand = _unary_model(["Sqrt"])
    report = compare(finite, nan_cand, data, Tolerance(min_cosine=0.0))
    assert not report.ok and "NaN only in the candidate" in report.failures()[0]


def test_candidate_that_does_not_load_or_run_gives_failing_report():
    model = _unary_model(["Relu"])
    data = _data(model, n=2)
    checker = ParityChecker(model, data)
    bad = _unary_model(["Relu"])
    bad.graph.node[0].op_type = "NoSuchOp"
    report = checker.check(bad, EXACT)
    assert not report.ok and "candidate does not load in onnxruntime" in report.error
    assert report.outputs[0].reason == report.error and "\n" not in report.error
    needs_more = make_model([helper.make_node("Add", ["x", "z"], ["y"])],
                            [("x", FLOAT, [2, 3]), ("z", FLOAT, [2, 3])], [("y", FLOAT, [2, 3])])
    report = checker.check(needs_more, EXACT)
    assert not report.ok and report.error.startswith("candidate fails on batch 0")
    assert json.dumps(report.to_dict(), allow_nan=False)


def test_missing_and_extra_outputs_fail():
    model = _unary_model(["Relu"])
    cand = make_model([helper.make_node("Relu", ["x"], ["z"])], [("x", FLOAT, [2, 3])], [("z", FLOAT, [2, 3])])
    report = compare(model, cand, _data(model, n=1), EXACT)
    assert not report.ok
    assert report.error == "candidate outputs differ from the reference (missing y; unexpected z)"
    assert report.outputs[0].reason == "missing in the candidate"


def test_reference_session_built_once_unoptimized_and_outputs_reused(monkeypatch):
    built = []
    runs = []
    real = parity_mod.make_session

    class Counting:
        def __init__(self, sess):
            self.sess = sess

        def run(self, names, feed):
            runs.append(self.optimize)
            return self.sess.run(names, feed)

        def get_outputs(self):
            return self.sess.get_outputs()

    def spy(model, *, optimize=True, threads=None, **kw):
        built.append(optimize)
        wrapped = Counting(real(model, optimize=optimize, threads=threads, **kw))
        wrapped.optimize = optimize
        return wrapped

    monkeypatch.setattr(parity_mod, "make_session", spy)
    model = conv_bn_relu()
    labels = []

    def progress(iterable, label):
        labels.append(label)
        return iterable

    checker = ParityChecker(model, _data(model, n=3), progress=progress, threads=1)
    assert checker.check(_copy(model), EXACT).ok
    assert checker.check(_copy(model), EXACT).ok
    assert built == [False, True, True]
    assert runs.count(False) == 3 and runs.count(True) == 6
    assert labels == ["parity: reference", "parity: candidate", "parity: candidate"]


def test_token_model_with_random_ids_and_mask_and_int_output():
    from test_calibration import token_model

    model = token_model()
    argmax = _copy(model)
    argmax.graph.node.append(helper.make_node("ArgMax", ["hidden"], ["best"], axis=2, keepdims=0, name="am"))
    argmax.graph.output.append(helper.make_tensor_value_info("best", TensorProto.INT64, ["batch", "seq"]))
    onnx.checker.check_model(argmax, full_check=True)
    data = load_calibration(None, input_specs(argmax), num_samples=3)
    report = compare(argmax, _copy(argmax), data, TIGHT)
    assert report.ok and [o.name for o in report.outputs] == ["hidden", "best"]
    assert report.outputs[1].agreement == 1.0 and report.outputs[1].cosine == pytest.approx(1.0)
    broken = _with_weight(argmax, "emb", lambda e: e.__imul__(-1.0))
    failed = compare(argmax, broken, data, TIGHT)
    assert {f.split(":")[0] for f in failed.failures()} == {"hidden", "best"}


def test_candidate_may_be_an_ir_model_and_reference_failure_is_input_error():
    model = conv_bn_relu()
    assert compare(model, Model.from_proto(model), _data(model, n=1), EXACT).ok
    wrong = load_calibration([{"x": np.zeros((1, 3, 8, 8), np.float32)}], input_specs(model))
    other = _unary_model(["Relu"])                           # data does not fit this reference
    with pytest.raises(InputError, match="reference model fails on calibration batch 0"):
        ParityChecker(other, wrong).check(other, EXACT)


def test_locate_without_shared_intermediates_checks_outputs_only():
    model = _unary_model(["Relu", "Neg"])
    renamed = _unary_model(["Relu", "Neg"])
    renamed.graph.node[0].output[0] = "other"
    renamed.graph.node[1].input[0] = "other"
    renamed.graph.node[1].op_type = "Abs"
    onnx.checker.check_model(renamed, full_check=True)
    loc = ParityChecker(model, _data(model, n=1)).locate(renamed, EXACT)
    assert (loc.node_name, loc.tensor_name, loc.checked_tensors) == ("neg_1", "y", 1)
    assert loc.op_type == "Abs"


def test_locate_with_constant_node_weights_names_the_computing_node():
    model = conv_bn_relu()
    consts = _copy(model)                                    # paddle2onnx style: weights as Constant nodes
    weights = list(consts.graph.initializer)
    del consts.graph.initializer[:]
    for t in reversed(weights):
        consts.graph.node.insert(0, helper.make_node("Constant", [], [t.name], value=t, name=f"const_{t.name}"))
    onnx.checker.check_model(consts, full_check=True)
    broken = _copy(consts)
    node = next(n for n in broken.graph.node if n.name == "const_fc.w")
    arr = numpy_helper.to_array(node.attribute[0].t).copy()
    arr[3, 0] += 1.0
    node.attribute[0].t.CopyFrom(numpy_helper.from_array(arr, "fc.w"))
    checker = ParityChecker(consts, _data(consts))
    assert checker.check(_copy(consts), EXACT).ok
    loc = checker.locate(broken, EXACT)
    assert (loc.node_name, loc.op_type, loc.tensor_name, loc.checked_tensors) == ("fc", "Gemm", "logits", 6)


def test_legacy_model_with_initializer_inputs_uses_their_defaults():
    w = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [("x", FLOAT, ["N", 4]), ("w", FLOAT, [4, 3])], [("y", FLOAT, ["N", 3])],
                       [numpy_helper.from_array(w, "w")], opset=9, ir_version=3)
    onnx.checker.check_model(model, full_check=True)
    specs = input_specs(model)
    assert [s.name for s in specs] == ["x"]
    data = load_calibration(None, specs, num_samples=2)
    assert compare(model, _copy(model), data, TIGHT).ok
    changed = _with_weight(model, "w", lambda a: a.__setitem__((0, 0), a[0, 0] + 1.0))
    report = compare(model, changed, data, TIGHT)
    assert not report.ok and report.failures()[0].startswith("y: max_abs")


def test_random_data_that_does_not_suit_the_model_says_how_to_fix_it():
    shape = numpy_helper.from_array(np.array([-1, 5], np.int64), "shape")
    model = make_model([helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")],
                       [("x", FLOAT, ["N", "L"])], [("y", FLOAT, [None, 5])], [shape])
    onnx.checker.check_model(model, full_check=True)
    with pytest.raises(InputError, match=r"batch 0 of random\(seed=0, samples=2\).*--input-shape"):
        ParityChecker(model, _data(model, n=2)).check(_copy(model), EXACT)       # L defaults to 16
    pinned = random_calibration(input_specs(model, {"x": [1, 10]}), num_samples=2)
    report = compare(model, _copy(model), pinned, EXACT)
    assert report.ok and report.outputs[0].ref_shape == (2, 5)


def test_parity_prefetch_reads_calibration_files_once_for_both_threads():
    # The background reference reads the feeds ahead: a pass that iterates them in the main thread
    # while the reference still runs reuses them instead of reading the files a second time.
    import threading

    from onnxslim_kit.calibration import CalibrationData

    proto = conv_bn_relu()
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(4)]
    reads = []

    def factory():
        reads.append(1)
        for a in arrays:
            yield {"x": a}

    data = CalibrationData(factory, length=4, num_samples=4, source="counted", is_random=False)
    checker = ParityChecker(proto, data, threads=1)
    real, entered, gate = checker._ref_session, threading.Event(), threading.Event()

    class Held:  # the reference session, held at its first batch until the main thread has iterated
        def run(self, names, feed):
            entered.set()
            gate.wait(10)
            return real.run(names, feed)

    checker._ref_session = Held()
    checker.prefetch()
    assert entered.wait(10)
    main_pass = [feed["x"] for feed in data]
    gate.set()
    refs = checker.reference_outputs
    assert len(reads) == 1  # one read of the source for both threads
    assert all(np.array_equal(a, b) for a, b in zip(main_pass, arrays)) and len(main_pass) == 4
    np.testing.assert_array_equal(refs[2][checker.output_names[0]], run_model(proto, {"x": arrays[2]})[0])
    report = checker.check(proto, EXACT)
    assert report.ok and report.num_batches == 4 and len(reads) == 1
    onnx.checker.check_model(proto, full_check=True)


def test_bad_tolerance_key_through_the_api_is_one_input_error_not_an_abort():
    """The API validates tolerance keys before the parity reference thread starts: an InputError, not an
    interpreter abort (exit 134) from a native thread left running."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    code = ("from onnxslim_kit import api\n"
            "api.optimize('models/bert_tiny.onnx', num_samples=512, batch_size=64, tolerance={'bogus': 1})\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr[-500:]   # the exception, not 134
    assert "InputError: --tolerance: unknown tolerance key 'bogus'" in res.stderr


def test_run_feeds_with_label_turns_onnxruntime_failures_into_one_line_input_errors():
    """runtime.run_feeds (analyze's reference run, the search's latency feed): with the model's label, a
    model that does not load and a batch that does not run are one-line InputErrors naming both."""
    from onnxslim_kit.errors import InputError
    from onnxslim_kit.runtime import run_feeds

    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], name="rs")]
    proto = make_model(nodes, [("x", FLOAT, ["N", 4])], [("y", FLOAT, [1, 4])],
                       [numpy_helper.from_array(np.array([1, 4], np.int64), "shape")])
    ok = {"x": np.ones((1, 4), np.float32)}
    assert run_feeds(proto, [ok], label="m.onnx")[0]["y"].shape == (1, 4)
    with pytest.raises(InputError) as err:
        run_feeds(proto, [ok, {"x": np.ones((3, 4), np.float32)}], label="m.onnx", source="calib.npz")
    assert str(err.value).startswith("m.onnx: fails on calibration batch 1 of calib.npz (") and "\n" not in str(err.value)
    broken = onnx.ModelProto.FromString(proto.SerializeToString())
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(InputError, match=r"^m\.onnx: does not load in onnxruntime \(\w+: .+\)$"):
        run_feeds(broken, [ok], label="m.onnx")
    with pytest.raises(Exception) as raw:   # without a label the caller handles onnxruntime's own error
        run_feeds(broken, [ok])
    assert not isinstance(raw.value, InputError)
