"""Flow-matching UniPC multistep solver, one state per latent frame.

Reimplements the SkyReels-V2 `FlowUniPCMultistepScheduler` as the DF pipeline configures it:
solver order 2, `bh2`, predict-x0 (x0 = x - sigma * v), UniC corrector on every step after the
first, `lower_order_final` (the last step is first order), final sigma 0.

Schedule (`make_flow_schedule`), with the exact number handling of upstream:
- base sigmas `linspace(sigma_max, 0, N + 1)[:-1]` in float64, where sigma_max is float32(0.999)
  (the value the training sigmas hold) promoted to float64;
- shift `s * sigma / (1 + (s - 1) * sigma)` in float64;
- model timesteps `int64(1000 * sigma')` (truncated); solver sigmas float32 with a final 0.

The solver math then runs on the float32 sigmas, as upstream does.

Upstream aliasing quirk (`alias_first_sample`): the DF pipeline passes `latents[:, j]`, a view,
and writes the result back into that view. At a frame's first step no corrector runs, so the
scheduler keeps the *input* view as `last_sample`; the in-place write then turns it into the
step's *result*. The frame's first correction (its second step) therefore starts from the
step-0 result rather than the step-0 input. From then on `last_sample` is the corrector's own
output and nothing is aliased. Here the effect is explicit: with `alias_first_sample=True` the
solver stores the step-0 result as `last_sample`; with False it behaves as a plain scheduler.
Inputs are never kept by reference, so views passed in are safe either way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FlowSchedule", "FlowUniPCSolver", "SolverStep", "make_flow_schedule"]

SIGMA_MAX = float(torch.tensor(0.999, dtype=torch.float32))   # 0.9990000128746033
NUM_TRAIN_TIMESTEPS = 1000
SOLVER_ORDER = 2


@dataclass(frozen=True)
class FlowSchedule:
    """The N model timesteps and N + 1 solver sigmas of one `set_timesteps(N, shift)`."""

    timesteps: torch.Tensor  # int64 [N], e.g. [999, 995, ...] for N=30, shift 8
    sigmas: torch.Tensor     # float32 [N + 1], decreasing, last = 0

    @property
    def num_steps(self) -> int:
        return self.timesteps.numel()


def make_flow_schedule(num_steps: int, shift: float,
                       num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> FlowSchedule:
    """Upstream `set_timesteps(num_steps, shift=shift)` after construction with shift 1."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1 (e.g. 30); got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0 (1 = no shift; SkyReels-V2 uses 8 for T2V, 3-5 for "
                         f"I2V); got {shift!r}")
    shift = float(shift)
    # numpy's linspace: start + i * step in float64, with step = (stop - start) / N
    step = (0.0 - SIGMA_MAX) / num_steps
    base = [i * step + SIGMA_MAX for i in range(num_steps)]
    shifted = [shift * sigma / (1 + (shift - 1) * sigma) for sigma in base]
    timesteps = torch.tensor([int(sigma * num_train_timesteps) for sigma in shifted], dtype=torch.int64)
    sigmas = torch.tensor(shifted + [0.0], dtype=torch.float64).to(torch.float32)
    return FlowSchedule(timesteps=timesteps, sigmas=sigmas)


@dataclass(frozen=True)
class SolverStep:
    """What one `step` did (the golden `trace.*` of the scheduler cases)."""

    index: int                      # position in the schedule (0..N-1)
    order: int                      # predictor order used
    x0_pred: torch.Tensor           # x0 = input sample - sigma * velocity
    corrected_sample: torch.Tensor  # sample after the UniC corrector (the input at the first step)


class FlowUniPCSolver:
    """UniPC (order 2, bh2, predict-x0) state of one latent frame over one `FlowSchedule`."""

    def __init__(self, schedule: FlowSchedule, alias_first_sample: bool = False):
        self.schedule = schedule
        self.alias_first_sample = alias_first_sample
        sigmas = schedule.sigmas                          # float32 [N + 1]
        self._sigmas = sigmas
        self._alphas = 1 - sigmas
        self._lambdas = torch.log(self._alphas) - torch.log(sigmas)   # +inf at the final sigma 0
        self.step_index: int | None = None                 # next schedule position
        self.steps_taken = 0
        self._x0_history: list[torch.Tensor] = []          # the last <= 2 x0 predictions
        self._last_sample: torch.Tensor | None = None      # predictor input of the previous step
        self._last_order = 0
        self.last_step: SolverStep | None = None

    @property
    def finished(self) -> bool:
        return self.step_index is not None and self.step_index >= self.schedule.num_steps

    def step(self, velocity: torch.Tensor, timestep: int | torch.Tensor,
             sample: torch.Tensor) -> torch.Tensor:
        """Advance one step: returns the sample at the next sigma (same shape as `sample`).

        `timestep` only locates the first step in the schedule (as upstream); later steps
        follow the schedule.
        """
        if self.step_index is None:
            self.step_index = self._locate(timestep)
        index = self.step_index
        if index >= self.schedule.num_steps:
            raise RuntimeError(f"solver already took all {self.schedule.num_steps} steps")
        dtype = torch.promote_types(sample.dtype, torch.float32)   # bf16 latents step in fp32
        sample = sample.to(dtype)
        velocity = velocity.to(dtype)

        # 1. x0 prediction from the raw input
        x0 = sample - self._sigmas[index] * velocity
        # 2. UniC: correct the input with the new x0 (every step after the first)
        corrected = self._last_sample is not None
        if corrected:
            sample = self._correct(x0, index)
        # 3. UniP: predict the next sample
        self._x0_history = (self._x0_history + [x0])[-SOLVER_ORDER:]
        order = min(SOLVER_ORDER, self.schedule.num_steps - index, self.steps_taken + 1)
        prev_sample = self._predict(sample, index, order)

        if corrected:
            self._last_sample = sample
        elif self.alias_first_sample:
            self._last_sample = prev_sample    # upstream's in-place write into the input view
        else:
            self._last_sample = sample.clone()
        self._last_order = order
        self.last_step = SolverStep(index=index, order=order, x0_pred=x0, corrected_sample=sample)
        self.steps_taken += 1
        self.step_index = index + 1
        return prev_sample

    def _locate(self, timestep: int | torch.Tensor) -> int:
        """First step: the schedule position of `timestep` (the second match if it repeats)."""
        matches = (self.schedule.timesteps == int(timestep)).nonzero().flatten().tolist()
        if not matches:
            raise ValueError(f"timestep {int(timestep)} is not in the schedule "
                             f"{self.schedule.timesteps.tolist()}")
        return matches[1] if len(matches) > 1 else matches[0]

    def _coefficients(self, target: int, source: int) -> tuple[torch.Tensor, ...]:
        """(sigma ratio, alpha_t * (e^-h - 1), e^-h - 1, h) from sigma[source] to sigma[target]."""
        h = self._lambdas[target] - self._lambdas[source]
        phi = torch.expm1(-h)                              # h*phi_1(-h); = B(h) for bh2
        ratio = self._sigmas[target] / self._sigmas[source]
        return ratio, self._alphas[target] * phi, phi, h

    def _predict(self, sample: torch.Tensor, index: int, order: int) -> torch.Tensor:
        """UniP-`order` from sigma[index] to sigma[index + 1], x0 history ends with this step's."""
        ratio, alpha_phi, _, h = self._coefficients(index + 1, index)
        m0 = self._x0_history[-1]
        x_next = ratio * sample - alpha_phi * m0
        if order == 2:
            r = (self._lambdas[index - 1] - self._lambdas[index]) / h
            d1 = (self._x0_history[-2] - m0) / r
            x_next = x_next - alpha_phi * (0.5 * d1)       # rho_p = 1/2 for order 2
        return x_next

    def _correct(self, x0: torch.Tensor, index: int) -> torch.Tensor:
        """UniC of the previous step's prediction (sigma[index-1] -> sigma[index]) with the new x0."""
        order = self._last_order
        ratio, alpha_phi, phi, h = self._coefficients(index, index - 1)
        m0 = self._x0_history[-1]
        x = ratio * self._last_sample - alpha_phi * m0
        d1_t = x0 - m0
        if order == 1:
            return x - alpha_phi * (0.5 * d1_t)
        # order 2: solve [[1, 1], [r, 1]] @ rho = b, with b_k = k! * h*phi_k(-h) / B(h)
        r = (self._lambdas[index - 2] - self._lambdas[index - 1]) / h
        d1 = (self._x0_history[-2] - m0) / r
        hh = -h
        phi_2 = phi / hh - 1
        phi_3 = phi_2 / hh - 0.5
        b1 = phi_2 / phi
        b2 = 2 * phi_3 / phi
        rho_0 = (b1 - b2) / (1 - r)
        rho_1 = b1 - rho_0
        return x - alpha_phi * (rho_0 * d1 + rho_1 * d1_t)
