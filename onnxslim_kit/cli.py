"""Command line: ``onnxslim-kit optimize | inspect | compare | bench | analyze | passes``.

Exit codes: 0 ok, 2 bad input or usage, 3 parity failure (nothing written), 1 anything else.
Errors are one line on stderr ("error: ..."), never a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
from typing import Iterable

import click

from . import __version__
from .errors import InputError, OnnxSlimError, ParityError

EPILOG = """\b
Examples:
  onnxslim-kit optimize model.onnx -o slim.onnx
  onnxslim-kit optimize model.onnx -o q.onnx -p cleanup -p quantize-dynamic --calib calib.npz
  onnxslim-kit inspect model.onnx --input-shape input_ids:1,128
  onnxslim-kit bench model.onnx slim.onnx --runs 50
  onnxslim-kit analyze model.onnx --calib calib.npz --json sensitivity.json --cache sensitivity.jsonl
  onnxslim-kit optimize model.onnx -o small.onnx --calib calib.npz --target accuracy_drop=0.01 --save-recipe plan.toml
"""


def _progress_factory(quiet: bool):
    """A (iterable, label) -> iterable wrapper drawing a bar on stderr when it is a terminal."""
    if quiet or not sys.stderr.isatty():
        return None

    def wrap(iterable: Iterable, label: str) -> Iterable:
        try:
            length = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            length = None
        with click.progressbar(iterable, length=length, label=label, file=sys.stderr) as bar:
            yield from bar

    return wrap


class _Group(click.Group):
    """Turns every exception into one line and an exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except click.exceptions.Abort:
            click.echo("error: interrupted; nothing was written", err=True)
            ctx.exit(130)
        except ParityError as exc:
            report = exc.report
            if report is not None and not (ctx.obj or {}).get("quiet"):
                from .report import render

                click.echo(render(report), err=True)
                if (ctx.obj or {}).get("report_path"):
                    report.to_json(ctx.obj["report_path"])
            click.echo(f"error: {exc}", err=True)
            ctx.exit(3)
        except OnnxSlimError as exc:
            if (ctx.obj or {}).get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted; nothing was written", err=True)
            ctx.exit(130)
        except BrokenPipeError:  # output piped into `head`: not an error of ours
            sys.stderr.close()
            ctx.exit(0)
        except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, no traceback
            if (ctx.obj or {}).get("debug"):
                raise
            click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
            ctx.exit(1)


# optimize options that only mean something with --target (the search)
_TARGET_ONLY = ("metric", "labels", "techniques", "holdout", "save_recipe", "cache", "executor", "objective",
                "confidence", "latency_threads", "latency_batch", "workers", "max_verifications")

@click.group(cls=_Group, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxslim-kit")
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
@click.option("-v", "--verbose", count=True, help="Log what passes do (-vv for debug logs).")
@click.pass_context
def main(ctx, debug, verbose):
    """Compress ONNX models for onnxruntime and prove they still compute what the original computed.

    Every rewrite is checked against the original model in onnxruntime (the parity gate) before
    anything is written.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2), format="%(name)s: %(message)s")


_input_shape_option = click.option(
    "--input-shape", "input_shapes", multiple=True, metavar="NAME:D1,D2,...",
    help="Pin a dynamic input shape for calibration data, parity and MACs (repeatable), "
         "e.g. input_ids:1,128. The written model keeps its dynamic declarations.")
_calib_option = click.option(
    "--calib", "calib", type=click.Path(), default=None, metavar="DATA",
    help="Calibration/parity data: a .npz (one array per input name, samples on axis 0), a .npy "
         "(single-input models), a folder of per-sample .npz/.npy files, or a folder of images. "
         "Default: seeded random data that the model accepts.")
_tolerance_option = click.option(
    "--tolerance", "tolerances", multiple=True, metavar="KEY=VALUE",
    help="Override the parity bound (repeatable): atol, rtol, cosine, snr (dB), top1.")


_metric_option = click.option(
    "--metric", default=None, metavar="NAME",
    help="top1, cosine, snr or MODULE:FUNCTION: how outputs are scored against the original's: top1 (argmax agreement with --labels, else with "
         "the original), cosine (smallest output cosine), snr (dB), or a Python function "
         "f(outputs, reference_outputs[, labels]) -> float, higher is better (lists of {output: array} per "
         "feed). Default: top1 with --labels, else cosine.")
_labels_option = click.option(
    "--labels", type=click.Path(), default=None, metavar="FILE",
    help="One integer label per calibration sample, in order: a .npy array or a .npz with one array "
         "(never unpickled).")


def _parse_tolerances(items) -> dict[str, float] | None:
    if not items:
        return None
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise InputError(f"--tolerance {item!r}: expected KEY=VALUE (e.g. cosine=0.999)")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise InputError(f"--tolerance {item!r}: {value!r} is not a number") from None
    return out


@main.command()
@click.argument("model", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the optimized model "
              "(atomically, only if parity passes; weights go to OUTPUT.data above 2 GB).")
@click.option("-p", "--pass", "passes", multiple=True, metavar="PASS[:key=value,...]",
              help="A pass to run, in order (repeatable). Default: cleanup. List values use '+', "
                   "e.g. quantize-dynamic:exclude=fc1+fc2. See 'onnxslim-kit passes'.")
@click.option("--recipe", type=click.Path(), default=None, help="TOML recipe with [[pass]] tables, instead of -p.")
@_calib_option
@_input_shape_option
@_tolerance_option
@click.option("--check", type=click.Choice(["end", "per-pass", "off"]), default="end", show_default=True,
              help="Parity check once at the end, after every pass (a pass that breaks its tolerance is "
                   "rolled back and the pipeline goes on), or off.")
@click.option("--report", "report_path", type=click.Path(), default=None, help="Write the full report as JSON.")
@click.option("--locate", is_flag=True, help="On a parity failure, find the first node whose output diverges.")
@click.option("--seed", default=0, show_default=True, help="Seed for random calibration data and passes.")
@click.option("--samples", default=8, show_default=True, help="Number of random samples when no --calib is given.")
@click.option("--batch-size", type=int, default=None, help="Rows per feed for dynamic-batch inputs (default 1).")
@click.option("--overwrite", is_flag=True, help="Allow OUTPUT to be the input file.")
@click.option("--target", default=None, metavar="KIND=VALUE",
              help="accuracy_drop=D, size=Rx or latency=Rx: search for a per-layer plan of techniques that meets "
                   "this target instead of running "
                   "passes (excludes -p/--recipe): the metric may drop by at most D vs the original, or the "
                   "size / median latency is at most R times the original's. The plan is verified end to "
                   "end; the model is written only if the target is met.")
@_metric_option
@_labels_option
@click.option("-t", "--technique", "techniques", multiple=True, metavar="PASS[:key=value,...]",
              help="With --target: a technique the search may apply per layer (repeatable; default: "
                   "quantize-int8, quantize-weights:bits=4, prune-channels:ratio=0.25, 0.5 and 0.75, svd:energy=0.9).")
@click.option("-j", "--workers", type=int, default=1, show_default=True,
              help="With --target: worker processes for the per-layer analysis.")
@click.option("--executor", default="local", show_default=True, metavar="WHERE",
              help="With --target: where the per-layer analysis runs: local, ray or ray://HOST:PORT (as for "
                   "analyze --executor).")
@click.option("--holdout", type=float, default=0.0, show_default=True,
              help="With --target: share of the calibration feeds (seeded) kept out of the search and only "
                   "scored at the end, e.g. 0.5.")
@click.option("--max-verifications", type=int, default=8, show_default=True,
              help="With --target: most end-to-end builds the search may use to repair or extend the plan.")
@click.option("--save-recipe", type=click.Path(), default=None,
              help="With --target: write the plan as a TOML recipe that --recipe replays to the same model "
                   "(with the same calibration data; with --holdout, the search share of it).")
@click.option("--cache", type=click.Path(), default=None,
              help="With --target: JSON-lines cache of the per-layer analysis (see analyze --cache).")
@click.option("--confidence", type=float, default=0.95, show_default=True,
              help="With --target and --metric top1: the verified drop plus z(confidence) * sqrt(2 * (samples "
                   "whose correctness changed + 1)) / samples must be within the target, so that the plan also "
                   "meets it on fresh data of the same size; 0 checks the drop alone.")
@click.option("--latency-threads", type=int, default=2, show_default=True,
              help="With --target: onnxruntime threads for every latency the search measures (latency target, "
                   "balanced objective, the result's ratio).")
@click.option("--latency-batch", type=int, default=1, show_default=True,
              help="With --target: batch size (rows on dynamic-batch inputs) at which latency is measured: the "
                   "batch you deploy at; int8 and small layers gain least at 1.")
@click.option("--objective", type=click.Choice(["balanced", "latency", "size"]), default="balanced",
              show_default=True,
              help="With --target accuracy_drop or latency: balanced = time each technique on all its candidate "
                   "layers of one op type before the search, leave out what makes this model slower here and "
                   "order changes by bytes + measured latency saved; latency = the same probe, order by the "
                   "measured latency saved alone (the fastest plan within the target; bytes break ties), then try "
                   "each group of the plan out and drop it if the plan is faster without it; size = "
                   "order by MACs and bytes saved whatever the latency (nothing timed before the search).")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
@click.pass_context
def optimize(ctx, model, output, passes, recipe, calib, input_shapes, tolerances, check, report_path, locate,
             seed, samples, batch_size, overwrite, target, metric, labels, techniques, workers, executor, holdout,
             max_verifications, save_recipe, cache, confidence, latency_threads, latency_batch, objective, quiet):
    """Optimize MODEL and write it to OUTPUT if it passes the parity gate.

    With a target (accuracy_drop, size or latency), a per-layer plan is searched instead and written
    only if its end-to-end verification meets the target.
    """
    from .api import optimize as run
    from .report import render, render_search

    ctx.obj.update(quiet=quiet, report_path=report_path)
    if target is None:
        # Given on the command line at all (a default restated counts too; nothing repeats the defaults here).
        given = [f"--{name.replace('_', '-')}" if name != "techniques" else "-t/--technique" for name in _TARGET_ONLY
                 if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise InputError(f"{', '.join(given)}: only with --target")
    else:
        if passes or recipe:
            raise InputError("--target runs the search: give it without -p/--pass or --recipe")
        _, result = run(model, target=target, calibration=calib, input_shapes=list(input_shapes),
                        tolerance=_parse_tolerances(tolerances), check=check, output=output, seed=seed,
                        num_samples=samples, batch_size=batch_size, progress=_progress_factory(quiet),
                        overwrite=overwrite, metric=metric, labels=labels, techniques=list(techniques) or None,
                        workers=workers, executor=executor, holdout=holdout, max_verifications=max_verifications,
                        save_recipe=save_recipe, cache=cache, confidence=confidence, objective=objective,
                        latency_threads=latency_threads, latency_batch=latency_batch)
        if report_path:
            with open(report_path, "w", encoding="utf-8") as fh:
                json.dump(_json_safe(result.to_dict()), fh, indent=2)
                fh.write("\n")
        if not quiet:
            click.echo(render_search(result))
        return
    _, report = run(model, passes=list(passes) or None, recipe=recipe, calibration=calib,
                    input_shapes=list(input_shapes), tolerance=_parse_tolerances(tolerances), check=check,
                    locate=locate, output=output, seed=seed, num_samples=samples, batch_size=batch_size,
                    progress=_progress_factory(quiet), overwrite=overwrite)
    if report_path:
        report.to_json(report_path)
    if not quiet:
        click.echo(render(report))


@main.command()
@click.argument("model", type=click.Path())
@_input_shape_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def inspect(model, input_shapes, as_json):
    """Show nodes by op type, parameters, MACs and size of MODEL."""
    from .api import inspect as run
    from .report import render_stats

    stats = run(model, input_shapes=list(input_shapes))
    click.echo(json.dumps(stats.to_dict(), indent=2) if as_json else render_stats(stats))


@main.command()
@click.argument("reference", type=click.Path())
@click.argument("candidate", type=click.Path())
@_calib_option
@_input_shape_option
@_tolerance_option
@click.option("--seed", default=0, show_default=True, help="Seed for random data.")
@click.option("--samples", default=8, show_default=True, help="Number of random samples when no --calib is given.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def compare(reference, candidate, calib, input_shapes, tolerances, seed, samples, as_json, quiet):
    """Parity of CANDIDATE against REFERENCE on the same inputs (exit 3 if outside the tolerance)."""
    from .api import compare as run
    from .report import render_parity

    parity = run(reference, candidate, calibration=calib, input_shapes=list(input_shapes),
                 tolerance=_parse_tolerances(tolerances), seed=seed, num_samples=samples,
                 progress=_progress_factory(quiet))
    click.echo(json.dumps(_json_safe(parity.to_dict()), indent=2) if as_json else render_parity(parity))
    if not parity.ok:
        sys.exit(3)


def _json_safe(value):
    from .report import _clean

    return _clean(value)


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path())
@_input_shape_option
@click.option("--threads", default=2, show_default=True, help="onnxruntime intra-op threads per session.")
@click.option("--runs", default=20, show_default=True, help="Timed runs per model and round.")
@click.option("--warmup", default=3, show_default=True, help="Untimed runs before each round.")
@click.option("--rounds", default=3, show_default=True,
              help="Rounds; models are interleaved A,B,A,B so drift hits all of them alike.")
@click.option("--seed", default=0, show_default=True, help="Seed for the random input.")
def bench(models, input_shapes, threads, runs, warmup, rounds, seed):
    """Latency of one or more MODELS in onnxruntime (CPU), side by side, with ratios to the first.

    One session is alive at a time (onnxruntime's spinning worker threads slow a second session).
    """
    from .api import _shapes
    from .calibration import input_specs, random_calibration
    from .ir import load_proto
    from .report import table
    from .runtime import time_sessions

    shapes = _shapes(list(input_shapes))
    for m in models[1:]:
        load_proto(m, load_external_data=False)  # one-line errors for bad files before timing anything
    feed = next(iter(random_calibration(input_specs(load_proto(models[0]), shapes), num_samples=1, seed=seed)))
    times = time_sessions(list(models), feed, threads=threads, runs=runs, warmup=warmup, rounds=rounds)
    base = statistics.median(times[0])
    rows = []
    for i, m in enumerate(models):
        med = statistics.median(times[i])
        p90 = sorted(times[i])[int(0.9 * (len(times[i]) - 1))]
        rows.append([m, f"{med * 1e3:.3f}", f"{p90 * 1e3:.3f}", f"{med / base:.3f}x"])
    click.echo(table(["model", "median ms", "p90 ms", "vs first"], rows))
    click.echo(f"{threads} thread(s), {rounds} round(s) x {runs} runs, interleaved")


@main.command("analyze")
@click.argument("model", type=click.Path())
@_calib_option
@click.option("-t", "--technique", "techniques", multiple=True, metavar="PASS[:key=value,...]",
              help="A technique to try on each layer alone (repeatable): a pass spec whose pass has an "
                   "'include' option, which analyze sets to one layer at a time. Default: quantize-int8, "
                   "quantize-weights:bits=4, prune-channels:ratio=0.25, 0.5 and 0.75, svd:energy=0.9.")
@click.option("-j", "--workers", type=int, default=None,
              help="Local worker processes (every evaluation runs with 1-thread onnxruntime sessions and "
                   "1 BLAS thread). Default: one per CPU (at most 8) once the first second of evaluations "
                   "shows the rest takes long enough to pay for starting them; 1 runs everything in this process.")
@click.option("--executor", default="local", show_default=True, metavar="local|ray|ray://HOST:PORT",
              help="Where evaluations run: a local process pool, or Ray (a local Ray instance, the cluster "
                   "in RAY_ADDRESS, or ray://HOST:PORT; needs pip install onnxslim-kit[ray] here and "
                   "onnxslim-kit on every node).")
@click.option("--json", "json_path", type=click.Path(), default=None,
              help="Write the full analysis (every evaluation, per-output metrics, skip reasons) as JSON.")
@click.option("--cache", type=click.Path(), default=None,
              help="JSON-lines cache: finished evaluations are appended as they finish, and a rerun with "
                   "the same model, calibration data and techniques reuses them (resumes an interrupted run).")
@click.option("--latency", is_flag=True,
              help="Also time each changed model against the baseline (1 thread, interleaved; slow and noisy).")
@_input_shape_option
@click.option("--seed", default=0, show_default=True, help="Seed for random calibration data and passes.")
@click.option("--samples", default=8, show_default=True, help="Number of random samples when no --calib is given.")
@click.option("--top", type=int, default=None, help="Show only the first N rows of the table.")
@_metric_option
@_labels_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no table (use with --json).")
@click.pass_context
def analyze(ctx, model, calib, techniques, workers, executor, json_path, cache, latency, input_shapes, seed,
            samples, top, metric, labels, quiet):
    """Per-layer sensitivity: apply each technique to one layer at a time and measure the damage.

    Every evaluation runs cleanup plus one technique restricted to one layer (Conv, ConvTranspose,
    MatMul, Gemm), compares the outputs with the original model's on the calibration data (cosine,
    SNR) and counts the MACs, parameters and bytes it saves. The table is sorted by damage per
    fraction saved (best trade first); layers a technique does not touch are listed with its reason.
    """
    from .analyze import analyze as run
    from .report import render_analysis

    ctx.obj.update(quiet=quiet)
    report = run(model, calib, techniques=list(techniques) or None, workers=workers, executor=executor,
                 cache=cache, latency=latency, input_shapes=list(input_shapes), seed=seed, num_samples=samples,
                 progress=_progress_factory(quiet), metric=metric, labels=labels)
    if json_path:
        report.to_json(json_path)
    if not quiet:
        click.echo(render_analysis(report, top=top))


@main.command("passes")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_passes(as_json):
    """Every pass with its options, types, defaults and help."""
    from .registry import available_passes, pass_options

    info = []
    for name, cls in available_passes().items():
        opts = [{"name": o.name, "type": o.type_name, "default": o.default, "help": o.help} for o in pass_options(cls)]
        tol = cls.tolerance.describe()
        info.append({"name": name, "summary": cls.summary, "tolerance": tol,
                     "needs": sorted(cls.needs), "options": opts})
    if as_json:
        click.echo(json.dumps(_json_safe(info), indent=2))
        return
    for entry in info:
        click.echo(f"{entry['name']}: {entry['summary']}")
        click.echo(f"  keeps: {entry['tolerance']}" + (f"; needs: {', '.join(entry['needs'])}" if entry["needs"] else ""))
        for o in entry["options"]:
            click.echo(f"  {o['name']} ({o['type']}, default {o['default']!r}): {o['help']}")
        click.echo("")


if __name__ == "__main__":  # pragma: no cover
    main()
