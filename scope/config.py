"""Typed, self-checking configs: one dataclass per acceleration method.

Every field is checked in `__post_init__`; a bad value raises `ValueError` with a message that
says what a valid value looks like. At the system boundary a config is one JSON object
(`{"method": "scope", "tau_cache": 0.05, ...}`) read by `load_config` / `AccelConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

class RescalePolynomial(NamedTuple):
    """A TeaCache-style rescale polynomial fitted on one model's indicator."""

    coefficients: tuple[float, ...]   # numpy.poly1d order: highest degree first
    probe: str                        # the adapter probe kind it was fitted on (e.g. a time projection)
    ret_steps: bool                   # fitted with TeaCache's "ret steps" variant


# Named polynomials, registered by the model families that publish them (scope knows no model:
# e.g. `pipelines.wan.calibration` registers Wan2.1's); a config may also give a list.
_RESCALE: dict[str, RescalePolynomial] = {}
_RESCALE_ALIASES: dict[str, str] = {}


def register_rescale(name: str, coefficients: tuple[float, ...], probe: str, ret_steps: bool,
                     aliases: tuple[str, ...] = ()) -> None:
    """Make a published polynomial available by name (idempotent for the same values)."""
    poly = RescalePolynomial(tuple(float(c) for c in coefficients), probe, bool(ret_steps))
    if _RESCALE.get(name, poly) != poly:
        raise ValueError(f"rescale polynomial {name!r} is already registered with other values")
    _RESCALE[name] = poly
    for alias in aliases:
        _RESCALE_ALIASES[alias] = name


def registered_rescales() -> dict[str, RescalePolynomial]:
    """Every registered polynomial (aliases included), by name."""
    return {**_RESCALE, **{a: _RESCALE[n] for a, n in _RESCALE_ALIASES.items()}}


SELECTIVE_MODES = ("off", "exact", "approx")
RESIDUAL_DTYPES = ("input", "float32", "float16", "bfloat16")
GRANULARITIES = ("global", "chunk")
SCOPE_INDICATORS = ("probe", "input", "probe+input", "none")
FLOWCACHE_INDICATORS = ("probe", "input")
# Coordinates a residual history can be extrapolated in: the noise level sigma (the paper),
# the model's timestep (1000 x sigma for flow matching: the same polynomial as sigma, kept so a
# config can say what it means), the chunk's own step index (TaylorSeer), log-SNR of the
# flow-matching interpolant log((1 - sigma) / sigma).
COORDINATES = ("sigma", "timestep", "step", "logsnr")
PREFERENCES = ("predict", "cache")
ERROR_ESTIMATES = ("observed", "embedded", "off")
SCOPE_GRANULARITIES = ("call", "chunk")
# What a calibrated config records about the schedule it was calibrated on (`calibrated_for`).
SCHEDULE_KEYS = ("num_steps", "shift", "ar_step", "guidance_scale", "causal_block_size",
                 "base_num_frames", "overlap_frames", "frames", "model")


# ---------------------------------------------------------------------------------------------
# 1. Small checkers (each raises ValueError naming the field and a valid example)
# ---------------------------------------------------------------------------------------------

def _fail(cfg: object, name: str, want: str, got: object) -> None:
    raise ValueError(f"{type(cfg).__name__}.{name} must be {want} (got {got!r})")


def _check_bool(cfg: object, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, bool):
        _fail(cfg, name, "true or false", value)


def _check_int(cfg: object, name: str, low: int, high: int | None = None, example: str = "") -> None:
    value = getattr(cfg, name)
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    ok = ok and (high is None or value <= high)
    if not ok:
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        _fail(cfg, name, f"an integer {span}{example}", value)


def _check_float(cfg: object, name: str, low: float, *, strict: bool = False, high: float | None = None,
                 allow_inf: bool = False, example: str = "") -> None:
    value = getattr(cfg, name)
    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = is_num and not math.isnan(value) and (allow_inf or math.isfinite(value))
    ok = ok and (value > low if strict else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"> {low}" if strict else f">= {low}"
        if high is not None:
            bound += f" and <= {high}"
        if allow_inf:
            bound += " (inf disables it)"
        _fail(cfg, name, f"a number {bound}{example}", value)


def _check_choice(cfg: object, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        _fail(cfg, name, "one of " + ", ".join(repr(c) for c in choices), value)


def _same(a: object, b: object) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _check_schedule(cfg: object, name: str) -> None:
    value = getattr(cfg, name)
    if value is None:
        return
    if not isinstance(value, dict) or set(value) - set(SCHEDULE_KEYS):
        extra = sorted(set(value) - set(SCHEDULE_KEYS)) if isinstance(value, dict) else value
        _fail(cfg, name, "null or an object with keys among " + ", ".join(SCHEDULE_KEYS)
              + f" (unknown: {extra})", value)


def resolve_rescale(spec: str | tuple[float, ...] | list[float] | None) -> tuple[tuple[float, ...], str] | None:
    """Return (coefficients highest degree first, probe kind) for a rescale spec, or None."""
    if spec is None:
        return None
    if isinstance(spec, str):
        poly = _named_rescale(spec)
        return poly.coefficients, poly.probe
    return tuple(float(c) for c in spec), "default"


def _named_rescale(name: str) -> RescalePolynomial:
    found = _RESCALE.get(_RESCALE_ALIASES.get(name, name))
    if found is None:
        names = ", ".join(sorted(registered_rescales())) or "none registered yet"
        raise ValueError(f"unknown rescale polynomial {name!r}; valid names: {names} (model families "
                         f"register theirs, e.g. `import pipelines.wan.calibration`), or a list of 1-8 "
                         f"coefficients (highest degree first), or null")
    return found


def _normalise_rescale(cfg: object, name: str = "rescale") -> None:
    value = getattr(cfg, name)
    if isinstance(value, list):
        value = tuple(value)
        object.__setattr__(cfg, name, value)
    if value is None:
        return
    if isinstance(value, str):
        try:
            resolve_rescale(value)
        except ValueError as err:
            raise ValueError(f"{type(cfg).__name__}.{name}: {err}") from None
        return
    ok = isinstance(value, tuple) and 1 <= len(value) <= 8 and all(
        isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in value)
    if not ok:
        _fail(cfg, name, "null, a registered polynomial name, or a list of 1-8 finite "
                         "coefficients, highest degree first (e.g. [1.0, 0.0] = identity)", value)


# ---------------------------------------------------------------------------------------------
# 2. Base config: what every method shares (selective computation, residual storage)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class AccelConfig:
    """Fields shared by every method.

    selective: "off" = every frame of the window runs whenever any chunk recomputes;
        "exact" = drop only what cannot influence the recomputed chunks (under block-causal
        attention: chunks after the last recomputed one; finished leading chunks may be served
        from cached K/V); under bidirectional attention "exact" equals "off";
        "approx" = also drop not-started chunks after the active interval and finished chunks
        more than `context_chunks` before it, under any attention (measured quality trade-off).
    context_chunks: finished chunks kept as attention context before the active interval
        ("approx" only; "exact" keeps all of them).
    kv_cache_finished: serve finished context chunks from per-layer K/V captured once (needs the
        adapter's `run_stack_kv`; exact under block-causal attention).
    kv_cache_stale: ("approx" only) Cache/Predict chunks needed as context serve the K/V of their
        last run instead of running again (FlowCache-style stale K/V).
    reuse_context_outputs: an active chunk whose frames run anyway (as context) takes the computed
        output instead of its Cache/Predict value (recorded as Recompute, reason "in-run").
    residual_dtype: storage dtype of residual history ("input" = dtype of the hidden states).
    trace: record one row per unit and call in `RequestStats.trace` (calibration data).
    calibrated_for: the schedule a calibrated config was measured on (keys in SCHEDULE_KEYS,
        e.g. {"num_steps": 30, "ar_step": 2, "shift": 3.0, "frames": 48}); null = not calibrated.
        `schedule_mismatch` names what differs from the schedule it is used with.
    """

    method: ClassVar[str] = "base"

    selective: str = "off"
    context_chunks: int = 1
    kv_cache_finished: bool = False
    kv_cache_stale: bool = False
    reuse_context_outputs: bool = True
    residual_dtype: str = "input"
    trace: bool = False
    calibrated_for: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.validate()

    # -- what the system around a method needs (cluster/ asks these, never the method name) ----
    @property
    def needs_whole_stack(self) -> bool:
        """The method must see the whole block stack in one process (no pipeline stages)."""
        return False

    @property
    def needs_stack_feedback(self) -> bool:
        """Decisions use whole-stack residuals (a pipeline-parallel stage 0 needs them fed back)."""
        return False

    def schedule_mismatch(self, schedule: dict[str, Any]) -> list[str]:
        """'key: calibrated X, used with Y' for every recorded schedule key that differs."""
        if not self.calibrated_for:
            return []
        out = []
        for key, want in sorted(self.calibrated_for.items()):
            got = schedule.get(key)
            if got is not None and not _same(want, got):
                out.append(f"{key}: calibrated {want!r}, used with {got!r}")
        return out

    def validate(self) -> None:
        _check_choice(self, "selective", SELECTIVE_MODES)
        _check_int(self, "context_chunks", 0, example=" (finished chunks kept before the active "
                                                        "interval, e.g. 1)")
        for name in ("kv_cache_finished", "kv_cache_stale", "reuse_context_outputs", "trace"):
            _check_bool(self, name)
        _check_choice(self, "residual_dtype", RESIDUAL_DTYPES)
        _check_schedule(self, "calibrated_for")
        if self.kv_cache_finished and self.selective == "off":
            raise ValueError(f"{type(self).__name__}.kv_cache_finished needs selective='exact' or "
                             f"'approx' (with selective='off' every frame runs, so no K/V is served)")
        if self.kv_cache_stale and self.selective != "approx":
            raise ValueError(f"{type(self).__name__}.kv_cache_stale serves out-of-date K/V, an "
                             f"approximation: it needs selective='approx' (got {self.selective!r})")

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict including "method"."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AccelConfig:
        """Build a config from a dict with a "method" key; unknown keys are errors."""
        if not isinstance(data, dict):
            raise ValueError(f"an acceleration config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        method = data.pop("method", None if cls is AccelConfig else cls.method)
        if method is None:
            raise ValueError(f"acceleration config needs a 'method' key; valid methods: "
                             f"{', '.join(METHOD_CONFIGS)}")
        target = _config_class(method)
        if cls is not AccelConfig and target is not cls:
            raise ValueError(f"{cls.__name__}.from_dict got method {method!r}, expected {cls.method!r}")
        valid = target.field_names()
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} for method {method!r}; valid keys: "
                             f"method, {', '.join(valid)}")
        return target(**data)

    def replace(self, **overrides: Any) -> AccelConfig:
        return dataclasses.replace(self, **overrides)


# ---------------------------------------------------------------------------------------------
# 3. One config per method
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class NoneConfig(AccelConfig):
    """No caching: every active chunk recomputes (selective computation may still drop frames)."""

    method: ClassVar[str] = "none"


@dataclass(frozen=True, kw_only=True)
class ScopeConfig(AccelConfig):
    """SCOPE tri-modal scheduler (Recompute / Cache / Predict) per (request, branch, chunk).

    granularity: "call" = the change indicator is one number per model call (all active chunks
        of the window together), so chunks recompute together and skip together: under
        block-causal attention only a skipped *tail* of the active interval saves compute, and
        per-chunk indicators stagger (some chunk always wants to run, the ones before it run as
        its context). "chunk" = one indicator per chunk (the paper's per-unit reading).
    sync: (call granularity) a Recompute asked for by the indicator or a control (threshold,
        max consecutive, horizon, error estimate, short history) recomputes every active chunk,
        so the chunks stay in lockstep; only the hard per-chunk needs (warm-up, no history,
        final step) recompute just the prefix of the active interval up to that chunk (under
        block-causal attention the chunks before it run as its context anyway).
    indicator: what changes between calls: "input" (relative L1 change of the stack input
        tokens: content, per prompt), "probe" (the model's time modulation: timestep only),
        "probe+input", or "none" (only the controls and max_consecutive decide).
    Decision per active chunk, with acc = indicator accumulated since its last Recompute and
    s(sigma) the low-noise tightening factor: prefer="predict" tries Predict below
    tau_predict * s, then Cache below tau_cache * s; prefer="cache" tries Cache first (the
    paper's order). Predict extrapolates the last `order + 1` residuals as a polynomial in
    `coordinate`, under its controls (`horizon_rho`, `error_estimate` / `eps_error`).
    error_estimate: "observed" = the relative error this unit's predictor made the last time it
        could be checked (the would-be prediction vs the recomputed residual), scaled to the
        current horizon by (h / h_obs)^(order + 1): it bounds the predictor actually used;
        "embedded" = difference to the order +- 1 polynomial; "off".
    Thresholds are in the indicator's units: `scope calibrate` measures them per model and
    schedule (the embedded model ships its calibrated config). The defaults are that calibrated
    point (procedural model, 30 steps, ar_step 2, 48 frames: BENCHMARKS.md), not universal.
    """

    method: ClassVar[str] = "scope"

    tau_cache: float = 0.0
    tau_predict: float = 0.3
    granularity: str = "call"
    sync: bool = False
    indicator: str = "input"
    rescale: str | tuple[float, ...] | None = None
    probe_kind: str = "default"
    coordinate: str = "logsnr"
    order: int = 1
    prefer: str = "predict"
    warmup_steps: int = 1
    force_final_step: bool = True
    max_consecutive: int = 3
    history: int | None = None
    horizon_rho: float = 4.0
    error_estimate: str = "observed"
    eps_error: float = math.inf
    sigma_floor_scale: float = 0.5
    sigma_knee: float = 1.0
    residual_dtype: str = "float32"

    def validate(self) -> None:
        super().validate()
        ex = " (e.g. tau_cache=0.05, tau_predict=0.15)"
        _check_float(self, "tau_cache", 0.0, allow_inf=True, example=ex)
        _check_float(self, "tau_predict", 0.0, allow_inf=True, example=ex)
        _check_choice(self, "granularity", SCOPE_GRANULARITIES)
        _check_bool(self, "sync")
        _check_choice(self, "indicator", SCOPE_INDICATORS)
        _normalise_rescale(self)
        if not isinstance(self.probe_kind, str) or not self.probe_kind:
            _fail(self, "probe_kind", "'default' or a non-empty probe kind the model's adapter offers",
                  self.probe_kind)
        _check_choice(self, "coordinate", COORDINATES)
        _check_choice(self, "prefer", PREFERENCES)
        _check_int(self, "warmup_steps", 0, example=" (Recompute calls per chunk first, e.g. 1)")
        _check_bool(self, "force_final_step")
        _check_int(self, "max_consecutive", 1, example=" (non-Recompute calls in a row, e.g. 4)")
        _check_int(self, "order", 0, 2, example=" (0 = reuse, 1 = linear, 2 = quadratic in the "
                                                 "coordinate)")
        if self.history is not None:
            _check_int(self, "history", self.order + 1, self.order + 2,
                       example=f" (order + 1 = {self.order + 1}, or order + 2 = {self.order + 2} "
                               f"to check the error against one order higher; null = order + 1)")
        _check_float(self, "horizon_rho", 0.0, strict=True, allow_inf=True,
                     example=" (multiple of the coordinate span the history covers, e.g. 4.0)")
        _check_choice(self, "error_estimate", ERROR_ESTIMATES)
        _check_float(self, "eps_error", 0.0, strict=True, allow_inf=True,
                     example=" (relative error estimate that forces Recompute, e.g. 0.25)")
        _check_float(self, "sigma_floor_scale", 0.0, strict=True, high=1.0,
                     example=" (threshold scale at sigma=0; 1.0 = no tightening, e.g. 0.5)")
        _check_float(self, "sigma_knee", 0.0, strict=True, high=1.0,
                     example=" (sigma below which thresholds start to shrink, e.g. 1.0)")

    @property
    def history_len(self) -> int:
        return self.order + 1 if self.history is None else self.history

    @property
    def needs_stack_feedback(self) -> bool:
        return self.error_estimate != "off" and math.isfinite(self.eps_error)


@dataclass(frozen=True, kw_only=True)
class TeaCacheConfig(AccelConfig):
    """TeaCache: accumulate the rescaled relative-L1 change of the probe; reuse below threshold.

    granularity "global" = one decision for the whole window (original TeaCache);
    "chunk" = one per chunk (the per-group port used by FlowCache for SkyReels-V2).
    `use_ret_steps` selects the warm-up default (5 calls, else 1) and the final-step default
    (forced only without ret steps) and must match the named polynomial's variant.
    """

    method: ClassVar[str] = "teacache"

    threshold: float = 0.08
    granularity: str = "global"
    rescale: str | tuple[float, ...] | None = None   # a model family's published one: its accel defaults
    use_ret_steps: bool = True
    probe_kind: str | None = None
    warmup_steps: int | None = None
    force_final_step: bool | None = None

    def validate(self) -> None:
        super().validate()
        _check_float(self, "threshold", 0.0, strict=True, example=" (e.g. 0.08)")
        _check_choice(self, "granularity", GRANULARITIES)
        _normalise_rescale(self)
        _check_bool(self, "use_ret_steps")
        if isinstance(self.rescale, str):
            fitted_ret = _named_rescale(self.rescale).ret_steps
            if fitted_ret != self.use_ret_steps:
                want = "with" if fitted_ret else "without"
                raise ValueError(f"TeaCacheConfig.rescale {self.rescale!r} was fitted {want} ret "
                                 f"steps; set use_ret_steps={fitted_ret} or pick the polynomial "
                                 f"fitted {'without' if fitted_ret else 'with'} them")
        if self.probe_kind is not None and (not isinstance(self.probe_kind, str) or not self.probe_kind):
            _fail(self, "probe_kind", "null (take it from the polynomial) or a probe kind the model's adapter offers",
                  self.probe_kind)
        if self.warmup_steps is not None:
            _check_int(self, "warmup_steps", 0, example=" (null = 5 with ret steps, else 1)")
        if self.force_final_step is not None:
            _check_bool(self, "force_final_step")

    @property
    def effective_warmup(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return 5 if self.use_ret_steps else 1

    @property
    def effective_force_final(self) -> bool:
        if self.force_final_step is not None:
            return self.force_final_step
        return not self.use_ret_steps

    @property
    def effective_probe_kind(self) -> str:
        if self.probe_kind is not None:
            return self.probe_kind
        resolved = resolve_rescale(self.rescale)
        return "default" if resolved is None else resolved[1]


@dataclass(frozen=True, kw_only=True)
class FlowCacheConfig(AccelConfig):
    """FlowCache-style per-chunk reuse: each chunk accumulates its own relative-L1 change.

    Defaults follow FlowCache for MAGI-1: the indicator is the chunk's stack input (patch
    embedding), no polynomial, threshold 0.015, 5 warm-up calls per chunk, final step computed.
    For the SkyReels-V2 port use indicator="probe", rescale="wan-1.3b", threshold 0.1-0.15.
    """

    method: ClassVar[str] = "flowcache"

    threshold: float = 0.015
    indicator: str = "input"
    rescale: str | tuple[float, ...] | None = None
    probe_kind: str = "default"
    warmup_steps: int = 5
    force_final_step: bool = True

    def validate(self) -> None:
        super().validate()
        _check_float(self, "threshold", 0.0, strict=True, example=" (e.g. 0.015)")
        _check_choice(self, "indicator", FLOWCACHE_INDICATORS)
        _normalise_rescale(self)
        if not isinstance(self.probe_kind, str) or not self.probe_kind:
            _fail(self, "probe_kind", "a non-empty string such as 'default'", self.probe_kind)
        _check_int(self, "warmup_steps", 0, example=" (e.g. 5)")
        _check_bool(self, "force_final_step")


@dataclass(frozen=True, kw_only=True)
class TaylorSeerConfig(AccelConfig):
    """TaylorSeer at stack level: full compute at the first `first_enhance` steps and every
    `interval`-th step after; otherwise a Taylor expansion in the STEP index whose derivatives
    are backward differences between full steps. granularity "chunk" counts each chunk's own
    steps; "global" counts `CallContext.step` (one decision per model call, as the original:
    the default). Defaults are TaylorSeer's Wan2.1 ones (interval 5, order 1, first_enhance 1)."""

    method: ClassVar[str] = "taylorseer"

    interval: int = 5
    order: int = 1
    first_enhance: int = 1
    granularity: str = "global"
    force_final_step: bool = False

    def validate(self) -> None:
        super().validate()
        _check_int(self, "interval", 1, example=" (full compute every N steps, e.g. 5)")
        _check_int(self, "order", 0, 2, example=" (Taylor order, e.g. 1)")
        _check_int(self, "first_enhance", 0, example=" (full steps at the start, e.g. 1)")
        _check_choice(self, "granularity", GRANULARITIES)
        _check_bool(self, "force_final_step")


@dataclass(frozen=True, kw_only=True)
class FBCacheConfig(AccelConfig):
    """First-Block Cache: always run block 0; if its residual changed by less than `threshold`
    (relative L1 against the residual at the last full compute), skip blocks 1..L-1 and add the
    cached tail residual. Finished chunks may be served from K/V (`kv_cache_finished`), block 0
    and blocks 1..L-1 each keeping their own."""

    method: ClassVar[str] = "fbcache"

    threshold: float = 0.05
    granularity: str = "global"
    warmup_steps: int = 0
    force_final_step: bool = False

    def validate(self) -> None:
        super().validate()
        _check_float(self, "threshold", 0.0, strict=True, example=" (e.g. 0.05)")
        _check_choice(self, "granularity", GRANULARITIES)
        _check_int(self, "warmup_steps", 0, example=" (e.g. 0)")
        _check_bool(self, "force_final_step")
        if self.kv_cache_stale:
            raise ValueError("FBCacheConfig does not support kv_cache_stale (its skipped chunks "
                             "never run the tail, so there is no stale K/V to serve); set it to false")

    @property
    def needs_whole_stack(self) -> bool:
        return True


@dataclass(frozen=True, kw_only=True)
class MagCacheConfig(AccelConfig):
    """MagCache: skip while the accumulated magnitude-ratio error stays small.

    From call `retention_ratio x num_steps` on, per skipped step: ratio *= gamma(step),
    steps += 1, err += |1 - ratio|; skip (reuse the last residual) while err < threshold and
    steps <= max_skip_steps, else compute and reset. gamma(step) = mean over tokens of
    ||r_step|| / ||r_step-1|| is measured once on one prompt (`calibrate=true` records it;
    `scope bench` does this on a training caption) and kept per CFG branch in `mag_ratios`
    ({"cond": [...], "uncond": [...]}, index = the chunk's own step; resampled by nearest
    index when the step count differs). Defaults are MagCache's Wan2.1 ones (thresh 0.12,
    K 2, retention 0.2). One decision per model call (as the original), each active chunk's
    ratio taken at its own step.
    """

    method: ClassVar[str] = "magcache"

    threshold: float = 0.12
    max_skip_steps: int = 2
    retention_ratio: float = 0.2
    num_steps: int | None = None
    mag_ratios: dict[str, list[float]] | None = None
    calibrate: bool = False

    def validate(self) -> None:
        super().validate()
        _check_float(self, "threshold", 0.0, strict=True, example=" (e.g. 0.12 for Wan 1.3B)")
        _check_int(self, "max_skip_steps", 1, example=" (K, e.g. 2)")
        _check_float(self, "retention_ratio", 0.0, high=1.0, example=" (e.g. 0.2)")
        if self.num_steps is not None:
            _check_int(self, "num_steps", 1, example=" (denoising steps per chunk, e.g. 30)")
        _check_bool(self, "calibrate")
        ratios = self.mag_ratios
        if ratios is not None:
            ok = isinstance(ratios, dict) and ratios and all(
                isinstance(k, str) and isinstance(v, (list, tuple)) and v and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
                    for x in v) for k, v in ratios.items())
            if not ok:
                _fail(self, "mag_ratios", "an object {branch: [positive ratio per step, ...]}, e.g. "
                      "{\"cond\": [1.0, 0.98, ...], \"uncond\": [...]}", ratios)
            object.__setattr__(self, "mag_ratios", {k: [float(x) for x in v] for k, v in ratios.items()})
        elif not self.calibrate:
            raise ValueError("MagCacheConfig.mag_ratios is not set: MagCache needs its magnitude "
                             "ratios measured on this model first (run one generation with "
                             "calibrate=true and pass the recorded `mag_ratios`; `scope bench` "
                             "does this itself)")


# ---------------------------------------------------------------------------------------------
# 4. Factory and JSON loading
# ---------------------------------------------------------------------------------------------

METHOD_CONFIGS: dict[str, type[AccelConfig]] = {
    c.method: c for c in (NoneConfig, ScopeConfig, TeaCacheConfig, FlowCacheConfig,
                          TaylorSeerConfig, FBCacheConfig, MagCacheConfig)
}


def _config_class(method: str) -> type[AccelConfig]:
    if method not in METHOD_CONFIGS:
        raise ValueError(f"unknown acceleration method {method!r}; valid methods: "
                         f"{', '.join(METHOD_CONFIGS)}")
    return METHOD_CONFIGS[method]


def make_config(method: str, **overrides: Any) -> AccelConfig:
    """`make_config("scope", tau_cache=0.03)`; unknown methods or keys raise ValueError."""
    return AccelConfig.from_dict({"method": method, **overrides})


def load_config(path: str | Path) -> AccelConfig:
    """Read an `--accel-config accel.json` file."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    try:
        return AccelConfig.from_dict(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
