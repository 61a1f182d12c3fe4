"""Side by side: onnxslim-kit `quantize-int8` vs onnxruntime's fastest static recipe on this CPU
(quant_pre_process + quantize_static, QDQ, per-channel, uint8 activations / int8 weights), same models,
same calibration samples.

    python tools/bench_static_int8.py [--models resnet_tiny mobilenetv2_tiny ...] [--runs 30] [--rounds 5]

Prints per model: latency (onnxruntime CPU, 2 threads, interleaved rounds, one session alive at a time; each
variant's per-round median vs fp32's in the same round, median over rounds) of fp32 / ours / ORT, size, cosine and top-1 agreement vs fp32 on the calibration samples,
held-out accuracy where the model ships labels (digits CNN), tool run time, and ratios ours/ORT.
"""

from __future__ import annotations

import argparse
import os
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

from bench_quantize import cosines, latencies, md_table, outputs, size, snrs  # noqa: E402
from onnxslim_kit import api  # noqa: E402
from onnxslim_kit.calibration import input_specs, load_calibration  # noqa: E402
from onnxslim_kit.runtime import paired_ratio, round_medians  # noqa: E402

DEFAULT_MODELS = ["resnet_tiny", "mobilenetv2_tiny", "mobilenetv3_tiny", "digits_cnn", "det_head_tiny",
                  "bert_tiny", "paddle_style_opset11"]


def ours(src, out, calib):
    t0 = time.perf_counter()
    api.optimize(src, passes=["cleanup", "quantize-int8"], calibration=calib, output=out,
                 tolerance={"cosine": 0.9})
    return time.perf_counter() - t0


def ort_static(src, out, feeds, tmp, *, per_channel: bool = True, method: str = "MinMax",
               preprocess: bool = True):
    """onnxruntime's static QDQ recipe (U8S8), after quant_pre_process unless ``preprocess`` is false;
    the one copy the quantization benchmarks share. Returns the tool's run time."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    t0 = time.perf_counter()
    pre = os.path.join(tmp, "pre.onnx")
    cwd = os.getcwd()
    os.chdir(tmp)  # quant_pre_process leaves files in the working directory when it fails (FIELD-NOTES 3)
    try:
        model_in = src
        if preprocess:
            try:
                quant_pre_process(src, pre)
                model_in = pre
            except Exception:  # noqa: BLE001 - the reference's own pre-processing fails on some models
                pass
        quantize_static(model_in, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method))
    finally:
        os.chdir(cwd)
    return time.perf_counter() - t0


def top1(reference, path, feeds):
    a = outputs(reference, feeds, 2, optimize=False)
    b = outputs(path, feeds, 2)
    agree = [float(np.mean(np.argmax(x[0], -1) == np.argmax(y[0], -1))) for x, y in zip(a, b)]
    return float(np.mean(agree))


def eval_set(name, default_feeds=None):
    """(feeds, labels) of models/<name>.eval.npz as one batch; (default_feeds, None) when there is none."""
    data_path = ROOT / "models" / f"{name}.eval.npz"
    if not data_path.exists():
        return default_feeds, None
    data = np.load(data_path)
    labels = data["labels"] if "labels" in data.files else None
    return [{k: data[k] for k in data.files if k != "labels"}], labels


def accuracy(path, name):
    feeds, labels = eval_set(name)
    if labels is None:
        return None
    pred = outputs(path, feeds, 2)[0][0].argmax(-1)
    return float((pred == labels).mean())


def batched(paths: dict[str, str], feed: dict, args) -> dict[str, float] | None:
    """Median latency at batch ``args.batch`` (the first sample repeated), when every input's batch dim
    is dynamic; None otherwise."""
    if args.batch <= 1:
        return None
    model = onnx.load(paths["fp32"], load_external_data=False)
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            return None
    big = {k: np.repeat(v[:1], args.batch, axis=0) for k, v in feed.items()}
    times = latencies(paths, big, args.threads, max(5, args.runs // 3), args.rounds)
    return paired(times, args.rounds) | head_to_head(times, args.rounds)


def head_to_head(times: dict[str, list[float]], rounds: int) -> dict[str, float]:
    """ours / ORT paired per round directly (not a ratio of two ratios to fp32)."""
    return {"ours/ORT": paired_ratio(times["ours"], times["ORT"], rounds)} if "ours" in times and "ORT" in times else {}


def paired(times: dict[str, list[float]], rounds: int, base: str = "fp32") -> dict[str, float]:
    """Per variant: the ``base`` variant's median round x the variant's paired per-round ratio to it
    (onnxslim_kit.runtime.paired_ratio), so every ratio in the table is a same-round comparison."""
    median = statistics.median(round_medians(times[base], rounds))
    return {k: median * paired_ratio(v, times[base], rounds) for k, v in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tool-repeats", type=int, default=5,
                        help="alternated runs of each tool per model for the tool-time column (median)")
    parser.add_argument("--batch", type=int, default=8,
                        help="also time fp32/ours/ORT at this batch size (dynamic-batch models; 0: skip)")
    args = parser.parse_args(argv)
    rows = []
    notes = []
    # Warm-up: both tools once on a throwaway copy, so neither tool's first-call costs (imports,
    # onnxruntime's quantization modules) land on the first model's tool time.
    warm = tempfile.mkdtemp(prefix="bench-int8-warmup-")
    wsrc, wcal = str(ROOT / "models" / "digits_cnn.onnx"), str(ROOT / "models" / "digits_cnn.calib.npz")
    ours(wsrc, os.path.join(warm, "ours.onnx"), wcal)
    ort_static(wsrc, os.path.join(warm, "ort.onnx"), list(load_calibration(wcal, input_specs(onnx.load(wsrc)))), warm)
    for name in args.models:
        src = str(ROOT / "models" / f"{name}.onnx")
        calib = str(ROOT / "models" / f"{name}.calib.npz")
        feeds = list(load_calibration(calib, input_specs(onnx.load(src))))
        tmp = tempfile.mkdtemp(prefix=f"bench-int8-{name}-")
        paths = {"fp32": src}
        secs = {}
        jobs = [("ours", lambda o: ours(src, o, calib)), ("ORT", lambda o: ort_static(src, o, feeds, tmp))]
        for label, job in jobs:
            out = os.path.join(tmp, f"{label}.onnx")
            try:
                secs[label] = job(out)
                outputs(out, feeds[:1], args.threads)  # the result must load and run
                paths[label] = out
            except Exception as exc:  # noqa: BLE001 - report and go on
                msg = f"{name}: {label} failed: {type(exc).__name__}: {' '.join(str(exc).split())[:220]}"
                print(msg)
                notes.append(msg)
                if label == "ORT":  # its per-channel output is invalid below opset 13: its per-tensor flavour
                    try:
                        secs[label] = ort_static(src, out, feeds, tmp, per_channel=False)
                        outputs(out, feeds[:1], args.threads)
                        paths[label] = out
                        notes.append(f"{name}: ORT row = quantize_static per_channel=False (per-channel failed)")
                    except Exception as exc2:  # noqa: BLE001
                        notes.append(f"{name}: ORT per-tensor failed too: {type(exc2).__name__}")
        # Tool time: the first run above warmed this model's files and caches; then the tools alternate
        # (ours, ORT, ours, ORT, ...) and each keeps its median, so one load spike does not decide it.
        per_channel = not any(n.startswith(f"{name}: ORT row = quantize_static per_channel=False") for n in notes)
        runs_s: dict[str, list[float]] = {label: [] for label in secs if label in paths}
        for _ in range(args.tool_repeats):
            for label in runs_s:
                out = os.path.join(tmp, f"{label}.onnx")
                runs_s[label].append(ours(src, out, calib) if label == "ours" else
                                     ort_static(src, out, feeds, tmp, per_channel=per_channel))
        secs.update({label: statistics.median(v) for label, v in runs_s.items() if v})
        cos = cosines(src, paths, feeds, args.threads)
        snr = snrs(src, paths, feeds, args.threads)
        times = latencies(paths, feeds[0], args.threads, args.runs, args.rounds)
        med = paired(times, args.rounds) | head_to_head(times, args.rounds)
        med_b = batched(paths, feeds[0], args)
        for label in paths:
            rows.append([name, label, f"{med[label] * 1e3:.3f}", f"{med[label] / med['fp32']:.3f}",
                         f"{med_b[label] / med_b['fp32']:.3f}" if med_b else "-",
                         f"{size(paths[label]) / 1024:.0f}", f"{min(cos[label]):.5f}", f"{min(snr[label]):.2f}",
                         f"{top1(src, paths[label], feeds):.3f}" if label != "fp32" else "1.000",
                         (f"{accuracy(paths[label], name):.4f}" if accuracy(paths[label], name) is not None else "-"),
                         f"{secs.get(label, 0):.2f}"])
        if "ours" in paths and "ORT" in paths:
            rows.append([name, "ratio ours/ORT", f"{med['ours/ORT']:.3f}", "",
                         f"{med_b['ours/ORT']:.3f}" if med_b else "-",
                         f"{size(paths['ours']) / size(paths['ORT']):.3f}", "", "", "", "",
                         f"{secs['ours'] / secs['ORT']:.2f}"])
        print("\n".join(" | ".join(r) for r in rows[-(len(paths) + 1):]), flush=True)
    header = ["model", "variant", "median ms", "vs fp32", f"batch {args.batch} vs fp32", "KiB", "min cosine",
              "min SNR dB", "top-1 agree", "accuracy", "tool s"]
    text = md_table(header, rows)
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    out = ROOT / "tools" / "results" / "static_int8_vs_ort.md"
    out.write_text(f"# quantize-int8 vs onnxruntime quantize_static (QDQ, per-channel, U8S8)\n\n"
                   f"{args.threads} threads, {args.rounds} interleaved rounds x {args.runs} runs, batch 1 (and "
                   f"batch {args.batch} where the batch dim is dynamic: ratio column); tool time: after one "
                   f"warm-up run of each tool, the median of {args.tool_repeats} alternated runs per model\n\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
