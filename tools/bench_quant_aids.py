"""Side by side: quantize-int8 accuracy aids (equalize, bias_correction, smoothquant) vs onnxruntime's
static recipe (quant_pre_process + quantize_static, QDQ, U8S8), per-channel and per-tensor weights, same
models, same calibration samples, one run.

    python tools/bench_quant_aids.py [--models mobilenetv2_digits resnet_tiny bert_tiny] [--runs 20] [--rounds 3]

Per model and variant: min cosine and SNR (dB) of every output vs fp32 on held-out data where the model
ships it (``<name>.eval.npz``; else the calibration samples), held-out accuracy where it has labels, and
latency (onnxruntime CPU, median of interleaved rounds, one session alive at a time) as a ratio to fp32
and to ORT per-channel. Written to tools/results/quant_aids.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quantize import outputs, size  # noqa: E402
from bench_static_int8 import eval_set, ort_static  # noqa: E402
from onnxslim_kit import api  # noqa: E402
from onnxslim_kit.calibration import input_specs, load_calibration  # noqa: E402
from onnxslim_kit.runtime import time_sessions  # noqa: E402

CNN_VARIANTS = {
    "ours": "quantize-int8",
    "ours +equalize": "quantize-int8:equalize=true",
    "ours +bias_correction": "quantize-int8:bias_correction=true",
    "ours +both": "quantize-int8:equalize=true,bias_correction=true",
    "ours per-tensor": "quantize-int8:per_channel=false",
    "ours per-tensor +equalize": "quantize-int8:per_channel=false,equalize=true",
    "ours per-tensor +bias_correction": "quantize-int8:per_channel=false,bias_correction=true",
    "ours per-tensor +both": "quantize-int8:per_channel=false,equalize=true,bias_correction=true",
}
TRANSFORMER_VARIANTS = {
    "ours": "quantize-int8",
    "ours +smoothquant=0.5": "quantize-int8:smoothquant=0.5",
    "ours +smoothquant=0.8": "quantize-int8:smoothquant=0.8",
    "ours +bias_correction": "quantize-int8:bias_correction=true",
    "ours per-tensor": "quantize-int8:per_channel=false",
    "ours per-tensor +smoothquant=0.5": "quantize-int8:per_channel=false,smoothquant=0.5",
}
DEFAULT_MODELS = ["mobilenetv2_digits", "resnet_tiny", "bert_tiny"]


def ours(src, spec, out, calib):
    t0 = time.perf_counter()
    api.optimize(src, passes=["cleanup", spec], calibration=calib, output=out, check="off")
    return time.perf_counter() - t0


def parity(ref_outs, outs):
    """(min cosine, min SNR dB) over the outputs, each output concatenated over all feeds."""
    cos, snr = [], []
    for k in range(len(ref_outs[0])):
        a = np.concatenate([r[k].reshape(-1) for r in ref_outs]).astype(np.float64)
        b = np.concatenate([o[k].reshape(-1) for o in outs]).astype(np.float64)
        cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
        noise = float(np.sum((a - b) ** 2))
        snr.append(10 * np.log10(float(np.sum(a ** 2)) / noise) if noise > 0 else float("inf"))
    return min(cos), min(snr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    header = ["model", "variant", "min cosine", "min SNR dB", "accuracy", "latency vs fp32", "latency vs ORT",
              "KiB", "tool s"]
    rows, notes = [], []
    for name in args.models:
        src = str(ROOT / "models" / f"{name}.onnx")
        calib = str(ROOT / "models" / f"{name}.calib.npz")
        specs = input_specs(onnx.load(src))
        feeds = list(load_calibration(calib, specs))
        test_feeds, labels = eval_set(name, feeds)
        tmp = tempfile.mkdtemp(prefix=f"bench-aids-{name}-")
        jobs = {"ORT per-channel": lambda o: ort_static(src, o, feeds, tmp, per_channel=True),
                "ORT per-tensor": lambda o: ort_static(src, o, feeds, tmp, per_channel=False)}
        variants = TRANSFORMER_VARIANTS if name.startswith("bert") else CNN_VARIANTS
        for label, spec in variants.items():
            jobs[label] = lambda o, spec=spec: ours(src, spec, o, calib)
        paths, secs = {"fp32": src}, {"fp32": 0.0}
        for label, job in jobs.items():
            out = os.path.join(tmp, label.replace(" ", "_").replace("=", "").replace("+", "") + ".onnx")
            try:
                secs[label] = job(out)
                paths[label] = out
            except Exception as exc:  # noqa: BLE001 - report and go on
                msg = f"{name}: {label} failed: {type(exc).__name__}: {' '.join(str(exc).split())[:220]}"
                print(msg, flush=True)
                notes.append(msg)
        ref = outputs(src, test_feeds, args.threads, optimize=False)
        times = time_sessions(list(paths.values()), feeds[0], threads=args.threads, runs=args.runs,
                              rounds=args.rounds)
        med = {label: statistics.median(t) for label, t in zip(paths, times)}
        for label, path in paths.items():
            outs = outputs(path, test_feeds, args.threads)
            cos, snr = parity(ref, outs)
            acc = "-" if labels is None else f"{float((outs[0][0].argmax(-1) == labels).mean()):.4f}"
            vs_ort = f"{med[label] / med['ORT per-channel']:.3f}" if "ORT per-channel" in med else "-"
            rows.append([name, label, f"{cos:.6f}", f"{snr:.2f}", acc, f"{med[label] / med['fp32']:.3f}", vs_ort,
                         f"{size(path) / 1024:.0f}", f"{secs[label]:.2f}"])
            print(" | ".join(rows[-1]), flush=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leave no model copies behind
    text = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    text += "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    out = ROOT / "tools" / "results" / "quant_aids.md"
    out.write_text("# quantize-int8 accuracy aids vs onnxruntime quantize_static (QDQ, U8S8)\n\n"
                   f"{args.threads} threads, {args.rounds} interleaved rounds x {args.runs} runs; cosine/SNR/accuracy "
                   "on the held-out eval set where the model ships one, else on the calibration samples. "
                   "Latencies were taken on a shared, loaded 2-core machine: compare ratios only.\n\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
