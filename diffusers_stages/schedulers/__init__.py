"""FDM (momentum diffusion) schedulers and training utilities."""

from .fdm import FDM_SIGMA_RANGES, FDMSchedulerOutput, FDMVPProcess, fdm_calibrated_sigma_max, fdm_scale
from .fdm_warmup import FDMLossWarmup
from .scheduling_fdm_ddim import FDMDDIMScheduler
from .scheduling_fdm_dpmsolver_multistep import FDMDPMSolverMultistepScheduler
from .scheduling_fdm_edm import FDMEDMScheduler

__all__ = [
    "FDM_SIGMA_RANGES",
    "FDMDDIMScheduler",
    "FDMDPMSolverMultistepScheduler",
    "FDMEDMScheduler",
    "FDMLossWarmup",
    "FDMSchedulerOutput",
    "FDMVPProcess",
    "fdm_calibrated_sigma_max",
    "fdm_scale",
]
