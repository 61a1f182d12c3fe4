"""onnxslim_kit/analyze.py: per-layer sensitivity analysis, process pool, resumable cache, CLI."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

import onnxslim_kit
from builders import FLOAT, init, make_model, rng, run_model
from onnxslim_kit.cli import main
from onnxslim_kit.errors import InputError

QW = "quantize-weights:bits=4,block_size=16,min_elements=1024"
PRUNE = "prune-channels:multiple=8,ratio=0.5"  # canonical form: options sorted


def _mlp(outlier: bool = True) -> onnx.ModelProto:
    """x[N,32] -> fc1 -> Relu -> fc2 -> Relu -> fc3 -> Relu -> fc4 (Gemm, 10 logits). With ``outlier``,
    fc2's weight has one huge value in every 16-row block of every column, on rows whose input is
    always zero (fc1's columns 0, 16, 32, 48 are zero): the float model ignores them, but blocked int4
    takes its scale from them and rounds the rest of every block to zero, so quantizing fc2 hurts far
    more than quantizing fc3."""
    r = rng(0)
    w = {name: (r.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
         for name, shape in (("w1", (32, 64)), ("w2", (64, 64)), ("w3", (64, 64)), ("w4", (64, 10)))}
    if outlier:
        w["w1"][:, 0::16] = 0.0
        w["w2"][0::16, :] = 50.0
    inits = [init(k, v) for k, v in w.items()] + [init("b4", np.zeros(10, np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["a1"], name="r1"),
             helper.make_node("MatMul", ["a1", "w2"], ["h2"], name="fc2"),
             helper.make_node("Relu", ["h2"], ["a2"], name="r2"),
             helper.make_node("MatMul", ["a2", "w3"], ["h3"], name="fc3"),
             helper.make_node("Relu", ["h3"], ["a3"], name="r3"),
             helper.make_node("Gemm", ["a3", "w4", "b4"], ["logits"], name="fc4")]
    return make_model(nodes, [("x", FLOAT, ["N", 32])], [("logits", FLOAT, ["N", 10])], inits)


def _rows(report):
    return report.to_dict(run_details=False)["evaluations"]


def _by(report, technique, layer):
    return next(e for e in report.evaluations if e.technique == technique and e.layer == layer)


def test_analyze_workers_1_and_2_give_identical_results():
    proto = _mlp()
    one = onnxslim_kit.analyze(proto, techniques=[QW, PRUNE], workers=1)
    two = onnxslim_kit.analyze(proto, techniques=[QW, PRUNE], workers=2)
    assert one.layers == ["fc1", "fc2", "fc3", "fc4"] and len(one.evaluations) == 8
    assert _rows(one) == _rows(two)
    assert one.computed == two.computed == 8 and one.reused == 0
    statuses = {(e.technique, e.layer): e.status for e in one.evaluations}
    assert statuses[(QW, "fc1")] == "ok" and statuses[(QW, "fc4")] == "skipped"  # 640 elements < 1024
    assert _by(one, QW, "fc4").reason == "weight has 640 elements < min_elements=1024"
    assert _by(one, PRUNE, "fc4").status == "skipped"  # its channels reach the graph output
    pruned = _by(one, PRUNE, "fc2")
    assert pruned.status == "ok" and pruned.macs_saved > 0 and pruned.params_saved == 32 * 64 * 2
    assert 0.0 < pruned.macs_saved_fraction < 1.0 and pruned.score == pytest.approx(
        pruned.damage / pruned.macs_saved_fraction)


def test_analyze_outlier_layer_ranks_as_more_damaging():
    proto = _mlp()
    report = onnxslim_kit.analyze(proto, techniques=[QW], workers=1)
    fc2, fc3 = _by(report, QW, "fc2"), _by(report, QW, "fc3")
    assert fc2.damage > 10 * fc3.damage and fc2.bytes_saved > 0 and fc3.bytes_saved > 0
    # weight-only int4 saves no MACs: MatMulNBits nodes whose MACs are unknown are listed, not "saved"
    assert fc2.macs_saved == 0 and "fc2_nbits" in fc2.macs_unresolved
    ranked = [e.layer for e in report.ranked() if e.status == "ok"]
    assert ranked.index("fc3") < ranked.index("fc2")
    # The reported cosine is the one of the model that technique + include really produces.
    out, _ = onnxslim_kit.optimize(proto, passes=["cleanup", QW + ",include=fc2"], check="off")
    onnx.checker.check_model(out, full_check=True)
    cos = []
    for feed in onnxslim_kit.api._data(proto, None, {}, num_samples=8, seed=0, batch_size=None):
        cos.append((run_model(proto, feed)[0], run_model(out, feed)[0]))
    a = np.concatenate([c[0].ravel() for c in cos]).astype(np.float64)
    b = np.concatenate([c[1].ravel() for c in cos]).astype(np.float64)
    assert fc2.cosine == pytest.approx(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), abs=1e-5)


def test_analyze_resumes_from_cache_after_interrupt(tmp_path):
    proto = _mlp()
    cache = tmp_path / "cache.jsonl"

    class Stop(Exception):
        pass

    def stop_after_three(iterable, label):
        for i, item in enumerate(iterable):
            if i == 2:
                raise Stop
            yield item

    with pytest.raises(Stop):
        onnxslim_kit.analyze(proto, techniques=[QW, PRUNE], workers=1, cache=cache, progress=stop_after_three)
    assert len(cache.read_text().splitlines()) == 1 + 3  # header + the three finished evaluations
    seen = []

    def count(iterable, label):
        for item in iterable:
            seen.append((item.technique, item.layer))
            yield item

    resumed = onnxslim_kit.analyze(proto, techniques=[QW, PRUNE], workers=1, cache=cache, progress=count)
    assert resumed.reused == 3 and resumed.computed == 5 and len(seen) == 5
    assert {(e.technique, e.layer) for e in resumed.evaluations if e.cached} == {
        (QW, "fc1"), (QW, "fc2"), (QW, "fc3")}
    fresh = onnxslim_kit.analyze(proto, techniques=[QW, PRUNE], workers=1)
    assert _rows(resumed) == _rows(fresh)
    # Another model (different weights) does not reuse the entries.
    other = onnxslim_kit.analyze(_mlp(outlier=False), techniques=[QW], workers=1, cache=cache)
    assert other.reused == 0 and other.computed == 4


def test_analyze_cache_refuses_a_file_that_is_not_a_cache(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("my notes\n")
    with pytest.raises(InputError, match="not an analyze cache"):
        onnxslim_kit.analyze(_mlp(), techniques=[QW], workers=1, cache=path)
    assert path.read_text() == "my notes\n"


def test_analyze_cli_writes_json_and_table(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(_mlp(), model)
    out = tmp_path / "a.json"
    res = CliRunner().invoke(main, ["analyze", str(model), "-t", QW, "-j", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "damage/saved" in res.output and "fc2" in res.output and "not evaluated (1)" in res.output
    data = json.loads(out.read_text())
    for key in ("source", "techniques", "layers", "baseline", "original", "calibration", "model_fingerprint",
                "workers", "computed", "reused", "evaluations"):
        assert key in data
    ev = data["evaluations"][0]
    for key in ("technique", "layer", "op", "status", "reason", "cosine", "snr_db", "damage", "outputs",
                "macs_saved", "params_saved", "bytes_saved", "latency_ratio", "score"):
        assert key in ev
    assert ev["layer"] == "fc1" or ev["layer"] == "fc3"  # best trades first; fc2 (outlier) is not first
    assert data["evaluations"][-1]["status"] == "skipped"


@pytest.mark.parametrize("technique, message", [
    ("nope", "unknown pass 'nope'"),
    ("cleanup", "technique 'cleanup' has no 'include' option"),
    ("svd:include=fc1", "do not set include"),
    ("svd:energy=2", "energy must be in (0, 1]"),
])
def test_analyze_cli_bad_technique_exits_2_with_one_line(tmp_path, technique, message):
    model = tmp_path / "m.onnx"
    onnx.save(_mlp(), model)
    res = CliRunner().invoke(main, ["analyze", str(model), "-t", technique, "-j", "1"])
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and res.output.startswith("error: ") and message in res.output
