"""prune-channels on the shipped models: with and without reconstruction, side by side with the original.

    python tools/bench_prune.py [--models resnet_tiny ...] [--ratio 0.3] [--criterion l1] [--runs 30] [--rounds 3]

Calibration uses the first half of each model's calibration samples; parity is measured on the other
half (held out: reconstruction fits the calibration half, so measuring there would flatter it), and on
models/digits_cnn.eval.npz for the digits CNN's accuracy. Prints per model and setting: groups pruned,
MACs ratio, params ratio, onnxruntime latency ratio (2 threads, one session alive at a time, interleaved
rounds, the held-out samples as one batch; baseline: the original after `cleanup`), held-out min cosine and top-1 agreement of the outputs,
and accuracy where the model has labels. No other ONNX tool prunes channels, so there is no reference
column: the baseline is the same pruning without reconstruction.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quantize import latencies, outputs, size  # noqa: E402
from bench_static_int8 import accuracy  # noqa: E402
from onnxslim_kit import api  # noqa: E402
from onnxslim_kit.calibration import input_specs, load_calibration  # noqa: E402

DEFAULT_MODELS = ["resnet_tiny", "mobilenetv2_tiny", "mobilenetv3_tiny", "det_head_tiny", "digits_cnn", "bert_tiny"]


def split_calibration(name: str, tmp: str) -> tuple[str, str]:
    data = np.load(ROOT / "models" / f"{name}.calib.npz")
    n = next(iter(data.values())).shape[0]
    fit, held = os.path.join(tmp, "fit.npz"), os.path.join(tmp, "held.npz")
    np.savez(fit, **{k: v[: n // 2] for k, v in data.items()})
    np.savez(held, **{k: v[n // 2:] for k, v in data.items()})
    return fit, held


def parity(reference: str, candidate: str, feeds) -> tuple[float, float | None]:
    ref, cand = outputs(reference, feeds, 2, optimize=False), outputs(candidate, feeds, 2)
    cos, agree = [], []
    for r, c in zip(ref, cand):
        for a, b in zip(r, c):
            a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
            cos.append(float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64) + 1e-30)))
            if a.ndim == 2 and a.shape[1] > 1:
                agree.append(float(np.mean(a.argmax(1) == b.argmax(1))))
    return min(cos), (float(np.mean(agree)) if agree else None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--criterion", default="l1")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads for the latency runs")
    parser.add_argument("--weights", action="store_true", help="also the prune-weights table (size, parity)")
    args = parser.parse_args(argv)
    settings = {f"reconstruct={r}": f"prune-channels:ratio={args.ratio},criterion={args.criterion},reconstruct={r}"
                for r in ("false", "true")}
    lines = ["| model | setting | groups pruned | MACs ratio | params ratio | latency ratio | held-out min cosine "
             "| top-1 agreement | accuracy | checker |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in args.models:
        src = str(ROOT / "models" / f"{name}.onnx")
        tmp = tempfile.mkdtemp(prefix=f"bench-prune-{name}-")
        fit, held = split_calibration(name, tmp)
        held_feeds = list(load_calibration(held, input_specs(onnx.load(src, load_external_data=False))))
        base = os.path.join(tmp, "base.onnx")
        _, base_rep = api.optimize(src, passes=["cleanup"], calibration=fit, output=base)
        paths, reports = {"original (cleanup)": base}, {}
        for label, spec in settings.items():
            out = os.path.join(tmp, f"{label}.onnx")
            _, reports[label] = api.optimize(src, passes=["cleanup", spec], calibration=fit, output=out,
                                             tolerance={"cosine": 0.0})
            paths[label] = out
        batch = {k: np.concatenate([f[k] for f in held_feeds]) for k in held_feeds[0]}  # compute, not call overhead
        times = latencies(paths, batch, args.threads, args.runs, args.rounds)
        t0 = statistics.median(times["original (cleanup)"])
        acc0 = accuracy(src, name)
        lines.append(f"| {name} | original (cleanup) | - | 1.000 | 1.000 | 1.000 | 1.00000 | 1.000 | "
                     f"{f'{acc0:.4f}' if acc0 is not None else '-'} | ok |")
        for label in settings:
            rep = reports[label]
            cos, agree = parity(src, paths[label], held_feeds)
            acc = accuracy(paths[label], name)
            try:
                onnx.checker.check_model(paths[label], full_check=True)
                checked = "ok"
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                checked = f"FAILED: {exc}"
            lines.append(
                f"| {name} | {label} | {int(rep.passes[1].stats.get('groups_pruned', 0))}/"
                f"{int(rep.passes[1].stats.get('groups', 0))} | {rep.after.macs / max(base_rep.after.macs, 1):.3f} | "
                f"{rep.after.params / base_rep.after.params:.3f} | {statistics.median(times[label]) / t0:.3f} | "
                f"{cos:.5f} | {f'{agree:.3f}' if agree is not None else '-'} | "
                f"{f'{acc:.4f}' if acc is not None else '-'} | {checked} |")
        print("\n".join(lines[-3:]), flush=True)
    text = (f"# prune-channels ratio={args.ratio} criterion={args.criterion}: reconstruction off vs on\n\n"
            f"`python tools/bench_prune.py --ratio {args.ratio} --criterion {args.criterion} --threads {args.threads} "
            f"--runs {args.runs} --rounds {args.rounds}{' --weights' if args.weights else ''}`\n\n" + "\n".join(lines) + "\n")
    if args.weights:
        text += "\n" + weights_table(args.models)
    (ROOT / "tools" / "results" / f"prune_{args.criterion}_{args.ratio}.md").write_text(text)
    return 0


WEIGHT_SETTINGS = ["prune-weights:sparsity=0.5", "prune-weights:sparsity=0.5,criterion=stability",
                   "prune-weights:pattern=2:4", "prune-weights:pattern=2:4,criterion=stability",
                   "prune-weights:sparsity=0.8,sparse_storage=true",
                   "prune-weights:sparsity=0.8,criterion=stability,sparse_storage=true"]


def weights_table(models) -> str:
    """prune-weights: size on disk and held-out parity (no latency column: onnxruntime has no sparse CPU
    kernels, so zeroed weights run at the same speed)."""
    lines = ["## prune-weights (size, not speed)", "",
             "| model | setting | sparsity | size ratio | held-out min cosine | accuracy |", "|---|---|---|---|---|---|"]
    for name in models:
        src = str(ROOT / "models" / f"{name}.onnx")
        tmp = tempfile.mkdtemp(prefix=f"bench-prunew-{name}-")
        fit, held = split_calibration(name, tmp)
        held_feeds = list(load_calibration(held, input_specs(onnx.load(src, load_external_data=False))))
        base = os.path.join(tmp, "base.onnx")
        api.optimize(src, passes=["cleanup"], calibration=fit, output=base)
        for i, spec in enumerate(WEIGHT_SETTINGS):
            out = os.path.join(tmp, f"{i}.onnx")
            _, rep = api.optimize(src, passes=["cleanup", spec], calibration=fit, output=out, tolerance={"cosine": 0.0})
            cos, _ = parity(src, out, held_feeds)
            acc = accuracy(out, name)
            lines.append(f"| {name} | {spec.split(':', 1)[1]} | {rep.passes[1].stats.get('sparsity', 0):.2f} | "
                         f"{size(out) / size(base):.3f} | {cos:.5f} | {f'{acc:.4f}' if acc is not None else '-'} |")
        print("\n".join(lines[-len(WEIGHT_SETTINGS):]), flush=True)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
