"""The Pass contract (after onnx-ir's pass infrastructure).

A pass has a registry name, typed keyword-only options, declared needs and a tolerance, and returns a
:class:`PassResult`. It never reads or writes files, never parses CLI strings and never prints.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

from .errors import OnnxSlimError, PassError
from .ir import Model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    """What a pass promises about the outputs, checked by the parity gate.

    Exact passes set ``atol``/``rtol`` (elementwise: ``|a-b| <= atol + rtol*|ref|``); lossy passes set
    lower bounds on cosine similarity, SNR (dB) and top-1 agreement. ``None`` means "not checked".
    """

    atol: float | None = None
    rtol: float | None = None
    min_cosine: float | None = None
    min_snr_db: float | None = None
    min_top1: float | None = None

    KEYS: ClassVar[tuple[str, ...]] = ("atol", "rtol", "cosine", "snr", "top1")

    @property
    def exact(self) -> bool:
        return self.atol is not None or self.rtol is not None

    @classmethod
    def combine(cls, tolerances: Iterable["Tolerance"]) -> "Tolerance":
        """The tolerance a chain of passes keeps end to end: exact only if every pass is exact; else
        the loosest of the lossy bounds (the chain is at most as good as its weakest member)."""
        tols = list(tolerances)
        if not tols:
            return EXACT
        if all(t.exact and not t.lossy for t in tols):
            return cls(atol=max(t.atol or 0.0 for t in tols), rtol=max(t.rtol or 0.0 for t in tols))

        def loosest(values):
            values = [v for v in values if v is not None]
            return min(values) if values else None

        lossy = [t for t in tols if t.lossy]
        return cls(min_cosine=loosest(t.min_cosine for t in lossy),
                   min_snr_db=loosest(t.min_snr_db for t in lossy),
                   min_top1=loosest(t.min_top1 for t in lossy))

    @property
    def lossy(self) -> bool:
        return any(v is not None for v in (self.min_cosine, self.min_snr_db, self.min_top1))

    def override(self, **overrides: float) -> "Tolerance":
        """Apply CLI overrides: keys atol, rtol, cosine, snr, top1."""
        mapping = {"atol": "atol", "rtol": "rtol", "cosine": "min_cosine", "snr": "min_snr_db",
                   "top1": "min_top1"}
        changes = {}
        for key, value in overrides.items():
            if key not in mapping:
                raise ValueError(f"unknown tolerance key '{key}' (use one of {', '.join(mapping)})")
            changes[mapping[key]] = float(value)
        if changes and not {"atol", "rtol"} & overrides.keys():
            # A lossy bound asked for on its own replaces an exact one (keeping atol would fail every
            # lossy candidate anyway); give atol/rtol too to keep both.
            changes.setdefault("atol", None)
            changes.setdefault("rtol", None)
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        parts = []
        if self.atol is not None:
            parts.append(f"atol={self.atol:g}")
        if self.rtol is not None:
            parts.append(f"rtol={self.rtol:g}")
        if self.min_cosine is not None:
            parts.append(f"cosine>={self.min_cosine:g}")
        if self.min_snr_db is not None:
            parts.append(f"snr>={self.min_snr_db:g}dB")
        if self.min_top1 is not None:
            parts.append(f"top1>={self.min_top1:g}")
        return ", ".join(parts) or "none"

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


EXACT = Tolerance(atol=1e-4, rtol=1e-4)


@dataclass
class PassResult:
    model: Model
    modified: bool
    stats: dict[str, float] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (node or candidate, reason)
    warnings: list[str] = field(default_factory=list)


@dataclass
class PassContext:
    """Per-run state shared by passes. ``calibration`` is an iterable of ``{input_name: array}``."""

    calibration: Any = None                      # onnxslim_kit.calibration.CalibrationData | None
    calibration_is_random: bool = True
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    seed: int = 0
    reference: Any = None                        # the original ModelProto (teacher), read-only
    progress: Callable[[Iterable, str], Iterable] | None = None
    warnings: list[str] = field(default_factory=list)

    def track(self, iterable: Iterable, label: str) -> Iterable:
        """Wrap long loops; the CLI supplies a progress bar, the API none."""
        return self.progress(iterable, label) if self.progress else iterable


def require_nodes(model: Model, names: Iterable[str] | None, option: str = "include") -> None:
    """Refuse, with one line, an option that names nodes the model does not have (a typo would otherwise
    make the pass silently do nothing)."""
    from .errors import InputError

    missing = [n for n in names or [] if model.node_by_name(n) is None]
    if missing:
        raise InputError(f"{option}: no node named {', '.join(repr(n) for n in missing[:5])} in the model")


class Pass(abc.ABC):
    """Base class. Subclasses set ``name``, ``summary``, optionally ``needs``/``tolerance``, take their
    options as keyword-only typed ``__init__`` parameters, and implement :meth:`run`."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    tolerance: ClassVar[Tolerance] = EXACT

    def options(self) -> dict[str, Any]:
        """Current option values (attributes named like the ``__init__`` parameters)."""
        from .registry import pass_options  # avoid a cycle

        return {opt.name: getattr(self, opt.name, opt.default) for opt in pass_options(type(self))}

    def reads_calibration(self) -> bool:
        """Whether this configured pass fits anything to the calibration data (ranges, refits,
        whitening): then its damage must be measured on samples it did not see (``analyze``)."""
        return bool(self.needs)

    def requires(self, model: Model, ctx: PassContext) -> None:
        """Preconditions; raise :class:`PassError` with a clear message to refuse the whole model."""

    @abc.abstractmethod
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        """Rewrite ``model`` (owned by the pass for this call) and return the result."""

    def ensures(self, result: PassResult, ctx: PassContext) -> None:
        """Postconditions: the graph is still a DAG whose tensors are all produced somewhere."""
        result.model.toposort()
        for value in result.stats.values():
            if isinstance(value, float) and math.isnan(value):
                raise PassError(f"{self.name}: produced a NaN statistic")

    def __call__(self, model: Model, ctx: PassContext) -> PassResult:
        start = time.perf_counter()
        try:
            self.requires(model, ctx)
            result = self.run(model, ctx)
            self.ensures(result, ctx)
        except OnnxSlimError as exc:
            msg = str(exc)
            raise type(exc)(msg if msg.startswith(self.name) else f"{self.name}: {msg}") from exc
        except Exception as exc:  # noqa: BLE001 - wrap with the pass name, keep the cause
            raise PassError(f"{self.name}: {type(exc).__name__}: {exc}") from exc
        result.stats.setdefault("seconds", round(time.perf_counter() - start, 4))
        return result

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"
