"""Calibration data: sources, random data for token/mask inputs, batching, every error path, laziness."""

from __future__ import annotations

import itertools
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from builders import FLOAT, conv_bn_relu, init, make_model, run_model
from onnxslim_kit.calibration import (CalibrationData, InputSpec, input_specs, load_calibration,
                                      random_calibration)
from onnxslim_kit.errors import InputError

VOCAB = 50


def token_model(*, vocab: int = VOCAB, dim: int = 4, ids_type=TensorProto.INT64) -> onnx.ModelProto:
    """input_ids [batch, seq] -> Gather(embedding) * Unsqueeze(Cast(attention_mask)) -> [batch, seq, dim]."""
    emb = np.random.default_rng(0).standard_normal((vocab, dim)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["tok"], name="embed"),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axes"], ["mask_3d"], name="unsq"),
        helper.make_node("Mul", ["tok", "mask_3d"], ["hidden"], name="mul"),
    ]
    return make_model(nodes,
                      [("input_ids", ids_type, ["batch", "seq"]),
                       ("attention_mask", TensorProto.INT64, ["batch", "seq"])],
                      [("hidden", FLOAT, ["batch", "seq", dim])],
                      [init("emb", emb), init("axes", np.array([2], dtype=np.int64))])


def pool_model(dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    """x [N, 3, H, W] (all spatial dims dynamic) -> GlobalAveragePool -> [N, 3, 1, 1]."""
    return make_model([helper.make_node("GlobalAveragePool", ["x"], ["y"], name="gap")],
                      [("x", dtype, ["N", 3, "H", "W"])], [("y", dtype, ["N", 3, 1, 1])])


def static_model(batch: int = 4) -> onnx.ModelProto:
    return conv_bn_relu(batch=batch)


# -- input specs --------------------------------------------------------------------------------

def test_input_specs_excludes_legacy_initializer_inputs():
    model = conv_bn_relu()
    legacy = onnx.ModelProto()
    legacy.CopyFrom(model)
    for t in model.graph.initializer:
        legacy.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    specs = input_specs(legacy)
    assert [s.name for s in specs] == ["x"]
    assert specs[0].dtype == np.float32 and specs[0].shape == ("N", 3, 8, 8)


def test_input_specs_pinned_shape_replaces_symbolic_dims():
    specs = input_specs(token_model(), {"input_ids": [2, 7], "attention_mask": [2, 7]})
    assert [(s.name, s.shape) for s in specs] == [("input_ids", (2, 7)), ("attention_mask", (2, 7))]
    assert specs[0].int_high == VOCAB and specs[1].int_high is None


@pytest.mark.parametrize("shapes, message", [
    ({"ids": [1, 4]}, "no input named 'ids'"),
    ({"x": [1, 3, 8]}, "rank 3 does not match"),
    ({"x": [1, 3, 9, 8]}, "conflicts with the model's static dim 8"),
])
def test_input_specs_bad_pinned_shape_is_input_error(shapes, message):
    with pytest.raises(InputError, match=message):
        input_specs(conv_bn_relu(), shapes)


# -- random data ---------------------------------------------------------------------------------

def test_random_float_inputs_are_seeded_normal_and_reiterable():
    specs = input_specs(conv_bn_relu())
    data = random_calibration(specs, num_samples=6, seed=3)
    assert data.is_random and data.source == "random(seed=3, samples=6)"
    assert len(data) == 6 and data.num_samples == 6
    first = [f["x"] for f in data]
    second = [f["x"] for f in data]
    assert all(a.shape == (1, 3, 8, 8) and a.dtype == np.float32 for a in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    other = next(iter(random_calibration(specs, num_samples=6, seed=4)))["x"]
    assert not np.array_equal(first[0], other)
    values = np.concatenate([a.ravel() for a in first])
    assert abs(values.mean()) < 0.15 and 0.85 < values.std() < 1.15
    for feed in data:
        (out,) = run_model(conv_bn_relu(), feed)
        assert out.shape == (1, 10) and np.isfinite(out).all()


def test_random_token_ids_stay_below_vocab_and_masks_are_ones():
    model = token_model()
    data = load_calibration(None, input_specs(model), num_samples=4)
    feeds = list(data)
    assert len(feeds) == 4
    for feed in feeds:
        ids, mask = feed["input_ids"], feed["attention_mask"]
        assert ids.dtype == np.int64 and ids.shape == (1, 16)          # batch 1, symbolic seq 16
        assert ids.min() >= 0 and ids.max() < VOCAB
        assert mask.dtype == np.int64 and np.all(mask == 1)
        (hidden,) = run_model(model, feed)
        assert hidden.shape == (1, 16, 4) and np.isfinite(hidden).all()
    all_ids = np.concatenate([f["input_ids"].ravel() for f in feeds])
    assert len(np.unique(all_ids)) > 10                                # not a constant


def test_random_token_ids_capped_at_100_for_big_vocab_and_pinned_shape_used():
    model = token_model(vocab=5000)
    specs = input_specs(model, {"input_ids": [2, 5], "attention_mask": [2, 5]})
    data = random_calibration(specs, num_samples=10)
    assert len(data) == 5 and data.num_samples == 10                   # 2 rows per feed
    ids = np.concatenate([f["input_ids"].ravel() for f in data])
    assert ids.min() >= 0 and ids.max() < 100 and ids.max() > 50
    assert all(f["input_ids"].shape == (2, 5) for f in data)


def test_random_declared_dtypes_bool_and_unknown_dims():
    specs = [InputSpec("a", np.dtype(np.float16), ("b", 3)), InputSpec("b", np.dtype(np.float64), (None, 2)),
             InputSpec("flag", np.dtype(np.bool_), ()), InputSpec("n", np.dtype(np.int32), ("b", None, "t"))]
    feed = next(iter(random_calibration(specs, num_samples=1)))
    assert feed["a"].dtype == np.float16 and feed["a"].shape == (1, 3)
    assert feed["b"].dtype == np.float64 and feed["b"].shape == (1, 2)
    assert feed["flag"].dtype == np.bool_ and feed["flag"].shape == () and bool(feed["flag"])
    assert feed["n"].dtype == np.int32 and feed["n"].shape == (1, 1, 16)


def test_random_static_batch_rounds_samples_up_to_whole_feeds():
    data = random_calibration(input_specs(static_model(batch=4)), num_samples=6)
    assert len(data) == 2 and data.num_samples == 8
    assert all(f["x"].shape == (4, 3, 8, 8) for f in data)


def test_random_string_input_is_input_error():
    with pytest.raises(InputError, match="random data is not possible"):
        random_calibration([InputSpec("text", np.dtype(np.str_), (1,))])


# -- npz / npy files -------------------------------------------------------------------------------

def test_npz_is_sliced_by_static_batch(tmp_path):
    x = np.arange(10 * 3 * 8 * 8, dtype=np.float32).reshape(10, 3, 8, 8)
    np.savez(tmp_path / "calib.npz", x=x)
    model = static_model(batch=4)
    data = load_calibration(tmp_path / "calib.npz", input_specs(model))
    feeds = list(data)
    assert len(data) == 2 and len(feeds) == 2 and data.num_samples == 8   # the last 2 rows do not fit
    np.testing.assert_array_equal(feeds[0]["x"], x[0:4])
    np.testing.assert_array_equal(feeds[1]["x"], x[4:8])
    assert not data.is_random and data.source == str(tmp_path / "calib.npz")
    assert run_model(model, feeds[1])[0].shape == (4, 10)


def test_npz_dynamic_batch_uses_batch_size_and_casts_float64(tmp_path):
    x = np.random.default_rng(0).standard_normal((7, 3, 8, 8))            # float64: accepted, cast
    np.savez(tmp_path / "calib.npz", x=x)
    data = load_calibration(tmp_path / "calib.npz", input_specs(conv_bn_relu()), batch_size=3)
    feeds = list(data)
    assert [f["x"].shape[0] for f in feeds] == [3, 3, 1] and data.num_samples == 7
    assert all(f["x"].dtype == np.float32 for f in feeds)
    np.testing.assert_allclose(np.concatenate([f["x"] for f in feeds]), x.astype(np.float32))
    default = load_calibration(tmp_path / "calib.npz", input_specs(conv_bn_relu()))
    assert len(default) == 7                                              # dynamic batch default 1


def test_npz_extra_axis_stacks_whole_feeds_and_int64_ids_cast_to_int32(tmp_path):
    model = token_model(ids_type=TensorProto.INT32)
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(3, 2, 5))      # 3 feeds of [2, 5], int64
    np.savez(tmp_path / "tok.npz", input_ids=ids, attention_mask=np.ones((3, 2, 5), np.int64))
    data = load_calibration(tmp_path / "tok.npz", input_specs(model))
    feeds = list(data)
    assert len(feeds) == 3 and data.num_samples == 6
    assert feeds[2]["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(feeds[2]["input_ids"], ids[2])
    assert run_model(model, feeds[0])[0].shape == (2, 5, 4)


def test_npy_file_for_single_input_model(tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    feeds = list(load_calibration(tmp_path / "x.npy", input_specs(conv_bn_relu())))
    assert len(feeds) == 2
    np.testing.assert_array_equal(feeds[1]["x"], x[1:2])


def test_dict_source_and_feed_iterable_source():
    specs = input_specs(conv_bn_relu())
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    data = load_calibration({"x": x}, specs, batch_size=2)
    assert [f["x"].shape for f in data] == [(2, 3, 8, 8), (2, 3, 8, 8)]
    gen = ({"x": x[i:i + 1]} for i in range(4))                            # one-shot: materialized
    data = load_calibration(gen, specs)
    assert len(data) == 4 and len(list(data)) == 4 and len(list(data)) == 4
    assert load_calibration(data, specs) is data
    capped = load_calibration([{"x": x[i:i + 1]} for i in range(4)], specs, max_samples=2)
    assert len(capped) == 2 and len(list(capped)) == 2


# -- error paths ----------------------------------------------------------------------------------

def test_missing_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="nothere.npz: calibration data not found"):
        load_calibration(tmp_path / "nothere.npz", input_specs(conv_bn_relu()))


def test_mismatched_names_say_which_are_missing_and_unexpected(tmp_path):
    np.savez(tmp_path / "c.npz", input_ids=np.zeros((2, 5), np.int64), token_type_ids=np.zeros((2, 5), np.int64))
    with pytest.raises(InputError, match=r"c.npz: .*missing attention_mask; unexpected token_type_ids"):
        load_calibration(tmp_path / "c.npz", input_specs(token_model()))


@pytest.mark.parametrize("array, message", [
    (np.zeros((2, 3, 8), np.float32), "rank"),
    (np.zeros((2, 3, 9, 8), np.float32), r"dim 2: 9 != 8"),
    (np.zeros((2, 3, 8, 8), np.int64), "int64, the model expects float32"),
    (np.full((2, 3, 8, 8), 1e300), "overflow float32"),
])
def test_bad_arrays_are_input_errors_naming_the_file(tmp_path, array, message):
    np.savez(tmp_path / "bad.npz", x=array)
    with pytest.raises(InputError, match=message) as info:
        list(load_calibration(tmp_path / "bad.npz", input_specs(conv_bn_relu())))
    assert "bad.npz" in str(info.value) and "\n" not in str(info.value)


def test_float_data_for_integer_input_is_error_and_int_overflow_is_error(tmp_path):
    np.savez(tmp_path / "f.npz", input_ids=np.zeros((2, 5)), attention_mask=np.ones((2, 5), np.int64))
    with pytest.raises(InputError, match="float data for a integer input"):
        load_calibration(tmp_path / "f.npz", input_specs(token_model()))
    model = token_model(ids_type=TensorProto.INT32)
    np.savez(tmp_path / "o.npz", input_ids=np.full((2, 5), 2**40), attention_mask=np.ones((2, 5), np.int64))
    with pytest.raises(InputError, match="outside int32"):
        list(load_calibration(tmp_path / "o.npz", input_specs(model)))


def test_pickled_npy_is_refused(tmp_path):
    obj = np.empty((1, 3, 8, 8), dtype=object)
    obj[...] = 1.0
    np.save(tmp_path / "obj.npy", obj, allow_pickle=True)
    with pytest.raises(InputError, match="obj.npy: .*pickled data refused"):
        load_calibration(tmp_path / "obj.npy", input_specs(conv_bn_relu()))


def test_pickled_npz_and_pickled_file_in_folder_are_refused(tmp_path):
    obj = np.empty((1, 3, 8, 8), dtype=object)
    obj[...] = 1.0
    np.savez(tmp_path / "obj.npz", x=obj)
    with pytest.raises(InputError, match="pickled data refused"):
        load_calibration(tmp_path / "obj.npz", input_specs(conv_bn_relu()))
    folder = tmp_path / "folder"
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros((1, 3, 8, 8), np.float32))
    np.save(folder / "b.npy", obj, allow_pickle=True)
    data = load_calibration(folder, input_specs(conv_bn_relu()))           # first file is fine
    with pytest.raises(InputError, match="b.npy: holds Python objects: pickled data refused"):
        list(data)


def test_empty_folder_and_unsupported_file_are_input_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="empty folder"):
        load_calibration(tmp_path, input_specs(conv_bn_relu()))
    with pytest.raises(InputError, match="unsupported calibration file"):
        load_calibration(tmp_path / "notes.txt", input_specs(conv_bn_relu()))


def test_npy_for_multi_input_model_is_input_error(tmp_path):
    np.save(tmp_path / "ids.npy", np.zeros((1, 5), np.int64))
    with pytest.raises(InputError, match="single-input models only"):
        load_calibration(tmp_path / "ids.npy", input_specs(token_model()))


def test_corrupt_npz_is_input_error(tmp_path):
    (tmp_path / "broken.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(InputError, match="broken.npz: not a readable numpy file"):
        load_calibration(tmp_path / "broken.npz", input_specs(conv_bn_relu()))


# -- folders ----------------------------------------------------------------------------------------

def test_folder_of_per_sample_npz_with_varying_sizes(tmp_path):
    model = pool_model()
    r = np.random.default_rng(0)
    sizes = [(5, 7), (9, 4), (6, 6)]
    for i, (h, w) in enumerate(sizes):
        np.savez(tmp_path / f"s{i}.npz", x=r.standard_normal((3, h, w)).astype(np.float32))  # no batch axis
    data = load_calibration(tmp_path, input_specs(model))
    assert len(data) == 3 and data.num_samples == 3
    for (h, w), feed in zip(sizes, data):
        assert feed["x"].shape == (1, 3, h, w)
        (y,) = run_model(model, feed)
        np.testing.assert_allclose(y.reshape(3), feed["x"][0].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


def test_folder_file_with_wrong_names_is_reported_when_read(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((1, 3, 4, 4), np.float32))
    np.savez(tmp_path / "b.npz", y=np.zeros((1, 3, 4, 4), np.float32))
    data = load_calibration(tmp_path, input_specs(pool_model()))
    with pytest.raises(InputError, match=r"b.npz: input names do not match the model \(missing x; unexpected y"):
        list(data)


def test_large_folder_is_read_lazily(tmp_path, monkeypatch):
    for i in range(1000):
        np.save(tmp_path / f"{i:04d}.npy", np.full((1, 3, 2, 2), i, np.float32))
    opened = []
    real_load = np.load

    def counting_load(file, *args, **kwargs):
        opened.append(str(file))
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(np, "load", counting_load)
    data = load_calibration(tmp_path, input_specs(pool_model()))
    assert len(data) == 1000 and len(opened) == 0                          # headers only, no loads
    feeds = list(itertools.islice(iter(data), 3))
    assert len(opened) == 3
    assert [float(f["x"][0, 0, 0, 0]) for f in feeds] == [0.0, 1.0, 2.0]


# -- images ------------------------------------------------------------------------------------------

def _save_image(path, size, color):
    from PIL import Image

    Image.new("RGB", size, color).save(path)


def test_image_folder_resize_crop_normalize_nchw(tmp_path):
    pytest.importorskip("PIL")
    _save_image(tmp_path / "a.png", (20, 10), (255, 0, 51))                 # width 20, height 10
    _save_image(tmp_path / "b.jpg", (12, 16), (0, 128, 255))
    model = conv_bn_relu()
    pre = {"resize": 10, "center_crop": 8, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.5, 1.0]}
    data = load_calibration(tmp_path, input_specs(model), preprocess=pre)
    feeds = list(data)
    assert len(data) == 2 and not data.is_random
    x = feeds[0]["x"]
    assert x.shape == (1, 3, 8, 8) and x.dtype == np.float32
    expected = (np.array([255, 0, 51]) / 255 - 0.5) / np.array([0.25, 0.5, 1.0])
    np.testing.assert_allclose(x[0, :, 4, 4], expected, atol=1e-6)
    assert feeds[1]["x"].shape == (1, 3, 8, 8)
    for feed in feeds:
        assert run_model(model, feed)[0].shape == (1, 10)


def test_image_folder_nhwc_uint8_default_resize_to_static_size(tmp_path):
    pytest.importorskip("PIL")
    _save_image(tmp_path / "a.png", (30, 17), (10, 20, 30))
    model = make_model([helper.make_node("Cast", ["img"], ["y"], to=TensorProto.FLOAT, name="cast")],
                       [("img", TensorProto.UINT8, [1, 6, 5, 3])], [("y", FLOAT, [1, 6, 5, 3])])
    feed = next(iter(load_calibration(tmp_path, input_specs(model))))
    assert feed["img"].dtype == np.uint8 and feed["img"].shape == (1, 6, 5, 3)
    np.testing.assert_array_equal(feed["img"][0, 3, 2], [10, 20, 30])
    assert run_model(model, feed)[0].shape == (1, 6, 5, 3)


def test_unreadable_image_and_bad_preprocess_are_input_errors(tmp_path):
    pytest.importorskip("PIL")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match="broken.png: unreadable image"):
        load_calibration(tmp_path, input_specs(conv_bn_relu()))
    (tmp_path / "broken.png").unlink()
    _save_image(tmp_path / "ok.png", (8, 8), (1, 2, 3))
    with pytest.raises(InputError, match="unknown key"):
        load_calibration(tmp_path, input_specs(conv_bn_relu()), preprocess={"normalise": True})
    with pytest.raises(InputError, match="single-input models only"):
        load_calibration(tmp_path, input_specs(token_model()))


def test_image_folder_without_pillow_is_input_error(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(InputError, match="needs Pillow"):
        load_calibration(tmp_path, input_specs(conv_bn_relu()))


def test_calibration_data_len_and_samples_of_custom_source():
    data = CalibrationData(lambda: iter([{"x": np.zeros(1)}]), length=1, num_samples=1, source="s", is_random=False)
    assert len(data) == 1 and data.num_samples == 1 and list(data)[0]["x"].shape == (1,)


def test_input_without_declared_shape(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)          # no shape at all
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [x],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    specs = input_specs(model)
    assert specs[0].shape == () and not specs[0].rank_known
    with pytest.raises(InputError, match="declares no shape.*--input-shape x:D1,D2"):
        random_calibration(specs)
    pinned = input_specs(model, {"x": [2, 3]})
    assert pinned[0].rank_known and next(iter(random_calibration(pinned)))["x"].shape == (2, 3)
    np.savez(tmp_path / "c.npz", x=np.arange(12, dtype=np.float32).reshape(4, 3))
    feeds = list(load_calibration(tmp_path / "c.npz", specs, batch_size=2))
    assert [f["x"].shape for f in feeds] == [(2, 3), (2, 3)]
    np.testing.assert_array_equal(run_model(model, feeds[1])[0], np.arange(6, 12, dtype=np.float32).reshape(2, 3))
