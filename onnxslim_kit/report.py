"""The optimization report: a dataclass with a JSON form and plain-text terminal tables."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .metrics import ModelStats
from .pass_base import Tolerance


@dataclass
class Report:
    source: str
    output: str | None
    before: ModelStats
    after: ModelStats | None
    passes: list                       # list[pipeline.PassRecord]
    parity: Any = None                 # parity.ParityReport | None
    locate: Any = None                 # parity.LocateResult | None
    tolerance: Tolerance | None = None
    check: str = "end"
    calibration_source: str = ""
    calibration_is_random: bool = True
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    written: bool = False

    @property
    def ok(self) -> bool:
        return self.parity is None or bool(self.parity.ok)

    def to_dict(self) -> dict[str, Any]:
        return _clean({
            "source": self.source,
            "output": self.output,
            "written": self.written,
            "ok": self.ok,
            "check": self.check,
            "tolerance": self.tolerance.to_dict() if self.tolerance else None,
            "calibration": {"source": self.calibration_source, "random": self.calibration_is_random},
            "before": self.before.to_dict(),
            "after": self.after.to_dict() if self.after else None,
            "passes": [p.to_dict() for p in self.passes],
            "parity": self.parity.to_dict() if self.parity is not None else None,
            "locate": self.locate.to_dict() if self.locate is not None else None,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
        })

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False)
        if path is not None:
            from .ir import atomic_write_text

            atomic_write_text(path, text + "\n")
        return text


def _clean(value: Any) -> Any:
    """JSON-safe: no NaN/inf literals (written as strings), tuples as lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _clean(value.item())
    return value


# ----------------------------------------------------------------------------------------------
# terminal rendering
# ----------------------------------------------------------------------------------------------

def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if n and _numeric(c) else c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _numeric(text: str) -> bool:
    return bool(text) and (text[0].isdigit() or text[0] in "-+.") and any(ch.isdigit() for ch in text)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3e}"
        return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def human_count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _ratio(after: float, before: float) -> str:
    return f"{after / before:.3f}x" if before else "-"


def render_stats(stats: ModelStats) -> str:
    rows = [["nodes", stats.nodes], ["params", human_count(stats.params)], ["MACs", human_count(stats.macs)],
            ["size", human_bytes(stats.bytes)], ["opset", stats.opset]]
    out = [table(["metric", "value"], rows)]
    out.append("")
    out.append(table(["op", "count"], [[op, n] for op, n in sorted(stats.op_histogram.items(), key=lambda x: -x[1])]))
    if stats.inputs:
        out.append("")
        out.append(table(["input", "shape"], [[k, v] for k, v in stats.inputs.items()]))
    if stats.assumed_shapes:
        out.append(f"MACs assume {', '.join(f'{k}={v}' for k, v in stats.assumed_shapes.items())} "
                   f"(pin with --input-shape)")
    if stats.unresolved:
        out.append(f"MACs unknown for {len(stats.unresolved)} node(s): {', '.join(stats.unresolved[:5])}")
    return "\n".join(out)


def render_parity(parity) -> str:
    rows = [[m.name, m.max_abs, m.max_rel, m.cosine, m.snr_db, m.top1, "ok" if m.ok else f"FAIL: {m.reason}"]
            for m in parity.outputs]
    text = table(["output", "max abs", "max rel", "cosine", "SNR dB", "top-1", "status"], rows)
    head = f"parity ({parity.tolerance.describe()}; {parity.num_batches} batch(es) of {parity.data_source})"
    if getattr(parity, "error", None):
        text += f"\nerror: {parity.error}"
    return head + "\n" + text


def render(report: Report, *, max_skips: int = 5) -> str:
    parts = []
    b, a = report.before, report.after
    if a is not None:
        rows = [["nodes", b.nodes, a.nodes, _ratio(a.nodes, b.nodes)],
                ["params", human_count(b.params), human_count(a.params), _ratio(a.params, b.params)],
                ["MACs", human_count(b.macs), human_count(a.macs), _ratio(a.macs, b.macs)],
                ["size", human_bytes(b.bytes), human_bytes(a.bytes), _ratio(a.bytes, b.bytes)]]
        parts.append(table(["", "before", "after", "ratio"], rows))
        ops = sorted(set(b.op_histogram) | set(a.op_histogram))
        changed = [[op, b.op_histogram.get(op, 0), a.op_histogram.get(op, 0)] for op in ops
                   if b.op_histogram.get(op, 0) != a.op_histogram.get(op, 0)]
        if changed:
            parts.append(table(["op", "before", "after"], changed))
    if report.passes:
        rows = []
        for rec in report.passes:
            key_stats = ", ".join(f"{k}={_fmt(v)}" for k, v in rec.stats.items()
                                  if v and k not in ("nodes_before", "nodes_after", "rounds"))[:90]
            rows.append([rec.name, rec.modified, f"{rec.nodes_before}->{rec.nodes_after}", key_stats or "-",
                         len(rec.skipped), f"{rec.seconds:.2f}s", "ROLLED BACK" if rec.rolled_back else ""])
        parts.append(table(["pass", "modified", "nodes", "stats", "skipped", "time", ""], rows))
        skip_lines = []
        for rec in report.passes:
            for cand, reason in rec.skipped[:max_skips]:
                skip_lines.append(f"  {rec.name}: {cand}: {reason}")
            if len(rec.skipped) > max_skips:
                skip_lines.append(f"  {rec.name}: ... and {len(rec.skipped) - max_skips} more (see --report)")
        if skip_lines:
            parts.append("left unchanged:\n" + "\n".join(skip_lines))
    if report.parity is not None:
        parts.append(render_parity(report.parity))
    if report.locate is not None:
        parts.append(f"first divergence: {report.locate.summary()}")
    for w in report.warnings:
        parts.append(f"warning: {w}")
    status = "written to " + report.output if report.written else ("not written" if report.output else "")
    parts.append(f"{'OK' if report.ok else 'PARITY FAILED'} in {report.seconds:.2f}s" + (f"; {status}" if status else ""))
    return "\n\n".join(parts)


def render_analysis(report, *, top: int | None = None) -> str:
    """Per-layer sensitivity table, best trade first (damage per fraction saved), then skipped rows."""
    rows, skipped = [], []
    metric = next((e.metric for e in report.evaluations if e.metric), None)
    for e in report.ranked():
        if e.status != "ok":
            skipped.append(f"  {e.technique} {e.layer}: {e.status}: {e.reason}")
            continue
        row = [e.technique, e.layer, e.op, e.damage, e.cosine, e.snr_db, f"{100 * e.macs_saved_fraction:.1f}%",
               human_count(e.params_saved), human_bytes(e.bytes_saved), e.score]
        if report.latency:
            row.insert(9, e.latency_ratio)
        if metric:
            row += [e.metric_drop, e.measured_on]
        rows.append(row)
    shown = rows[:top] if top else rows
    headers = ["technique", "layer", "op", "damage", "cosine", "snr dB", "MACs saved", "params saved",
               "bytes saved", "damage/saved"]
    if report.latency:
        headers.insert(9, "latency x")
    if metric:
        headers += [f"{metric} drop", "measured on"]
    lines = [f"{report.source}: {len(report.evaluations)} evaluation(s) ({report.computed} computed, "
             f"{report.reused} from the cache) on {report.calibration_source}, "
             f"{f'{report.workers} worker(s)' if report.executor == 'local' else report.executor}, "
             f"{report.seconds:.1f}s",
             "damage = 1 - min cosine over the outputs vs the original; damage/saved = damage per fraction of "
             "the baseline's MACs saved (bytes where no MACs are saved); lower is a better trade", ""]
    lines.append(table(headers, shown) if shown else "(no layer was changed by any technique)")
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more row(s) (see --json)")
    if skipped:
        lines.append("")
        lines.append(f"not evaluated ({len(skipped)}):")
        lines.extend(skipped)
    for w in report.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def render_search(result) -> str:
    """The plan (one row per layer and technique) and the verified result of a search."""
    rows = [[e.layer, e.op, e.technique, e.predicted_drop, e.damage, f"{100 * e.macs_saved_fraction:.1f}%",
             human_bytes(e.bytes_saved)] for e in result.plan]
    lines = [f"search: target {result.target.describe()}, metric {result.metric}; {result.candidates} candidate(s) "
             f"from {len(result.analysis.evaluations) if result.analysis else 0} evaluation(s); "
             f"{result.verifications} end-to-end verification(s); {result.seconds:.1f}s", ""]
    for t, ratio in result.probe.items():
        lines.append(f"latency probe: {t}, every candidate layer at once: "
                     + (f"{ratio:.3f}x the original" if ratio is not None else "does not build uniformly, not timed")
                     + (f" -> not used: {result.excluded[t]}" if t in result.excluded else ""))
    for t, drop in result.group_drops.items():
        lines.append(f"whole group: {t}, every candidate layer at once: measured drop {drop:.4g}"
                     + (" -> taken whole" if t in result.groups_taken else ""))
    if result.probe or result.group_drops:
        lines.append("")
    lines.append(table(["layer", "op", "technique", "predicted drop", "damage", "MACs saved", "bytes saved"], rows)
                 if rows else "(empty plan: cleanup only)")
    lines.append("")
    for step in result.steps:
        lines.append(f"  verify {step.action}: {step.entries} change(s), drop {step.search_drop:.6g}"
                     + (f" + margin {step.margin:.4g}" if step.margin else "") + f", size "
                     f"{step.size_ratio:.4f}x" + (f", latency {step.latency_ratio:.3f}x" if step.latency_ratio else "")
                     + (" (met)" if step.met else " (not met)"))
    macs = f"{result.macs_ratio:.4f}x" if result.macs_ratio is not None else "unknown"
    lines.append(f"result: {result.message}")
    lines.append(f"  {result.metric} on the search data ({result.search_samples} sample(s)): original "
                 f"{result.baseline_score:.6g}, result {result.search_score:.6g}, drop {result.search_drop:.6g}")
    if result.holdout_drop is not None:
        lines.append(f"  {result.metric} on held-out data ({result.holdout_samples} sample(s), not seen by the "
                     f"search): original {result.holdout_baseline:.6g}, result {result.holdout_score:.6g}, drop "
                     f"{result.holdout_drop:.6g}")
    lines.append(f"  size {human_bytes(result.original['bytes'])} -> {human_bytes(result.result['bytes'])} "
                 f"({result.size_ratio:.4f}x), MACs {macs}"
                 + (f", latency {result.latency_ratio:.3f}x" if result.latency_ratio is not None else ""))
    if result.recipe_path:
        if result.recipe_calibration:  # the feeds stacked into one array per input: every one has rows
            rows_per_feed = {len(next(iter(f.values()))) for f in result.fit_feeds if f}
            batch = f" --batch-size {rows_per_feed.pop()}" if len(rows_per_feed) == 1 and 1 not in rows_per_feed else ""
            lines.append(f"recipe: {result.recipe_path}; replay: onnxslim-kit optimize {result.source} -o OUT "
                         f"--recipe {result.recipe_path} --calib {result.recipe_calibration}{batch}")
        else:
            why = ("the search ran on seeded random data" if result.fit_is_random else
                   "its calibration feeds do not stack into one .npz")
            lines.append(f"recipe: {result.recipe_path} ({why}: a byte-identical replay needs the same feeds "
                         f"through the Python API, SearchResult.fit_feeds)")
    return "\n".join(lines)
