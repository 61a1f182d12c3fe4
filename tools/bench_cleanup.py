"""Side by side: onnxslim-kit's default pipeline (cleanup) vs onnxslim, on the same models and data.

    python tools/bench_cleanup.py [--out tools/results/cleanup_vs_onnxslim.md]

Models: every model in models/ (with its shipped calibration samples) and the model graphs shipped
with the onnx package under onnx/backend/test/data/light (seeded random inputs). For each model:
node counts (before / ours / onnxslim), parity of each result against the original in onnxruntime
(max abs error over the same inputs), and each tool's run time, with ratios ours/onnxslim.
Needs the tools extra (onnxslim): pip install -e ".[tools]".
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
import re
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxslim_kit import api  # noqa: E402
from onnxslim_kit.calibration import input_specs, load_calibration  # noqa: E402
from onnxslim_kit.ir import load_proto  # noqa: E402
from onnxslim_kit.parity import ParityChecker  # noqa: E402
from onnxslim_kit.pass_base import EXACT  # noqa: E402


ONNXSLIM_ALIKE = ["freeze-initializer-inputs",
                  "cleanup:max_bytes=4000000000,max_expand_bytes=4000000000"]


def _cases():
    for path in sorted(glob.glob(str(ROOT / "models" / "*.onnx"))):
        name = Path(path).stem
        calib = ROOT / "models" / f"{name}.calib.npz"
        if not calib.exists():  # exporter/opset variants share their base model's samples
            calib = ROOT / "models" / (re.sub(r"_(opset\d+|dynamo)$", "", name) + ".calib.npz")
        yield name, path, str(calib) if calib.exists() else None
    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    for path in sorted(light.glob("*.onnx")):
        yield path.stem, str(path), None


def _max_abs(report) -> float:
    return max((m.max_abs for m in report.outputs), default=float("nan"))


def main(argv=None) -> int:
    import onnxslim

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "tools" / "results" / "cleanup_vs_onnxslim.md"))
    parser.add_argument("--samples", type=int, default=4, help="random samples where no calibration file exists")
    args = parser.parse_args(argv)
    rows = []
    failures = 0
    not_more = not_more_alike = 0
    for name, path, calib in _cases():
        proto = load_proto(path)
        nodes = len(proto.graph.node)
        data = load_calibration(calib, input_specs(proto), num_samples=args.samples, seed=0, max_samples=8)
        checker = ParityChecker(proto, data)
        t0 = time.perf_counter()
        try:
            ours, _ = api.optimize(proto, calibration=data, check="off")
            ours_err = None
        except Exception as exc:  # noqa: BLE001 - a benchmark reports every failure and goes on
            ours, ours_err = None, f"{type(exc).__name__}: {exc}"
        t_ours = time.perf_counter() - t0
        # onnxslim's assumptions: initializer inputs are constants, and every constant is folded
        # whatever it costs in file size. Ours does that only when asked.
        try:
            alike, _ = api.optimize(proto, calibration=data, check="off", passes=ONNXSLIM_ALIKE)
            n_alike = len(alike.graph.node)
        except Exception as exc:  # noqa: BLE001
            n_alike = f"error: {type(exc).__name__}"
        t0 = time.perf_counter()
        try:
            theirs = onnxslim.slim(onnx.load(path))
            theirs_err = None
        except Exception as exc:  # noqa: BLE001
            theirs, theirs_err = None, f"{type(exc).__name__}: {str(exc)[:80]}"
        t_theirs = time.perf_counter() - t0
        ours_par = checker.check(ours, EXACT) if ours is not None else None
        theirs_par = checker.check(theirs, EXACT) if theirs is not None else None
        n_ours = len(ours.graph.node) if ours is not None else None
        n_theirs = len(theirs.graph.node) if theirs is not None else None
        ok = ours_par is not None and ours_par.ok
        failures += not ok
        if n_ours is not None and (n_theirs is None or n_ours <= n_theirs):
            not_more += 1
        if isinstance(n_alike, int) and (n_theirs is None or n_alike <= n_theirs):
            not_more_alike += 1
        rows.append([name, nodes, n_ours if n_ours is not None else f"error: {ours_err}", n_alike,
                     n_theirs if n_theirs is not None else f"error: {theirs_err}",
                     f"{_max_abs(ours_par):.2e}" + ("" if ok else " FAIL") if ours_par else "-",
                     (f"{_max_abs(theirs_par):.2e}" + ("" if theirs_par.ok else " FAIL")) if theirs_par else "-",
                     f"{t_ours:.2f}", f"{t_theirs:.2f}", f"{t_ours / t_theirs:.2f}" if t_theirs else "-"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    header = ["model", "nodes", "ours", "ours (frozen inputs, unlimited folding)", "onnxslim", "ours max abs", "onnxslim max abs", "ours s", "onnxslim s",
              "time ratio"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    summary = (f"{not_more}/{len(rows)} models where ours (defaults) has <= onnxslim's node count, "
               f"{not_more_alike}/{len(rows)} with onnxslim's assumptions (initializer inputs frozen, "
               f"unlimited folding); "
               f"{failures} parity failure(s) of ours (max abs > 1e-4 + 1e-4*|ref|)")
    text = "\n".join(lines) + "\n\n" + summary + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    Path(args.out).write_text(f"# cleanup vs onnxslim {onnxslim.__version__}\n\n" + text)
    print(summary)
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
