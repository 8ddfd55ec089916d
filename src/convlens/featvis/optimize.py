"""The activation-maximization engine: many objectives and regularizer weights in one batch.

Two modes:

* ``default`` — Adam on the pixels, clipped to the input range every step, TV/√N, zero-padded
  jitter (3 px); optionally a data-informed start image (``init``, e.g. the training mean) and
  L2 decay outside a central box (``border_decay``), as ``run.py`` sets them for small grayscale
  networks (or, for colour images, an optional Fourier / decorrelated-colour parameterization).
* ``kerasvis`` — keras-vis 0.4.1's ``Optimizer.minimize`` (docs/activation-maximization.md, checked against its source):
  uniform noise start standardized with the population std (mean = middle of the input range,
  std = 5 % of it), gradient divided by its RMS, RMSprop with lr 1 (cache = 0.95·cache + 0.05·g²,
  step g/√(cache + 1e-7)), Lp (p = 6, weight 10) and TV terms; the input kept is the one *after*
  the step whose loss was the lowest; each image rescaled on its own: (x − mean)/(std + 1e-7)·0.1 + 0.5,
  population std.

Every random draw comes from one generator per image (``RandomPlan``), seeded by ``seed`` (one
seed for all images, or one per image): an image does not depend on its batch companions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import ConvlensError
from ..hooks import capture, frozen
from ..progress import progress as progress_of
from ..runtime import channels_last, channels_last_weights
from .objectives import LOGITS, Objective
from .generator import LatentParam
from .param import FourierColorParam, PixelParam, RandomPlan
from .regularizers import border_decay, l2_decay, lp_norm, total_variation

Weights = float | Sequence[float]


@dataclass
class ActMaxConfig:
    steps: int = 200
    mode: str = "default"
    lr: float = 0.05
    tv_weight: Weights = 2.0
    tv_beta: float = 2.0
    lp_weight: Weights | None = None  # default: 0 (default mode), 10 (kerasvis)
    lp_p: float = 6.0
    decay: Weights | None = None  # L2 decay of every pixel; default: 20 (default mode), 0 (kerasvis, fourier)
    border_decay: Weights = 0.0  # L2 decay of the pixels outside the central box (default mode)
    border_box: int = 20  # side of the central box that border_decay spares
    jitter: int | None = None  # default: 3 px zero-padded (default mode), 0 (kerasvis; circular when set)
    rotate: float = 0.0
    scale: float = 0.0
    param: str = "pixel"  # or "fourier" (colour images)
    init: torch.Tensor | None = None  # start image(s) in model input space, (C, H, W) or (B, C, H, W)
    init_noise: float = 0.1  # std of the start noise, as a fraction of the input range (default mode)
    decoder: nn.Module | None = None  # generator prior: optimize z of image = decoder(z) ∈ [0, 1] instead
    latent_decay: float = 1.0  # generator prior: weight of mean(z²), keeps z where the decoder was trained
    input_range: tuple[float, float] = (0.0, 1.0)
    to_input: Callable[[torch.Tensor], torch.Tensor] | None = None  # [0,1] RGB → model input (fourier)
    seed: int | Sequence[int] = 0  # one seed for every image, or one per image
    progress: bool = False


@dataclass
class ActMaxResult:
    images: torch.Tensor      # (B, C, H, W) what the model sees
    display: torch.Tensor     # (B, C, H, W) in [0, 1] for showing
    objective: torch.Tensor   # (B,) objective value of the final images
    tv: torch.Tensor          # (B,) total variation of the final images
    probabilities: torch.Tensor  # (B, classes) softmax of the model on the final images
    history: list[float] = field(default_factory=list)


def per_sample(weights: Weights | None, n: int, name: str, default: float = 0.0) -> torch.Tensor:
    """A scalar or one weight per sample → (n,) tensor; negative or non-finite weights are refused."""
    w = torch.as_tensor(default if weights is None else weights, dtype=torch.float32).flatten()
    if w.numel() == 1:
        w = w.expand(n)
    if w.numel() != n:
        raise ConvlensError(f"{w.numel()} {name} values for {n} images")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ConvlensError(f"{name} must be finite and non-negative, got {w.tolist()}")
    return w.clone()


class Evaluator:
    """Objective values for a batch where each row has its own objective (rows grouped by objective)."""

    def __init__(self, model: nn.Module, objectives: Sequence[Objective]):
        self.model = model
        self.layers = sorted(set().union(*(o.layers for o in objectives)) - {LOGITS})
        groups: dict[Objective, list[int]] = {}
        for i, obj in enumerate(objectives):
            groups.setdefault(obj, []).append(i)
        self.groups = [(obj, torch.tensor(rows)) for obj, rows in groups.items()]
        self.n = len(objectives)
        self.coefficients = None  # all objectives linear in the logits: one weighted sum for the batch
        if all(o.linear is not None for o in objectives):
            classes = 1 + max((c for o in objectives for c in o.linear), default=0)
            self.coefficients = torch.zeros(self.n, classes)
            for i, obj in enumerate(objectives):
                for c, w in obj.linear.items():
                    self.coefficients[i, c] = w

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective per row (B,), logits (B, classes))."""
        with capture(self.model, self.layers) as kept:
            logits = self.model(channels_last(x))
        if self.coefficients is not None:
            k = self.coefficients.shape[1]
            return (logits[:, :k] * self.coefficients.to(logits)).sum(1), logits
        outputs = {LOGITS: logits, **{name: kept[name] for name in self.layers}}
        if len(self.groups) == 1:
            return self.groups[0][0](outputs), logits
        parts = [(rows, obj({k: v[rows] for k, v in outputs.items()})) for obj, rows in self.groups]
        values = torch.zeros(self.n, dtype=logits.dtype, device=logits.device).index_put(
            (torch.cat([r for r, _ in parts]).to(logits.device),),
                                                                    torch.cat([v for _, v in parts]))
        return values, logits


def check_config(cfg: ActMaxConfig) -> None:
    if cfg.steps <= 0:
        raise ConvlensError(f"steps must be positive, got {cfg.steps}")
    if cfg.mode not in ("default", "kerasvis"):
        raise ConvlensError(f"unknown mode {cfg.mode!r}; use default or kerasvis")
    if cfg.param not in ("pixel", "fourier"):
        raise ConvlensError(f"unknown parameterization {cfg.param!r}; use pixel or fourier")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ConvlensError(f"learning rate must be positive, got {cfg.lr}")
    if (cfg.jitter or 0) < 0:
        raise ConvlensError(f"jitter must be non-negative, got {cfg.jitter}")


def pixel_default(cfg: ActMaxConfig) -> bool:
    return cfg.mode == "default" and cfg.param == "pixel" and cfg.decoder is None


def image_seeds(seed: int | Sequence[int], n: int) -> list[int]:
    seeds = [int(seed)] * n if isinstance(seed, (int, float)) else [int(s) for s in seed]
    if len(seeds) != n:
        raise ConvlensError(f"{len(seeds)} seeds for {n} images")
    return seeds


def maximize(model: nn.Module, objectives: Sequence[Objective], shape: Sequence[int],
             config: ActMaxConfig | None = None) -> ActMaxResult:
    """Optimize one image per objective, all in one batch (see module docstring)."""
    cfg = config or ActMaxConfig()
    check_config(cfg)
    n = len(objectives)
    if n == 0:
        raise ConvlensError("no objectives to maximize")
    kerasvis = cfg.mode == "kerasvis"
    weights = {"tv": per_sample(cfg.tv_weight, n, "tv weight"),
               "lp": per_sample(cfg.lp_weight, n, "lp weight", 10.0 if kerasvis else 0.0),
               "decay": per_sample(cfg.decay, n, "decay", 20.0 if pixel_default(cfg) else 0.0),
               "border": per_sample(cfg.border_decay, n, "border decay")}
    jitter = cfg.jitter if cfg.jitter is not None else (0 if kerasvis else 3)
    # draws on the CPU, one generator per image, so results match on every device and in every batch
    plan = RandomPlan(image_seeds(cfg.seed, n), cfg.steps, jitter, cfg.rotate, cfg.scale)
    device = next(iter(model.parameters()), torch.zeros(())).device
    weights = {k: v.to(device) for k, v in weights.items()}
    evaluator = Evaluator(model, objectives)
    with frozen(model), channels_last_weights(model):
        run = run_kerasvis if kerasvis else run_default
        return run(evaluator, n, tuple(shape), cfg, weights, plan, device)


def tv_scale(x: torch.Tensor) -> float:
    """Default mode: TV is divided by √N rather than N (N = C·H·W).

    keras-vis' TV/N is so small next to a logit that on 28×28 inputs the lab's weights
    0.125…16 change nothing when pixels are clipped to the input range; with TV/√N the
    same weights go from noisy to smooth, so the lab's sweep is meaningful again.
    """
    return math.sqrt(x[0].numel())


def regularized_loss(x: torch.Tensor, values: torch.Tensor, cfg: ActMaxConfig, w: dict) -> torch.Tensor:
    """−objective + tv·TV + lp·Lp + decay·mean(x²) + border·mean(mask·(x − lo)²), one value per image."""
    tv = total_variation(x, cfg.tv_beta)
    if cfg.mode == "default":  # TV / √N instead of keras-vis' TV / N (see tv_scale)
        tv = tv * tv_scale(x)
    loss = -values + w["tv"] * tv
    if bool((w["lp"] > 0).any()):
        loss = loss + w["lp"] * lp_norm(x, cfg.lp_p)
    if bool((w["decay"] > 0).any()):
        loss = loss + w["decay"] * l2_decay(x)
    if bool((w["border"] > 0).any()):
        loss = loss + w["border"] * border_decay(x, cfg.border_box, cfg.input_range[0])
    return loss


def finish(evaluator: Evaluator, images: torch.Tensor, display: torch.Tensor, history, cfg) -> ActMaxResult:
    with torch.no_grad():
        values, logits = evaluator(images)
        tv = total_variation(images, cfg.tv_beta)
    return ActMaxResult(images.detach(), display.detach(), values, tv, logits.softmax(1), history)


def start_images(n: int, shape: tuple, cfg: ActMaxConfig, plan: RandomPlan) -> torch.Tensor:
    """``init`` (or a dark grey, 20 % of the range) plus Gaussian noise of std ``init_noise``·range, clipped."""
    lo, hi = cfg.input_range
    noise = plan.draw(lambda g: torch.randn(shape, generator=g))
    if cfg.init is None:
        base = torch.full((n, *shape), lo + 0.2 * (hi - lo))
    else:
        base = cfg.init.detach().float().cpu()
        base = base.expand(n, *shape) if base.dim() == len(shape) or base.shape[0] == 1 else base
        if tuple(base.shape) != (n, *shape):
            raise ConvlensError(f"start image of shape {tuple(cfg.init.shape)} for {n} images of shape {shape}")
    return (base + cfg.init_noise * (hi - lo) * noise).clamp(lo, hi)


def decoder_latent_size(decoder: nn.Module) -> int:
    first = next(m for m in decoder.modules() if isinstance(m, nn.Linear))
    return first.in_features


def run_default(evaluator, n, shape, cfg: ActMaxConfig, w, plan: RandomPlan, device) -> ActMaxResult:
    lo, hi = cfg.input_range
    latent = None
    if cfg.decoder is not None:
        size = decoder_latent_size(cfg.decoder)
        param = LatentParam(cfg.decoder, plan.draw(lambda g: torch.randn(size, generator=g)).to(device),
                            cfg.input_range)
        to_model, latent = None, param.z
    elif cfg.param == "fourier":
        if shape[0] != 3 or cfg.to_input is None:
            raise ConvlensError("the Fourier parameterization needs a colour model and its input mapping")
        param = FourierColorParam(plan.generators, shape[1:], device=device)
        to_model = cfg.to_input
    else:
        param = PixelParam(start_images(n, shape, cfg, plan).to(device))
        to_model = None
    plan.draw_transforms()
    opt = torch.optim.Adam(param.parameters(), lr=cfg.lr)
    history = []
    for step in progress_of(range(cfg.steps), desc="activation maximization", unit="step", enabled=cfg.progress):
        img = param.image()
        x = to_model(img) if to_model else img
        values, _ = evaluator(plan.transform(x, step, "zero", lo))
        loss = regularized_loss(x, values, cfg, w)
        if latent is not None:
            loss = loss + cfg.latent_decay * latent.pow(2).mean(1)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        if isinstance(param, PixelParam):
            with torch.no_grad():
                param.x.clamp_(lo, hi)
        history.append(float(loss.detach().mean()))
    with torch.no_grad():
        img = param.image()
        images = to_model(img) if to_model else img
        display = img if to_model else (images - lo) / (hi - lo)
    return finish(evaluator, images, display, history, cfg)


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Per image (x − mean)/(std + 1e-7) with the population std, as keras-vis' NumPy code does."""
    mean = x.mean((1, 2, 3), keepdim=True)
    return (x - mean) / (x.std(dim=(1, 2, 3), correction=0, keepdim=True) + 1e-7)


def run_kerasvis(evaluator, n, shape, cfg: ActMaxConfig, w, plan: RandomPlan, device) -> ActMaxResult:
    """keras-vis 0.4.1 ``Optimizer.minimize``: the loss is scored at x, the step applied, and the input
    kept is the one after the step of the lowest scored loss (``best_input = seed_input.copy()``)."""
    lo, hi = cfg.input_range
    mid, span = (lo + hi) / 2, hi - lo
    noise = standardize(plan.draw(lambda g: torch.rand(shape, generator=g)))
    plan.draw_transforms()
    x = (mid + 0.05 * span * noise).to(device).requires_grad_(True)
    cache = torch.zeros_like(x)
    best_loss = torch.full((n,), math.inf, device=device)
    best = x.detach().clone()
    history = []
    for step in progress_of(range(cfg.steps), desc="activation maximization (keras-vis)", unit="step",
                            enabled=cfg.progress):
        values, _ = evaluator(plan.transform(x, step, "circular", lo))
        loss = regularized_loss(x, values, cfg, w)
        grad = torch.autograd.grad(loss.sum(), x)[0]
        with torch.no_grad():
            grad = grad / (grad.pow(2).mean((1, 2, 3), keepdim=True).sqrt() + 1e-7)
            cache.mul_(0.95).add_(0.05 * grad * grad)
            x -= grad / torch.sqrt(cache + 1e-7)
            improved = loss.detach() < best_loss
            best[improved] = x.detach()[improved]
            best_loss = torch.where(improved, loss.detach(), best_loss)
        history.append(float(loss.detach().mean()))
    display = (standardize(best) * 0.1 + 0.5).clamp(0, 1)
    images = cfg.to_input(display) if cfg.to_input else lo + display * span
    return finish(evaluator, images, display, history, cfg)
