"""Golden adapters for SkyReels-V2 DF sampling: `timestep_matrix`, `scheduler` and `sample` cases.

Each runner takes a `GoldenCase` and returns name -> tensor for every `output.*` and every
`trace.*` it can expose (only names the case holds). Everything comes from the case: sizes,
steps, shift, schedule arguments, prefix, noise. Layout: shared/reference/GOLDEN_FORMAT.md §5.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from pipelines.skyreels_v2.pipeline import DFPipeline, RowRecord, ScheduleArgs
from pipelines.skyreels_v2.schedule import generate_timestep_matrix
from pipelines.skyreels_v2.unipc import FlowUniPCSolver, make_flow_schedule
from tests.parity.golden import GoldenCase

VAE_TEMPORAL_STRIDE = 4   # upstream: latent frames = (pixel frames - 1) // 4 + 1


def _keep_known(case: GoldenCase, produced: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value for name, value in produced.items() if name in case.io}


def run_timestep_matrix(case: GoldenCase) -> dict[str, torch.Tensor]:
    """GOLDEN_FORMAT §5.2: `generate_timestep_matrix` with the case's arguments."""
    call = case.call
    matrix = generate_timestep_matrix(
        num_frames=call["num_frames"], step_template=case.call_tensor(call["step_template"]),
        base_num_frames=call["base_num_frames"], ar_step=call["ar_step"],
        num_pre_ready=call["num_pre_ready"], causal_block_size=call["causal_block_size"],
        shrink_interval_with_mask=call.get("shrink_interval_with_mask", False))
    return _keep_known(case, {
        "output.step_matrix": matrix.step_matrix,
        "output.step_index": matrix.step_index,
        "output.step_update_mask": matrix.update_mask,
        "output.valid_interval": matrix.valid_interval,
    })


def run_scheduler(case: GoldenCase) -> dict[str, torch.Tensor]:
    """GOLDEN_FORMAT §5.3: `set_timesteps(N, shift)`, then N steps over the recorded velocities."""
    call = case.call
    constructor = call.get("constructor", {})
    expected = {"solver_order": 2, "solver_type": "bh2", "predict_x0": True,
                "lower_order_final": True, "final_sigmas_type": "zero",
                "prediction_type": "flow_prediction", "shift": 1.0, "disable_corrector": []}
    differing = {k: constructor[k] for k, v in expected.items() if k in constructor and constructor[k] != v}
    if differing:
        raise NotImplementedError(f"golden case {case.name}: scheduler settings {differing} are not "
                                  f"supported (only {expected})")
    settings = call["set_timesteps"]
    schedule = make_flow_schedule(settings["num_inference_steps"], settings["shift"],
                                  num_train_timesteps=constructor.get("num_train_timesteps", 1000))
    passing = call.get("sample_passing", "separate_tensors")
    if passing not in ("separate_tensors", "pipeline_inplace_view"):
        raise NotImplementedError(f"golden case {case.name}: sample_passing {passing!r} is unknown")
    solver = FlowUniPCSolver(schedule, alias_first_sample=passing == "pipeline_inplace_view")

    sample = case.tensor("input.sample")
    velocities = case.tensor("input.model_outputs")
    samples, x0_preds, corrected, orders = [], [], [], []
    for i in range(schedule.num_steps):
        sample = solver.step(velocities[i], schedule.timesteps[i], sample)
        samples.append(sample)
        x0_preds.append(solver.last_step.x0_pred)
        corrected.append(solver.last_step.corrected_sample)
        orders.append(solver.last_step.order)
    return _keep_known(case, {
        "output.timesteps": schedule.timesteps,
        "output.sigmas": schedule.sigmas,
        "output.samples": torch.stack(samples),
        "trace.x0_pred": torch.stack(x0_preds),
        "trace.corrected_sample": torch.stack(corrected),
        "trace.order": torch.tensor(orders, dtype=torch.int64),
    })


def _build_model(case: GoldenCase) -> torch.nn.Module:
    from pipelines.skyreels_v2.model import WanDFConfig, WanDFTransformer

    model = WanDFTransformer(WanDFConfig.from_dict(case.meta["model_config"]))
    model.load_state_dict(case.weights, strict=True)
    return model.eval()


def schedule_args_of(case: GoldenCase) -> ScheduleArgs:
    """The pipeline settings of a `sample` case, in latent frames (upstream's short-video path)."""
    call = case.call
    base = call.get("base_num_frames")
    base_latents = None if base is None else (base - 1) // VAE_TEMPORAL_STRIDE + 1
    if call.get("overlap_history") is not None or call.get("end_image") is not None:
        raise NotImplementedError(f"golden case {case.name}: long-video and end_image sample cases "
                                  f"are not supported")
    return ScheduleArgs(
        num_steps=call["num_inference_steps"], shift=call["shift"],
        guidance_scale=call["guidance_scale"], ar_step=call["ar_step"],
        causal_block_size=call["causal_block_size"], addnoise_condition=call["addnoise_condition"],
        base_num_frames=base_latents,
        fps=call["fps"], causal_attention=bool(call.get("causal_attention", False)))


def run_sample(case: GoldenCase,
               model: Callable[..., torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """GOLDEN_FORMAT §5.4: the full DF walk from `input.init_noise` to `output.latents`.

    `model` defaults to the case's tiny WanDFTransformer; any callable with the model's
    signature works (e.g. a stub replaying `trace.v_cond` / `trace.v_uncond`).
    """
    call = case.call
    args = schedule_args_of(case)
    if call["fps_embedding_id"] != (0 if args.fps == 16 else 1):
        raise AssertionError(f"golden case {case.name}: fps {args.fps} does not map to fps_embedding_id "
                             f"{call['fps_embedding_id']}")
    noise = case.tensor("input.init_noise")
    expected_shape = (noise.shape[0], call["latent_frames"], call["latent_height"], call["latent_width"])
    if tuple(noise.shape) != expected_shape:
        raise AssertionError(f"golden case {case.name}: init_noise {tuple(noise.shape)} != {expected_shape}")
    prefix = case.tensor("input.prefix_latent") if call.get("num_pre_ready", 0) > 0 else None
    addnoise_eps = case.io.get("input.addnoise_eps")
    negative = case.tensor("input.negative_context") if args.guidance_scale > 1 else None

    records: list[RowRecord] = []
    pipeline = DFPipeline(model if model is not None else _build_model(case),
                          faithful_aliasing=True)
    with torch.no_grad():
        result = pipeline.generate(noise, case.tensor("input.context"), negative, args,
                                   prefix_latents=prefix, addnoise_eps=addnoise_eps,
                                   on_row=records.append)
    matrix = result.segments[0].matrix
    produced = {
        "output.latents": result.latents,
        "trace.step_matrix": matrix.step_matrix,
        "trace.step_update_mask": matrix.update_mask,
        "trace.model_input": torch.stack([r.model_input for r in records]),
        "trace.model_t": torch.stack([r.t for r in records]),
        "trace.v_cond": torch.stack([r.v_cond for r in records]),
    }
    if all(r.v_uncond is not None for r in records):
        produced["trace.v_uncond"] = torch.stack([r.v_uncond for r in records])
    return _keep_known(case, produced)
