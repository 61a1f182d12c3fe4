"""svd pass: plain vs whitened at the same ranks, on a BERT-style encoder and a digits CNN with a large head.

    python tools/bench_lowrank.py [--models bert_tiny digits_cnn_wide] [--runs 30] [--rounds 3]

Table 1, per model and setting (energy 0.90/0.95/0.99, plain vs whitened; ranks are read from the
whitened spectrum in both, ``rank_by=outputs``, so each plain/whitened pair has identical ranks, params
and MACs and differs only in the factors): layers factored, params ratio and MACs ratio
(onnxslim_kit.metrics.model_stats, via the report), onnxruntime latency ratio vs the original
(interleaved A, B, A, B, one session alive at a time, --threads, all calibration samples in one batch;
also vs the cleanup-only model, since every setting runs cleanup first), cosine vs the original of each output (final
output and pooled embedding), and held-out accuracy where the model has labels.

Then budget=0.5 and max_error=0.1, plain vs whitened: there each factorization has its own error
profile, so the ranks (and params/MACs) differ between the two.

Table 2: the factored layers alone: the original MatMul/Gemm/Conv vs its two factors at the ranks that
energy=0.95 chose, timed interleaved in onnxruntime on the layer's real input shape.

Table 3: the combined pipeline cleanup -> svd:energy=0.95 -> quantize-int8, one row per prefix, so
each pass's contribution to params, MACs, bytes, latency and parity shows; cleanup -> quantize-int8 is
the reference without the low-rank step. Each row ran through the default parity gate of its pipeline.

No other tool offers low-rank factorization of ONNX weights, so there is no third-party reference column.
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
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quantize import cosines, latencies  # noqa: E402
from bench_static_int8 import accuracy  # noqa: E402
from onnxslim_kit import api  # noqa: E402
from onnxslim_kit.calibration import input_specs, load_calibration  # noqa: E402
from onnxslim_kit.errors import ParityError  # noqa: E402
from onnxslim_kit.runtime import make_session  # noqa: E402

ENERGIES = (0.9, 0.95, 0.99)
SETTINGS = [f"svd:energy={e},rank_by=outputs,whiten={w}" for e in ENERGIES for w in ("false", "true")] + \
    [f"svd:{mode},whiten={w}" for mode in ("budget=0.5", "max_error=0.1") for w in ("false", "true")]
PIPELINES = [["cleanup"], ["cleanup", "svd:energy=0.95"], ["cleanup", "svd:energy=0.95", "quantize-int8"],
             ["cleanup", "quantize-int8"]]


def batch_feed(feeds) -> dict:
    """Every calibration sample in one batch: latency then measures the matrix work, not per-call overhead."""
    return {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}


def ratio(times: dict, a: str, b: str) -> str:
    """Latency of ``a`` over ``b``: median of the runs, and in brackets the ratio of the fastest runs (other
    jobs on a shared machine only ever add time, so the minimum is the least disturbed estimate)."""
    return f"{statistics.median(times[a]) / statistics.median(times[b]):.3f} ({min(times[a]) / min(times[b]):.3f})"


def _fmt_acc(acc):
    return f"{acc:.4f}" if acc is not None else "-"


def svd_table(name: str, src: str, calib: str, feeds, args, tmp: str) -> list[str]:
    paths, reports = {"original": src, "cleanup": os.path.join(tmp, "cleanup.onnx")}, {}
    api.optimize(src, passes=["cleanup"], calibration=calib, output=paths["cleanup"])
    for i, spec in enumerate(SETTINGS):
        out = os.path.join(tmp, f"s{i}.onnx")
        _, report = api.optimize(src, passes=["cleanup", spec], calibration=calib, output=out,
                                 tolerance={"cosine": 0.0})
        paths[spec], reports[spec] = out, report
    cos = cosines(src, paths, feeds, 2)
    times = latencies(paths, batch_feed(feeds), args.threads, args.runs, args.rounds)
    out_names = [o.name for o in onnx.load(src).graph.output]
    lines = [f"| {name} | original | - | 1.000 | 1.000 | 1.000 | {ratio(times, 'original', 'cleanup')} | "
             + " | ".join("1.00000" for _ in out_names) + f" | {_fmt_acc(accuracy(src, name))} |"]
    for spec in SETTINGS:
        rep = reports[spec]
        lines.append(f"| {name} | {spec.replace('svd:', '').replace(',rank_by=outputs', '')} | "
                     f"{rep.passes[1].stats.get('layers_factored', 0)} | "
                     f"{rep.after.params / rep.before.params:.3f} | {rep.after.macs / max(rep.before.macs, 1):.3f} | "
                     f"{ratio(times, spec, 'original')} | {ratio(times, spec, 'cleanup')} | "
                     + " | ".join(f"{c:.5f}" for c in cos[spec]) + f" | {_fmt_acc(accuracy(paths[spec], name))} |")
    return lines, out_names, paths[SETTINGS[3]]  # energy=0.95 whitened, for the layer table


def _observed_shapes(src: str, names: list[str], feed) -> dict[str, tuple]:
    proto = onnx.load(src)
    have = {o.name for o in proto.graph.output}
    for n in names:
        if n not in have:
            proto.graph.output.append(helper.make_empty_tensor_value_info(n))
    sess = make_session(proto, optimize=False)
    outs = sess.run(names, {k: v for k, v in feed.items() if k in {i.name for i in sess.get_inputs()}})
    return {n: o.shape for n, o in zip(names, outs)}


def layer_table(name: str, src: str, factored: str, feed, args, tmp: str) -> list[str]:
    """Each factored layer alone: original node vs its two factors, same input shape, interleaved."""
    orig = onnx.load(src)
    fact = onnx.load(factored)
    inits = {t.name: t for t in list(orig.graph.initializer) + list(fact.graph.initializer)}
    by_out_orig = {n.output[0]: n for n in orig.graph.node}
    rows = []
    seconds = [n for n in fact.graph.node if n.input and n.input[0].endswith("_lowrank") or
               any(i.endswith("_lowrank") for i in n.input)]
    firsts = {n.output[0]: n for n in fact.graph.node if n.output and n.output[0].endswith("_lowrank")}
    pairs = []
    for second in seconds:
        mid = next(i for i in second.input if i in firsts)
        first = firsts[mid]
        original = by_out_orig.get(second.output[0])
        if original is None:
            continue
        x = next(i for i in first.input if i not in inits)
        pairs.append((original, first, second, x))
    shapes = _observed_shapes(src, sorted({p[3] for p in pairs}), feed) if pairs else {}
    for k, (original, first, second, x) in enumerate(pairs):
        xshape = list(shapes[x])
        def single(nodes):
            used = {i for n in nodes for i in n.input if i in inits}
            g = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, xshape)],
                                  [helper.make_tensor_value_info(second.output[0], onnx.TensorProto.FLOAT, None)],
                                  initializer=[inits[u] for u in sorted(used)])
            m = helper.make_model(g, opset_imports=orig.opset_import)
            m.ir_version = min(orig.ir_version, 10)
            return m
        a = os.path.join(tmp, f"l{k}_orig.onnx")
        b = os.path.join(tmp, f"l{k}_pair.onnx")
        onnx.save(single([original]), a)
        onnx.save(single([first, second]), b)
        xfeed = {x: np.random.default_rng(0).standard_normal(xshape).astype(np.float32)}
        times = latencies({"orig": a, "pair": b}, xfeed, args.threads, args.runs * 3, args.rounds)
        w = [d for d in (list(inits[i].dims) for i in original.input[1:2] if i in inits)]
        fa = [list(inits[i].dims) for i in first.input if i in inits]
        fb = [list(inits[i].dims) for i in second.input[:2] if i in inits]
        rows.append(f"| {name} | {original.name} ({original.op_type}) | {xshape} | {w[0] if w else '-'} | "
                    f"{fa[0]} + {fb[0]} | {ratio(times, 'pair', 'orig')} |")
    return rows


def pipeline_table(name: str, src: str, calib: str, feeds, args, tmp: str, out_names) -> list[str]:
    paths, reports, gates = {"original": src}, {}, {}
    for i, passes in enumerate(PIPELINES):
        key = " -> ".join(passes)
        out = os.path.join(tmp, f"p{i}.onnx")
        try:
            _, report = api.optimize(src, passes=passes, calibration=calib, output=out)
            gates[key] = f"pass ({report.tolerance.describe()})"
        except ParityError as exc:
            _, report = api.optimize(src, passes=passes, calibration=calib, output=out, tolerance={"cosine": 0.0})
            gates[key] = f"FAIL: {exc}"
        paths[key], reports[key] = out, report
    cos = cosines(src, paths, feeds, 2)
    times = latencies(paths, batch_feed(feeds), args.threads, args.runs, args.rounds)
    lines = []
    for passes in PIPELINES:
        key = " -> ".join(passes)
        rep = reports[key]
        contrib = "; ".join(f"{r.name}: " + ", ".join(f"{k}={v}" for k, v in r.stats.items()
                                                       if k in ("nodes_removed", "layers_factored", "nodes_quantized"))
                            for r in rep.passes)
        lines.append(f"| {name} | {key} | {rep.after.params / rep.before.params:.3f} | "
                     f"{rep.after.macs / max(rep.before.macs, 1):.3f} | {rep.after.bytes / rep.before.bytes:.3f} | "
                     f"{ratio(times, key, 'original')} | " + " | ".join(f"{c:.5f}" for c in cos[key])
                     + f" | {_fmt_acc(accuracy(paths[key], name))} | {gates[key]} | {contrib} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bert_tiny", "digits_cnn_wide"])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="onnxruntime threads when timing (1: on a shared 2-core machine two threads were "
                             "descheduled so often that long runs were penalised more than short ones)")
    args = parser.parse_args(argv)
    t1 = ["| model | setting | layers | params ratio | MACs ratio | latency ratio median (min) | vs cleanup only | "
          "cosine out 1 | cosine out 2 | accuracy |", "|---|---|---|---|---|---|---|---|---|---|"]
    t2 = ["| model | layer | input shape | weight | factors | latency ratio pair / original, median (min) |",
          "|---|---|---|---|---|---|"]
    t3 = ["| model | pipeline | params ratio | MACs ratio | bytes ratio | latency ratio median (min) | cosine out 1 | "
          "cosine out 2 | "
          "accuracy | parity gate | per-pass contribution |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    outputs_of = {}
    for name in args.models:
        src = str(ROOT / "models" / f"{name}.onnx")
        calib = str(ROOT / "models" / f"{name}.calib.npz")
        feeds = list(load_calibration(calib, input_specs(onnx.load(src))))
        tmp = tempfile.mkdtemp(prefix=f"bench-svd-{name}-")
        rows, out_names, factored = svd_table(name, src, calib, feeds, args, tmp)
        outputs_of[name] = out_names
        t1 += rows
        print("\n".join(rows), flush=True)
        rows = layer_table(name, src, factored, batch_feed(feeds), args, tmp)
        t2 += rows
        print("\n".join(rows), flush=True)
        rows = pipeline_table(name, src, calib, feeds, args, tmp, out_names)
        t3 += rows
        print("\n".join(rows), flush=True)
    legend = "; ".join(f"{m}: out 1 = {o[0]}, out 2 = {o[1] if len(o) > 1 else '-'}" for m, o in outputs_of.items())
    text = ("# svd: plain vs whitened at the same ranks\n\n"
            f"Measured by `python tools/bench_lowrank.py` (2-core machine shared with other jobs: latency ratios come\n"
            f"from interleaved runs, onnxruntime with {args.threads} thread(s), absolute times are not reported). "
            "Outputs: " + legend + ".\n\n"
            + "\n".join(t1) + "\n\n## Factored layers alone (energy=0.95, whitened ranks)\n\n" + "\n".join(t2)
            + "\n\n## Combined pipelines (default parity gates)\n\n" + "\n".join(t3) + "\n")
    (ROOT / "tools" / "results" / "lowrank.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
