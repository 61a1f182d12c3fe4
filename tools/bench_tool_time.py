"""Tool run time only, side by side: onnxslim-kit `cleanup` + `quantize-int8` (with its parity gate) vs
onnxruntime's static recipe (quant_pre_process + quantize_static, QDQ, per-channel, U8S8), the same two
jobs as ``tools/bench_static_int8.py``.

    python tools/bench_tool_time.py [--models paddle_style_opset11 digits_cnn ...] [--repeats 5]

Both tools run once per model as a warm-up, then alternate (ours, ORT, ours, ORT, ...) ``--repeats``
times. Prints per model the median process CPU seconds and wall seconds of each tool and the ratios
ours/ORT. Where ORT's per-channel output does not load (opset < 13), its per-tensor flavour is timed
instead, as ``bench_static_int8.py`` does.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quantize import outputs  # noqa: E402
from bench_static_int8 import DEFAULT_MODELS, ort_static, ours  # noqa: E402
from onnxslim_kit.calibration import input_specs, load_calibration  # noqa: E402


def timed(job):
    """(process CPU seconds, wall seconds) of ``job()``."""
    c0, w0 = time.process_time(), time.perf_counter()
    job()
    return time.process_time() - c0, time.perf_counter() - w0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's per-run advice
    med = statistics.median
    print("| model | ours CPU s | ORT CPU s | CPU ours/ORT | ours wall s | ORT wall s | wall ours/ORT |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        src = str(ROOT / "models" / f"{name}.onnx")
        calib = str(ROOT / "models" / f"{name}.calib.npz")
        feeds = list(load_calibration(calib, input_specs(onnx.load(src))))
        tmp = tempfile.mkdtemp(prefix=f"bench-tooltime-{name}-")
        mine, theirs = f"{tmp}/ours.onnx", f"{tmp}/ort.onnx"
        ours(src, mine, calib)
        per_channel = True
        ort_static(src, theirs, feeds, tmp)
        try:
            outputs(theirs, feeds[:1], 1)
        except Exception:  # noqa: BLE001 - per-channel QDQ is invalid below opset 13: per-tensor, as the benchmark
            per_channel = False
            ort_static(src, theirs, feeds, tmp, per_channel=False)
        a, b = [], []
        for _ in range(args.repeats):
            a.append(timed(lambda: ours(src, mine, calib)))
            b.append(timed(lambda: ort_static(src, theirs, feeds, tmp, per_channel=per_channel)))
        ac, aw = med(x[0] for x in a), med(x[1] for x in a)
        bc, bw = med(x[0] for x in b), med(x[1] for x in b)
        flavour = "" if per_channel else " (ORT per-tensor)"
        print(f"| {name}{flavour} | {ac:.3f} | {bc:.3f} | {ac / bc:.2f} | {aw:.3f} | {bw:.3f} | {aw / bw:.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
