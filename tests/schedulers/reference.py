"""Short reference formulas used as test oracles (independent of the package's code)."""

import math

import torch


def s_reference(sigma, m, sigma_min, sigma_max, beta_min=0.1, beta_d=19.9):
    """FDM paper: tau in [0, 1], B = beta_min tau + beta_d tau^2 / 2, s = exp(-m B) (1 + m B)."""
    tau = min(max((sigma - sigma_min) / (sigma_max - sigma_min), 0.0), 1.0)
    b = beta_min * tau + 0.5 * beta_d * tau**2
    return math.exp(-m * b) * (1 + m * b)


def gaussian_denoiser(mu, cov):
    """Exact E[x0 | x0 + sigma eps = x] for x0 ~ N(mu, cov): mu + cov (cov + sigma^2 I)^-1 (x - mu)."""

    def denoise(x, sigma):
        gain = cov @ torch.linalg.inv(cov + sigma**2 * torch.eye(len(mu), dtype=cov.dtype))
        return mu + (x - mu) @ gain.T

    return denoise


def gaussian_error(samples, mu, cov):
    """(|mean - mu|, max |cov - C|) of samples against N(mu, C)."""
    samples = samples.double()
    return float((samples.mean(0) - mu).norm()), float((samples.T.cov() - cov).abs().max())
