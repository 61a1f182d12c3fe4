"""Side by side: quantize-int8 with its embedding tables int8 (com.microsoft.GatherBlockQuantized, the default)
vs the same pass with op_types=Conv+MatMul+Gemm (tables left float32, the pass before this change) vs
onnxruntime's static QDQ recipe (which quantizes Gather too), same model, same calibration samples.

    python tools/bench_embedding_int8.py [--models bert_tiny] [--runs 100] [--rounds 5] [--batch 8]

Prints per model and variant: latency (onnxruntime CPU, 2 threads, interleaved rounds, one session alive at a
time; each variant's per-round median against the float-table variant's in the same round, median over
rounds) at batch 1 and at --batch, file size, min cosine vs fp32 on the calibration samples, and how each
int8 model looks its tables up after onnxruntime's graph optimizations.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quantize import cosines, latencies, md_table, size  # noqa: E402
from bench_static_int8 import ort_static  # noqa: E402
from onnxslim_kit import api  # noqa: E402
from onnxslim_kit.calibration import input_specs, load_calibration  # noqa: E402
from onnxslim_kit.runtime import paired_ratio  # noqa: E402


def lookups(path: str, tmp: str) -> str:
    """The op that reads each constant float/int8 table after onnxruntime's optimizations (ORT_ENABLE_ALL)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = os.path.join(tmp, "opt_" + os.path.basename(path))
    opts.log_severity_level = 3
    ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    opt = onnx.load(opts.optimized_model_filepath)
    inits = {t.name: t for t in opt.graph.initializer if len(t.dims) == 2}
    found = []
    for node in opt.graph.node:
        if "Gather" in node.op_type and node.input and node.input[0] in inits:
            t = inits[node.input[0]]
            found.append(f"{node.op_type}({onnx.TensorProto.DataType.Name(t.data_type).lower()} "
                         f"{'x'.join(map(str, t.dims))})")
    return ", ".join(sorted(found)) or "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bert_tiny"])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    rows = []
    for name in args.models:
        src = str(ROOT / "models" / f"{name}.onnx")
        calib = str(ROOT / "models" / f"{name}.calib.npz")
        feeds = list(load_calibration(calib, input_specs(onnx.load(src))))
        tmp = tempfile.mkdtemp(prefix=f"bench-emb-{name}-")
        paths = {"fp32": src, "int8 tables float": os.path.join(tmp, "float_tables.onnx"),
                 "int8 + tables int8": os.path.join(tmp, "int8_tables.onnx"), "ORT static": os.path.join(tmp, "ort.onnx")}
        api.optimize(src, passes=["cleanup", "quantize-int8:op_types=Conv+MatMul+Gemm"], calibration=calib,
                     output=paths["int8 tables float"], tolerance={"cosine": 0.9})
        api.optimize(src, passes=["cleanup", "quantize-int8"], calibration=calib,
                     output=paths["int8 + tables int8"], tolerance={"cosine": 0.9})
        ort_static(src, paths["ORT static"], feeds, tmp)
        cos = cosines(src, paths, feeds, args.threads)
        base = "int8 tables float"
        t1 = latencies(paths, feeds[0], args.threads, args.runs, args.rounds)
        big = {k: np.repeat(v[:1], args.batch, axis=0) for k, v in feeds[0].items()}
        tb = latencies(paths, big, args.threads, max(5, args.runs // 3), args.rounds) if args.batch > 1 else None
        for label, path in paths.items():
            rows.append([name, label, f"{paired_ratio(t1[label], t1[base], args.rounds):.3f}",
                         f"{paired_ratio(tb[label], tb[base], args.rounds):.3f}" if tb else "-",
                         f"{size(path) / 1024:.0f}", f"{size(path) / size(src):.3f}", f"{min(cos[label]):.5f}",
                         lookups(path, tmp) if label != "fp32" else "-"])
    print(md_table(["model", "variant", "latency vs tables float (batch 1)", f"(batch {args.batch})", "KiB",
                    "size vs fp32", "min cosine", "table lookups after ORT optimization"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
