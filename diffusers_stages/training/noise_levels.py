r"""
Training distributions of the noise level ``sigma`` for the sigma-space objectives (EDM paper, Table 1; FDM's
``training/loss.py`` uses the same three).

Each distribution is given by its CDF over ``ln sigma`` and its inverse, so that drawing inside a stage (a range of
``ln sigma``) is exact inverse-CDF sampling of the truncated distribution, and a stage's probability is a CDF
difference.

| name | draw | authors' parameters |
|---|---|---|
| `LogNormalSigma` (EDM) | ``ln sigma ~ N(P_mean, P_std^2)`` | -1.2, 1.2 |
| `LogUniformSigma` (VE) | ``sigma = sigma_min (sigma_max / sigma_min)^u``, ``u ~ U(0, 1)`` | 0.02, 100 |
| `VPSigma` (VP) | ``sigma = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``, ``t ~ U(epsilon_t, 1)`` | 0.1, 19.9, 1e-5 |
"""

from __future__ import annotations

import math

import torch


class LogNormalSigma:
    r"""
    EDM's ``ln sigma ~ N(p_mean, p_std^2)``.

    Args:
        p_mean (`float`, defaults to -1.2), p_std (`float`, defaults to 1.2): Mean and std of ``ln sigma``.
    """

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        if not p_std > 0:
            raise ValueError(f"`p_std` must be positive, got {p_std}.")
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    def cdf(self, log_sigma: torch.Tensor) -> torch.Tensor:
        """``P(ln sigma' <= log_sigma) = Phi((log_sigma - p_mean) / p_std)``."""
        return torch.special.ndtr((log_sigma - self.p_mean) / self.p_std)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        """``sigma = exp(p_mean + p_std Phi^-1(u))``."""
        return (self.p_mean + self.p_std * torch.special.ndtri(u)).exp()


class LogUniformSigma:
    r"""
    VE (SMLD / NCSN): ``ln sigma ~ U(ln sigma_min, ln sigma_max)``.

    Args:
        sigma_min (`float`, defaults to 0.02), sigma_max (`float`, defaults to 100.0): The range (FDM's VE-FDM, EDM's
            VE: 0.02 .. 100); ``0 < sigma_min < sigma_max``.
    """

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < `sigma_min` < `sigma_max`, got {sigma_min} and {sigma_max}.")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def cdf(self, log_sigma: torch.Tensor) -> torch.Tensor:
        """``clamp((log_sigma - ln sigma_min) / (ln sigma_max - ln sigma_min), 0, 1)``."""
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return ((log_sigma - lo) / (hi - lo)).clamp(0.0, 1.0)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        """``sigma = sigma_min (sigma_max / sigma_min)^u``."""
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** u


class VPSigma:
    r"""
    VP-SDE (Song et al.; DDPM's continuous limit): ``t ~ U(epsilon_t, 1)`` and
    ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``, so ``sigma`` runs over 0.001 .. 152.17 with the
    defaults.

    Args:
        beta_min (`float`, defaults to 0.1), beta_d (`float`, defaults to 19.9): The linear ``beta(t)`` schedule.
        epsilon_t (`float`, defaults to 1e-5): The smallest training ``t`` (``0 < epsilon_t < 1``).
    """

    def __init__(self, beta_min: float = 0.1, beta_d: float = 19.9, epsilon_t: float = 1e-5):
        if beta_min < 0 or beta_d <= 0:
            raise ValueError(f"need `beta_min` >= 0 and `beta_d` > 0, got {beta_min} and {beta_d}.")
        if not 0 < epsilon_t < 1:
            raise ValueError(f"`epsilon_t` must lie in (0, 1), got {epsilon_t}.")
        self.beta_min, self.beta_d, self.epsilon_t = float(beta_min), float(beta_d), float(epsilon_t)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``."""
        return torch.expm1(0.5 * self.beta_d * t**2 + self.beta_min * t).sqrt()

    def t_of_log_sigma(self, log_sigma: torch.Tensor) -> torch.Tensor:
        """The inverse: ``t = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d``."""
        log1p_sigma2 = torch.nn.functional.softplus(2 * log_sigma)  # ln(1 + sigma^2), exact at +-inf
        return ((self.beta_min**2 + 2 * self.beta_d * log1p_sigma2).sqrt() - self.beta_min) / self.beta_d

    def cdf(self, log_sigma: torch.Tensor) -> torch.Tensor:
        """``clamp((t(sigma) - epsilon_t) / (1 - epsilon_t), 0, 1)``."""
        return ((self.t_of_log_sigma(log_sigma) - self.epsilon_t) / (1 - self.epsilon_t)).clamp(0.0, 1.0)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        """``sigma(epsilon_t + u (1 - epsilon_t))``."""
        return self.sigma(self.epsilon_t + u * (1 - self.epsilon_t))
