"""Generate a transformer-shaped model whose weights (stored as external data) reach a given size.

    python tools/make_big_model.py OUT_DIR --gb 2.2 [--hidden 2048]

Each layer: LayerNorm -> MatMul(h, 4h) -> Gelu-ish (Relu) -> MatMul(4h, h) -> residual Add, weights
float32 random (seeded), written tensor by tensor into OUT_DIR/big.onnx.data (memory stays at one
layer). Input 'x' [batch, seq, hidden]. Used to measure memory and time of optimize above 2 GB
(/usr/bin/time -v).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--gb", type=float, default=2.2)
    parser.add_argument("--hidden", type=int, default=2048)
    args = parser.parse_args(argv)
    h = args.hidden
    layer_bytes = 2 * h * 4 * h * 4
    layers = max(1, int(np.ceil(args.gb * 2**30 / layer_bytes)))
    os.makedirs(args.out_dir, exist_ok=True)
    data_name = "big.onnx.data"
    data_path = os.path.join(args.out_dir, data_name)
    rng = np.random.default_rng(0)
    nodes, inits, offset = [], [], 0
    prev = "x"
    with open(data_path, "wb") as fh:
        def external(name, array):
            nonlocal offset
            raw = array.tobytes()
            fh.write(raw)
            t = TensorProto()
            t.name, t.data_type = name, TensorProto.FLOAT
            t.dims.extend(array.shape)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            offset += len(raw)
            inits.append(t)

        for i in range(layers):
            external(f"l{i}.up", (rng.standard_normal((h, 4 * h), dtype=np.float32) * 0.02))
            external(f"l{i}.down", (rng.standard_normal((4 * h, h), dtype=np.float32) * 0.02))
            inits += [helper.make_tensor(f"l{i}.g", TensorProto.FLOAT, [h], np.ones(h, np.float32)),
                      helper.make_tensor(f"l{i}.b", TensorProto.FLOAT, [h], np.zeros(h, np.float32))]
            nodes += [helper.make_node("LayerNormalization", [prev, f"l{i}.g", f"l{i}.b"], [f"ln{i}"], axis=-1),
                      helper.make_node("MatMul", [f"ln{i}", f"l{i}.up"], [f"up{i}"]),
                      helper.make_node("Relu", [f"up{i}"], [f"act{i}"]),
                      helper.make_node("MatMul", [f"act{i}", f"l{i}.down"], [f"down{i}"]),
                      helper.make_node("Add", [prev, f"down{i}"], [f"res{i}"])]
            prev = f"res{i}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", h])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["B", "S", h])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save_model(model, os.path.join(args.out_dir, "big.onnx"))
    print(f"{layers} layers, {offset / 2**30:.2f} GiB of weights in {data_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
