"""Explicit, scoped state: units keyed by (request, CFG branch, chunk), and the call context.

Nothing is stored on classes: every store is an instance owned by one accelerator or executor,
and `drop_request` removes everything a request left behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

import torch

T = TypeVar("T")

GLOBAL_CHUNK = -1  # chunk index of a unit that covers the whole window (global policies)


class UnitKey(NamedTuple):
    """One unit of state: a request, a CFG branch ("cond" / "uncond"), an absolute chunk index."""

    request: str
    branch: str
    chunk: int


@dataclass
class UnitState:
    """Everything kept for one unit on one block range, in one place.

    The executor of a block range owns a `StateStore[UnitState]`; the policy of the accelerator
    that decides reads and writes the decision fields of its executor's store (in-process that
    is the one store; a pipeline stage 0 decides on its own range's store, or on a whole-stack
    mirror when decisions need whole-stack residuals), so nothing is mirrored.
    """

    # decision side (written by the policy's commit)
    prev_signal: torch.Tensor | None = None   # indicator source at the previous active call
    prev_input: torch.Tensor | None = None    # stack input at the previous active call
    acc: float = 0.0                          # accumulated indicator since the last Recompute
    ratio: float = 1.0                        # MagCache: accumulated magnitude ratio since Recompute
    active_calls: int = 0                     # calls at which the chunk was active
    since_recompute: int = 0                  # consecutive non-Recompute active calls
    last_sigma: float | None = None           # noise level at the last active call
    observed: float | None = None             # relative error of the would-be prediction, last check
    observed_span: float = 0.0                # its horizon (coordinate distance to the newest point)
    # residual history of this block range (written by the executor at each Recompute)
    coords: list[float] = field(default_factory=list)           # oldest first
    residuals: list[torch.Tensor] = field(default_factory=list)
    # K/V of this block range for this chunk (written by the executor when captured)
    kv: Any = None
    kv_offset: int = -1                       # window offset at capture (positions are baked in)
    kv_sigma: float = -1.0                    # noise level at capture
    kv_exact: bool = False                    # captured with exact context (selective "exact")

    def clear_history(self) -> None:
        """Forget decisions and residuals (a finished chunk keeps only its K/V)."""
        kv = (self.kv, self.kv_offset, self.kv_sigma, self.kv_exact)
        self.__init__()  # type: ignore[misc]
        self.kv, self.kv_offset, self.kv_sigma, self.kv_exact = kv

    def clear_kv(self) -> None:
        self.kv, self.kv_offset, self.kv_sigma, self.kv_exact = None, -1, -1.0, False

    @property
    def has_kv(self) -> bool:
        return self.kv is not None

    @property
    def empty(self) -> bool:
        return self.kv is None and not self.coords and self.active_calls == 0 and self.prev_signal is None \
            and self.prev_input is None


class StateStore(Generic[T]):
    """Per-unit state, grouped by request so a finished request is dropped in one step."""

    def __init__(self, factory: Callable[[], T] | None = None) -> None:
        self._factory = factory
        self._by_request: dict[str, dict[UnitKey, T]] = {}

    def get(self, key: UnitKey) -> T | None:
        return self._by_request.get(key.request, {}).get(key)

    def ensure(self, key: UnitKey) -> T:
        """The unit's state, created with the factory on first use."""
        units = self._by_request.setdefault(key.request, {})
        if key not in units:
            if self._factory is None:
                raise KeyError(f"no state for {key} and no factory to create it")
            units[key] = self._factory()
        return units[key]

    def set(self, key: UnitKey, value: T) -> None:
        self._by_request.setdefault(key.request, {})[key] = value

    def pop(self, key: UnitKey) -> T | None:
        units = self._by_request.get(key.request)
        if units is None:
            return None
        value = units.pop(key, None)
        if not units:
            del self._by_request[key.request]
        return value

    def keys(self, request: str | None = None, branch: str | None = None) -> list[UnitKey]:
        groups = self._by_request.values() if request is None else [self._by_request.get(request, {})]
        return [k for units in groups for k in units if branch is None or k.branch == branch]

    def items(self, request: str | None = None) -> Iterator[tuple[UnitKey, T]]:
        groups = self._by_request.values() if request is None else [self._by_request.get(request, {})]
        for units in groups:
            yield from units.items()

    def drop(self, keys: Iterable[UnitKey]) -> int:
        return sum(self.pop(k) is not None for k in list(keys))

    def drop_chunks(self, request: str, chunks: Iterable[int], branch: str | None = None) -> int:
        wanted = set(chunks)
        return self.drop(k for k in self.keys(request, branch) if k.chunk in wanted)

    def drop_request(self, request: str) -> int:
        return len(self._by_request.pop(request, {}))

    def edit_chunks(self, request: str, chunks: Iterable[int], edit: Callable[[T], None],
                    branch: str | None = None) -> None:
        """Apply `edit` to these chunks' states; states left `empty` are dropped."""
        wanted = set(chunks)
        for key in [k for k in self.keys(request, branch) if k.chunk in wanted]:
            value = self.get(key)
            edit(value)
            if getattr(value, "empty", False):
                self.pop(key)

    def requests(self) -> list[str]:
        return list(self._by_request)

    def __len__(self) -> int:
        return sum(len(units) for units in self._by_request.values())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, UnitKey) and key in self._by_request.get(key.request, {})


@dataclass(frozen=True)
class CallContext:
    """What the pipeline tells the accelerator about one model call.

    chunk_sigma: [C] noise level in [0, 1] of each chunk of the window at this call.
    chunk_active: [C] bool, the sampler updates this chunk after this call (others are skipped:
        their output is discarded).
    causal: the model's attention is block-causal over chunks.
    chunk_sigma_next: [C] optional noise level after this step (0 = the chunk finishes now);
        needed by the final-step control.
    chunk_offset: absolute index of the window's first chunk in the video (a sliding window keeps
        a unit's identity; chunks left behind are released).
    chunk_required: [C] optional bool, the caller needs this chunk computed through every block at
        this call whatever the policy decides (e.g. a pass that writes the chunk's keys / values
        into the model's own cache); an active required chunk recomputes, an inactive one runs.
    """

    request: str
    branch: str
    step: int
    frames_per_chunk: int
    chunk_sigma: torch.Tensor | Sequence[float]
    chunk_active: torch.Tensor | Sequence[bool]
    causal: bool
    chunk_sigma_next: torch.Tensor | Sequence[float] | None = None
    chunk_offset: int = 0
    chunk_required: torch.Tensor | Sequence[bool] | None = None
    sigmas: tuple[float, ...] = field(init=False, repr=False)
    active: tuple[bool, ...] = field(init=False, repr=False)
    sigmas_next: tuple[float, ...] | None = field(init=False, repr=False)
    required: tuple[bool, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.request, str) or not isinstance(self.branch, str):
            raise ValueError(f"CallContext.request and .branch must be strings, got "
                             f"{self.request!r}, {self.branch!r}")
        for name, low in (("step", 0), ("frames_per_chunk", 1), ("chunk_offset", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"CallContext.{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.causal, bool):
            raise ValueError(f"CallContext.causal must be a bool, got {self.causal!r}")
        sigmas = _as_floats(self.chunk_sigma, "chunk_sigma")
        active = tuple(bool(a) for a in _as_list(self.chunk_active, "chunk_active"))
        if len(active) != len(sigmas) or not sigmas:
            raise ValueError(f"CallContext.chunk_sigma and chunk_active must be non-empty with one "
                             f"entry per chunk, got {len(sigmas)} and {len(active)}")
        nxt = None
        if self.chunk_sigma_next is not None:
            nxt = _as_floats(self.chunk_sigma_next, "chunk_sigma_next")
            if len(nxt) != len(sigmas):
                raise ValueError(f"CallContext.chunk_sigma_next needs {len(sigmas)} entries, "
                                 f"got {len(nxt)}")
        required = (False,) * len(sigmas)
        if self.chunk_required is not None:
            required = tuple(bool(r) for r in _as_list(self.chunk_required, "chunk_required"))
            if len(required) != len(sigmas):
                raise ValueError(f"CallContext.chunk_required needs {len(sigmas)} entries, got {len(required)}")
        object.__setattr__(self, "sigmas", sigmas)
        object.__setattr__(self, "active", active)
        object.__setattr__(self, "sigmas_next", nxt)
        object.__setattr__(self, "required", required)

    @property
    def num_chunks(self) -> int:
        return len(self.sigmas)

    def unit(self, j: int) -> UnitKey:
        """Key of window chunk j."""
        return UnitKey(self.request, self.branch, self.chunk_offset + j)

    def global_unit(self) -> UnitKey:
        return UnitKey(self.request, self.branch, GLOBAL_CHUNK)

    def is_final(self, j: int) -> bool | None:
        """Whether window chunk j takes its last step at this call (None: not known)."""
        if self.sigmas_next is None:
            return None
        return self.active[j] and self.sigmas_next[j] <= 0.0


def _as_list(value: object, name: str) -> list:
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"CallContext.{name} must be 1-D [C], got shape {tuple(value.shape)}")
        return value.detach().cpu().tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError(f"CallContext.{name} must be a 1-D tensor or a sequence, got {type(value).__name__}")


def _as_floats(value: object, name: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in _as_list(value, name))
    if any(not (0.0 <= v <= 1.0) for v in out):
        raise ValueError(f"CallContext.{name} must hold noise levels in [0, 1], got {list(out)}")
    return out
