"""Side by side: onnxslim-kit's weight quantization passes vs onnxruntime.quantization, same model, same data.

    python tools/bench_quantize.py [--model models/bert_tiny.onnx] [--runs 30] [--rounds 5]

Variants: fp32; ours `quantize-dynamic` vs onnxruntime `quantize_dynamic(per_channel=True)`; ours
`quantize-weights` (int4, block 32) vs onnxruntime `MatMulNBitsQuantizer` (int4, block 32). For each:
onnxruntime CPU latency (2 threads, median over interleaved rounds, one session alive at a time), size
on disk, cosine / max abs error of every output vs fp32 on the shipped calibration samples, and the
tool's run time; with ratios ours/theirs. `ours int4 gptq` is `quantize-weights:gptq=true`, fitted on
the first half of the calibration feeds only; an extra line compares it with round-to-nearest on the
held-out second half. (Static int8 QDQ is not compared yet: quantize-int8 does not
exist.)
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

from onnxslim_kit import api  # noqa: E402
from onnxslim_kit.calibration import input_specs, load_calibration  # noqa: E402
from onnxslim_kit.runtime import make_session, time_sessions  # noqa: E402


def _ours(src, passes, out, calib):
    t0 = time.perf_counter()
    api.optimize(src, passes=passes, calibration=calib, output=out, tolerance={"cosine": 0.9})
    return time.perf_counter() - t0


def _ort_dynamic(src, out):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t0 = time.perf_counter()
    quantize_dynamic(src, out, per_channel=True, weight_type=QuantType.QInt8)
    return time.perf_counter() - t0


def _ort_nbits(src, out):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    t0 = time.perf_counter()
    q = MatMulNBitsQuantizer(onnx.load(src), block_size=32, is_symmetric=True, accuracy_level=4)
    q.process()
    q.model.save_model_to_file(out, use_external_data_format=False)
    return time.perf_counter() - t0


def size(path):
    return os.path.getsize(path) + (os.path.getsize(path + ".data") if os.path.exists(path + ".data") else 0)


def outputs(path, feeds, threads, optimize=True):
    sess = make_session(path, optimize=optimize, threads=threads)
    try:
        return [sess.run(None, f) for f in feeds]
    finally:
        del sess


def _paired(reference: str, variants: dict[str, str], feeds, threads):
    """(variant name, [(reference, variant) float64 arrays per output, all feeds concatenated]); the
    reference runs unoptimized."""
    ref_out = outputs(reference, feeds, threads, optimize=False)
    for name, path in variants.items():
        outs = outputs(path, feeds, threads)
        yield name, [(np.concatenate([r[k].reshape(-1) for r in ref_out]).astype(np.float64),
                      np.concatenate([o[k].reshape(-1) for o in outs]).astype(np.float64))
                     for k in range(len(ref_out[0]))]


def cosines(reference: str, variants: dict[str, str], feeds, threads) -> dict[str, list[float]]:
    """Per-output cosine of each variant vs the reference, over all feeds."""
    return {name: [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in pairs]
            for name, pairs in _paired(reference, variants, feeds, threads)}


def snrs(reference: str, variants: dict[str, str], feeds, threads) -> dict[str, list[float]]:
    """Per-output SNR (dB) of each variant vs the reference, over all feeds."""
    def snr(a, b):
        err = float(((a - b) ** 2).sum())
        return float("inf") if err == 0 else 10 * np.log10(float((a ** 2).sum()) / err)

    return {name: [snr(a, b) for a, b in pairs] for name, pairs in _paired(reference, variants, feeds, threads)}


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    text = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    return text + "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"


def latencies(variants: dict[str, str], feed, threads: int, runs: int, rounds: int) -> dict[str, list[float]]:
    """Interleaved rounds, one session alive at a time (onnxslim_kit.runtime.time_sessions)."""
    times = time_sessions(list(variants.values()), feed, threads=threads, runs=runs, rounds=rounds)
    return dict(zip(variants, times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "bert_tiny.onnx"))
    parser.add_argument("--calib", default=None)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    src = args.model
    calib = args.calib or str(Path(src).with_suffix("")) + ".calib.npz"
    tmp = tempfile.mkdtemp(prefix="bench-quantize-")
    all_feeds = list(load_calibration(calib, input_specs(onnx.load(src))))
    fit_feeds, held_out = all_feeds[:len(all_feeds) // 2], all_feeds[len(all_feeds) // 2:]
    variants = {"fp32": (src, 0.0)}
    jobs = [
        ("ours dynamic int8", lambda o: _ours(src, ["cleanup", "quantize-dynamic"], o, calib)),
        ("ORT quantize_dynamic per-channel", lambda o: _ort_dynamic(src, o)),
        ("ours int4 weights", lambda o: _ours(src, ["cleanup", "quantize-weights:bits=4,block_size=32"], o, calib)),
        ("ORT MatMulNBits int4", lambda o: _ort_nbits(src, o)),
        ("ours int4 gptq", lambda o: _ours(src, ["cleanup", "quantize-weights:bits=4,block_size=32,gptq=true"], o,
                                           fit_feeds)),
    ]
    for i, (name, job) in enumerate(jobs):
        out = os.path.join(tmp, f"v{i}.onnx")
        try:
            variants[name] = (out, job(out))
        except Exception as exc:  # noqa: BLE001 - a benchmark reports and goes on
            print(f"{name}: failed: {type(exc).__name__}: {exc}")
    ref_proto = onnx.load(src)
    feeds = list(load_calibration(calib, input_specs(ref_proto)))
    accuracy = cosines(src, {k: v[0] for k, v in variants.items()}, feeds, args.threads)
    times = latencies({k: v[0] for k, v in variants.items()}, feeds[0], args.threads, args.runs, args.rounds)
    base = statistics.median(times["fp32"])
    out_names = [o.name for o in ref_proto.graph.output]
    print(f"model {src}; {len(feeds)} calibration feeds; {args.threads} threads; "
          f"{args.rounds} interleaved rounds x {args.runs} runs")
    print(f"{'variant':36s} {'median ms':>10s} {'vs fp32':>8s} {'size KiB':>9s} "
          + " ".join(f"{'cos ' + n[:14]:>20s}" for n in out_names) + f" {'tool s':>7s}")
    for name, (path, secs) in variants.items():
        med = statistics.median(times[name])
        print(f"{name:36s} {med * 1e3:10.3f} {med / base:8.3f} {size(path) / 1024:9.0f} "
              + " ".join(f"{c:20.5f}" for c in accuracy[name]) + f" {secs:7.2f}")
    for ours, theirs in (("ours dynamic int8", "ORT quantize_dynamic per-channel"),
                         ("ours int4 weights", "ORT MatMulNBits int4")):
        if ours in variants and theirs in variants:
            lat = statistics.median(times[ours]) / statistics.median(times[theirs])
            print(f"ratio {ours} / {theirs}: latency {lat:.3f}, size {size(variants[ours][0]) / size(variants[theirs][0]):.3f}, "
                  f"tool time {variants[ours][1] / max(variants[theirs][1], 1e-9):.2f}, "
                  f"cosine {' '.join(f'{a:.5f}/{b:.5f}' for a, b in zip(accuracy[ours], accuracy[theirs]))}")
    if "ours int4 gptq" in variants and "ours int4 weights" in variants and held_out:
        split = cosines(src, {k: variants[k][0] for k in ("ours int4 weights", "ours int4 gptq")}, held_out,
                        args.threads)
        gap = " ".join(f"{1 - g:.6f}/{1 - r:.6f}={(1 - g) / max(1 - r, 1e-12):.3f}"
                       for g, r in zip(split["ours int4 gptq"], split["ours int4 weights"]))
        print(f"held-out ({len(held_out)} feeds not used by gptq): cosine rtn "
              f"{' '.join(f'{c:.5f}' for c in split['ours int4 weights'])}, gptq "
              f"{' '.join(f'{c:.5f}' for c in split['ours int4 gptq'])}; 1-cos gptq/rtn {gap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
