import pytest
from onnx import helper

from builders import FLOAT, conv_bn_relu, init, make_model
from onnxslim_kit.errors import InputError
from onnxslim_kit.shapes import infer_shapes, input_dims, parse_input_shape, pin_input_shapes

import numpy as np


def _shape(model, name):
    for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        if vi.name == name:
            return input_dims(vi)
    raise KeyError(name)


def test_shapes_infer_keeps_symbolic_batch_and_weights():
    model = conv_bn_relu(channels=64)  # big enough for the weight to be stripped during inference
    out = infer_shapes(model)
    assert _shape(out, "conv_out") == ["N", 64, 8, 8]
    assert [t.name for t in out.graph.initializer] == [t.name for t in model.graph.initializer]
    assert out.graph.initializer[0].raw_data == model.graph.initializer[0].raw_data
    assert len(out.graph.input) == 1  # stripped weights do not leak in as inputs


def test_shapes_pin_input_shapes_resolves_dynamic_dims():
    pinned = pin_input_shapes(conv_bn_relu(), {"x": [4, 3, 8, 8]})
    assert _shape(infer_shapes(pinned), "conv_out") == [4, 8, 8, 8]


@pytest.mark.parametrize("shapes, message", [
    ({"y": [1, 3, 8, 8]}, "no input named 'y'"),
    ({"x": [1, 3, 8]}, "rank 3 does not match"),
    ({"x": [1, 4, 8, 8]}, "conflicts with the model's static dim 3"),
])
def test_shapes_pin_input_shapes_errors(shapes, message):
    with pytest.raises(InputError, match=message):
        pin_input_shapes(conv_bn_relu(), shapes)


def test_shapes_parse_input_shape():
    assert parse_input_shape("input_ids:1,128") == ("input_ids", [1, 128])
    assert parse_input_shape("ns:x:1") == ("ns:x", [1])
    for bad in ("x", "x:", "x:1,a", "x:0,3"):
        with pytest.raises(InputError):
            parse_input_shape(bad)


def test_shapes_infer_failure_raises_only_in_strict_mode():
    # Broadcasting [2, 3] with [4] is impossible: inference raises in strict mode.
    nodes = [helper.make_node("Add", ["x", "b"], ["y"])]
    model = make_model(nodes, [("x", FLOAT, [2, 3])], [("y", FLOAT, None)],
                       [init("b", np.zeros(4, np.float32))])
    with pytest.raises(Exception):
        infer_shapes(model, strict=True)
    relaxed = infer_shapes(model, strict=False)  # never raises: partial (here: no) annotations
    assert relaxed.graph == model.graph or list(relaxed.graph.value_info) == []
