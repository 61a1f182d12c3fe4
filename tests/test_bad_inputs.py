"""Every bad input gets one line naming the file and the problem, exit code 2, no traceback, and the
user's files are untouched."""

import hashlib

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from builders import conv_bn_relu, with_external_location
from onnxslim_kit.cli import main


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _expect_one_line_error(args, folder, *needles):
    before = _digest(folder)
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert _digest(folder) == before  # nothing the user had is changed, nothing new is written
    return lines[0]


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(conv_bn_relu(), path)
    return path


def test_bad_input_missing_file(tmp_path):
    _expect_one_line_error(["optimize", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx"], tmp_path,
                           "nope.onnx", "file not found")


def test_bad_input_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is a text file, not a model\n" * 20)
    _expect_one_line_error(["optimize", path, "-o", tmp_path / "o.onnx"], tmp_path, "notes.onnx",
                           "not a valid ONNX model")


def test_bad_input_truncated_protobuf(tmp_path, good):
    data = good.read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    _expect_one_line_error(["optimize", path, "-o", tmp_path / "o.onnx"], tmp_path, "cut.onnx",
                           "not a valid ONNX model")


def test_bad_input_unsupported_opset(tmp_path):
    proto = conv_bn_relu()
    proto.opset_import[0].version = 99
    path = tmp_path / "future.onnx"
    path.write_bytes(proto.SerializeToString())
    _expect_one_line_error(["optimize", path, "-o", tmp_path / "o.onnx"], tmp_path, "future.onnx",
                           "unsupported opset 99")


@pytest.mark.parametrize("location, message", [("../secret.bin", "points outside the model's folder"),
                                               ("/etc/hostname", "absolute path")])
def test_bad_input_external_data_outside_folder(tmp_path, location, message):
    folder = tmp_path / "m"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 1024)
    proto = with_external_location(conv_bn_relu(), location)
    path = folder / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    _expect_one_line_error(["optimize", path, "-o", folder / "o.onnx"], tmp_path, "model.onnx", message)


@pytest.mark.parametrize("arrays, message", [
    ({"image": np.zeros((4, 3, 8, 8), np.float32)}, "image"),            # wrong input name
    ({"x": np.zeros((4, 3, 9, 9), np.float32)}, "x"),                    # wrong static dims
    ({"x": np.zeros((4, 3, 8, 8), np.int64)}, "x"),                      # integer data for a float input
])
def test_bad_input_calibration_does_not_match(tmp_path, good, arrays, message):
    calib = tmp_path / "calib.npz"
    np.savez(calib, **arrays)
    line = _expect_one_line_error(["optimize", good, "-o", tmp_path / "o.onnx", "--calib", calib], tmp_path,
                                  "calib.npz", message)
    assert len(line) < 400


def test_bad_input_pickled_npy_is_refused(tmp_path, good):
    path = tmp_path / "evil.npy"
    np.save(path, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    _expect_one_line_error(["optimize", good, "-o", tmp_path / "o.onnx", "--calib", path], tmp_path,
                           "evil.npy", "pickle")


def test_bad_input_missing_calibration(tmp_path, good):
    _expect_one_line_error(["optimize", good, "-o", tmp_path / "o.onnx", "--calib", tmp_path / "nope.npz"],
                           tmp_path, "nope.npz")


def test_bad_input_output_folder_missing(tmp_path, good):
    _expect_one_line_error(["optimize", good, "-o", tmp_path / "no" / "such" / "o.onnx"], tmp_path,
                           "does not exist")


def test_bad_input_directory_as_model(tmp_path):
    _expect_one_line_error(["inspect", tmp_path], tmp_path, "is a directory")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_bad_input_calibration_with_nan_or_inf_names_the_input(tmp_path, good, bad):
    x = np.zeros((4, 3, 8, 8), np.float32)
    x[2, 1, 3, 3] = bad
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=x)
    _expect_one_line_error(["optimize", good, "-o", tmp_path / "o.onnx", "--calib", calib, "-p", "quantize-int8"],
                           tmp_path, "calib.npz", "'x'", "1 NaN/Inf value(s)")


@pytest.mark.parametrize("spec", ["quantize-int8", "quantize-dynamic:min_elements=1", "quantize-weights:min_elements=1",
                                  "fp16"])
def test_bad_input_already_quantized_model_is_refused(tmp_path, spec):
    import onnxslim_kit

    quantized, _ = onnxslim_kit.optimize(conv_bn_relu(), passes=["cleanup", "quantize-int8"])
    path = tmp_path / "int8.onnx"
    onnx.save(quantized, path)
    _expect_one_line_error(["optimize", path, "-o", tmp_path / "o.onnx", "-p", spec], tmp_path,
                           spec.partition(":")[0], "already quantized", "QuantizeLinear")
