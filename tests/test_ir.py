import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, numpy_helper

from builders import (FLOAT, assert_parity, conv_bn_relu, init, make_model, relu_chain, run_model,
                      with_external_location)
from onnxslim_kit import runtime
from onnxslim_kit.errors import InputError, PassError
from onnxslim_kit.ir import Model, load_proto, save_proto


def test_ir_toposort_reversed_chain_5000_nodes():
    proto = relu_chain(5000, reverse=True)
    model = Model.from_proto(proto)
    with pytest.raises(RecursionError):  # the reason ir.py has its own sort
        gs.import_onnx(proto).toposort()
    model.toposort()
    assert [n.name for n in model.nodes[:3]] == ["relu_0", "relu_1", "relu_2"]
    assert model.nodes[-1].name == "relu_4999"
    out = model.to_proto()
    onnx.checker.check_model(out, full_check=True)
    x = np.linspace(-1, 1, 4, dtype=np.float32).reshape(1, 4)
    np.testing.assert_array_equal(run_model(out, {"t0": x})[0], np.maximum(x, 0))


def test_ir_toposort_is_stable_and_detects_cycles():
    model = Model.from_proto(conv_bn_relu())
    before = [n.name for n in model.nodes]
    model.toposort()
    assert [n.name for n in model.nodes] == before
    a, b = model.nodes[1], model.nodes[2]  # bn -> relu: make relu feed bn as well => cycle
    a.inputs.append(b.outputs[0])
    with pytest.raises(PassError, match="cycle"):
        model.toposort()


def test_ir_toposort_orders_subgraph_outer_scope_reads():
    # 'scale' is produced by a Mul and read only inside the If branches: the If must come after it.
    then_g = helper.make_graph([helper.make_node("Add", ["scale", "scale"], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", FLOAT, [2])])
    else_g = helper.make_graph([helper.make_node("Sub", ["scale", "scale"], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", FLOAT, [2])])
    nodes = [
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g),
        helper.make_node("Mul", ["x", "x"], ["scale"], name="mul"),
    ]
    proto = make_model(nodes, [("x", FLOAT, [2]), ("cond", onnx.TensorProto.BOOL, [])], [("y", FLOAT, [2])])
    model = Model.from_proto(proto)
    model.toposort()
    assert [n.name for n in model.nodes] == ["mul", "if"]
    out = model.to_proto()
    onnx.checker.check_model(out, full_check=True)
    res = run_model(out, {"x": np.array([1, 2], np.float32), "cond": np.array(True)})[0]
    np.testing.assert_array_equal(res, [2, 8])


def test_ir_unique_name_avoids_every_existing_name():
    model = Model.from_proto(conv_bn_relu())
    assert model.unique_name("conv_out") == "conv_out_1"
    assert model.unique_name("conv_out") == "conv_out_2"
    assert model.unique_name("fresh") == "fresh"
    assert model.unique_name("conv") == "conv_1"  # node names count too


def test_ir_constant_value_sees_constant_nodes_and_not_overridable_inputs():
    w = np.arange(4, dtype=np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=helper.make_tensor("wv", FLOAT, [4], w)),
        helper.make_node("Constant", [], ["k"], value_ints=[1, 2]),
        helper.make_node("Add", ["x", "w"], ["y0"]),
        helper.make_node("Add", ["y0", "legacy"], ["y"]),
    ]
    legacy = init("legacy", np.ones(4, np.float32))
    proto = make_model(nodes, [("x", FLOAT, [4]), ("legacy", FLOAT, [4])], [("y", FLOAT, [4])], [legacy])
    model = Model.from_proto(proto)
    t = model.tensors()
    np.testing.assert_array_equal(model.constant_value(t["w"]), w)
    np.testing.assert_array_equal(model.constant_value(t["k"]), [1, 2])
    assert model.constant_value(t["legacy"]) is None  # initializer listed as an input: overridable
    assert model.constant_value(t["x"]) is None
    out = model.to_proto()  # the legacy input stays an input (graphsurgeon alone drops it)
    assert [i.name for i in out.graph.input] == ["x", "legacy"]
    onnx.checker.check_model(out, full_check=True)
    x = np.zeros(4, np.float32)
    assert run_model(out, {"x": x, "legacy": np.full(4, 2, np.float32)})[0].tolist() == [2, 3, 4, 5]


def test_ir_replace_all_uses_keeps_graph_output_names():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Identity", ["r"], ["y"], name="id")]
    proto = make_model(nodes, [("x", FLOAT, [3])], [("y", FLOAT, [3])])
    model = Model.from_proto(proto)
    t = model.tensors()
    assert model.replace_all_uses(t["y"], t["r"])
    model.remove_nodes([model.node_by_name("id")])
    out = model.to_proto()
    assert [o.name for o in out.graph.output] == ["y"]
    assert [n.op_type for n in out.graph.node] == ["Relu"]
    assert_parity(proto, out, {"x": np.array([-1, 0, 2], np.float32)})


def test_ir_replace_all_uses_refuses_to_rename_a_graph_input():
    proto = make_model([helper.make_node("Identity", ["x"], ["y"], name="id")], [("x", FLOAT, [3])],
                       [("y", FLOAT, [3])])
    model = Model.from_proto(proto)
    t = model.tensors()
    assert model.replace_all_uses(t["y"], t["x"]) is False
    assert [o.name for o in model.graph.outputs] == ["y"]
    assert model.graph.outputs[0] is t["y"]


def test_ir_remove_nodes_and_cleanup_drop_dead_weights():
    model = Model.from_proto(conv_bn_relu())
    fc = model.node_by_name("fc")
    flat = model.tensors()["flat"]
    model.graph.outputs = [flat]
    stats = model.cleanup()
    assert stats["dead_nodes_removed"] == 1 and stats["unused_initializers_removed"] == 2
    assert fc not in model.nodes
    assert "fc.w" not in model.tensors()


def test_ir_export_keeps_metadata_and_caps_ir_version():
    proto = conv_bn_relu()
    proto.ir_version = onnx.IR_VERSION
    proto.doc_string = "doc"
    proto.producer_name, proto.producer_version = "exporter", "9.9"
    proto.model_version = 7
    proto.metadata_props.add(key="labels", value="cat,dog")
    out = Model.from_proto(proto).to_proto()
    assert out.ir_version <= runtime.max_ir_version()
    assert (out.doc_string, out.producer_name, out.producer_version, out.model_version) == \
        ("doc", "exporter", "9.9", 7)
    assert [(p.key, p.value) for p in out.metadata_props] == [("labels", "cat,dog")]
    runtime.make_session(out)  # loads


def test_ir_export_drops_stale_value_info_and_reinfers():
    proto = conv_bn_relu()
    proto.graph.value_info.append(helper.make_tensor_value_info("conv_out", FLOAT, [7, 7]))  # stale
    out = Model.from_proto(proto).to_proto()
    shapes = {vi.name: [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
              for vi in out.graph.value_info}
    assert shapes["conv_out"] == ["N", 8, 8, 8]
    onnx.checker.check_model(out, full_check=True)


def test_ir_external_data_roundtrip_and_atomic_save(tmp_path):
    proto = conv_bn_relu(channels=64)  # conv.w is 6.9 kB: above the 1 kB external-data threshold
    src = tmp_path / "m.onnx"
    onnx.save_model(onnx.ModelProto.FromString(proto.SerializeToString()), src, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    model = Model.load(src)
    assert model.meta.source == str(src)
    dst = tmp_path / "out.onnx"
    save_proto(model.to_proto(), dst, external_data=True)
    assert (tmp_path / "out.onnx.data").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # temp folder gone
    reloaded = load_proto(dst)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_model(reloaded, {"x": x})[0], run_model(proto, {"x": x})[0], atol=1e-6)


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "sub/../../outside.bin"])
def test_ir_external_data_outside_model_folder_is_refused(tmp_path, location):
    proto = with_external_location(conv_bn_relu(), location)
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "outside.bin").write_bytes(b"\0" * 4096)
    path = folder / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(InputError, match="outside the model's folder|absolute path"):
        load_proto(path)


def test_ir_external_data_symlink_escape_is_refused(tmp_path):
    proto = with_external_location(conv_bn_relu(), "w.bin")
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 4096)
    os.symlink(tmp_path / "secret.bin", folder / "w.bin")
    path = folder / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(InputError, match="outside the model's folder"):
        load_proto(path)


def test_ir_save_failure_leaves_existing_file_untouched(tmp_path, monkeypatch):
    dst = tmp_path / "out.onnx"
    dst.write_bytes(b"previous")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        save_proto(conv_bn_relu(), dst)
    assert dst.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["out.onnx"]


def test_ir_fingerprint_is_deterministic_and_sensitive_to_weights():
    a = Model.from_proto(conv_bn_relu(seed=0))
    b = Model.from_proto(conv_bn_relu(seed=0))
    c = Model.from_proto(conv_bn_relu(seed=1))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_ir_copy_does_not_alias_structure():
    model = Model.from_proto(conv_bn_relu())
    clone = model.copy()
    clone.remove_nodes([clone.node_by_name("relu")])
    assert len(model.nodes) == 6 and len(clone.nodes) == 5


def test_ir_export_keeps_local_functions_and_node_doc_strings():
    fn = helper.make_function("custom.ns", "Swish", ["X"], ["Y"],
                              [helper.make_node("Sigmoid", ["X"], ["S"]), helper.make_node("Mul", ["X", "S"], ["Y"])],
                              opset_imports=[helper.make_opsetid("", 17)])
    nodes = [helper.make_node("Swish", ["x"], ["y"], domain="custom.ns", name="sw", doc_string="swish here")]
    proto = make_model(nodes, [("x", FLOAT, [2, 3])], [("y", FLOAT, [2, 3])], functions=[fn],
                       extra_opsets=[("custom.ns", 1)])
    out = Model.from_proto(proto).to_proto()
    assert [f.name for f in out.functions] == ["Swish"]
    assert {(o.domain, o.version) for o in out.opset_import} >= {("", 17), ("custom.ns", 1)}
    assert out.graph.node[0].doc_string == "swish here"
    assert_parity(proto, out, {"x": np.linspace(-2, 2, 6, dtype=np.float32).reshape(2, 3)})


def test_ir_weight_free_export_for_shape_inference_keeps_weights_intact():
    model = Model.from_proto(conv_bn_relu(channels=64))  # conv.w 6.9 kB: stubbed
    light = model.to_proto(value_info="drop", weights=False)
    stub = next(t for t in light.graph.initializer if t.name == "conv.w")
    assert stub.data_location == onnx.TensorProto.EXTERNAL and not stub.raw_data
    infos = model.value_infos()
    dims = [d.dim_value or d.dim_param for d in infos["conv_out"].type.tensor_type.shape.dim]
    assert dims == ["N", 64, 8, 8]
    full = model.to_proto()  # the real weights are back after the stubbed export
    onnx.checker.check_model(full, full_check=True)
    assert next(t for t in full.graph.initializer if t.name == "conv.w").raw_data


def _dims(infos, name):
    return [d.dim_value or d.dim_param for d in infos[name].type.tensor_type.shape.dim]


def test_ir_value_infos_cache_follows_mutations_made_without_invalidate(monkeypatch):
    # x[2,6] -> Reshape(shape) -> Transpose(perm) -> MatMul(w) -> y: every kind of in-place change a
    # pass makes (small constant replaced under the same name, attribute edited, input rewired, big
    # weight replaced, declared input shape edited, node added) must show in the next value_infos().
    import onnxslim_kit.shapes as shapes

    w = np.ones((4, 5), np.float32)
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"),
             helper.make_node("Transpose", ["r"], ["t"], name="transpose", perm=[1, 0]),
             helper.make_node("MatMul", ["t", "w"], ["y"], name="matmul")]
    proto = make_model(nodes, [("x", FLOAT, [2, 6])], [("y", FLOAT, None)],
                       [init("shape", np.array([3, 4], np.int64)), init("w", w)])
    model = Model.from_proto(proto)
    calls = []
    real = shapes.value_infos
    monkeypatch.setattr(shapes, "value_infos", lambda p: calls.append(1) or real(p))

    def fresh():  # the uncached computation
        return real(model.to_proto(value_info="drop", weights=False))

    assert _dims(model.value_infos(), "t") == [4, 3]
    assert _dims(model.value_infos(), "t") == [4, 3] and len(calls) == 1  # unchanged graph: reused
    reshape, transpose, matmul = model.nodes
    reshape.inputs[1] = gs.Constant("shape", np.array([4, 3], np.int64))  # same name, new value
    assert _dims(model.value_infos(), "t") == [3, 4] == _dims(fresh(), "t")
    reshape.inputs[1] = gs.Constant("shape", np.array([6, 2], np.int64))  # and again (array to array)
    assert _dims(model.value_infos(), "t") == [2, 6] == _dims(fresh(), "t")
    reshape.inputs[1] = gs.Constant("shape", np.array([4, 3], np.int64))
    assert _dims(model.value_infos(), "t") == [3, 4] == _dims(fresh(), "t")
    transpose.attrs["perm"] = [0, 1]  # attribute edited in place
    assert _dims(model.value_infos(), "t") == [4, 3] == _dims(fresh(), "t")
    matmul.inputs[1] = gs.Constant("w", np.ones((3, 120), np.float32))  # big weight (> 1 kB) replaced
    assert _dims(model.value_infos(), "y") == [4, 120] == _dims(fresh(), "y")
    matmul.inputs[1] = gs.Constant("w", np.ones((3, 100), np.float32))
    assert _dims(model.value_infos(), "y") == [4, 100] == _dims(fresh(), "y")
    model.graph.inputs[0].shape = [1, 12]  # declared input shape edited
    assert _dims(model.value_infos(), "x") == [1, 12] == _dims(fresh(), "x")
    relu = gs.Variable("relu_out", dtype=np.float32)
    model.graph.nodes.insert(2, gs.Node("Relu", "relu", inputs=[transpose.outputs[0]], outputs=[relu]))
    matmul.inputs[0] = relu  # new node, consumer rewired
    infos = model.value_infos()
    assert _dims(infos, "relu_out") == [4, 3] and len(calls) == 9  # one shape inference per change
    infos["relu_out"] = None  # the caller's dict: the cache is not affected
    assert _dims(model.value_infos(), "relu_out") == [4, 3] and len(calls) == 9
    relu.shape = [4, 3]
    model.graph.outputs[0].shape = [4, 100]
    out = model.to_proto()
    onnx.checker.check_model(out, full_check=True)
    x = np.arange(12, dtype=np.float32).reshape(1, 12)
    expected = np.maximum(x.reshape(4, 3), 0) @ np.ones((3, 100), np.float32)
    np.testing.assert_allclose(run_model(out, {"x": x})[0], expected, rtol=1e-6)


def test_ir_save_single_file_leaves_no_temp_and_ordinary_permissions(tmp_path):
    dst = tmp_path / "out.onnx"
    dst.write_bytes(b"previous")
    save_proto(conv_bn_relu(), dst)  # no external data: a temporary file beside it, renamed
    assert os.listdir(tmp_path) == ["out.onnx"]
    ordinary = tmp_path / "ordinary"
    ordinary.write_bytes(b"")
    assert os.stat(dst).st_mode & 0o777 == os.stat(ordinary).st_mode & 0o777  # not mkstemp's 0600
    out = load_proto(dst)
    onnx.checker.check_model(out, full_check=True)
    assert_parity(conv_bn_relu(), out, {"x": np.ones((2, 3, 8, 8), np.float32)})


def test_ir_export_without_value_info_leaves_tensor_types_in_place():
    proto = conv_bn_relu()
    proto.graph.value_info.append(helper.make_tensor_value_info("conv_out", FLOAT, ["N", 8, 8, 8]))
    model = Model.from_proto(proto)
    typed = {t.name: (t.dtype, t.shape) for t in model.tensors().values()
             if isinstance(t, gs.Variable) and t.dtype is not None}
    assert "conv_out" in typed  # an intermediate tensor with a declared type
    dropped = model.to_proto(value_info="drop")
    assert not dropped.graph.value_info  # nothing declared for intermediates...
    assert {t.name: (t.dtype, t.shape) for t in model.tensors().values() if t.name in typed} == typed  # ...types kept
    kept = model.to_proto(value_info="keep")
    assert "conv_out" in {vi.name for vi in kept.graph.value_info}
    out = model.to_proto()
    onnx.checker.check_model(out, full_check=True)
    assert_parity(conv_bn_relu(), out, {"x": np.ones((2, 3, 8, 8), np.float32)})


def test_ir_tensor_map_matches_graphsurgeon_tensors():
    from onnxslim_kit.ir import tensor_map

    nodes = [helper.make_node("Clip", ["x", "", "hi"], ["c"], name="clip"),  # omitted optional input
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    proto = make_model(nodes, [("x", FLOAT, [2, 3])], [("y", FLOAT, [2, 3])],
                       [init("hi", np.array(6.0, np.float32))])
    graph = Model.from_proto(proto).graph
    graph.nodes[1].inputs.append(gs.Variable("c"))  # a distinct tensor sharing a name: the last one wins
    expected = [(name, id(t)) for name, t in graph.tensors(check_duplicates=False).items()]
    assert [(name, id(t)) for name, t in tensor_map(graph).items()] == expected
    assert [name for name, _ in expected] == ["x", "hi", "c", "y"]
    graph.nodes[1].inputs.pop()
    out = Model(graph, Model.from_proto(proto).meta).to_proto()
    onnx.checker.check_model(out, full_check=True)
    x = np.linspace(-8, 8, 6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(run_model(out, {"x": x})[0], np.clip(x, 0, 6))


def test_ir_unique_name_after_reset_sees_names_added_without_it():
    from builders import relu_chain
    from onnxslim_kit.ir import Model

    model = Model.from_proto(relu_chain(2))
    assert model.unique_name("x") == "x"            # builds the used-name set
    model.graph.nodes[0].outputs[0].name = "plugin"  # a rename that bypassed unique_name
    model.reset_names()
    assert model.unique_name("plugin") == "plugin_1"


def test_ir_has_node_is_identity_not_equality():
    """A node removed from the graph is not present even when a live node equals it."""
    proto = conv_bn_relu(channels=4)
    model = Model.from_proto(proto)
    live = model.graph.nodes[0]
    twin = gs.Node(live.op, live.name, attrs=dict(live.attrs), inputs=list(live.inputs), outputs=list(live.outputs))
    assert model.has_node(live) and twin == live and not model.has_node(twin)


def test_ir_value_infos_cache_hits_with_constant_nodes_after_an_export(monkeypatch):
    """A Constant node's value (kept as its TensorProto) keys the cache by payload: the name the first
    export (value_infos' own) writes into that proto does not make the next value_infos() recompute."""
    import onnxslim_kit.shapes as shapes

    nodes = [helper.make_node("Constant", [], ["shape"], name="c",
                              value=numpy_helper.from_array(np.array([3, 4], np.int64))),
             helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape")]
    model = Model.from_proto(make_model(nodes, [("x", FLOAT, [2, 6])], [("r", FLOAT, None)]))
    calls = []
    real = shapes.value_infos
    monkeypatch.setattr(shapes, "value_infos", lambda p: calls.append(1) or real(p))
    for _ in range(3):
        assert _dims(model.value_infos(), "r") == [3, 4]
    model.to_proto()
    assert _dims(model.value_infos(), "r") == [3, 4] and len(calls) == 1
