"""Peak memory and time of ``onnxslim-kit optimize`` on transformer-shaped models with external data.

    python tools/bench_big_model.py /tmp/bigbench --gb 0.5 1 2.2 --passes cleanup quantize-weights svd \
        [--hidden 2048] [--tolerance cosine=0.95]

For each size, builds OUT_DIR/<gb>/big.onnx(+.data) with tools/make_big_model.py (kept for reuse),
then runs, one at a time, for each pass:

    /usr/bin/time -v python -m onnxslim_kit optimize big.onnx -o out.onnx -p PASS --input-shape x:1,8,H -q

and prints one markdown row per run: weights (GiB), pass, exit code, wall seconds, peak RSS (GB, from
/usr/bin/time's "Maximum resident set size", which counts file-mapped pages too), peak / weights,
and the files written next to out.onnx. A run is skipped when MemAvailable is below 2.5x the weights
+ 1 GB (the machine is shared). Outputs are deleted after each run; the inputs are kept.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mem_available() -> int:
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def build(folder: str, gb: float, hidden: int) -> int:
    data = os.path.join(folder, "big.onnx.data")
    if not os.path.exists(os.path.join(folder, "big.onnx")):
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_big_model.py"), folder, "--gb", str(gb),
                        "--hidden", str(hidden)], check=True)
    return os.path.getsize(data)


def run(model: str, out: str, spec: str, hidden: int, extra: list[str]) -> tuple[list[str], int, float, int, str]:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "onnxslim_kit", "optimize", model, "-o", out, "-p", spec,
           "--input-shape", f"x:1,8,{hidden}", "-q", *extra]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    text = proc.stderr
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) * 1024
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1)
    seconds = 0.0
    for part in wall.split(":"):
        seconds = seconds * 60 + float(part)
    status = re.search(r"Exit status: (\d+)", text)
    rc = int(status.group(1)) if status else proc.returncode
    err = "" if rc == 0 else " ".join(line for line in text.splitlines() if line.startswith("error"))[:200]
    return cmd, rc, seconds, rss, err


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--gb", type=float, nargs="+", default=[0.5, 1.0, 2.2])
    parser.add_argument("--passes", nargs="+", default=["cleanup", "quantize-weights", "svd"])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--tolerance", action="append", default=[],
                        help="KEY=VALUE passed to optimize --tolerance (random weights over many layers)")
    args = parser.parse_args(argv)
    rows = []
    print("| weights GiB | pass | exit | seconds | peak RSS GB | peak / weights | written |")
    print("|---|---|---|---|---|---|---|")
    for gb in args.gb:
        folder = os.path.join(args.out_dir, f"{gb:g}gb_h{args.hidden}")
        weights = build(folder, gb, args.hidden)
        for spec in args.passes:
            need = 2.5 * weights + 2**30
            if mem_available() < need:
                print(f"| {weights / 2**30:.2f} | {spec} | skipped: MemAvailable {mem_available() / 1e9:.1f} GB "
                      f"< {need / 1e9:.1f} GB | | | | |", flush=True)
                continue
            out = os.path.join(folder, "out.onnx")
            extra = [a for t in args.tolerance for a in ("--tolerance", t)]
            cmd, rc, seconds, rss, err = run(os.path.join(folder, "big.onnx"), out, spec, args.hidden, extra)
            written = sorted(f for f in os.listdir(folder) if f.startswith("out.onnx"))
            sizes = ", ".join(f"{f} {os.path.getsize(os.path.join(folder, f)) / 2**20:.1f} MiB" for f in written)
            print(f"| {weights / 2**30:.2f} | {spec} | {rc}{' ' + err if err else ''} | {seconds:.1f} | "
                  f"{rss / 1e9:.2f} | {rss / weights:.2f} | {sizes or 'nothing'} |", flush=True)
            rows.append((gb, spec, " ".join(cmd[2:])))
            for f in written:
                os.remove(os.path.join(folder, f))
            time.sleep(1)
    print("\ncommands (run from the repository root, PYTHONPATH=.):")
    for _, _, cmd in rows:
        print("  /usr/bin/time -v " + cmd.replace(sys.executable, "python"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
