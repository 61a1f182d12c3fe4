"""Why int8 MobileNets can be slower than fp32 in onnxruntime on x86: per-layer latency of chains of
identical convolutions (8 layers, Relu between) in fp32 and after `quantize-int8`, depthwise and dense,
channel counts on and off the multiple of 16 that onnxruntime's faster x86 int8 depthwise kernel needs.

    python tools/bench_depthwise.py [--threads 1] [--rounds 6]

Prints microseconds per layer (10th percentile of interleaved runs, so a busy machine shows less) and
the int8/fp32 ratio; writes tools/results/depthwise_int8.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quantize import md_table  # noqa: E402
from onnxslim_kit import api  # noqa: E402
from onnxslim_kit.runtime import cpu_int8_dot_product, time_sessions  # noqa: E402

LAYERS = 8
CONFIGS = [  # (channels, spatial, kernel, depthwise)
    (16, 32, 3, True), (64, 16, 3, True), (72, 16, 3, True), (80, 16, 3, True), (112, 8, 5, True),
    (120, 8, 5, True), (128, 8, 5, True), (72, 16, 1, False), (120, 8, 1, False), (64, 16, 3, False),
]


def chain(c: int, h: int, k: int, depthwise: bool, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    group = c if depthwise else 1
    nodes, inits, x = [], [], "x"
    for i in range(LAYERS):
        w = (rng.standard_normal((c, c // group, k, k)) * 0.3).astype(np.float32)
        b = (rng.standard_normal(c) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", group=group,
                                      kernel_shape=[k, k], pads=[k // 2] * 4))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"a{i}"], name=f"relu{i}"))
        x = f"a{i}"
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, c, h, h]) for n in ("x", x)]
    graph = helper.make_graph(nodes, "chain", io[:1], io[1:], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-dw-"))
    rows = []
    for c, h, k, dw in CONFIGS:
        src, out, calib = tmp / "fp32.onnx", tmp / "int8.onnx", tmp / "calib.npz"
        onnx.save(chain(c, h, k, dw), src)
        x = np.random.default_rng(1).random((8, c, h, h)).astype(np.float32)
        np.savez(calib, x=x)
        api.optimize(src, passes=["quantize-int8"], calibration=calib, output=out, tolerance={"cosine": 0.5})
        times = time_sessions([str(src), str(out)], {"x": x[:1]}, threads=args.threads, runs=40, warmup=3,
                              rounds=args.rounds)
        a, b = (float(np.percentile(t, 10)) * 1e6 / LAYERS for t in times)
        rows.append([f"{'depthwise' if dw else 'dense'} {k}x{k}", str(c), f"{h}x{h}", f"{a:.1f}", f"{b:.1f}",
                     f"{b / a:.2f}"])
        print(" | ".join(rows[-1]), flush=True)
    header = ["conv", "channels", "spatial", "fp32 us/layer", "int8 us/layer", "int8/fp32"]
    text = md_table(header, rows)
    (ROOT / "tools" / "results" / "depthwise_int8.md").write_text(
        f"# int8 vs fp32 convolutions in onnxruntime (chains of {LAYERS}, batch 1, {args.threads} thread(s), "
        f"p10 of {args.rounds} interleaved rounds; CPU int8 dot product: {cpu_int8_dot_product()})\n\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
