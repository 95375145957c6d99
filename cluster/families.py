"""What a replica runs: a model spec, and the small table of model-family facts the cluster needs.

The cluster never imports a model file directly: each family gives a loader for one stage's
weights, its ordered `parallelize_*` function, a whole-model loader (in-process runs) and its
acceleration adapter (read from the family's table, `pipelines.families.table(name)`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ModelSpec:
    """A model family and where its weights come from.

    source: a named size of the family (random weights drawn from `seed`: tests and demos; every
        stage then holds exactly the weights of an in-process model built from the same spec) or
        a checkpoint folder (local path or fsspec URL: file://, s3://, memory://, ...).
    overrides: config fields replaced on a named size, e.g. (("num_layers", 3),); for a MAGI-1 weights
        folder without config.json, (("size", "4.5b-distill"),) names the size whose config it has.
    """

    source: str = "tiny"
    family: str = "skyreels-v2"
    seed: int = 0
    dtype: str = "float32"
    overrides: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; valid: {sorted(FAMILIES)}")
        object.__setattr__(self, "overrides", tuple(tuple(kv) for kv in self.overrides))
        FAMILIES[self.family].check(self)


@dataclass(frozen=True)
class Family:
    """Per-family functions (all take the `ModelSpec`)."""

    check: Callable[[ModelSpec], None]
    num_layers: Callable[[ModelSpec], int]
    load_stage_model: Callable[..., torch.nn.Module]     # (spec, stage_index, num_stages, counts, device)
    parallelize: Callable[..., Any]                       # (model, stage_index, num_stages, counts=, sp_group=)
    load_model: Callable[[ModelSpec, str], torch.nn.Module]
    accel_adapter: Callable[[], Any]
    # what a replica of this family cannot do, refused before any actor starts: (ReplicaConfig) -> None
    check_replica: Callable[[Any], None] | None = None
    # the coordinator class that serves this family's requests (None: `cluster.coordinator.Coordinator`)
    coordinator: Callable[[], type] | None = None


# ----------------------------------------------------------------------------- SkyReels-V2 DF

def _stage_spec(spec: ModelSpec) -> Any:
    from pipelines.skyreels_v2.parallelize import StageSpec
    return StageSpec(source=spec.source, seed=spec.seed, dtype=spec.dtype, overrides=spec.overrides)


def _skyreels_num_layers(spec: ModelSpec) -> int:
    from pipelines.skyreels_v2.parallelize import checkpoint_config
    config = _stage_spec(spec).config() or checkpoint_config(spec.source)
    return config.num_layers


def _skyreels_load_stage(spec: ModelSpec, stage_index: int, num_stages: int, counts: Sequence[int] | None,
                         device: str) -> torch.nn.Module:
    """Only this stage's blocks (and the head on the last stage) are loaded."""
    from pipelines.skyreels_v2.parallelize import load_stage_model, split_blocks
    block_range = split_blocks(_skyreels_num_layers(spec), num_stages, counts)[stage_index]
    return load_stage_model(_stage_spec(spec), block_range, stage_index == num_stages - 1, device)


def _skyreels_parallelize(model: torch.nn.Module, stage_index: int, num_stages: int, *,
                          counts: Sequence[int] | None = None, sp_group: Any = None) -> Any:
    from pipelines.skyreels_v2.parallelize import parallelize_skyreels
    return parallelize_skyreels(model, stage_index, num_stages, counts=counts, sp_group=sp_group)


def _skyreels_load_model(spec: ModelSpec, device: str = "cpu") -> torch.nn.Module:
    from pipelines.skyreels_v2.parallelize import load_stage_model
    return load_stage_model(_stage_spec(spec), None, True, device)


def _skyreels_adapter() -> Any:
    from pipelines.families import table
    return table("skyreels-v2").accel_adapter()      # the family's table (pipelines/skyreels_v2/family.py)


# ----------------------------------------------------------------------------- MAGI-1

def _magi_stage_spec(spec: ModelSpec) -> Any:
    from pipelines.magi1.parallelize import MagiStageSpec
    return MagiStageSpec(source=spec.source, seed=spec.seed, dtype=spec.dtype, overrides=spec.overrides)


def _magi_num_layers(spec: ModelSpec) -> int:
    from pipelines.magi1.parallelize import stage_config
    return stage_config(_magi_stage_spec(spec)).num_layers


def _magi_load_stage(spec: ModelSpec, stage_index: int, num_stages: int, counts: Sequence[int] | None,
                     device: str) -> torch.nn.Module:
    """Only this stage's layers (and the final layers on the last stage) are loaded."""
    from pipelines.magi1.parallelize import load_stage_model, split_blocks
    block_range = split_blocks(_magi_num_layers(spec), num_stages, counts)[stage_index]
    return load_stage_model(_magi_stage_spec(spec), block_range, stage_index == num_stages - 1, device)


def _magi_parallelize(model: torch.nn.Module, stage_index: int, num_stages: int, *,
                      counts: Sequence[int] | None = None, sp_group: Any = None) -> Any:
    from pipelines.magi1.parallelize import parallelize_magi1
    return parallelize_magi1(model, stage_index, num_stages, counts=counts, sp_group=sp_group)


def _magi_load_model(spec: ModelSpec, device: str = "cpu") -> torch.nn.Module:
    from pipelines.magi1.parallelize import load_stage_model
    return load_stage_model(_magi_stage_spec(spec), None, True, device)


def _magi_adapter() -> Any:
    from pipelines.families import table
    return table("magi-1").accel_adapter()           # the family's table (pipelines/magi1/family.py)


def _magi_check_replica(config: Any) -> None:
    from pipelines.magi1.parallelize import SEQUENCE_PARALLEL_REFUSED
    if config.sequence_parallel > 1:
        raise ValueError(SEQUENCE_PARALLEL_REFUSED)
    if config.accel is not None:
        raise ValueError(f"MAGI-1 replicas run without acceleration for now (accel={config.accel.method!r} "
                         f"given: a MAGI-1 call through the stages, `StageWorker.run_call`, does not plan or "
                         f"execute SCOPE yet); set accel=None, or run the accelerated MAGI-1 pipeline in process")


def _magi_coordinator() -> type:
    from cluster.magi import MagiCoordinator
    return MagiCoordinator


FAMILIES: dict[str, Family] = {
    "skyreels-v2": Family(check=_stage_spec, num_layers=_skyreels_num_layers,
                          load_stage_model=_skyreels_load_stage, parallelize=_skyreels_parallelize,
                          load_model=_skyreels_load_model, accel_adapter=_skyreels_adapter),
    "magi-1": Family(check=_magi_stage_spec, num_layers=_magi_num_layers, load_stage_model=_magi_load_stage,
                     parallelize=_magi_parallelize, load_model=_magi_load_model, accel_adapter=_magi_adapter,
                     check_replica=_magi_check_replica, coordinator=_magi_coordinator),
}


def family_of(spec: ModelSpec) -> Family:
    return FAMILIES[spec.family]


def load_model(spec: ModelSpec, device: str = "cpu") -> torch.nn.Module:
    """The whole model of a spec (for in-process runs and comparisons)."""
    return family_of(spec).load_model(spec, device)
