"""Seeded fuzzing: random valid CNN-like graphs through every pass, and mutated / truncated model and
calibration bytes through the CLI.

    python tools/fuzz.py [--graphs 200] [--mutations 500] [--seed 0]

Graph fuzzing: each run must either return a model that passes onnx.checker (full check) and its parity
gate, or refuse with an OnnxSlimError (one line). Byte fuzzing: the CLI must answer every corrupted file
with exit code 0, 2 or 3 and, on error, exactly one line and no traceback. Prints the counts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxslim_kit import api  # noqa: E402
from onnxslim_kit.errors import OnnxSlimError  # noqa: E402
from onnxslim_kit.registry import available_passes  # noqa: E402

FLOAT = TensorProto.FLOAT


def random_graph(seed: int) -> onnx.ModelProto:
    """A random DAG of convs (depthwise too), BN, activations (HardSwish/HardSigmoid/LeakyRelu included),
    SE gates, residual adds, concats, transposes and reshapes."""
    rng = np.random.default_rng(seed)
    opset = int(np.random.default_rng([seed, 1]).choice([13, 17, 21]))
    nodes, inits = [], []
    tensors = [("x", 3)]  # (name, channels); spatial 8x8, batch dynamic
    counter = [0]

    def name(prefix):
        counter[0] += 1
        return f"{prefix}{counter[0]}"

    def const(prefix, array, as_node):
        n = name(prefix)
        if as_node:  # paddle-style weight (FIELD-NOTES 1)
            nodes.append(helper.make_node("Constant", [], [n], value=numpy_helper.from_array(array, n + "_v")))
        else:
            inits.append(numpy_helper.from_array(array, n))
        return n

    for _ in range(int(rng.integers(3, 12))):
        src, c = tensors[int(rng.integers(len(tensors)))]
        op = rng.choice(["conv", "conv", "bn", "act", "add", "mul", "concat", "transpose", "reshape", "pad_conv",
                         "se"])
        out = name("t")
        as_node = bool(rng.random() < 0.2)
        if op in ("conv", "pad_conv"):
            cout = int(rng.choice([4, 8, 16]))
            k = int(rng.choice([1, 3]))
            group = c if (k == 3 and cout == c and rng.random() < 0.3) else 1
            w = const("w", (rng.standard_normal((cout, c // group, k, k)) * 0.3).astype(np.float32), as_node)
            b = const("b", (rng.standard_normal(cout) * 0.1).astype(np.float32), as_node)
            inp = src
            pads = [k // 2] * 4
            if op == "pad_conv" and k == 3:
                p = const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), False)
                inp = name("padded")
                nodes.append(helper.make_node("Pad", [src, p], [inp], name=name("pad")))
                pads = [0] * 4
            nodes.append(helper.make_node("Conv", [inp, w, b], [out], name=name("conv"), pads=pads, group=group))
            tensors.append((out, cout))
        elif op == "bn":
            params = [const(p, v.astype(np.float32), as_node) for p, v in (
                ("s", 1 + 0.2 * rng.standard_normal(c)), ("o", 0.1 * rng.standard_normal(c)),
                ("m", 0.1 * rng.standard_normal(c)), ("v", 0.5 + rng.random(c)))]
            nodes.append(helper.make_node("BatchNormalization", [src] + params, [out], name=name("bn")))
            tensors.append((out, c))
        elif op == "act":
            kinds = ["Relu", "Sigmoid", "Identity", "Tanh", "HardSigmoid", "LeakyRelu"] + \
                (["HardSwish"] if opset >= 14 else [])
            nodes.append(helper.make_node(str(rng.choice(kinds)), [src], [out], name=name("act")))
            tensors.append((out, c))
        elif op == "se":  # squeeze-excitation gate: GAP -> 1x1 Conv -> HardSigmoid -> Mul
            w = const("se_w", (rng.standard_normal((c, c, 1, 1)) * 0.3).astype(np.float32), as_node)
            pooled, gate, sig = name("se_pool"), name("se_gate"), name("se_sig")
            nodes += [helper.make_node("GlobalAveragePool", [src], [pooled], name=name("se_gap")),
                      helper.make_node("Conv", [pooled, w], [gate], name=name("se_conv")),
                      helper.make_node("HardSigmoid", [gate], [sig], name=name("se_hsig")),
                      helper.make_node("Mul", [src, sig], [out], name=name("se_mul"))]
            tensors.append((out, c))
        elif op == "add":
            same = [t for t, ch in tensors if ch == c]
            other = same[int(rng.integers(len(same)))]
            nodes.append(helper.make_node("Add", [src, other], [out], name=name("add")))
            tensors.append((out, c))
        elif op == "mul":
            s = const("scale", (1 + 0.1 * rng.standard_normal((c, 1, 1))).astype(np.float32), as_node)
            nodes.append(helper.make_node("Mul", [src, s], [out], name=name("mul")))
            tensors.append((out, c))
        elif op == "concat":
            other, c2 = tensors[int(rng.integers(len(tensors)))]
            nodes.append(helper.make_node("Concat", [src, other], [out], name=name("concat"), axis=1))
            tensors.append((out, c + c2))
        elif op == "transpose":
            mid = name("nhwc")
            nodes.append(helper.make_node("Transpose", [src], [mid], name=name("tr"), perm=[0, 2, 3, 1]))
            nodes.append(helper.make_node("Transpose", [mid], [out], name=name("tr"), perm=[0, 3, 1, 2]))
            tensors.append((out, c))
        else:
            s1 = const("shape", np.array([0, c, 64], np.int64), False)
            s2 = const("shape", np.array([0, c, 8, 8], np.int64), False)
            mid = name("flat")
            nodes.append(helper.make_node("Reshape", [src, s1], [mid], name=name("rs")))
            nodes.append(helper.make_node("Reshape", [mid, s2], [out], name=name("rs")))
            tensors.append((out, c))
    last, c = tensors[-1]
    pooled, flat = name("pool"), name("flat")
    fc_w = const("fc_w", (rng.standard_normal((10, c)) * 0.3).astype(np.float32), False)
    fc_b = const("fc_b", np.zeros(10, np.float32), False)
    nodes += [helper.make_node("GlobalAveragePool", [last], [pooled], name=name("gap")),
              helper.make_node("Flatten", [pooled], [flat], name=name("flatten")),
              helper.make_node("Gemm", [flat, fc_w, fc_b], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, f"fuzz{seed}", [helper.make_tensor_value_info("x", FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", FLOAT, ["N", 10])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


PASS_SPECS = {"svd": "svd:min_size=64,rank_ratio=0.5", "quantize-weights": "quantize-weights:min_elements=16",
              "quantize-dynamic": "quantize-dynamic:min_elements=16"}


def fuzz_graphs(count: int, seed: int = 0, passes=None) -> dict:
    passes = passes or sorted(p for p in available_passes() if not p.startswith("test-"))
    counts = {"ok": 0, "refused": 0, "crashed": 0, "invalid": 0}
    problems = []
    for i in range(count):
        proto = random_graph(seed + i)
        onnx.checker.check_model(proto, full_check=True)
        for p in passes:
            try:
                out, report = api.optimize(proto, passes=[PASS_SPECS.get(p, p)], seed=seed + i, num_samples=2,
                                           tolerance={"cosine": 0.9} if report_lossy(p) else None)
                onnx.checker.check_model(out, full_check=True)
                counts["ok"] += 1
            except OnnxSlimError as exc:
                if "\n" in str(exc):
                    counts["invalid"] += 1
                    problems.append((seed + i, p, "multi-line error: " + str(exc)[:200]))
                else:
                    counts["refused"] += 1
                    problems.append((seed + i, p, "refused: " + str(exc)[:200]))
            except Exception as exc:  # noqa: BLE001 - anything else is a bug
                counts["crashed"] += 1
                problems.append((seed + i, p, "CRASH " + "".join(traceback.format_exception_only(exc)).strip()[:300]))
    counts["problems"] = problems
    return counts


def report_lossy(name: str) -> bool:
    from onnxslim_kit.registry import get_pass

    return get_pass(name).tolerance.lossy


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    kind = rng.integers(3)
    if kind == 0:  # truncate
        return bytes(buf[: int(rng.integers(0, len(buf)))])
    if kind == 1:  # flip random bytes
        for _ in range(int(rng.integers(1, 20))):
            buf[int(rng.integers(len(buf)))] = int(rng.integers(256))
        return bytes(buf)
    start = int(rng.integers(len(buf)))  # splice garbage
    return bytes(buf[:start]) + rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes() + bytes(buf[start:])


def fuzz_bytes(count: int, seed: int = 0) -> dict:
    from click.testing import CliRunner

    from onnxslim_kit.cli import main

    rng = np.random.default_rng(seed)
    model = random_graph(seed).SerializeToString()
    calib = Path(tempfile.mkdtemp(prefix="fuzz-")) / "seed.npz"
    np.savez(calib, x=rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    calib_bytes = calib.read_bytes()
    counts = {"cases": 0, "exit_0": 0, "exit_2": 0, "exit_3": 0, "bad": 0}
    problems = []
    folder = Path(tempfile.mkdtemp(prefix="fuzz-bytes-"))
    for i in range(count):
        target = "model" if i % 3 else "calib"
        m = folder / f"m{i}.onnx"
        c = folder / f"c{i}.npz"
        m.write_bytes(mutate(model, rng) if target == "model" else model)
        c.write_bytes(mutate(calib_bytes, rng) if target == "calib" else calib_bytes)
        result = CliRunner().invoke(main, ["optimize", str(m), "-o", str(folder / f"o{i}.onnx"), "--calib", str(c),
                                           "-q"])
        counts["cases"] += 1
        lines = [line for line in result.output.splitlines() if line.strip()]
        ok_shape = result.exit_code in (0, 2, 3) and "Traceback" not in result.output and \
            (result.exit_code == 0 or len(lines) == 1 or result.exit_code == 3)
        if ok_shape:
            counts[f"exit_{result.exit_code}"] += 1
        else:
            counts["bad"] += 1
            problems.append((i, target, result.exit_code, result.output[-300:]))
        for p in (m, c, folder / f"o{i}.onnx"):
            if p.exists():
                os.unlink(p)
    counts["problems"] = problems
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", type=int, default=200)
    parser.add_argument("--mutations", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    g = fuzz_graphs(args.graphs, args.seed)
    print(f"graphs: {args.graphs} random graphs x passes: ok {g['ok']}, refused {g['refused']}, "
          f"crashed {g['crashed']}, invalid {g['invalid']}")
    for p in g["problems"][:30]:
        print("  ", p)
    b = fuzz_bytes(args.mutations, args.seed)
    print(f"bytes: {b['cases']} mutated files: exit 0 {b['exit_0']}, exit 2 {b['exit_2']}, exit 3 {b['exit_3']}, "
          f"bad {b['bad']}")
    for p in b["problems"][:10]:
        print("  ", p)
    return 0 if g["crashed"] == 0 and g["invalid"] == 0 and b["bad"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
