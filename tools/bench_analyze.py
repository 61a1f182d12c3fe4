"""Wall time of ``analyze`` (default techniques): 1 worker (inline) vs 2 local workers vs the default
(no worker count) vs Ray.

    python tools/bench_analyze.py [--repeats 2] [--no-ray] [--out tools/results/analyze_workers.md]

Models: resnet_tiny (20 Conv + Gemm) and mobilenetv2_tiny (28 Conv + Gemm), and digits_cnn (4 Conv +
Gemm, a small model) with their shipped calibration samples. Variants run interleaved (w1, w2,
default, ray, w1, ...) in this one process, each a full ``analyze`` call (pool start-up included;
Ray's ``ray.init(address="local", num_cpus=2)`` happens once before the first run and is reported separately).
Prints every run, the median per variant, the ratios against 1 worker, the CPU seconds used by
this process and its pool workers (not Ray's workers), the 1-minute load average before each run,
and whether every variant gave the same evaluations (JSON minus timing fields). Ray needs
``pip install -e ".[ray]"``; without it (or with --no-ray) the Ray variant is left out.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxslim_kit.analyze import analyze  # noqa: E402

MODELS = ("resnet_tiny", "mobilenetv2_tiny", "digits_cnn")


def _rows(report) -> list[dict]:
    return report.to_dict(run_details=False)["evaluations"]


def _load() -> float:
    return os.getloadavg()[0]


def _cpu() -> float:
    """User + system CPU seconds of this process and its reaped children (the pool's workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "tools" / "results" / "analyze_workers.md"))
    args = parser.parse_args(argv)

    variants = [("1 worker", {"workers": 1}), ("2 workers", {"workers": 2}), ("default", {})]
    ray_note = "not run (--no-ray)" if args.no_ray else "not installed"
    if not args.no_ray:
        try:
            import ray
        except ImportError:
            ray = None
        if ray is not None:
            t0 = time.perf_counter()
            ray.init(address="local", num_cpus=2, include_dashboard=False)  # a new local instance
            ray_note = f"ray {ray.__version__}, ray.init(num_cpus=2) took {time.perf_counter() - t0:.1f}s (not counted)"
            variants.append(("ray (2 cpus)", {"executor": "ray"}))
    print(f"cpus: {os.cpu_count()}; {ray_note}", flush=True)

    # Untimed warm-up: the first analyze in a process imports every pass module.
    analyze(str(ROOT / "models" / "digits_cnn.onnx"), str(ROOT / "models" / "digits_cnn.calib.npz"), workers=1)
    lines = ["# analyze wall time: 1 worker vs 2 workers vs default vs Ray", "",
             f"`python tools/bench_analyze.py --repeats {args.repeats}` on {os.cpu_count()} CPUs, default techniques, "
             f"each model's calib.npz; variants interleaved; every run a full analyze call (pool start-up "
             f"included). Ray: {ray_note}.", "",
             "| model | variant | runs (s) | median s | vs 1 worker | CPU s (median) "
             "| load avg (1 min) before each run |",
             "|---|---|---|---|---|---|---|"]
    for name in args.models:
        model = str(ROOT / "models" / f"{name}.onnx")
        calib = str(ROOT / "models" / f"{name}.calib.npz")
        times: dict[str, list[float]] = {v: [] for v, _ in variants}
        loads: dict[str, list[float]] = {v: [] for v, _ in variants}
        cpu: dict[str, list[float]] = {v: [] for v, _ in variants}
        rows: dict[str, list[dict]] = {}
        evaluations = 0
        for rep in range(args.repeats):
            for label, kwargs in variants:
                loads[label].append(_load())
                t0, c0 = time.perf_counter(), _cpu()
                report = analyze(model, calib, **kwargs)
                times[label].append(time.perf_counter() - t0)
                cpu[label].append(_cpu() - c0)
                evaluations = len(report.evaluations)
                rows.setdefault(label, _rows(report))
                same = _rows(report) == rows[variants[0][0]] if variants[0][0] in rows else True
                print(f"{name} {label:13s} run {rep + 1}: {times[label][-1]:6.2f}s  cpu {cpu[label][-1]:6.2f}s  "
                      f"load {loads[label][-1]:.2f}"
                      f"  ({evaluations} evaluations, same as 1 worker: {same})", flush=True)
        base = statistics.median(times[variants[0][0]])
        identical = all(r == rows[variants[0][0]] for r in rows.values())
        for label, _ in variants:
            med = statistics.median(times[label])
            print(f"{name} {label:13s} median {med:6.2f}s  ratio vs 1 worker {med / base:.3f}", flush=True)
            lines.append(f"| {name} ({evaluations} evaluations) | {label} | "
                         f"{', '.join(f'{t:.1f}' for t in times[label])} | {med:.1f} | {med / base:.2f}x | "
                         f"{statistics.median(cpu[label]):.1f}{' (driver only)' if 'ray' in label else ''} | "
                         f"{', '.join(f'{x:.1f}' for x in loads[label])} |")
        print(f"{name}: every variant gave identical evaluations: {identical}", flush=True)
        lines.append(f"| {name} | identical evaluations in every variant | {identical} | | | | |")
    lines += ["", "Taken on a 2-core machine shared with other agents' jobs: absolute times are noisy; compare "
              "the ratios within one run. The load average includes this benchmark's own processes (the "
              "previous run's). default = no worker count: inline for 1 s, then a pool of one worker per CPU "
              "when the rest is estimated at >= 3 s."]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
