"""The default pipeline on the real exported models shipped in models/ (no torch needed)."""

import re
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxslim_kit
from onnxslim_kit.calibration import input_specs, load_calibration
from onnxslim_kit.ir import load_proto
from onnxslim_kit.runtime import make_session

MODELS = Path(__file__).resolve().parent.parent / "models"
ALL = sorted(p.stem for p in MODELS.glob("*.onnx"))


def _calib(name: str) -> Path:
    own = MODELS / f"{name}.calib.npz"  # exporter/opset variants share their base model's samples
    return own if own.exists() else MODELS / (re.sub(r"_(opset\d+|dynamo)$", "", name) + ".calib.npz")


def _outputs(proto, feeds):
    sess = make_session(proto, optimize=False)
    return [sess.run(None, f) for f in feeds]


def test_real_models_are_present():
    assert {"digits_cnn", "resnet_tiny", "mobilenetv2_tiny", "mobilenetv3_tiny", "bert_tiny", "det_head_tiny",
            "paddle_style_opset11", "sklearn_mlp", "mobilenetv2_tiny_dynamo"} <= set(ALL)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_real_model_cleanup_keeps_outputs(name, tmp_path):
    src = MODELS / f"{name}.onnx"
    out = tmp_path / f"{name}.slim.onnx"
    proto, report = onnxslim_kit.optimize(src, calibration=_calib(name), output=out)
    assert report.parity.ok and report.written
    onnx.checker.check_model(str(out), full_check=True)
    assert len(proto.graph.node) <= report.before.nodes
    original = load_proto(src)
    assert [(p.key, p.value) for p in proto.metadata_props] == [(p.key, p.value) for p in original.metadata_props]
    assert [i.name for i in proto.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in proto.graph.output] == [o.name for o in original.graph.output]
    # Independent check (not the tool's own gate): onnxruntime, optimizations off, shipped data.
    feeds = list(load_calibration(_calib(name), input_specs(original), max_samples=8))
    for ref, got in zip(_outputs(original, feeds), _outputs(load_proto(out), feeds)):
        for a, b in zip(ref, got):
            assert a.shape == b.shape and a.dtype == b.dtype
            np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_real_model_dynamo_export_keeps_external_data_layout(tmp_path):
    src = MODELS / "mobilenetv2_tiny_dynamo.onnx"
    assert (MODELS / "mobilenetv2_tiny_dynamo.onnx.data").exists()  # the exporter's default layout
    _, report = onnxslim_kit.optimize(src, calibration=_calib("mobilenetv2_tiny_dynamo"),
                                      output=tmp_path / "m.onnx")
    assert report.parity.ok
    assert load_proto(tmp_path / "m.onnx").graph.initializer  # weights loaded and written back inline


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_cnn", "sklearn_mlp"])
def test_real_model_accuracy_unchanged_after_cleanup(name, tmp_path):
    data = np.load(MODELS / f"{name}.eval.npz")
    labels = data["labels"]
    inputs = {k: data[k] for k in data.files if k != "labels"}
    original = load_proto(MODELS / f"{name}.onnx")
    slim, _ = onnxslim_kit.optimize(original, calibration=_calib(name))

    def accuracy(proto):
        out = make_session(proto).run(None, inputs)
        pred = out[0] if out[0].ndim == 1 else out[0].argmax(1)
        return float((pred == labels).mean())

    before, after = accuracy(original), accuracy(slim)
    assert before > 0.95 and after == before


@pytest.mark.slow
def test_real_model_paddle_style_constant_weights_get_folded():
    proto, report = onnxslim_kit.optimize(MODELS / "paddle_style_opset11.onnx",
                                          calibration=_calib("paddle_style_opset11"))
    assert report.before.op_histogram.get("Constant", 0) > 20
    assert "Constant" not in report.after.op_histogram  # FIELD-NOTES 1: Constant-node weights handled
    assert report.after.opset == 11
