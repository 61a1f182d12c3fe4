"""The accuracy-aware search (`optimize --target accuracy_drop=...`) vs every single technique applied
uniformly, on the same data, in one run.

    python tools/bench_auto.py [--models digits_cnn mobilenetv2_digits bert_tiny] [--drop 0.01] [--runs 20]

Per model, the data is split (seeded; `--splits N` repeats with seeds 0..N-1): the search (and every calibrated uniform variant) sees the
search share only; every number in the table is measured on the held-out share, which nothing saw:

- digits_cnn, mobilenetv2_digits: models/<name>.eval.npz (images + labels) split in halves; metric top1
  against the labels; the held-out column is accuracy;
- bert_tiny: models/bert_tiny.calib.npz split in halves (no labels); metric cosine (drop 0.01 means
  every output's cosine vs the original >= 0.99); the held-out column is the smallest output cosine.

Variants: the original (after nothing), the search's plan, and uniform int8 (quantize-int8), int4
weights (quantize-weights:bits=4), prune-channels at several ratios, svd at several energies, each
after cleanup. Columns: size on disk, MACs (unknown where MatMulNBits nodes are not counted), latency
(onnxruntime CPU, 2 threads, batch 1, variants interleaved A,B,C,... over rounds, one session alive at
a time; per round each variant's median run / the original's, then the median over rounds), held-out metric and drop. Then: the best uniform variant at the same accuracy (held-out
drop within the target) by size and by latency, vs the plan, as ratios plan / uniform. That choice
uses the held-out data (an oracle the search does not have); the summary also makes it the search's way,
from the search share alone (cross-fitted halves, the same top1 margin), and lists the uniform variants
that are both smaller and faster than the plan. Results go to
tools/results/auto_compression.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quantize import md_table  # noqa: E402
from bench_static_int8 import eval_set, paired  # noqa: E402
from onnxslim_kit import api  # noqa: E402
from onnxslim_kit.metrics import model_stats  # noqa: E402
from onnxslim_kit.runtime import run_feeds, time_sessions  # noqa: E402
from onnxslim_kit.search import confidence_z, search, top1_margin  # noqa: E402
from onnxslim_kit.usermetric import parse_metric, top1_discordant  # noqa: E402

# The search with every default technique under each objective: balanced (the default: leaves out what
# makes the model slower here) and size (MACs + bytes whatever the latency).
SEARCHES = {"search plan": (None, "balanced"), "search plan (objective latency)": (None, "latency"),
            "search plan (objective size)": (None, "size")}
UNIFORM = ["quantize-int8", "quantize-weights:bits=4", "prune-channels:ratio=0.25", "prune-channels:ratio=0.5",
           "prune-channels:ratio=0.75", "svd:energy=0.8", "svd:energy=0.9", "svd:energy=0.95", "svd:energy=0.99"]


def split_data(name: str, seed: int = 0):
    """(search calibration dict, search labels, held-out feeds, held-out labels, metric, batch_size)."""
    feeds, labels = eval_set(name)
    if labels is not None:
        data = feeds[0]
        n = len(labels)
        perm = np.random.default_rng(seed).permutation(n)
        a, b = np.sort(perm[: n // 2]), np.sort(perm[n // 2:])
        search_cal = {k: v[a] for k, v in data.items()}
        held = [{k: v[b[i:i + 30]] for k, v in data.items()} for i in range(0, len(b), 30)]
        return search_cal, labels[a], held, labels[b], "top1", 30
    data = dict(np.load(ROOT / "models" / f"{name}.calib.npz"))
    n = len(next(iter(data.values())))
    perm = np.random.default_rng(seed).permutation(n)
    a, b = np.sort(perm[: n // 2]), np.sort(perm[n // 2:])
    search_cal = {k: v[a] for k, v in data.items()}
    held = [{k: v[i:i + 1] for k, v in data.items()} for i in b]
    return search_cal, None, held, None, "cosine", None


def run(proto, feeds, optimize=True):
    return run_feeds(proto, feeds, optimize=optimize, threads=2)


def bench_model(name: str, drop: float, runs: int, rounds: int, workers: int, confidence: float = 0.95,
                objective: str | None = None, split: int = 0) -> tuple[list[list[str]], list[str], list[list[str]]]:
    src = str(ROOT / "models" / f"{name}.onnx")
    original = onnx.load(src)
    cal, labels, held, held_labels, metric, batch = split_data(name, seed=split)
    scorer = parse_metric(metric)
    variants: dict[str, onnx.ModelProto] = {"original": original}
    results, search_s = {}, {}
    searches = SEARCHES if objective is None else {"search plan": (None, objective)}
    for label, (techniques, goal) in searches.items():
        t0 = time.perf_counter()
        results[label] = search(src, cal, target=f"accuracy_drop={drop}", metric=metric, labels=labels,
                                workers=workers, batch_size=batch, techniques=techniques, confidence=confidence,
                                objective=goal)
        search_s[label] = time.perf_counter() - t0
        variants[label] = results[label].model
    build_s = {}
    for spec in UNIFORM:
        t0 = time.perf_counter()
        try:
            proto, _ = api.optimize(src, passes=["cleanup", spec], calibration=cal, batch_size=batch, check="off")
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"{name}: {spec} failed: {type(exc).__name__}: {exc}")
            continue
        build_s[spec] = time.perf_counter() - t0
        variants[f"uniform {spec}"] = proto
    ref = run(original, held, optimize=False)
    base = scorer.baseline(ref, held_labels)
    first = {k: v[:1] for k, v in held[0].items()}
    names = list(variants)
    times = time_sessions([variants[k] for k in names], first, threads=2, runs=runs, warmup=3, rounds=rounds)
    # Per round, each variant's median run against the original's in the same round; the median of those
    # ratios over rounds (a burst of load hits both sides of a ratio), times the original's median.
    med = paired(dict(zip(names, times)), rounds, base="original")
    orig_stats = model_stats(original)
    rows, info = [], {}
    for k in names:
        proto = variants[k]
        st = model_stats(proto)
        score = scorer.score(run(proto, held), ref, held_labels)
        macs_known = not [u for u in st.unresolved if u not in orig_stats.unresolved]
        info[k] = dict(size=proto.ByteSize(), macs=st.macs if macs_known else None, lat=med[k], drop=base - score,
                       score=score)
        rows.append([name, k, f"{proto.ByteSize() / 1024:.1f}", f"{proto.ByteSize() / original.ByteSize():.3f}",
                     f"{st.macs / orig_stats.macs:.3f}" if macs_known else "unknown",
                     f"{med[k] * 1e3:.3f}", f"{med[k] / med['original']:.3f}", f"{score:.4f}", f"{base - score:+.4f}",
                     "yes" if base - score <= drop + 1e-12 else "no"])
    notes, summary = [], []
    for label, result in results.items():
        notes.append(f"{name}: {label}: search {search_s[label]:.1f}s, {result.verifications} verification(s), "
                     f"{len(result.plan)} change(s) ({', '.join(sorted({e.technique for e in result.plan})) or 'none'}); "
                     f"search-data drop {result.search_drop:+.4f} ({result.search_samples} samples, cross-fitted halves; "
                     f"the returned model fitted on {result.fit_samples}), held-out drop {info[label]['drop']:+.4f} "
                     f"({sum(len(next(iter(f.values()))) for f in held)} samples); metric {metric}"
                     + ("; latency probe: " + ", ".join(f"{k} {v:.3f}x" if v is not None else f"{k} n/a"
                                                       for k, v in result.probe.items())
                        + (f"; not used (probe, speed repair or polish): {', '.join(result.excluded)}" if result.excluded else "")
                        if result.probe else ""))
    ok = [k for k in names if k.startswith("uniform") and info[k]["drop"] <= drop + 1e-12]
    # The same choice made without the held-out data, by the search's own rule: a uniform variant
    # qualifies when its drop on the search share (plus the top1 prediction margin) is within the target,
    # scored cross-fitted as the search scores its plans (fitted on one half of the search share, scored
    # on the other, both ways), since a calibrated pass scored on its own calibration data looks better.
    rows_per = batch or 1
    n_search = len(next(iter(cal.values())))
    s_feeds = [{k: v[i:i + rows_per] for k, v in cal.items()} for i in range(0, n_search, rows_per)]
    half = len(s_feeds) // 2
    halves = (s_feeds[:half], s_feeds[half:])
    s_order = halves[1] + halves[0]
    s_labels = (np.concatenate([labels[half * rows_per:], labels[:half * rows_per]]) if labels is not None else None)
    s_ref = run(original, s_order)
    s_base = scorer.baseline(s_ref, s_labels)
    z = confidence_z(confidence)
    ok_search = []
    for k in names:
        if not k.startswith("uniform"):
            continue
        spec = k.removeprefix("uniform ")
        outs = []
        for fit, score_on in ((halves[0], halves[1]), (halves[1], halves[0])):
            fit_cal = {key: np.concatenate([f[key] for f in fit]) for key in cal}
            proto, _ = api.optimize(src, passes=["cleanup", spec], calibration=fit_cal, batch_size=batch, check="off")
            outs += run(proto, score_on)
        margin = top1_margin(z, *top1_discordant(outs, s_ref, s_labels)) if metric == "top1" and z else 0.0
        if max(s_base - scorer.score(outs, s_ref, s_labels), 0.0) + margin <= drop + 1e-12:
            ok_search.append(k)
    if not ok:
        notes.append(f"{name}: no uniform variant meets held-out drop <= {drop}")
    def searched(qualified: list[str], plan: dict) -> str:
        """The smallest and the fastest uniform variant chosen on the search data, their held-out drops,
        and whether the plan is smaller / faster than them."""
        if not qualified:
            return "none qualifies"
        small = min(qualified, key=lambda k: info[k]["size"])
        fast = min(qualified, key=lambda k: info[k]["lat"])
        return (f"smallest {small.removeprefix('uniform ')} ({info[small]['size'] / info['original']['size']:.3f}x, "
                f"held-out {info[small]['drop']:+.4f}): plan {'smaller' if plan['size'] <= info[small]['size'] else 'NOT smaller'}; "
                f"fastest {fast.removeprefix('uniform ')} ({info[fast]['lat'] / info['original']['lat']:.3f}x, "
                f"held-out {info[fast]['drop']:+.4f}): plan {'faster' if plan['lat'] <= info[fast]['lat'] else 'NOT faster'}")

    for label in results:
        if not ok:
            break
        plan = info[label]
        by_size = min(ok, key=lambda k: info[k]["size"])
        by_lat = min(ok, key=lambda k: info[k]["lat"])
        for which, k in (("smallest", by_size), ("fastest", by_lat)):
            u = info[k]
            macs = (f"{plan['macs'] / u['macs']:.3f}" if plan["macs"] is not None and u["macs"] is not None
                    else "unknown")
            notes.append(f"{name}: {label} vs the best uniform variant at the same accuracy ({which}) = {k}: "
                         f"plan/uniform size {plan['size'] / u['size']:.3f}, latency {plan['lat'] / u['lat']:.3f}, "
                         f"MACs {macs}; held-out drop plan {plan['drop']:+.4f} vs {u['drop']:+.4f}")
        verdict = []
        if plan["size"] > info[by_size]["size"]:
            verdict.append("NOT smaller than the smallest uniform variant")
        if plan["lat"] > info[by_lat]["lat"]:
            verdict.append("NOT faster than the fastest uniform variant")
        if plan["drop"] > drop + 1e-12:
            verdict.append("does NOT meet the target on held-out data")
        notes.append(f"{name}: {label}: " + ("; ".join(verdict) if verdict else
                                             "smaller and faster than the best uniform variants, within the target"))
        summary.append([name, str(split), label, f"{plan['size'] / info['original']['size']:.3f}",
                        f"{plan['lat'] / info['original']['lat']:.3f}", f"{plan['drop']:+.4f}",
                        "yes" if plan["drop"] <= drop + 1e-12 else "no",
                        f"{by_size} {info[by_size]['size'] / info['original']['size']:.3f}",
                        f"{by_lat} {info[by_lat]['lat'] / info['original']['lat']:.3f}",
                        "yes" if plan["size"] <= info[by_size]["size"] else "no",
                        "yes" if plan["lat"] <= info[by_lat]["lat"] else "no",
                        ", ".join(k.removeprefix("uniform ") for k in ok
                                  if info[k]["size"] < plan["size"] and info[k]["lat"] < plan["lat"]) or "none",
                        searched(ok_search, plan)])
    return rows, notes, summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits_cnn", "mobilenetv2_digits", "bert_tiny"])
    parser.add_argument("--drop", type=float, default=0.01)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", default="auto_compression.md", help="file name under tools/results/")
    parser.add_argument("--confidence", type=float, default=0.95, help="search confidence (top1 margin)")
    parser.add_argument("--objective", default=None, choices=["balanced", "latency", "size"],
                        help="run only this search objective (default: all three)")
    parser.add_argument("--splits", type=int, default=1,
                        help="repeat with this many seeded search / held-out splits (seeds 0..N-1); the full "
                             "table is split 0's, the summary has every split")
    args = parser.parse_args(argv)
    rows, notes, summary = [], [], []
    for name in args.models:
        for split in range(args.splits):
            r, n, sm = bench_model(name, args.drop, args.runs, args.rounds, args.workers, args.confidence,
                                   args.objective, split)
            if split == 0:
                rows += r
            notes += [f"(split {split}) {x}" for x in n]
            summary += sm
            print("\n".join(" | ".join(x) for x in r))
            print("\n".join(n), flush=True)
    header = ["model", "variant", "KiB", "size x", "MACs x", "median ms", "latency x", "held-out metric",
              "held-out drop", "meets target"]
    text = md_table(header, rows) + "\n"
    sheader = ["model", "split", "search", "size x", "latency x", "held-out drop", "meets target",
               "smallest uniform at the same accuracy (size x)", "fastest uniform at the same accuracy (latency x)",
               "plan smaller", "plan faster", "uniform variants at the same accuracy both smaller and faster",
               "uniform variants chosen on the search data by the search's rule (no held-out data)"]
    tally = []
    for label in dict.fromkeys(r[2] for r in summary):
        mine = [r for r in summary if r[2] == label]
        n = len(mine)
        tally.append([label, f"{sum(r[6] == 'yes' for r in mine)}/{n}",
                      f"{sum(r[6] == 'yes' and r[9] == 'yes' and r[10] == 'yes' for r in mine)}/{n}",
                      f"{sum(r[11] == 'none' for r in mine)}/{n}",
                      f"{sum(r[6] == 'yes' and r[11] == 'none' for r in mine)}/{n}",
                      f"{sum(r[6] == 'yes' and 'plan smaller' in r[12] and 'plan faster' in r[12] for r in mine)}/{n}"])
    text += ("Over every model and split:\n\n" + md_table(
        ["search", "held-out target met", "met, and smaller than the smallest AND faster than the fastest uniform "
         "variant at the same accuracy", "no uniform variant at the same accuracy both smaller and faster",
         "met and not dominated", "met, and smaller than the smallest AND faster than the fastest uniform variant "
         "chosen by the search's rule"], tally) + "\n")
    text += (f"Every split (seeded search / held-out halves; the uniform variants qualify on the held-out drop "
             f"<= {args.drop}):\n\n" + md_table(sheader, summary) + "\n")
    text += "\n".join(f"- {n}" for n in notes) + "\n"
    out = ROOT / "tools" / "results" / args.out
    out.write_text(f"# search (--target accuracy_drop={args.drop}, --confidence {args.confidence}, --objective "
                   f"{args.objective or 'balanced, latency and size'}) vs single "
                   f"techniques applied uniformly\n\n"
                   f"Held-out data only (never seen by the search or the calibrated passes). Latency: 2 threads, "
                   f"batch 1, {args.rounds} interleaved rounds x {args.runs} runs, per-round ratios to the original; "
                   f"compare ratios within a model, not absolute ms.\n\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
