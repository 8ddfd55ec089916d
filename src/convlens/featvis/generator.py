"""A generator prior for activation maximization (Nguyen et al. 2016, "DGN-AM", with a small VAE).

Instead of the pixels, the latent code z of a decoder trained on the data set is optimized:
maximize objective(network(decoder(z))) − latent_decay·mean(z²). Every image is then a
plausible digit, so the result shows *what the network accepts as the class* rather than the
network's own features. The VAE (MLP encoder/decoder) is trained once and cached (``cached.py``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cached import cached_network

LATENT = 8
HIDDEN = 256
VAE_VERSION = f"v1-mlp{HIDDEN}-z{LATENT}-e8-seed0"


class VAE(nn.Module):
    """784 → 256 → (μ, log σ²) ∈ R⁸ ; decoder 8 → 256 → 784 (sigmoid): images in [0, 1]."""

    def __init__(self, latent: int = LATENT, hidden: int = HIDDEN):
        super().__init__()
        self.latent = latent
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, 784), nn.Sigmoid(),
                                     nn.Unflatten(1, (1, 28, 28)))

    def forward(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=gen)
        return self.decoder(z), mu, logvar


def vae_loss(recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Negative ELBO per image: binary cross-entropy of the pixels + KL(q(z|x) ‖ N(0, I))."""
    bce = F.binary_cross_entropy(recon, x, reduction="sum") / len(x)
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / len(x)
    return bce + kl


def fit_vae(vae: VAE, epochs: int = 8, batch: int = 128, seed: int = 0) -> dict:
    from ..data.mnist import load_mnist

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, _ = load_mnist("train").tensors()
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    per_epoch = math.ceil(len(x) / batch)
    vae.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for group in opt.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        for i in range(per_epoch):
            xb = x[perm[i * batch:(i + 1) * batch]]
            recon, mu, logvar = vae(xb, gen)
            loss = vae_loss(recon, xb, mu, logvar)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    vae.eval()
    xt, _ = load_mnist("test").tensors()
    with torch.no_grad():
        recon, mu, logvar = vae(xt, torch.Generator().manual_seed(seed))
        test_loss = float(vae_loss(recon, xt, mu, logvar))
    return {"test_negative_elbo": test_loss, "epochs": epochs, "seed": seed, "latent": vae.latent}


def load_decoder(folder=None) -> tuple[nn.Module, dict]:
    """The cached VAE's decoder: z ∈ R⁸ → image in [0, 1] (trained on first use, about a minute on one core)."""
    vae, meta = cached_network("mnist-vae", VAE_VERSION, VAE, fit_vae, folder)
    return vae.decoder, meta


class LatentParam:
    """The image is decoder(z), mapped to the model's input range; z is optimized."""

    def __init__(self, decoder: nn.Module, z0: torch.Tensor, input_range: tuple[float, float]):
        self.decoder = decoder
        self.z = z0.clone().requires_grad_(True)
        self.lo, self.span = input_range[0], input_range[1] - input_range[0]

    def parameters(self) -> list[torch.Tensor]:
        return [self.z]

    def image(self) -> torch.Tensor:
        return self.lo + self.span * self.decoder(self.z)
