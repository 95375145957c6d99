"""Golden adapters for MAGI-1 sampling: `scheduler`, `timestep_matrix` and `sample` cases.

Each runner takes a `GoldenCase` and returns name -> tensor for every `output.*` and every
`trace.*` it can expose (only names the case holds). Everything comes from the case: runtime and
engine configs, latent size, prefix, noise, captions, weights. Layout: GOLDEN_FORMAT.md §6.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from pipelines.magi1.schedule import ChunkPlan, ChunkSchedule, distill_intervals, plan_chunk_calls, t_schedule
from tests.parity.golden import GoldenCase

KNOWN_REQUIRES: frozenset[str] = frozenset()   # no MAGI-1 capability is needed beyond the pipeline's own


def _keep_known(case: GoldenCase, produced: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value for name, value in produced.items() if name in case.io}


def _check_requires(case: GoldenCase) -> None:
    unknown = sorted(set(case.meta.get("requires") or []) - KNOWN_REQUIRES)
    if unknown:
        raise NotImplementedError(f"golden case {case.name}: requires {unknown}, which the MAGI-1 adapter "
                                  f"does not provide (known: {sorted(KNOWN_REQUIRES)})")


def run_scheduler(case: GoldenCase) -> dict[str, torch.Tensor]:
    """GOLDEN_FORMAT §6.3: `init_t` and `init_intervel`."""
    _check_requires(case)
    call = case.call
    tsc = call.get("t_schedule_config") or {}
    mode = call.get("shortcut_mode", "8,16,16")
    return _keep_known(case, {
        "output.t_schedule": t_schedule(call["num_steps"], mode, tsc.get("tSchedulerFunc", "sd3"),
                                        float(tsc.get("shift", 3.0))),
        "output.time_interval": distill_intervals(call["num_steps"], mode),
    })


def schedule_of(case: GoldenCase) -> ChunkSchedule:
    call = case.call
    return ChunkSchedule.from_configs(call["runtime_config"], call.get("engine_config") or {},
                                      call.get("t_schedule_config"))


def plan_of(case: GoldenCase) -> ChunkPlan:
    """The call plan of the case's walk; its size and chunk count are checked against the case."""
    call = case.call
    schedule = schedule_of(case)
    latent = call["latent_size"]
    frames = latent[2]
    if frames % schedule.chunk_width:
        raise AssertionError(f"golden case {case.name}: latent_size {latent} is not whole chunks of "
                             f"{schedule.chunk_width}")
    plan = plan_chunk_calls(frames // schedule.chunk_width, schedule, prefix_frames=call.get("prefix_T", 0))
    if "chunk_num" in call and call["chunk_num"] != plan.chunk_num:
        raise AssertionError(f"golden case {case.name}: chunk_num {call['chunk_num']} != {plan.chunk_num}")
    return plan


def tokens_per_chunk(case: GoldenCase, plan: ChunkPlan) -> int:
    call = case.call
    patch = call.get("patch_size") or (case.meta.get("model_config") or {}).get("patch_size", 2)
    _, _, _, height, width = call["latent_size"]
    tokens = plan.schedule.chunk_width * (height // patch) * (width // patch)
    if "tokens_per_chunk" in call and call["tokens_per_chunk"] != tokens:
        raise AssertionError(f"golden case {case.name}: tokens_per_chunk {call['tokens_per_chunk']} != {tokens}")
    return tokens


def call_traces(plan: ChunkPlan, tokens: int, max_chunks: int | None = None) -> dict[str, torch.Tensor]:
    """The per-call schedule tensors of GOLDEN_FORMAT §6.2 (`call_ints`, `call_t`, ...)."""
    width = plan.schedule.chunk_width
    widest = max(c.num_chunks for c in plan.calls)
    max_chunks = max_chunks or widest
    ints = torch.tensor([[c.step, c.slice_point, c.range_num, c.num_chunks, int(c.extra_clean),
                          int(c.prefix_pass), int(c.nearly_clean), c.num_chunks * width] for c in plan.calls],
                        dtype=torch.int64)
    t = _padded([c.t for c in plan.calls], max_chunks, float("nan"), torch.float32)
    kv = torch.full((len(plan.calls), max_chunks, 2), -1, dtype=torch.int64)
    for i, call in enumerate(plan.calls):
        kv[i, :call.num_chunks] = call.kv_range_tokens(tokens)
    return {"call_ints": ints, "call_t": t, "call_kv_range": kv,
            "call_distill_interval": torch.tensor([c.distill_interval for c in plan.calls], dtype=torch.float32)}


def _padded(rows: Sequence[Sequence[float]], width: int, fill: float, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(list(row), dtype=dtype)
    return out


def _width_of(case: GoldenCase, name: str) -> int | None:
    tensor = case.io.get(name)
    return None if tensor is None else tensor.shape[1]


def run_timestep_matrix(case: GoldenCase) -> dict[str, torch.Tensor]:
    """GOLDEN_FORMAT §6.4: the call sequence of the walk at the case's real size."""
    _check_requires(case)
    plan = plan_of(case)
    traces = call_traces(plan, tokens_per_chunk(case, plan), _width_of(case, "output.call_t"))
    produced = {f"output.{name}": value for name, value in traces.items()}
    produced["output.t_schedule"] = plan.t
    produced["output.yield_order"] = torch.tensor(plan.yield_order, dtype=torch.int64)
    produced["output.yield_frames"] = torch.tensor(plan.yield_frames, dtype=torch.int64)
    return _keep_known(case, produced)


def _build_model(case: GoldenCase) -> torch.nn.Module:
    from pipelines.magi1.checkpoint import from_state_dict

    if case.weights is None:
        raise ValueError(f"golden case {case.name}: a sample case needs weights (meta.weights is null)")
    return from_state_dict(case.meta["model_config"], case.weights, dtype=torch.float32).eval()


def run_sample(case: GoldenCase, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """GOLDEN_FORMAT §6.2: the whole chunk-wise walk from `input.init_noise`, with the case's
    configs, captions (row 0 = conditional, row 1 = null) and prefix."""
    from pipelines.magi1.pipeline import Caption, CallRecord, MagiPipeline, SampleArgs

    _check_requires(case)
    call = case.call
    env = call.get("env") or {}                                   # upstream reads prev_chunks_scale from the env
    mix = float(call.get("prev_chunks_scale", env.get("prev_chunks_scale", 0.7)))
    args = SampleArgs.from_configs(call["runtime_config"], call.get("engine_config") or {},
                                   call.get("t_schedule_config"), prev_chunks_scale=mix)
    noise = case.tensor("input.init_noise")
    if list(noise.shape) != list(call["latent_size"]):
        raise AssertionError(f"golden case {case.name}: init_noise {tuple(noise.shape)} != "
                             f"latent_size {call['latent_size']}")
    y, masks = case.tensor("input.y"), case.tensor("input.emb_masks")          # [2, chunks, L, C], [2, chunks, L]
    prefix = case.tensor("input.prefix_latent") if call.get("prefix_T", 0) > 0 else None
    if prefix is not None and prefix.shape[2] != call["prefix_T"]:
        raise AssertionError(f"golden case {case.name}: prefix_latent has {prefix.shape[2]} frames, "
                             f"prefix_T {call['prefix_T']}")

    records: list[CallRecord] = []
    pipeline = MagiPipeline(model if model is not None else _build_model(case), full_prefix_guidance=True)
    result = pipeline.generate(noise, [Caption(y[0], masks[0])], args, prefix=prefix,
                               null_captions=[Caption(y[1], masks[1])], on_call=records.append)
    plan = result.plan
    produced: dict[str, torch.Tensor] = {
        "output.t_schedule": plan.t,
        "output.time_interval": plan.intervals,
    }
    for chunk in result.chunks:
        produced[f"output.clean_chunk_{chunk.index}"] = chunk.latents[:1]
    traces = call_traces(plan, tokens_per_chunk(case, plan), _width_of(case, "trace.call_t"))
    produced.update({f"trace.{name}": value for name, value in traces.items()})
    for k, record in enumerate(records):
        if record.output is not None:
            produced[f"trace.dispatch_out_{k:03d}"] = record.output[0]
    return _keep_known(case, produced)
