"""Pipeline: an ordered list of configured passes, built from CLI specs or a TOML recipe.

Every pass's options and needs are validated before any pass runs. After every pass the pipeline
removes dead nodes and unused initializers, so no pass can leave dead weights behind.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import InputError
from .ir import Model
from .pass_base import Pass, PassContext, Tolerance
from .registry import get_pass, pass_options

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

logger = logging.getLogger(__name__)

KNOWN_NEEDS = {"calibration": "calibration data (--calib, or seeded random data)",
               "real-calibration": "real calibration data (--calib)"}


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``'svd:energy=0.95,whiten=false'`` -> ('svd', {'energy': '0.95', 'whiten': 'false'})."""
    spec = spec.strip()
    if not spec:
        raise InputError("empty pass spec")
    name, _, rest = spec.partition(":")
    options: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise InputError(f"pass spec '{spec}': option '{item}' is not key=value")
        key = key.strip().replace("-", "_")
        if key in options:
            raise InputError(f"pass spec '{spec}': option '{key}' given twice")
        options[key] = value.strip()
    return name.strip(), options


def build_pass(name: str, options: dict[str, Any]) -> Pass:
    """Instantiate a registered pass, converting option strings using the option annotations."""
    cls = get_pass(name)
    known = {opt.name: opt for opt in pass_options(cls)}
    kwargs = {}
    for key, value in options.items():
        if key not in known:
            raise InputError(f"pass '{name}' has no option '{key}' "
                             f"(options: {', '.join(known) or 'none'})")
        kwargs[key] = known[key].convert(value, name)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise InputError(f"pass '{name}': {exc}") from None


@dataclass
class PassRecord:
    """What one pass did, for the report."""

    name: str
    options: dict[str, Any]
    modified: bool = False
    stats: dict[str, float] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    parity: Any = None                 # ParityReport when --check per-pass
    rolled_back: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.options.items()},
            "modified": self.modified,
            "stats": self.stats,
            "skipped": [{"candidate": c, "reason": r} for c, r in self.skipped],
            "warnings": self.warnings,
            "seconds": round(self.seconds, 4),
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "parity": self.parity.to_dict() if self.parity is not None else None,
            "rolled_back": self.rolled_back,
        }


# A checker runs the parity gate on a candidate model against the original for a tolerance.
Checker = Callable[[Model, Tolerance], Any]


class Pipeline:
    def __init__(self, passes: list[Pass]):
        self.passes = list(passes)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_specs(cls, specs: list[str]) -> "Pipeline":
        return cls([build_pass(*parse_spec(s)) for s in specs])

    @classmethod
    def from_recipe(cls, path: str | os.PathLike) -> "Pipeline":
        """TOML recipe: one ``[[pass]]`` table per pass with ``name`` and its options::

            [[pass]]
            name = "cleanup"
            [[pass]]
            name = "svd"
            energy = 0.95
        """
        label = os.fspath(path)
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise InputError(f"{label}: recipe file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"{label}: invalid TOML ({exc})") from None
        entries = data.get("pass")
        if not isinstance(entries, list) or not entries:
            raise InputError(f"{label}: a recipe needs at least one [[pass]] table")
        passes = []
        for i, entry in enumerate(entries, 1):
            if not isinstance(entry, dict) or "name" not in entry:
                raise InputError(f"{label}: [[pass]] #{i} has no 'name'")
            options = {k.replace("-", "_"): v for k, v in entry.items() if k != "name"}
            passes.append(build_pass(str(entry["name"]), options))
        return cls(passes)

    @classmethod
    def coerce(cls, passes: "Pipeline | list[str | Pass] | None") -> "Pipeline":
        """Accept a Pipeline, a list of specs/pass objects, or None (the default: cleanup)."""
        if passes is None:
            return cls.from_specs(["cleanup"])
        if isinstance(passes, Pipeline):
            return passes
        if isinstance(passes, (str, Pass)):
            passes = [passes]
        built = [p if isinstance(p, Pass) else build_pass(*parse_spec(p)) for p in passes]
        return cls(built)

    def to_toml(self) -> str:
        """The recipe that rebuilds this pipeline exactly."""
        lines = []
        for p in self.passes:
            lines.append("[[pass]]")
            lines.append(f'name = "{p.name}"')
            for key, value in p.options().items():
                lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)

    # -- validation ------------------------------------------------------------------------------
    @property
    def tolerance(self) -> Tolerance:
        return Tolerance.combine(p.tolerance for p in self.passes)

    def validate(self, ctx: PassContext) -> None:
        """Check every pass's needs before any pass runs."""
        for p in self.passes:
            for need in sorted(p.needs):
                if need not in KNOWN_NEEDS:
                    raise InputError(f"pass '{p.name}' declares an unknown need '{need}'")
                if need == "calibration" and ctx.calibration is None:
                    raise InputError(f"pass '{p.name}' needs {KNOWN_NEEDS[need]}")
                if need == "real-calibration" and (ctx.calibration is None or ctx.calibration_is_random):
                    raise InputError(f"pass '{p.name}' needs {KNOWN_NEEDS[need]}")
            if "calibration" in p.needs and ctx.calibration_is_random:
                ctx.warnings.append(f"pass '{p.name}' uses seeded random calibration data; its accuracy "
                                    f"depends on real data: pass --calib")

    # -- execution ---------------------------------------------------------------------------------
    def run(self, model: Model, ctx: PassContext, *, checker: Checker | None = None,
            per_pass: bool = False, tolerance_override: dict[str, float] | None = None
            ) -> tuple[Model, list[PassRecord]]:
        """Run the passes in order. With ``per_pass`` and a ``checker``, a pass whose result breaks its
        tolerance is rolled back and recorded, and the pipeline goes on."""
        self.validate(ctx)
        records: list[PassRecord] = []
        for p in self.passes:
            record = PassRecord(name=p.name, options=p.options(), nodes_before=len(model.nodes))
            backup = model.copy() if per_pass and checker is not None else None
            start = time.perf_counter()
            model.reset_names()
            result = p(model, ctx)
            swept = result.model.cleanup()
            result.model.release_pages()  # weights the pass read from memory maps leave memory again
            record.seconds = time.perf_counter() - start
            model = result.model
            record.modified = result.modified or any(swept.values())
            record.stats = {k: v for k, v in result.stats.items() if k != "seconds"}
            for key, value in swept.items():
                if value:
                    record.stats[f"sweep_{key}"] = value
            record.skipped = list(result.skipped)
            record.warnings = list(result.warnings)
            if backup is not None and record.modified:
                tol = p.tolerance.override(**tolerance_override) if tolerance_override else p.tolerance
                record.parity = checker(model, tol)
                if not record.parity.ok:
                    logger.warning("pass %s broke parity; rolled back", p.name)
                    record.rolled_back = True
                    model = backup
            record.nodes_after = len(model.nodes)
            records.append(record)
        return model, records


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if value is None:
        return '"none"'
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
