"""svd pass: plain vs whitened at several energies, on the BERT-style encoder and the digits CNN.

    python tools/bench_lowrank.py [--runs 30] [--rounds 3]

Prints, per model and setting: layers factored, params ratio and MACs ratio (from the report),
onnxruntime latency ratio vs the original (interleaved, one session alive at a time), min cosine of the
outputs vs the original on the calibration samples, and held-out accuracy where the model has labels.
No other tool offers low-rank factorization of ONNX weights, so there is no reference column.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quantize import cosines, latencies  # noqa: E402
from bench_static_int8 import accuracy  # noqa: E402
from onnxslim_kit import api  # noqa: E402
from onnxslim_kit.calibration import input_specs, load_calibration  # noqa: E402

SETTINGS = [f"svd:energy={e},whiten={w}" for e in (0.9, 0.95, 0.99) for w in ("false", "true")] + \
    ["svd:rank_ratio=0.25,whiten=false", "svd:rank_ratio=0.25,whiten=true", "svd:rank_ratio=0.25,whiten=true,refit=true"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bert_tiny", "digits_cnn"])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    lines = ["| model | setting | layers | params ratio | MACs ratio | latency ratio | min cosine | accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    for name in args.models:
        src = str(ROOT / "models" / f"{name}.onnx")
        calib = str(ROOT / "models" / f"{name}.calib.npz")
        feeds = list(load_calibration(calib, input_specs(onnx.load(src))))
        tmp = tempfile.mkdtemp(prefix=f"bench-svd-{name}-")
        paths, reports = {"original": src}, {}
        for i, spec in enumerate(SETTINGS):
            out = os.path.join(tmp, f"{i}.onnx")
            _, report = api.optimize(src, passes=["cleanup", spec.replace("svd:", "svd:min_size=1024,")],
                                     calibration=calib, output=out, tolerance={"cosine": 0.0})
            paths[spec], reports[spec] = out, report
        cos = cosines(src, paths, feeds, 2)
        times = latencies(paths, feeds[0], 2, args.runs, args.rounds)
        base = statistics.median(times["original"])
        acc0 = accuracy(src, name)
        lines.append(f"| {name} | original | - | 1.000 | 1.000 | 1.000 | 1.00000 | {acc0 if acc0 is not None else '-'} |")
        for spec in SETTINGS:
            rep = reports[spec]
            acc = accuracy(paths[spec], name)
            lines.append(f"| {name} | {spec} | {rep.passes[1].stats.get('layers_factored', 0)} | "
                         f"{rep.after.params / rep.before.params:.3f} | {rep.after.macs / max(rep.before.macs, 1):.3f} | "
                         f"{statistics.median(times[spec]) / base:.3f} | {min(cos[spec]):.5f} | "
                         f"{f'{acc:.4f}' if acc is not None else '-'} |")
        print("\n".join(lines[-(len(SETTINGS) + 1):]), flush=True)
    text = "# svd: plain vs whitened\n\n" + "\n".join(lines) + "\n"
    (ROOT / "tools" / "results" / "lowrank.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
