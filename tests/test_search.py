"""onnxslim_kit/search.py and usermetric.py: the accuracy-aware search, user metrics, labels, recipes."""

import math
import sys
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnxslim_kit
from builders import conv_bn_relu, mlp_blocks, rng, run_model
from onnxslim_kit.cli import main
from onnxslim_kit.errors import InputError
from onnxslim_kit.metrics import model_stats
from onnxslim_kit.usermetric import load_labels, parse_metric

search_module = sys.modules["onnxslim_kit.search"]

QW = "quantize-weights:bits=4,block_size=16,min_elements=1024"
PRUNE = "prune-channels:multiple=8,ratio=0.5"
SVD = "svd:energy=0.9,min_size=1024"
INT8 = "quantize-int8"


def _model() -> onnx.ModelProto:
    return mlp_blocks(layers=2, hidden=32, seed=1)


def _calib(n: int = 16) -> dict[str, np.ndarray]:
    return {"x": rng(7).standard_normal((n, 8, 32)).astype(np.float32)}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _outputs(proto, x):
    return np.concatenate([run_model(proto, {"x": x[i:i + 1]})[0] for i in range(len(x))])


def _user_module(tmp_path, monkeypatch, body: str) -> str:
    """A metric module in tmp_path (imported from the current directory); returns its name."""
    name = f"usermetric_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def _threshold_metric(tmp_path, monkeypatch, max_damage: float) -> str:
    """A user metric (module:function) that is 1 while the cosine damage of output res1 over all samples stays
    <= ``max_damage``, else 0: each change alone can pass while several together fail."""
    name = _user_module(tmp_path, monkeypatch, f"""
import numpy as np

def score(outputs, reference):
    a = np.concatenate([r["res1"].ravel() for r in reference]).astype(np.float64)
    b = np.concatenate([o["res1"].ravel() for o in outputs]).astype(np.float64)
    return 1.0 if 1.0 - a @ b / np.linalg.norm(a) / np.linalg.norm(b) <= {max_damage!r} else 0.0
""")
    return f"{name}:score"


def test_search_greedy_respects_target_on_search_data():
    proto, calib = _model(), _calib()
    result = onnxslim_kit.search(proto, calib, target="accuracy_drop=0.01", techniques=[QW, PRUNE, INT8],
                                 objective="size")
    assert result.met and result.plan and result.metric == "cosine"
    assert result.search_drop <= 0.01 and result.size_ratio < 1.0
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    # Independently: the smallest output cosine on the search's verification feeds (the second half,
    # which the passes did not fit on) is within the target, and the whole data set stays close.
    x = calib["x"]
    ver = x[len(x) // 2:]
    assert _cosine(_outputs(proto, ver), _outputs(out, ver)) >= 0.99
    assert _cosine(_outputs(proto, x), _outputs(out, x)) >= 0.98
    # Every verification the search accepted was within the target; one technique per family and layer.
    assert all(st.search_drop <= 0.01 for st in result.steps if st.met)
    families = [(e.layer, e.technique.split(":")[0].split("-")[0]) for e in result.plan]
    assert len(families) == len(set(families))
    assert len({e.technique for e in result.plan if e.technique.startswith("quantize")}) == 1


def test_search_uses_one_quantization_technique_when_both_are_cheap():
    """int8 ranks first on the Conv, 8-bit weight-only on the Gemm: a plan that mixed them would not
    build (the second quantization pass refuses a quantized model); the search keeps the first one."""
    proto = conv_bn_relu(channels=32)
    calib = {"x": rng(3).standard_normal((16, 3, 8, 8)).astype(np.float32)}
    qw8 = "quantize-weights:bits=8,block_size=16,min_elements=64"
    result = onnxslim_kit.search(proto, calib, target="accuracy_drop=0.05", techniques=[qw8, INT8],
                                 objective="size")
    fc = next(e for e in result.analysis.evaluations if e.technique == qw8 and e.layer == "fc")
    assert fc.status == "ok"
    assert result.met and [(e.layer, e.technique) for e in result.plan] == [("conv", INT8), ("fc", INT8)]
    onnx.checker.check_model(result.model, full_check=True)
    x = calib["x"]
    out = np.concatenate([run_model(result.model, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    ref = np.concatenate([run_model(proto, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    assert _cosine(ref, out) >= 0.99


def _int8_search_above_one_layer():
    """int8 on the four MatMuls with a target of 1.6x the worst single layer's damage: (model, calibration,
    the single-layer analysis, target, search result)."""
    proto, calib = _model(), _calib()
    single = onnxslim_kit.analyze(proto, calib, techniques=[INT8], workers=1)
    target = 1.6 * max(e.damage for e in single.evaluations if e.status == "ok")
    result = onnxslim_kit.search(proto, calib, target=f"accuracy_drop={target!r}", techniques=[INT8],
                                 objective="size")
    return proto, calib, single, target, result


def test_search_takes_whole_group_when_joint_drop_fits():
    """int8 on one layer costs about as much as on all four (the error is dominated by quantizing the
    shared input): the additive prediction admits one layer, but the four built and scored together fit,
    so the greedy's first plan already holds all four."""
    proto, calib, single, target, result = _int8_search_above_one_layer()
    assert sum(e.damage for e in single.evaluations if e.status == "ok") > target
    assert result.steps[0].action == "greedy" and result.steps[0].entries == 4 and result.steps[0].met
    assert result.met and len(result.plan) == 4
    assert sum(e.predicted_drop for e in result.plan) <= target   # the joint drop, shared by the members
    assert result.groups_taken == [f"{INT8} on MatMul"] and result.group_drops[f"{INT8} on MatMul"] <= target
    assert result.to_dict()["groups_taken"] == result.groups_taken
    assert "taken whole" in onnxslim_kit.report.render_search(result)
    onnx.checker.check_model(result.model, full_check=True)
    x = calib["x"][8:]
    assert 1.0 - _cosine(_outputs(proto, x), _outputs(result.model, x)) <= target


def test_search_extends_plan_when_prediction_is_pessimistic(monkeypatch):
    """Single-layer predictions only (no whole groups): the additive prediction admits one layer, the
    verified slack admits the rest."""
    monkeypatch.setattr(search_module, "WHOLE_GROUPS", False)
    proto, calib, single, target, result = _int8_search_above_one_layer()
    assert result.steps[0].action == "greedy" and result.steps[0].entries == 1
    assert result.met and len(result.plan) == 4
    assert any(s.action.startswith("extend") and s.met and s.entries == 4 for s in result.steps)
    assert sum(e.predicted_drop for e in result.plan) > target  # more than the additive prediction allowed
    onnx.checker.check_model(result.model, full_check=True)
    x = calib["x"][8:]
    assert 1.0 - _cosine(_outputs(proto, x), _outputs(result.model, x)) <= target


def test_search_repair_reverts_layers_when_damage_compounds(tmp_path, monkeypatch):
    """A threshold metric: each change alone keeps the cosine above the threshold (predicted drop 0),
    all of them together do not (drop 1). The greedy takes them all; verification fails; the repair
    reverts the most damaging ones until the target holds."""
    proto, calib = _model(), _calib()
    single = onnxslim_kit.analyze(proto, calib, techniques=[QW], workers=1)
    damages = sorted(e.damage for e in single.evaluations if e.status == "ok")
    assert len(damages) == 4
    threshold = 1.0 - 1.5 * damages[-1]   # every change alone passes
    metric = _threshold_metric(tmp_path, monkeypatch, 1.5 * damages[-1])
    result = onnxslim_kit.search(proto, calib, target="accuracy_drop=0.5", metric=metric, techniques=[QW],
                                 objective="size")
    assert [s.met for s in result.steps][0] is False and result.steps[0].entries == 4
    assert result.met and result.steps[-1].met and 2 <= result.verifications <= 8
    assert 0 < len(result.plan) < 4 and result.search_drop == 0.0
    assert all(s.action.startswith("revert") for s in result.steps[1:])
    reverted = {s.action.split(" ", 1)[1] for s in result.steps[1:]}
    kept = {e.layer for e in result.plan}
    assert not kept & reverted
    onnx.checker.check_model(result.model, full_check=True)
    x = calib["x"][8:]
    assert _cosine(_outputs(proto, x), _outputs(result.model, x)) >= threshold


def test_search_recipe_round_trip_reproduces_identical_bytes(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(_model(), model)
    np.savez(tmp_path / "calib.npz", **_calib())
    out, recipe = tmp_path / "searched.onnx", tmp_path / "plan.toml"
    res = CliRunner().invoke(main, ["optimize", str(model), "-o", str(out), "--calib", str(tmp_path / "calib.npz"),
                                    "--target", "accuracy_drop=0.02", "-t", PRUNE, "-t", SVD, "-t", INT8,
                                    "--holdout", "0.25", "--objective", "size", "--save-recipe", str(recipe), "--report",
                                    str(tmp_path / "search.json")])
    assert res.exit_code == 0, res.output
    assert "held-out data" in res.output and "replay:" in res.output
    import json

    report = json.loads((tmp_path / "search.json").read_text())
    assert report["met"] and report["target"] == "accuracy_drop=0.02" and report["holdout_samples"] == 4
    assert report["plan"] and {"layer", "technique", "predicted_drop"} <= set(report["plan"][0])
    assert report["verifications"] == len(report["steps"]) and report["search_drop"] <= 0.02
    text = recipe.read_text()
    assert "include = [" in text and (tmp_path / "plan.calib.npz").exists()
    replay = tmp_path / "replayed.onnx"
    res = CliRunner().invoke(main, ["optimize", str(model), "-o", str(replay), "--recipe", str(recipe),
                                    "--calib", str(tmp_path / "plan.calib.npz"), "--tolerance", "cosine=0.95"])
    assert res.exit_code == 0, res.output
    assert replay.read_bytes() == out.read_bytes()
    searched = onnx.load(out)
    onnx.checker.check_model(searched, full_check=True)
    x = _calib()["x"]
    assert _cosine(_outputs(onnx.load(model), x), _outputs(searched, x)) >= 0.95


def test_search_size_target_met_and_measured():
    proto, calib = _model(), _calib()
    result = onnxslim_kit.search(proto, calib, target="size=0.5x", techniques=[QW, PRUNE])
    assert result.met and result.plan
    assert model_stats(result.model).bytes <= 0.5 * model_stats(proto).bytes
    onnx.checker.check_model(result.model, full_check=True)
    x = calib["x"]
    assert _cosine(_outputs(proto, x), _outputs(result.model, x)) >= 0.9


def test_search_size_target_unreachable_says_so():
    with pytest.raises(onnxslim_kit.errors.ParityError, match="cannot be met: best reached"):
        onnxslim_kit.optimize(_model(), calibration=_calib(), target="size=0.01x", techniques=[QW])


def test_search_prune_and_int8_compose_on_one_layer():
    proto, calib = _model(), _calib()
    pruned, _ = onnxslim_kit.optimize(proto, passes=["cleanup", PRUNE + ",include=up0"], calibration=calib,
                                      check="off")
    both, _ = onnxslim_kit.optimize(proto, passes=["cleanup", PRUNE + ",include=up0", INT8 + ":include=up0"],
                                    calibration=calib, check="off")
    onnx.checker.check_model(both, full_check=True)
    ops = [n.op_type for n in both.graph.node]
    assert "QuantizeLinear" in ops and model_stats(both).macs < model_stats(proto).macs
    w = {t.name: t for t in pruned.graph.initializer}
    up = next(n for n in pruned.graph.node if n.name == "up0")
    assert w[up.input[1]].dims[1] < 128  # the layer really lost hidden units
    x = calib["x"]
    assert _cosine(_outputs(pruned, x), _outputs(both, x)) >= 0.99


def test_search_prune_svd_and_int8_compose_on_one_layer():
    """The plan's pipeline order on one layer: prune its hidden units, factor it, quantize both factors."""
    proto, calib = _model(), _calib()
    svd = "svd:min_size=1024,rank_ratio=0.25"
    specs = ["cleanup", PRUNE + ",include=up0", svd + ",include=up0"]
    factored, _ = onnxslim_kit.optimize(proto, passes=specs, calibration=calib, check="off")
    names = {n.name for n in factored.graph.node}
    assert {"up0", "up0_factor_a"} <= names
    from onnxslim_kit.search import PlanEntry, build_pipeline

    entry = lambda t: PlanEntry("up0", "MatMul", t, 0.0, 0.0, 0.1, 0.1, 1)  # noqa: E731
    pipe = build_pipeline([entry(INT8), entry(svd), entry(PRUNE)], ["up0", "down0", "up1", "down1"])
    assert [p.name for p in pipe.passes] == ["cleanup", "prune-channels", "svd", "quantize-int8"]
    assert pipe.passes[3].include == ["up0", "up0_factor_a"]
    both, _ = onnxslim_kit.optimize(proto, passes=pipe, calibration=calib, check="off")
    onnx.checker.check_model(both, full_check=True)
    producers = {o: n for n in both.graph.node for o in n.output}
    for name in ("up0", "up0_factor_a"):
        node = next(n for n in both.graph.node if n.name == name)
        assert producers[node.input[1]].op_type == "DequantizeLinear"  # its weight is int8 now
    x = calib["x"]
    assert _cosine(_outputs(factored, x), _outputs(both, x)) >= 0.99


def test_search_plan_quantizes_only_factors_svd_really_made():
    """After pruning, svd finds up0 no longer worth factoring: the quantization pass of the plan then
    includes up0 alone (not a missing up0_factor_a, which it would refuse), and the recipe says so."""
    import importlib

    from onnxslim_kit.calibration import CalibrationData
    from onnxslim_kit.ir import Model
    from onnxslim_kit.pass_base import PassContext
    from onnxslim_kit.search import PlanEntry, build_pipeline

    search_mod = importlib.import_module("onnxslim_kit.search")
    proto, calib = _model(), _calib()
    entry = lambda t: PlanEntry("up0", "MatMul", t, 0.0, 0.0, 0.1, 0.1, 1)  # noqa: E731
    pipe = build_pipeline([entry(PRUNE), entry(SVD), entry(INT8)], ["up0", "down0", "up1", "down1"])
    assert pipe.passes[3].include == ["up0", "up0_factor_a"]
    feeds = [{"x": calib["x"][i:i + 1]} for i in range(8)]
    data = CalibrationData(lambda: iter(feeds), length=8, num_samples=8, source="test", is_random=False)
    ctx = PassContext(calibration=data, calibration_is_random=False, reference=proto)
    model, ran = search_mod._run_plan(pipe, Model.from_proto(proto), ctx)
    out = model.to_proto()
    assert "up0_factor_a" not in {n.name for n in out.graph.node}
    assert ran.passes[3].include == ["up0"] and 'include = ["up0"]' in ran.to_toml()
    onnx.checker.check_model(out, full_check=True)
    x = calib["x"]
    assert _cosine(_outputs(proto, x), _outputs(out, x)) >= 0.95


def test_analyze_calibrated_technique_measured_on_held_out_feeds():
    proto, calib = _model(), _calib()
    report = onnxslim_kit.analyze(proto, calib, techniques=[PRUNE, QW], workers=1)
    ev = next(e for e in report.evaluations if e.technique == PRUNE and e.layer == "up0")
    assert ev.status == "ok" and ev.measured_on == "held-out"
    assert next(e for e in report.evaluations if e.technique == QW and e.layer == "up0").measured_on == "all"
    # The damage is the one of the layer fitted on feeds 0-7, measured on feeds 8-15.
    x = calib["x"]
    fitted, _ = onnxslim_kit.optimize(proto, passes=["cleanup", PRUNE + ",include=up0"], calibration={"x": x[:8]},
                                      check="off")
    onnx.checker.check_model(fitted, full_check=True)
    held = _cosine(_outputs(proto, x[8:]), _outputs(fitted, x[8:]))
    assert ev.cosine == pytest.approx(held, abs=1e-5)
    in_sample = _cosine(_outputs(proto, x[:8]), _outputs(fitted, x[:8]))
    assert in_sample > held  # what the old in-sample measurement reported: optimistic


def test_metric_builtin_scores_against_labels_and_reference():
    ref = [{"logits": np.array([[3.0, 1.0], [0.0, 2.0]], np.float32)}]
    out = [{"logits": np.array([[3.0, 1.0], [2.0, 0.0]], np.float32)}]
    top1 = parse_metric("top1")
    assert top1.score(out, ref) == 0.5 and top1.score(out, ref, np.array([0, 0])) == 1.0
    assert top1.drop(out, ref, np.array([0, 1])) == pytest.approx(0.5)   # original 1.0, candidate 0.5
    cos = parse_metric("cosine")
    assert cos.baseline(ref) == 1.0 and cos.score(out, ref) == pytest.approx(10.0 / 14.0)
    assert math.isinf(parse_metric("snr").baseline(ref))


def test_metric_module_function_scores_outputs(tmp_path, monkeypatch):
    name = _user_module(tmp_path, monkeypatch, """
import numpy as np

def neg_mae(outputs, reference):
    return -float(np.mean([np.abs(o["y"] - r["y"]).mean() for o, r in zip(outputs, reference)]))

def acc(outputs, reference, labels):
    return float(np.mean(np.concatenate([o["y"].argmax(-1) for o in outputs]) == labels))
""")
    ref = [{"y": np.array([[1.0, 0.0]], np.float32)}, {"y": np.array([[0.0, 1.0]], np.float32)}]
    out = [{"y": np.array([[0.5, 0.0]], np.float32)}, {"y": np.array([[1.0, 0.0]], np.float32)}]
    m = parse_metric(f"{name}:neg_mae")
    assert m.score(out, ref) == pytest.approx(-0.625) and m.drop(out, ref) == pytest.approx(0.625)
    assert parse_metric(f"{name}:acc").score(out, ref, np.array([0, 1])) == 0.5


@pytest.mark.parametrize("metric, message", [
    ("nosuchmodule_xyz:f", "cannot import module 'nosuchmodule_xyz'"),
    ("{mod}:missing", "has no function 'missing'"),
    ("{mod}:boom", "raised ZeroDivisionError"),
    ("{mod}:text", "returned str, expected a float"),
    ("accuracy", "expected top1, cosine, snr or module:function"),
])
def test_metric_bad_spec_exits_2_with_one_line(tmp_path, monkeypatch, metric, message):
    mod = _user_module(tmp_path, monkeypatch, "def boom(o, r):\n    return 1 / 0\n\ndef text(o, r):\n    return 'x'\n")
    model = tmp_path / "m.onnx"
    onnx.save(_model(), model)
    np.savez(tmp_path / "calib.npz", **_calib(4))
    res = CliRunner().invoke(main, ["optimize", str(model), "-o", str(tmp_path / "o.onnx"), "--calib",
                                    str(tmp_path / "calib.npz"), "--target", "accuracy_drop=0.01", "-t", QW,
                                    "--metric", metric.format(mod=mod)])
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and res.output.startswith("error: ") and message in res.output
    assert not (tmp_path / "o.onnx").exists()


def test_search_labels_length_mismatch_exits_2_naming_the_file(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(_model(), model)
    np.savez(tmp_path / "calib.npz", **_calib(6))
    np.save(tmp_path / "labels.npy", np.zeros(5, np.int64))
    for command in (["optimize", str(model), "-o", str(tmp_path / "o.onnx"), "--target", "accuracy_drop=0.01"],
                    ["analyze", str(model), "-j", "1"]):
        res = CliRunner().invoke(main, command + ["--calib", str(tmp_path / "calib.npz"), "--labels",
                                                  str(tmp_path / "labels.npy")])
        assert res.exit_code == 2, res.output
        assert res.output.count("\n") == 1
        assert "labels.npy: 5 label(s) but the calibration data has 6 sample(s)" in res.output


def test_labels_refuse_pickles_and_multi_array_npz(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="obj.npy: not a readable"):
        load_labels(tmp_path / "obj.npy")
    np.savez(tmp_path / "two.npz", a=np.zeros(3, np.int64), b=np.zeros(3, np.int64))
    with pytest.raises(InputError, match="exactly one array"):
        load_labels(tmp_path / "two.npz")
    np.save(tmp_path / "f.npy", np.zeros(3, np.float32))
    with pytest.raises(InputError, match="labels must be integers"):
        load_labels(tmp_path / "f.npy")


@pytest.mark.parametrize("args, message", [
    (["--target", "speed=2"], "expected accuracy_drop=D, size=Rx or latency=Rx"),
    (["--target", "size=2x"], "the ratio must be in (0, 1]"),
    (["--target", "accuracy_drop=0.01", "-p", "cleanup"], "without -p/--pass or --recipe"),
    (["--metric", "top1"], "--metric: only with --target"),
    (["--executor", "ray"], "--executor: only with --target"),
    (["--confidence", "0.99"], "--confidence: only with --target"),
    (["--confidence", "0.95", "-j", "2"], "--confidence, --workers: only with --target"),   # defaults restated
    (["--max-verifications", "3"], "--max-verifications: only with --target"),
])
def test_search_cli_bad_target_exits_2_with_one_line(tmp_path, args, message):
    model = tmp_path / "m.onnx"
    onnx.save(_model(), model)
    res = CliRunner().invoke(main, ["optimize", str(model), "-o", str(tmp_path / "o.onnx")] + args)
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and message in res.output


@pytest.mark.slow
def test_search_digits_cnn_meets_target_on_held_out_labels(tmp_path):
    root = Path(__file__).resolve().parent.parent / "models"
    data = np.load(root / "digits_cnn.eval.npz")
    result = onnxslim_kit.search(root / "digits_cnn.onnx", {"image": data["image"]}, labels=data["labels"],
                                 target="accuracy_drop=0.02", holdout=0.5, batch_size=30, workers=1,
                                 objective="size")
    assert result.met and result.plan and result.holdout_samples == 270
    assert result.holdout_drop <= 0.02 and result.size_ratio < 0.5
    onnx.checker.check_model(result.model, full_check=True)
    pred = np.concatenate([run_model(result.model, {"image": data["image"][i:i + 60]})[0].argmax(-1)
                           for i in range(0, 540, 60)])
    ref = np.concatenate([run_model(onnx.load(root / "digits_cnn.onnx"), {"image": data["image"][i:i + 60]})[0]
                          .argmax(-1) for i in range(0, 540, 60)])
    assert np.mean(pred == data["labels"]) >= np.mean(ref == data["labels"]) - 0.02


def _fake_latency(slow_op: str, calls: list, slow=(1.3, 1.3, 1.3, 1.3, 1.3)):
    """A stand-in for the timing: every model holding a ``slow_op`` node runs ``slow`` x the original
    per round, any other 0.9x (tests assert what the search does with measurements, never timings)."""
    def fake(original, candidates, feed, *, threads=2, rounds=5, **_):
        calls.append(len(candidates))
        models = [onnx.load(c) if isinstance(c, (str, Path)) else c for c in candidates]  # probes come as files
        return [list(slow[:rounds]) if any(n.op_type == slow_op for n in m.graph.node) else [0.9] * rounds
                for m in models]
    return fake


def test_search_balanced_leaves_out_technique_that_makes_model_slower(monkeypatch, tmp_path):
    module = search_module
    calls: list = []
    monkeypatch.setattr(module, "latency_rounds", _fake_latency("QuantizeLinear", calls))
    proto, calib = _model(), _calib()
    result = onnxslim_kit.search(proto, calib, target="accuracy_drop=0.05", techniques=[INT8, PRUNE])
    # Each technique was probed on its candidate layers per op type, in one timing call; int8 measured
    # slower and is out of the candidates and of the plan; pruning is in.
    assert calls[0] == len(result.probe) >= 2
    slow = {k for k in result.probe if k.startswith(INT8)}
    assert slow and set(result.excluded) == slow and all(result.probe[k] == 1.3 for k in slow)
    assert result.met and result.plan and all(e.technique == PRUNE for e in result.plan)
    assert result.latency_ratio == 0.9   # the result's own latency is measured too
    report = result.to_dict()
    assert report["objective"] == "balanced" and set(report["excluded"]) == slow
    from onnxslim_kit.report import render_search
    assert "not used: applied to all" in render_search(result)
    onnx.checker.check_model(result.model, full_check=True)
    x = calib["x"]
    assert _cosine(_outputs(proto, x), _outputs(result.model, x)) >= 0.9
    # objective=size times nothing before the search and may use int8.
    calls.clear()
    sized = onnxslim_kit.search(proto, calib, target="accuracy_drop=0.05", techniques=[INT8, PRUNE],
                                objective="size")
    assert not sized.probe and not sized.excluded and calls == [1]
    assert any(e.technique == INT8 for e in sized.plan)


def test_search_balanced_keeps_technique_faster_in_one_round(monkeypatch):
    """Slower in four rounds of five, faster in one, median within 1.05x: not shown slower, so int8
    stays a candidate and its median ratio is reported. With a median 1.2x slower it is left out."""
    module = search_module
    monkeypatch.setattr(module, "latency_rounds", _fake_latency("QuantizeLinear", [], (1.02, 1.3, 0.95, 1.04, 1.4)))
    result = onnxslim_kit.search(_model(), _calib(), target="accuracy_drop=0.05", techniques=[INT8])
    assert not result.excluded and result.probe and all(v == 1.04 for v in result.probe.values())
    assert result.met and any(e.technique == INT8 for e in result.plan)
    monkeypatch.setattr(module, "latency_rounds", _fake_latency("QuantizeLinear", [], (1.2, 1.3, 0.95, 1.1, 1.4)))
    result = onnxslim_kit.search(_model(), _calib(), target="accuracy_drop=0.05", techniques=[INT8])
    assert set(result.excluded) == set(result.probe) and not result.plan


def test_search_balanced_speed_repair_drops_group_when_plan_is_slower(monkeypatch):
    """The probe keeps int8 (faster in one round of five, median 1.04x); the verified plan with int8 is then slower than
    the original in every round: the speed repair removes the int8 group, verifies, and keeps the faster,
    still verified plan."""
    module = search_module
    probe = _fake_latency("QuantizeLinear", [], (1.02, 1.3, 0.95, 1.04, 1.4))
    later = _fake_latency("QuantizeLinear", [], (1.2, 1.2, 1.2, 1.2, 1.2))
    calls: list = []

    def fake(*args, **kwargs):
        calls.append(1)
        return (probe if len(calls) == 1 else later)(*args, **kwargs)

    monkeypatch.setattr(module, "latency_rounds", fake)
    proto, calib = _model(), _calib()
    result = onnxslim_kit.search(proto, calib, target="accuracy_drop=0.05", techniques=[INT8, PRUNE])
    assert any(s.action.startswith("speed: without quantize-int8") and s.met for s in result.steps)
    assert result.met and result.plan and all(e.technique == PRUNE for e in result.plan)
    assert any(k.startswith(INT8) and "slower than the original in every round" in v
               for k, v in result.excluded.items())
    assert result.latency_ratio == 0.9
    onnx.checker.check_model(result.model, full_check=True)
    assert not any(n.op_type == "QuantizeLinear" for n in result.model.graph.node)


def test_search_balanced_rerun_with_cache_reuses_timings_and_plan(monkeypatch, tmp_path):
    """The probe's and the speed repair's timings go into --cache: a rerun (or the same search on
    another executor) decides on the same numbers and builds the same plan, timing nothing."""
    module = search_module
    first: list = []
    monkeypatch.setattr(module, "latency_rounds", _fake_latency("QuantizeLinear", first))
    proto, calib = _model(), _calib()
    cache = tmp_path / "analysis.jsonl"
    a = onnxslim_kit.search(proto, calib, target="accuracy_drop=0.05", techniques=[INT8, PRUNE], cache=cache)
    assert first and a.excluded
    # Now int8 would measure fast: with the cache the search does not time again and keeps its decisions.
    again: list = []
    monkeypatch.setattr(module, "latency_rounds", _fake_latency("NoSuchOp", again))
    b = onnxslim_kit.search(proto, calib, target="accuracy_drop=0.05", techniques=[INT8, PRUNE], cache=cache)
    assert again == [] and b.excluded == a.excluded and b.probe == a.probe
    assert [(e.layer, e.technique) for e in b.plan] == [(e.layer, e.technique) for e in a.plan]
    assert b.model.SerializeToString() == a.model.SerializeToString()
    assert b.analysis.reused == len(b.analysis.evaluations)


def test_search_latency_batch_reaches_every_timing(monkeypatch):
    """Every session the search times (probe, plans, a latency target, the result's ratio) runs the feed at
    --latency-batch rows on --latency-threads threads (the real timing path, only the clock faked)."""
    feeds: list = []

    def fake(models, feed, *, threads=2, runs=20, warmup=3, rounds=3):
        feeds.append((threads, feed["x"].shape[0]))
        return [[1e-4] * (runs * rounds) for _ in models]

    monkeypatch.setattr(search_module, "time_sessions", fake)
    result = onnxslim_kit.search(_model(), _calib(4), target="accuracy_drop=0.05", techniques=[INT8],
                                 latency_batch=6, latency_threads=1)
    assert result.probe and result.latency_ratio == 1.0 and feeds
    calls = len(feeds)
    onnxslim_kit.search(_model(), _calib(4), target="latency=0.9x", techniques=[INT8], latency_batch=6,
                        latency_threads=1)
    assert len(feeds) > calls
    # 6 rows asked, the first calibration feed has 1: repeated; every timing saw them, on 1 thread.
    assert set(feeds) == {(1, 6)}
    with pytest.raises(InputError, match="latency_batch"):
        onnxslim_kit.search(_model(), _calib(4), target="accuracy_drop=0.05", latency_batch=0)


def test_search_latency_target_orders_by_measured_speed_not_macs(monkeypatch):
    """The probe says int8 halves the latency and pruning changes nothing: a latency target is met with
    int8 (which saves no MACs, so a MACs ordering would not even list it) and without pruning."""
    module = search_module
    monkeypatch.setattr(module, "latency_rounds", _fake_latency("QuantizeLinear", [], (0.5,) * 5))
    original_fake = module.latency_rounds

    def fake(original, candidates, feed, **kw):
        rounds = original_fake(original, candidates, feed, **kw)
        return [[1.0] * len(r) if r[0] == 0.9 else r for r in rounds]   # no Q: as fast as the original

    monkeypatch.setattr(module, "latency_rounds", fake)
    result = onnxslim_kit.search(_model(), _calib(), target="latency=0.8x", techniques=[INT8, PRUNE])
    assert result.probe[f"{INT8} on MatMul"] == 0.5 and not result.excluded
    assert result.met and result.plan and all(e.technique == INT8 for e in result.plan)
    assert result.latency_ratio == 0.5
    onnx.checker.check_model(result.model, full_check=True)


def test_search_objective_bad_value_exits_2(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(_model(), model)
    res = CliRunner().invoke(main, ["optimize", str(model), "-o", str(tmp_path / "o.onnx"), "--target",
                                    "accuracy_drop=0.01", "--objective", "fastest"])
    assert res.exit_code == 2 and "fastest" in res.output
    res = CliRunner().invoke(main, ["optimize", str(model), "-o", str(tmp_path / "o.onnx"), "--objective", "size"])
    assert res.exit_code == 2 and "--objective: only with --target" in res.output
    with pytest.raises(InputError, match="objective"):
        onnxslim_kit.search(_model(), _calib(), target="accuracy_drop=0.01", objective="fastest")


def test_search_top1_margin_is_a_prediction_bound_for_fresh_data():
    from onnxslim_kit.search import top1_margin

    z = 1.6448536269514722
    # No discordant sample still leaves a margin (zero out of n does not prove a zero rate) ...
    assert top1_margin(z, 0, 270) > 0.008
    # ... and it grows with the discordant count and shrinks with the sample count.
    assert top1_margin(z, 4, 270) > top1_margin(z, 1, 270) > top1_margin(z, 0, 270)
    assert top1_margin(z, 1, 1000) < top1_margin(z, 1, 270)
    # A fresh sample of the same size adds its own noise: wider than the confidence bound on the mean.
    assert top1_margin(z, 3, 270) > z * math.sqrt(3) / 270 * math.sqrt(2)


@pytest.mark.slow
def test_search_balanced_on_digits_cnn_uses_no_excluded_group(tmp_path):
    """Real timings (whatever they say on this machine): every group is probed, the plan holds no change
    from a group the probe left out, the result's latency is measured, and the report carries it all."""
    root = Path(__file__).resolve().parent.parent / "models"
    data = np.load(root / "digits_cnn.eval.npz")
    result = onnxslim_kit.search(root / "digits_cnn.onnx", {"image": data["image"][:270]},
                                 labels=data["labels"][:270], target="accuracy_drop=0.02", batch_size=30)
    groups = {f"{e.technique} on {e.op}" for e in result.analysis.evaluations if e.status == "ok"}
    assert result.probe and {k.split(" (")[0] for k in result.probe} <= groups   # "(... weights)": size class
    assert all(v is None or v > 0 for v in result.probe.values())
    assert set(result.excluded) <= set(result.probe)
    assert not {search_module._group(e) for e in result.plan} & set(result.excluded)
    assert result.met and result.latency_ratio is not None and result.latency_ratio > 0
    # top1: every verification carries the prediction margin, and a met one holds drop + margin.
    assert all(s.margin > 0 for s in result.steps if math.isfinite(s.search_drop))
    assert all(max(s.search_drop, 0.0) + s.margin <= 0.02 + 1e-12 for s in result.steps if s.met)
    report = result.to_dict()
    assert report["objective"] == "balanced" and report["latency_probe"] and "excluded" in report
    onnx.checker.check_model(result.model, full_check=True)


def test_search_prune_levels_run_as_one_pass_with_layer_ratios():
    """Two prune-channels levels in one plan: one pass, each layer at its own ratio (a coupled group is
    never pruned twice); one level alone keeps the plain spec."""
    from onnxslim_kit.search import PlanEntry, build_pipeline

    p75 = PRUNE.replace("ratio=0.5", "ratio=0.75")
    order = ["up0", "down0", "up1", "down1"]
    pipe = build_pipeline([PlanEntry("up1", "MatMul", p75, 0.0, 0.0, 0.1, 0.1, 1),
                           PlanEntry("up0", "MatMul", PRUNE, 0.0, 0.0, 0.1, 0.1, 1)], order)
    prune = [p for p in pipe.passes if p.name == "prune-channels"]
    assert len(prune) == 1 and prune[0].include == ["up0", "up1"]
    assert prune[0].layer_ratios == ["up0=0.5", "up1=0.75"] and prune[0].multiple == 8
    proto, calib = _model(), _calib()
    model, _ = onnxslim_kit.optimize(proto, passes=["cleanup", "prune-channels:multiple=8,ratio=0.5,"
                                                    "include=up0+up1,layer_ratios=up0=0.5+up1=0.75"],
                                     calibration=calib, check="off")
    onnx.checker.check_model(model, full_check=True)
    w = {t.name: t for t in model.graph.initializer}
    hidden = {n.name: w[n.input[1]].dims[1] for n in model.graph.node if n.name in ("up0", "up1")}
    assert hidden == {"up0": 64, "up1": 32}   # 128 hidden units at 0.5 and 0.75
    single = build_pipeline([PlanEntry("up0", "MatMul", p75, 0.0, 0.0, 0.1, 0.1, 1)], order)
    (only,) = [p for p in single.passes if p.name == "prune-channels"]
    assert only.ratio == 0.75 and not only.layer_ratios


def test_search_raises_prune_level_on_a_layer_instead_of_stacking():
    """prune-channels at 0.5 and 0.75 offered on the same layers with a loose target: the plan holds at
    most one level per layer (the stronger replacing the weaker), never both."""
    proto, calib = _model(), _calib()
    p75 = PRUNE.replace("ratio=0.5", "ratio=0.75")
    result = onnxslim_kit.search(proto, calib, target="accuracy_drop=0.5", techniques=[PRUNE, p75],
                                 objective="size")
    assert result.met
    layers = [e.layer for e in result.plan]
    assert len(layers) == len(set(layers))
    assert {e.technique for e in result.plan} == {p75}   # 0.75 is what fits a loose target everywhere
    (prune,) = [p for p in result.pipeline.passes if p.name == "prune-channels"]
    assert prune.ratio == 0.75
    onnx.checker.check_model(result.model, full_check=True)
    x = calib["x"][8:]
    assert _cosine(_outputs(proto, x), _outputs(result.model, x)) >= 0.5


def test_search_reverts_to_whole_groups_when_singles_break_the_plan(tmp_path, monkeypatch):
    """A threshold metric: int4 on all four MatMuls passes (taken whole), pruning up0 or up1 alone passes
    (predicted drop 0), pruning both does not. The greedy's first plan (group + both prunes) fails; the
    repair goes back to the group, verified, and extends it by one prune."""
    proto, calib = _model(), _calib()
    metric = _threshold_metric(tmp_path, monkeypatch, 4.5e-5)
    result = onnxslim_kit.search(proto, calib, target="accuracy_drop=0.5", metric=metric,
                                 techniques=[QW, PRUNE], objective="size")
    assert result.groups_taken == [f"{QW} on MatMul"] and result.group_drops[f"{PRUNE} on MatMul"] == 1.0
    assert result.steps[0].action == "greedy" and not result.steps[0].met and result.steps[0].entries == 6
    assert result.steps[1].action == "revert to the whole groups" and result.steps[1].met
    assert result.met and result.search_drop == 0.0
    assert sorted(e.layer for e in result.plan if e.technique == QW) == ["down0", "down1", "up0", "up1"]
    assert len([e for e in result.plan if e.technique == PRUNE]) == 1
    onnx.checker.check_model(result.model, full_check=True)


def test_search_levels_order_prune_ratio_up_and_svd_energy_down():
    """A stronger level replaces a weaker one on its layer only: higher prune ratio, lower svd energy,
    same other options; another layer or other options are not an upgrade."""
    from onnxslim_kit.search import PlanEntry, _merged, _weaker

    def entry(layer, t):
        return PlanEntry(layer, "MatMul", t, 0.0, 0.0, 0.1, 0.1, 1)

    p50, p75 = entry("up0", PRUNE), entry("up0", PRUNE.replace("ratio=0.5", "ratio=0.75"))
    s90, s80 = entry("up0", "svd:energy=0.9,min_size=1024"), entry("up0", "svd:energy=0.8,min_size=1024")
    assert _weaker(p75, [p50]) is p50 and _weaker(p50, [p75]) is None
    assert _weaker(s80, [s90]) is s90 and _weaker(s90, [s80]) is None
    assert _weaker(entry("up1", PRUNE.replace("ratio=0.5", "ratio=0.75")), [p50]) is None
    assert _weaker(entry("up0", "prune-channels:multiple=16,ratio=0.75"), [p50]) is None
    assert _weaker(entry("up0", INT8), [p50]) is None
    assert _merged([p50, s90], [p75, s80]) == [p75, s80]


def test_search_size_classes_split_a_technique_whose_layers_differ_in_size():
    """The probe's groups split by weight-size class (powers of 4) only where one technique's layers on one
    op type span several classes, and never for quantization (quantized neighbours share their Q/DQ)."""
    from onnxslim_kit.search import PlanEntry, _group, _size_classes

    def entry(layer, t):
        return PlanEntry(layer, "MatMul", t, 0.0, 0.0, 0.1, 0.1, 1)

    cands = [entry("q", SVD), entry("up", SVD), entry("q", INT8), entry("k", INT8)]
    _size_classes(cands, {"q": 128 * 128, "k": 128 * 128, "up": 128 * 512})
    cands.append(entry("up", INT8))
    _size_classes(cands, {"q": 128 * 128, "k": 128 * 128, "up": 128 * 512})
    assert [_group(c) for c in cands] == [f"{SVD} on MatMul (16K-64K weights)", f"{SVD} on MatMul (64K-256K weights)",
                                          f"{INT8} on MatMul", f"{INT8} on MatMul", f"{INT8} on MatMul"]


def test_search_objective_latency_probes_and_orders_by_measured_saving(monkeypatch):
    """objective latency: the same probe as balanced (a technique slower in every round is left out); int8,
    measured no faster (1.0x), saves no latency, so with room for only one group the plan takes pruning."""
    module = search_module
    calls: list = []
    monkeypatch.setattr(module, "latency_rounds", _fake_latency("QuantizeLinear", calls, (1.0,) * 5))
    proto, calib = _model(), _calib()
    result = onnxslim_kit.search(proto, calib, target="accuracy_drop=1.7e-4", techniques=[INT8, PRUNE],
                                 objective="latency")
    assert result.probe and calls[0] == len(result.probe) and not result.excluded
    assert result.met and {e.technique for e in result.plan} == {PRUNE}
    assert result.to_dict()["objective"] == "latency" and result.latency_ratio == 0.9
    onnx.checker.check_model(result.model, full_check=True)
    res = CliRunner().invoke(main, ["optimize", "--help"])
    assert "latency = the same probe" in res.output


def test_search_objective_latency_polish_drops_group_that_slows_the_plan(monkeypatch):
    """Each technique alone is faster (int8 0.95x, pruning 0.9x) but the plan holding both runs 1.0x: the
    polish builds the plan without each group, times it against the plan in the same rounds and drops
    int8, which the plan runs faster without."""
    module = search_module

    def fake(original, candidates, feed, *, threads=2, rounds=5, **_):
        out = []
        for c in candidates:
            m = onnx.load(c) if isinstance(c, (str, Path)) else c
            quantized = any(n.op_type == "QuantizeLinear" for n in m.graph.node)
            pruned = any(64 in t.dims for t in m.graph.initializer)   # 128 hidden units -> 64
            out.append([1.0 if quantized and pruned else 0.95 if quantized else 0.9 if pruned else 1.0] * rounds)
        return out

    monkeypatch.setattr(module, "latency_rounds", fake)
    proto, calib = _model(), _calib()
    result = onnxslim_kit.search(proto, calib, target="accuracy_drop=0.5", techniques=[INT8, PRUNE],
                                 objective="latency")
    assert any(s.action == f"latency: without {INT8} on MatMul" and s.met for s in result.steps)
    assert result.met and {e.technique for e in result.plan} == {PRUNE}
    assert "rounds faster" in result.excluded[f"{INT8} on MatMul"] and result.latency_ratio == 0.9
    assert not any(n.op_type == "QuantizeLinear" for n in result.model.graph.node)
    onnx.checker.check_model(result.model, full_check=True)
    balanced = onnxslim_kit.search(proto, calib, target="accuracy_drop=0.5", techniques=[INT8, PRUNE])
    assert {e.technique for e in balanced.plan} == {INT8, PRUNE}   # no polish for the balanced objective


def test_search_reverts_to_whole_groups_when_level_raises_break_the_plan(tmp_path, monkeypatch):
    """The singles after the groups only raise levels (prune 0.5 -> 0.75, same plan length): when they break
    the plan, the search still goes back to the verified groups instead of reverting layers to nothing."""
    proto, calib = _model(), _calib()
    p75 = PRUNE.replace("ratio=0.5", "ratio=0.75")
    metric = _threshold_metric(tmp_path, monkeypatch, 7e-5)
    result = onnxslim_kit.search(proto, calib, target="accuracy_drop=0.5", metric=metric,
                                 techniques=[PRUNE, p75], objective="size")
    assert f"{PRUNE} on MatMul" in result.group_drops and result.group_drops[f"{PRUNE} on MatMul"] == 0.0
    assert not result.steps[0].met
    assert result.steps[1].action == "revert to the whole groups" and result.steps[1].met
    assert result.met and sorted(e.layer for e in result.plan) == ["up0", "up1"]   # both layers still pruned
    onnx.checker.check_model(result.model, full_check=True)


def test_search_latency_polish_does_not_re_offer_groups_left_out(monkeypatch):
    """The speed repair takes int8 out of a plan slower than the original; the polish then drops svd (the plan
    runs faster without it). The budget svd held is re-offered to the remaining changes, never to int8 or
    svd again."""
    module = search_module

    def fake(original, candidates, feed, *, threads=2, rounds=5, **_):
        out = []
        for c in candidates:
            m = onnx.load(c) if isinstance(c, (str, Path)) else c
            quantized = any(n.op_type == "QuantizeLinear" for n in m.graph.node)
            factored = any(n.name.endswith("_factor_a") for n in m.graph.node)
            pruned = any(64 in t.dims for t in m.graph.initializer)
            if quantized:
                per = [1.02, 1.3, 0.95, 1.04, 1.4] if not (factored or pruned) else [1.2] * 5
            else:
                per = [0.9 if factored and pruned else 0.95 if factored else 0.8 if pruned else 1.0] * 5
            out.append(per[:rounds])
        return out

    monkeypatch.setattr(module, "latency_rounds", fake)
    proto, calib = _model(), _calib()
    result = onnxslim_kit.search(proto, calib, target="accuracy_drop=0.5", techniques=[INT8, PRUNE, SVD],
                                 objective="latency")
    actions = [s.action for s in result.steps]
    assert f"speed: without {INT8} on MatMul" in actions and f"latency: without {SVD} on MatMul" in actions
    assert {f"{INT8} on MatMul", f"{SVD} on MatMul"} <= set(result.excluded)
    assert result.met and {e.technique for e in result.plan} == {PRUNE}
    assert not any(n.op_type == "QuantizeLinear" for n in result.model.graph.node)
    onnx.checker.check_model(result.model, full_check=True)


def test_search_latency_batch_the_model_cannot_run_is_one_input_error():
    """x is [N, 32] but a Reshape fixes the batch to 1: at --latency-batch 4 the original fails, said in one
    line naming the latency feed, before any timing."""
    from builders import FLOAT, init, make_model

    w = rng(2).standard_normal((32, 16)).astype(np.float32)
    nodes = [onnx.helper.make_node("Reshape", ["x", "shape"], ["r"], name="rs"),
             onnx.helper.make_node("MatMul", ["r", "w"], ["y"], name="fc")]
    proto = make_model(nodes, [("x", FLOAT, ["N", 32])], [("y", FLOAT, [1, 16])],
                       [init("w", w), init("shape", np.array([1, 32], np.int64))])
    calib = {"x": rng(3).standard_normal((8, 32)).astype(np.float32)}
    with pytest.raises(InputError, match=r"fails on .*the latency feed \(4 row\(s\)"):
        onnxslim_kit.search(proto, calib, target="accuracy_drop=0.05", techniques=[INT8], latency_batch=4)
