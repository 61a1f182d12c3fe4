"""Small golden graphs built in code (seeded), shared by the tests.

Every builder returns an ``onnx.ModelProto`` that passes ``onnx.checker.check_model(full_check=True)``
and runs in onnxruntime. Add new builders here rather than re-writing graph boilerplate in a test.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def make_model(nodes, inputs, outputs, initializers=(), *, opset: int = 17, ir_version: int | None = None,
               value_info=(), name: str = "test", functions=(), extra_opsets=()) -> onnx.ModelProto:
    """``inputs``/``outputs``: ValueInfoProtos or (name, elem_type, shape) tuples."""

    def vi(x):
        return x if isinstance(x, onnx.ValueInfoProto) else helper.make_tensor_value_info(*x)

    graph = helper.make_graph(list(nodes), name, [vi(i) for i in inputs], [vi(o) for o in outputs],
                              initializer=list(initializers), value_info=[vi(v) for v in value_info])
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    model.ir_version = ir_version if ir_version is not None else max(8, helper.find_min_ir_version_for(opsets, ignore_unknown=True))
    if any(not o.type.tensor_type.HasField("shape") for o in model.graph.output):
        # Outputs given with shape None: take the inferred shape (the checker wants one).
        inferred = onnx.shape_inference.infer_shapes(model)
        by_name = {o.name: o for o in inferred.graph.output}
        for out in model.graph.output:
            if not out.type.tensor_type.HasField("shape") and by_name[out.name].type.tensor_type.HasField("shape"):
                out.CopyFrom(by_name[out.name])
    return model


def relu_chain(n: int, *, reverse: bool = False, opset: int = 17) -> onnx.ModelProto:
    """x -> Relu -> Relu -> ... (n nodes), optionally stored in reverse topological order."""
    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"], name=f"relu_{i}") for i in range(n)]
    if reverse:
        nodes = nodes[::-1]
    return make_model(nodes, [("t0", FLOAT, [1, 4])], [(f"t{n}", FLOAT, [1, 4])], opset=opset)


def conv_bn_relu(*, seed: int = 0, channels: int = 8, opset: int = 17, batch: int | str = "N") -> onnx.ModelProto:
    """Conv(3->C, 3x3, bias) -> BatchNormalization -> Relu -> GlobalAveragePool -> Flatten -> Gemm(C->10)."""
    r = rng(seed)
    c = channels
    inits = [
        init("conv.w", r.standard_normal((c, 3, 3, 3)).astype(np.float32) * 0.3),
        init("conv.b", r.standard_normal(c).astype(np.float32) * 0.1),
        init("bn.scale", (1 + 0.2 * r.standard_normal(c)).astype(np.float32)),
        init("bn.bias", (0.1 * r.standard_normal(c)).astype(np.float32)),
        init("bn.mean", (0.1 * r.standard_normal(c)).astype(np.float32)),
        init("bn.var", (0.5 + r.random(c)).astype(np.float32)),
        init("fc.w", r.standard_normal((10, c)).astype(np.float32) * 0.3),
        init("fc.b", r.standard_normal(10).astype(np.float32) * 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv_out", "bn.scale", "bn.bias", "bn.mean", "bn.var"],
                         ["bn_out"], name="bn", epsilon=1e-5),
        helper.make_node("Relu", ["bn_out"], ["relu_out"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu_out"], ["pool_out"], name="pool"),
        helper.make_node("Flatten", ["pool_out"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    return make_model(nodes, [("x", FLOAT, [batch, 3, 8, 8])], [("logits", FLOAT, [batch, 10])], inits,
                      opset=opset)


def with_external_location(proto: onnx.ModelProto, location: str, *, index: int = 0) -> onnx.ModelProto:
    """Make initializer ``index`` point at external data ``location`` (payload dropped), e.g. to test
    that locations outside the model's folder are refused."""
    tensor = proto.graph.initializer[index]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return proto


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run with onnxruntime, graph optimizations off (so ORT's own fusions cannot hide a bug)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_parity(original: onnx.ModelProto, optimized: onnx.ModelProto, feeds: dict[str, np.ndarray],
                  *, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """checker(full_check) on the optimized model + onnxruntime outputs equal in shape, dtype, value."""
    onnx.checker.check_model(optimized, full_check=True)
    ref = run_model(original, feeds)
    got = run_model(optimized, feeds)
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(b, a, atol=atol, rtol=rtol)


def mlp_blocks(*, layers: int = 4, hidden: int = 128, seed: int = 0, opset: int = 21) -> onnx.ModelProto:
    """Transformer-shaped blocks (LayerNorm -> MatMul(h, 4h) -> Relu -> MatMul(4h, h) -> residual Add),
    as tools/make_big_model.py builds them, plus a dead Identity chain for cleanup. Input x [B, S, h]."""
    g = rng(seed)
    h = hidden
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        inits += [init(f"l{i}.up", (g.standard_normal((h, 4 * h)) * 0.02).astype(np.float32)),
                  init(f"l{i}.down", (g.standard_normal((4 * h, h)) * 0.02).astype(np.float32)),
                  init(f"l{i}.g", np.ones(h, np.float32)), init(f"l{i}.b", np.zeros(h, np.float32))]
        nodes += [helper.make_node("LayerNormalization", [prev, f"l{i}.g", f"l{i}.b"], [f"ln{i}"], axis=-1,
                                   name=f"ln{i}"),
                  helper.make_node("Identity", [f"ln{i}"], [f"ln{i}_id"], name=f"id{i}"),
                  helper.make_node("MatMul", [f"ln{i}_id", f"l{i}.up"], [f"up{i}"], name=f"up{i}"),
                  helper.make_node("Relu", [f"up{i}"], [f"act{i}"], name=f"act{i}"),
                  helper.make_node("MatMul", [f"act{i}", f"l{i}.down"], [f"down{i}"], name=f"down{i}"),
                  helper.make_node("Add", [prev, f"down{i}"], [f"res{i}"], name=f"res{i}")]
        prev = f"res{i}"
    return make_model(nodes, [("x", TensorProto.FLOAT, ["B", "S", h])], [(prev, TensorProto.FLOAT, ["B", "S", h])],
                      inits, opset=opset)


def save_external(proto: onnx.ModelProto, path, *, location: str | None = None) -> None:
    """Save ``proto`` (left unchanged) with every tensor above 1 kB in one external-data file."""
    import os

    copy = onnx.ModelProto.FromString(proto.SerializeToString())
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location or os.path.basename(str(path)) + ".data", size_threshold=1024)


def fused_ops(proto: onnx.ModelProto, tmp_path) -> list[str]:
    """Op types of the graph onnxruntime actually runs (its optimized model, all fusions on): how tests
    check that quantized layers became integer kernels rather than DQ -> float op."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
