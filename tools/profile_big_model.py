"""Peak RSS of each stage of ``onnxslim_kit.optimize`` on one model (sampled every 20 ms).

    python tools/profile_big_model.py /tmp/bigbench/0.5gb_h2048/big.onnx [-p quantize-weights] [--hidden 2048]

tracemalloc does not see numpy's or onnxruntime's native memory, so this samples VmRSS from
/proc/self/status in a thread and attributes each sample to the stage running at that moment: reference
session build (make_session), reference outputs, loading, the pass pipeline, the save and the
candidate check (the check runs inside the save, on the atomic-save copy). Writes OUT next to MODEL
as prof_out.onnx (removed afterwards). Linux only.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from onnxslim_kit import api, ir, parity, pipeline, runtime  # noqa: E402
from onnxslim_kit.errors import ParityError  # noqa: E402


def _rss_mb() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("-p", "--pass", dest="passes", action="append", default=None)
    parser.add_argument("--hidden", type=int, default=2048)
    args = parser.parse_args(argv)
    stage, peaks = ["start"], {}

    def sample():
        while True:
            peaks[stage[0]] = max(peaks.get(stage[0], 0), _rss_mb())
            time.sleep(0.02)

    def labelled(fn, label):
        def inner(*a, **k):
            prev, stage[0] = stage[0], label
            try:
                return fn(*a, **k)
            finally:
                stage[0] = prev
        return inner

    runtime.make_session = labelled(runtime.make_session, "session build")
    parity.make_session = runtime.make_session
    ref_outputs = parity.ParityChecker.reference_outputs.fget
    parity.ParityChecker.reference_outputs = property(labelled(ref_outputs, "reference outputs"))
    parity.ParityChecker.check = labelled(parity.ParityChecker.check, "candidate check")
    pipeline.Pipeline.run = labelled(pipeline.Pipeline.run, "passes")
    ir.Model.save = labelled(ir.Model.save, "save")
    ir.Model.load = labelled(ir.Model.load, "load")
    api.model_stats = labelled(api.model_stats, "stats")
    threading.Thread(target=sample, daemon=True).start()
    out = os.path.join(os.path.dirname(os.path.abspath(args.model)), "prof_out.onnx")
    start = time.perf_counter()
    outcome = "written"
    try:
        api.optimize(args.model, passes=args.passes, output=out, input_shapes=[f"x:1,8,{args.hidden}"])
    except ParityError as exc:
        outcome = f"not written: {exc}"
    finally:
        stage[0] = "after"
        time.sleep(0.1)
        for name in (out, out + ".data"):
            if os.path.exists(name):
                os.remove(name)
    weights = os.path.getsize(args.model + ".data") / 1e6 if os.path.exists(args.model + ".data") else 0
    print(f"{time.perf_counter() - start:.1f} s ({outcome}); weights {weights:.0f} MB; peak RSS MB by stage:")
    for name, mb in peaks.items():
        print(f"  {name:18s} {mb:6d}" + (f"  ({mb / weights:.2f}x weights)" if weights else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
