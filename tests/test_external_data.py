"""Models with external data go through memory maps, path-built sessions and a streamed save.

The big-model path (weights memory-mapped from the input's data file, reference session built from
the input path and released before the candidate's, candidate saved once into the atomic-save folder
and checked from there) must give the same bytes and the same parity as the in-memory path. The
in-memory path is forced through its own above-2-GB branches by lowering ``runtime.PROTO_LIMIT``.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import weakref

import numpy as np
import onnx
import pytest

import onnxslim_kit
from onnxslim_kit import parity as parity_mod
from onnxslim_kit import runtime
from onnxslim_kit.errors import ParityError
from onnxslim_kit.ir import Model, load_proto
from onnxslim_kit.metrics import disk_bytes

from builders import mlp_blocks, run_model, rng, save_external

SHAPES = ["x:1,8,128"]


def _digest(folder) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))}


@pytest.fixture()
def external_model(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    proto = mlp_blocks()
    save_external(proto, src / "m.onnx")
    assert (src / "m.onnx.data").stat().st_size >= 2 * 2**20  # a few MB of external weights
    return proto, src / "m.onnx"


def test_ir_external_weights_are_read_only_memory_maps_when_loaded_from_file(external_model):
    _, path = external_model
    model = Model.load(path)
    up = model.tensors()["l0.up"]
    values = up.values
    base = values
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.base if isinstance(base, np.ndarray) else base.obj
    assert isinstance(base, mmap.mmap)  # a view of the data file, not a copy
    assert not values.flags.writeable  # a pass writing a weight in place fails loudly
    with pytest.raises(ValueError):
        values[0, 0] = 1.0
    small = model.tensors()["l0.g"]  # 512 B: read, not mapped
    assert small.values.flags.owndata or not isinstance(small.values.base, mmap.mmap)
    np.testing.assert_array_equal(values, onnx.numpy_helper.to_array(
        load_proto(path).graph.initializer[0]))


@pytest.mark.parametrize("passes", [["cleanup"], ["cleanup", "quantize-weights:bits=4"]])
def test_optimize_external_data_path_matches_in_memory_path_bytes_and_parity(external_model, tmp_path,
                                                                             monkeypatch, passes):
    proto, path = external_model
    before = _digest(path.parent)
    monkeypatch.setattr(runtime, "PROTO_LIMIT", 2**16)  # the in-memory path takes its >2 GB branches
    live = []
    real_make_session = parity_mod.make_session

    def one_session_at_a_time(model, **kwargs):
        assert all(ref() is None for ref in live), "a previous session is still alive"
        sess = real_make_session(model, **kwargs)
        live.append(weakref.ref(sess))
        return sess

    monkeypatch.setattr(parity_mod, "make_session", one_session_at_a_time)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    out_a, out_b = tmp_path / "a" / "out.onnx", tmp_path / "b" / "out.onnx"
    header, rep_a = onnxslim_kit.optimize(path, passes=passes, input_shapes=SHAPES, output=out_a)
    sessions_streamed = len(live)
    monkeypatch.setattr(parity_mod, "make_session", real_make_session)
    _, rep_b = onnxslim_kit.optimize(load_proto(path), passes=passes, input_shapes=SHAPES, output=out_b)

    assert sessions_streamed == 2  # reference (from the input path), then the candidate
    assert _digest(path.parent) == before  # input model and data untouched
    assert sorted(os.listdir(tmp_path / "a")) == ["out.onnx", "out.onnx.data"]  # no temp folder left
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")  # same bytes as the in-memory path
    assert rep_a.parity.to_dict() == rep_b.parity.to_dict() and rep_a.parity.ok
    assert rep_a.after.bytes == disk_bytes(out_a) and rep_a.written
    locations = {e.value for t in header.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"out.onnx.data"}  # the returned proto references the written data

    onnx.checker.check_model(str(out_a), full_check=True)
    feed = {"x": rng(1).standard_normal((1, 8, 128)).astype(np.float32)}
    ref = run_model(proto, feed)[0]
    got = run_model(load_proto(out_a), feed)[0]
    if passes == ["cleanup"]:
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    else:
        cosine = float(np.dot(ref.ravel(), got.ravel()) / (np.linalg.norm(ref) * np.linalg.norm(got)))
        assert cosine > 0.98


def test_optimize_external_data_parity_failure_writes_nothing(external_model, tmp_path):
    _, path = external_model
    before = _digest(path.parent)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ParityError):
        onnxslim_kit.optimize(path, passes=["quantize-weights:bits=4"], input_shapes=SHAPES,
                              tolerance={"cosine": 0.999999}, output=out_dir / "q.onnx")
    assert os.listdir(out_dir) == []  # neither the model, its data, nor the atomic-save folder
    assert _digest(path.parent) == before


def test_ir_external_data_length_not_matching_shape_is_refused(external_model, tmp_path):
    _, path = external_model
    header = onnx.load_model(str(path), load_external_data=False)
    tensor = next(t for t in header.graph.initializer if t.name == "l0.up")
    for entry in tensor.external_data:
        if entry.key == "length":
            entry.value = str(int(entry.value) - 4)  # one float short of its [128, 512] shape
    with open(path, "wb") as fh:
        fh.write(header.SerializeToString())
    with pytest.raises(onnxslim_kit.errors.InputError, match="'l0.up' has 262140 bytes"):
        Model.load(path)
    with pytest.raises(onnxslim_kit.errors.InputError, match="l0.up"):  # CLI: exit 2, one line
        onnxslim_kit.optimize(path, input_shapes=SHAPES, output=tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
