"""Side by side: onnxslim-kit `quantize-int8` calibration methods (minmax, percentile, mse, entropy) vs
onnxruntime `quantize_static` with its MinMax and Entropy calibrators (QDQ, per-channel, U8S8), same
models, same calibration samples.

    python tools/bench_calibration.py [--models digits_cnn resnet_tiny bert_tiny]

Prints per model and variant: min cosine of the outputs vs fp32 (on the held-out eval set where the model
ships one, else on the calibration samples themselves), held-out accuracy (digits CNN) and the tool's run
time. Accuracy only for the calibration methods (they produce the same graph, only the ranges differ).
For opset >= 21 models also `activation_type=int16` (A16W8), with latencies of fp32 / uint8 / int16
(interleaved rounds, one session alive at a time): onnxruntime runs int16 QDQ as DQ -> float op -> Q.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quantize import cosines, latencies, outputs  # noqa: E402
from bench_static_int8 import eval_set, ort_static  # noqa: E402
from onnxslim_kit import api  # noqa: E402
from onnxslim_kit.calibration import input_specs, load_calibration  # noqa: E402

METHODS = ["minmax", "percentile", "mse", "entropy"]


def ours(src, out, calib, method):
    t0 = time.perf_counter()
    api.optimize(src, passes=["cleanup", f"quantize-int8:calibration={method}"], calibration=calib, output=out,
                 tolerance={"cosine": 0.0})
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+",
                        default=["digits_cnn", "resnet_tiny", "bert_tiny", "mobilenetv3_tiny_opset23"])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    rows = []
    for name in args.models:
        src = str(ROOT / "models" / f"{name}.onnx")
        calib = str(ROOT / "models" / f"{name.split('_opset')[0]}.calib.npz")
        specs = input_specs(onnx.load(src))
        feeds = list(load_calibration(calib, specs))
        eval_feeds, labels = eval_set(name, feeds)
        tmp = tempfile.mkdtemp(prefix=f"bench-calib-{name}-")
        paths, secs = {}, {}
        jobs = [(f"ours {m}", lambda o, m=m: ours(src, o, calib, m)) for m in METHODS]
        jobs += [(f"ORT {m}", lambda o, m=m: ort_static(src, o, feeds, tmp, method=m, preprocess=False)) for m in ("MinMax", "Entropy")]
        opset = next(o.version for o in onnx.load(src, load_external_data=False).opset_import
                     if o.domain in ("", "ai.onnx"))
        if opset >= 21:
            jobs.append(("ours int16 (A16W8)", lambda o: ours(src, o, calib, "minmax,activation_type=int16")))
        for label, job in jobs:
            out = os.path.join(tmp, label.replace(" ", "_") + ".onnx")
            try:
                secs[label] = job(out)
                paths[label] = out
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"{name}: {label} failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
        cos = cosines(src, paths, eval_feeds, 2)
        fp32_acc = None
        if labels is not None:
            fp32_acc = float((outputs(src, eval_feeds, 2)[0][0].argmax(-1) == labels).mean())
        for label, path in paths.items():
            acc = "-"
            if labels is not None:
                acc = f"{float((outputs(path, eval_feeds, 2)[0][0].argmax(-1) == labels).mean()):.4f} " \
                      f"(fp32 {fp32_acc:.4f})"
            rows.append([name, label, f"{min(cos[label]):.5f}", acc, f"{secs[label]:.2f}"])
            print(" | ".join(rows[-1]), flush=True)
        if "ours int16 (A16W8)" in paths:
            times = latencies({"fp32": src, "uint8": paths["ours minmax"], "int16": paths["ours int16 (A16W8)"]},
                              feeds[0], 2, args.runs, args.rounds)
            med = {k: float(np.median(v)) for k, v in times.items()}
            rows.append([name, "latency vs fp32 (uint8 / int16)",
                         f"{med['uint8'] / med['fp32']:.3f} / {med['int16'] / med['fp32']:.3f}", "", ""])
            print(" | ".join(rows[-1]), flush=True)
        for m, ref in (("minmax", "MinMax"), ("entropy", "Entropy")):
            if f"ours {m}" in cos and f"ORT {ref}" in cos:
                rows.append([name, f"1-cos ratio ours {m}/ORT {ref}",
                             f"{(1 - min(cos[f'ours {m}'])) / max(1 - min(cos[f'ORT {ref}']), 1e-12):.3f}", "", ""])
                print(" | ".join(rows[-1]), flush=True)
    header = ["model", "variant", "min cosine vs fp32", "accuracy (held out)", "tool s"]
    text = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    text += "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"
    (ROOT / "tools" / "results" / "calibration_methods.md").write_text(
        "# quantize-int8 calibration methods vs onnxruntime quantize_static calibrators\n\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
