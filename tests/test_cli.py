"""CLI end to end with click's CliRunner, and the Python API it mirrors."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from click.testing import CliRunner

import onnxslim_kit
from builders import conv_bn_relu, run_model
from onnxslim_kit.cli import main
from onnxslim_kit.errors import InputError, ParityError
from onnxslim_kit.pass_base import Pass, PassResult
from onnxslim_kit.registry import register_pass


@register_pass
class _BreakConv(Pass):
    """Test pass: deliberately corrupts the first Conv weight (a new array; never in place)."""

    name = "test-break-conv"

    def run(self, model, ctx):
        conv = next(n for n in model.nodes if n.op == "Conv")
        w = np.asarray(conv.inputs[1].values)
        conv.inputs[1] = gs.Constant(model.unique_name("broken_w"), w * 1.5)
        return PassResult(model, True, {"broken": 1})


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    proto = conv_bn_relu()
    proto.metadata_props.add(key="labels", value="0,1,2")
    onnx.save(proto, path)
    return path


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_optimize_writes_model_and_json_report(model_path, tmp_path):
    out, report = tmp_path / "slim.onnx", tmp_path / "report.json"
    result = _invoke("optimize", model_path, "-o", out, "--report", report)
    assert result.exit_code == 0, result.output
    assert "OK in" in result.output and "BatchNormalization" in result.output
    slim = onnx.load(out)
    onnx.checker.check_model(slim, full_check=True)
    assert [n.op_type for n in slim.graph.node] == ["Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"]
    assert [(p.key, p.value) for p in slim.metadata_props] == [("labels", "0,1,2")]
    data = json.loads(report.read_text())
    assert data["ok"] and data["written"] and data["before"]["nodes"] == 6 and data["after"]["nodes"] == 5
    assert data["passes"][0]["name"] == "cleanup" and data["passes"][0]["stats"]["batchnorms_folded"] == 1
    assert data["parity"]["outputs"][0]["name"] == "logits" and data["parity"]["outputs"][0]["ok"]
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_model(slim, {"x": x})[0], run_model(onnx.load(model_path), {"x": x})[0],
                               atol=1e-5, rtol=1e-5)


def test_cli_parity_failure_exits_3_and_writes_nothing(model_path, tmp_path):
    out = tmp_path / "slim.onnx"
    out.write_bytes(b"previous run")
    result = _invoke("optimize", model_path, "-o", out, "-p", "test-break-conv", "--locate")
    assert result.exit_code == 3
    assert "parity check failed" in result.output and "logits" in result.output
    assert "first divergence: " in result.output and "conv" in result.output
    assert out.read_bytes() == b"previous run"
    assert "Traceback" not in result.output


def test_cli_per_pass_check_rolls_back_only_the_broken_pass(model_path, tmp_path):
    out, report = tmp_path / "slim.onnx", tmp_path / "r.json"
    result = _invoke("optimize", model_path, "-o", out, "-p", "cleanup", "-p", "test-break-conv",
                     "--check", "per-pass", "--report", report)
    assert result.exit_code == 0, result.output
    assert "ROLLED BACK" in result.output
    passes = json.loads(report.read_text())["passes"]
    assert [(p["name"], p["rolled_back"]) for p in passes] == [("cleanup", False), ("test-break-conv", True)]
    assert "BatchNormalization" not in [n.op_type for n in onnx.load(out).graph.node]


def test_cli_recipe_and_tolerance(model_path, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[pass]]\nname = "cleanup"\ncse = false\n')
    out = tmp_path / "slim.onnx"
    result = _invoke("optimize", model_path, "-o", out, "--recipe", recipe, "--tolerance", "atol=1e-3")
    assert result.exit_code == 0, result.output
    assert "atol=0.001" in result.output


@pytest.mark.parametrize("args, message", [
    (["-p", "nope"], "unknown pass 'nope'"),
    (["-p", "cleanup:bogus=1"], "has no option 'bogus'"),
    (["-p", "cleanup:cse=maybe"], "expected true or false"),
    (["--tolerance", "cosine"], "expected KEY=VALUE"),
    (["--tolerance", "speed=1"], "unknown tolerance key 'speed'"),
    (["--input-shape", "x:1,3"], "rank 2 does not match"),
    (["--input-shape", "y:1,3,8,8"], "no input named 'y'"),
    (["--recipe", "missing.toml"], "recipe file not found"),
])
def test_cli_usage_errors_exit_2_with_one_line(model_path, tmp_path, args, message):
    out = tmp_path / "slim.onnx"
    result = _invoke("optimize", model_path, "-o", out, *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not out.exists()


def test_cli_refuses_to_overwrite_input_without_flag(model_path):
    before = model_path.read_bytes()
    result = _invoke("optimize", model_path, "-o", model_path)
    assert result.exit_code == 2 and "would overwrite the input" in result.output
    assert model_path.read_bytes() == before
    assert _invoke("optimize", model_path, "-o", model_path, "--overwrite").exit_code == 0
    assert len(onnx.load(model_path).graph.node) == 5


def test_cli_inspect_json_and_table(model_path):
    result = _invoke("inspect", model_path, "--json", "--input-shape", "x:4,3,8,8")
    data = json.loads(result.output)
    assert data["nodes"] == 6 and data["op_histogram"]["Conv"] == 1
    assert data["macs_per_node"]["conv"] == 4 * 8 * 8 * 8 * 3 * 9  # [4,8,8,8] outputs x 27 MACs each
    assert data["macs_per_node"]["fc"] == 4 * 10 * 8
    table = _invoke("inspect", model_path).output
    assert "MACs" in table and "assume x=[1, 3, 8, 8]" in table


def test_cli_compare_same_and_different(model_path, tmp_path):
    other = tmp_path / "other.onnx"
    proto = conv_bn_relu(seed=1)
    onnx.save(proto, other)
    same = _invoke("compare", model_path, model_path, "--json")
    assert same.exit_code == 0 and json.loads(same.output)["outputs"][0]["ok"]
    diff = _invoke("compare", model_path, other)
    assert diff.exit_code == 3 and "FAIL" in diff.output


def test_cli_bench_prints_side_by_side(model_path, tmp_path):
    out = tmp_path / "slim.onnx"
    _invoke("optimize", model_path, "-o", out, "-q")
    result = _invoke("bench", model_path, out, "--runs", "3", "--rounds", "1", "--warmup", "1")
    assert result.exit_code == 0, result.output
    assert str(out) in result.output and "1.000x" in result.output and "interleaved" in result.output


def test_cli_passes_lists_options(tmp_path):
    result = _invoke("passes")
    assert "cleanup: " in result.output and "max_bytes (int, default 4194304)" in result.output
    data = json.loads(_invoke("passes", "--json").output)
    names = {p["name"] for p in data}
    assert {"cleanup", "fold-constants", "fold-batchnorm", "cse", "quantize-dynamic", "fp16"} <= names


def test_cli_help_explains_every_option():
    for command in ("optimize", "inspect", "compare", "bench", "passes"):
        text = _invoke(command, "--help").output
        for line in text.splitlines():
            if line.strip().startswith("--") and "--help" not in line:
                assert len(line.strip().split("  ", 1)) == 2 or line.rstrip().endswith(("...", "]")), line


def test_python_api_mirrors_cli(model_path, tmp_path):
    proto, report = onnxslim_kit.optimize(str(model_path), output=tmp_path / "api.onnx",
                                          input_shapes=["x:2,3,8,8"])
    assert report.written and report.parity.ok and len(proto.graph.node) == 5
    assert report.before.macs == 2 * (8 * 8 * 8 * 27 + 10 * 8)
    stats = onnxslim_kit.inspect(tmp_path / "api.onnx")
    assert stats.nodes == 5
    parity = onnxslim_kit.compare(model_path, tmp_path / "api.onnx")
    assert parity.ok and parity.outputs[0].max_abs < 1e-5


def test_python_api_parity_error_carries_report(model_path, tmp_path):
    with pytest.raises(ParityError) as info:
        onnxslim_kit.optimize(model_path, passes=["test-break-conv"], output=tmp_path / "x.onnx", locate=True)
    assert not (tmp_path / "x.onnx").exists()
    report = info.value.report
    assert not report.parity.ok and report.locate.node_name == "conv"


def test_python_api_rejects_passes_and_recipe_together(model_path):
    with pytest.raises(InputError, match="not both"):
        onnxslim_kit.optimize(model_path, passes=["cleanup"], recipe="r.toml")


def test_python_module_entry_point(model_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "onnxslim_kit", "inspect", str(model_path), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and json.loads(result.stdout)["nodes"] == 6


def test_cli_output_is_deterministic(tmp_path):
    """Same input, options and seed: byte-identical output (quantization included)."""
    src = Path(__file__).resolve().parent.parent / "models" / "bert_tiny.onnx"
    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}.onnx"
        result = _invoke("optimize", src, "-o", out, "-p", "cleanup", "-p", "quantize-dynamic", "-q",
                         "--tolerance", "cosine=0.99")
        assert result.exit_code == 0, result.output
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_cli_pass_incompatible_with_model_is_a_usage_error(model_path, tmp_path):
    out = tmp_path / "q.onnx"
    result = _invoke("optimize", model_path, "-o", out, "-p", "quantize-weights:bits=2,min_elements=1")
    assert result.exit_code == 2 and not out.exists()
    assert result.output.strip() == ("error: quantize-weights: bits=2 needs opset >= 25 (INT2 "
                                     "DequantizeLinear); the model has 17")


def test_cli_compare_lossy_tolerance_replaces_the_exact_bound(model_path, tmp_path):
    """`compare A B --tolerance cosine=X` judges by cosine alone: the exact atol/rtol default no longer
    fails a model that is close but not equal (give atol too to keep both)."""
    proto = onnx.load(model_path)
    for t in proto.graph.initializer:
        if t.name == "conv.w":
            w = onnx.numpy_helper.to_array(t)
            t.CopyFrom(onnx.numpy_helper.from_array(w * 1.01, t.name))  # 1% off: not exact, cosine ~1
    near = tmp_path / "near.onnx"
    onnx.save(proto, near)
    assert _invoke("compare", model_path, near).exit_code == 3
    assert _invoke("compare", model_path, near, "--tolerance", "cosine=0.99").exit_code == 0
    assert _invoke("compare", model_path, near, "--tolerance", "cosine=0.99", "--tolerance", "atol=1e-6").exit_code == 3
