"""`ode_solver: dpm-solver++2m` (MixGRPO-Flash) against diffusers' own DPM-Solver++: `DPMSolverMultistepScheduler`
with flow prediction (second order, midpoint, first-order final step) walks a whole schedule from sigma 1 the way
`flowfactory.samplers.flow.dpm_solver_2m_step` does when its history starts at the first step."""

from __future__ import annotations

import pytest
import torch

from flowfactory.samplers.flow import dpm_solver_2m_step


# diffusers' DPMSolverMultistepScheduler builds its sigmas with np.array(torch tensor), which numpy 2 warns about
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_2m_step_follows_diffusers_dpm_solver_multistep() -> None:
    from diffusers import DPMSolverMultistepScheduler

    g = torch.Generator().manual_seed(0)
    mu, s = torch.randn(32, generator=g, dtype=torch.float64), 0.5 + torch.rand(32, generator=g, dtype=torch.float64)

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:  # the exact velocity of data N(mu, s^2)
        x0 = mu + (1 - sigma) * s**2 / ((1 - sigma) ** 2 * s**2 + sigma**2) * (x - (1 - sigma) * mu)
        return (x - x0) / sigma

    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                            solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint")
    scheduler.set_timesteps(12)
    sigmas = scheduler.sigmas.double()
    assert float(sigmas[-1]) == 0.0
    theirs = ours = torch.randn(32, generator=g, dtype=torch.float64)
    prev = None
    for i, t in enumerate(scheduler.timesteps):
        theirs = scheduler.step(velocity(theirs, float(sigmas[i])), t, theirs).prev_sample
        v = velocity(ours, float(sigmas[i]))
        ours, prev = dpm_solver_2m_step(ours, v, prev, sigmas, i), ours - float(sigmas[i]) * v
        assert torch.allclose(ours, theirs.double(), rtol=0, atol=1e-5), f"step {i}"
