"""The activation-maximization engine: many objectives and regularizer weights in one batch.

Two modes:

* ``default`` — the best we found for small grayscale networks: Adam on the pixels,
  1-px jitter, clipping to the input range every step (or, for colour images, an
  optional Fourier / decorrelated-colour parameterization).
* ``kerasvis`` — keras-vis 0.4.1 as documented in docs/activation-maximization.md: noise start (mean = middle of
  the input range, std = 5 % of it), gradient divided by its RMS, RMSprop with lr 1
  (cache = 0.95·cache + 0.05·g², step g/√(cache + 1e-7)), Lp (p = 6, weight 10) and TV
  terms, best iterate kept, each image rescaled on its own: (x − mean)/std·0.1 + 0.5.
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
from ..runtime import channels_last_weights
from .objectives import LOGITS, Objective
from .param import FourierColorParam, PixelParam, jitter, rotate_scale
from .regularizers import l2_decay, lp_norm, total_variation

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
    decay: Weights | None = None  # default: 20 (default mode, keeps the background dark), 0 (kerasvis)
    jitter: int | None = None  # default: 1 px (default mode), 0 (kerasvis)
    rotate: float = 0.0
    scale: float = 0.0
    param: str = "pixel"  # or "fourier" (colour images)
    input_range: tuple[float, float] = (0.0, 1.0)
    to_input: Callable[[torch.Tensor], torch.Tensor] | None = None  # [0,1] RGB → model input (fourier)
    seed: int = 0
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
            logits = self.model(x.contiguous(memory_format=torch.channels_last))
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
               "decay": per_sample(cfg.decay, n, "decay", 0.0 if kerasvis or cfg.param == "fourier" else 20.0)}
    gen = torch.Generator().manual_seed(cfg.seed)  # draws on the CPU, so results match on every device
    device = next(iter(model.parameters()), torch.zeros(())).device
    weights = {k: v.to(device) for k, v in weights.items()}
    evaluator = Evaluator(model, objectives)
    with frozen(model), channels_last_weights(model):
        run = run_kerasvis if kerasvis else run_default
        return run(evaluator, n, tuple(shape), cfg, weights, gen, device)


def tv_scale(x: torch.Tensor) -> float:
    """Default mode: TV is divided by √N rather than N (N = C·H·W).

    keras-vis' TV/N is so small next to a logit that on 28×28 inputs the lab's weights
    0.125…16 change nothing when pixels are clipped to the input range; with TV/√N the
    same weights go from noisy to smooth, so the lab's sweep is meaningful again.
    """
    return math.sqrt(x[0].numel())


def regularized_loss(x: torch.Tensor, values: torch.Tensor, cfg: ActMaxConfig, w: dict) -> torch.Tensor:
    tv = total_variation(x, cfg.tv_beta)
    if cfg.mode == "default":  # TV / √N instead of keras-vis' TV / N (see tv_scale)
        tv = tv * tv_scale(x)
    loss = -values + w["tv"] * tv
    if bool((w["lp"] > 0).any()):
        loss = loss + w["lp"] * lp_norm(x, cfg.lp_p)
    if bool((w["decay"] > 0).any()):
        loss = loss + w["decay"] * l2_decay(x)
    return loss


def finish(evaluator: Evaluator, images: torch.Tensor, display: torch.Tensor, history, cfg) -> ActMaxResult:
    with torch.no_grad():
        values, logits = evaluator(images)
        tv = total_variation(images, cfg.tv_beta)
    return ActMaxResult(images.detach(), display.detach(), values, tv, logits.softmax(1), history)


def run_default(evaluator, n, shape, cfg: ActMaxConfig, w, gen, device) -> ActMaxResult:
    lo, hi = cfg.input_range
    pixels = 1 if cfg.jitter is None else cfg.jitter
    if cfg.param == "fourier":
        if shape[0] != 3 or cfg.to_input is None:
            raise ConvlensError("the Fourier parameterization needs a colour model and its input mapping")
        param = FourierColorParam(n, shape[1:], gen, device=device)
        to_model = cfg.to_input
    else:
        init = lo + (hi - lo) * (0.2 + 0.1 * torch.randn((n, *shape), generator=gen))
        param = PixelParam(init.clamp(lo, hi).to(device))
        to_model = None
    opt = torch.optim.Adam(param.parameters(), lr=cfg.lr)
    history = []
    for _ in progress_of(range(cfg.steps), desc="activation maximization", unit="step", enabled=cfg.progress):
        img = param.image()
        x = to_model(img) if to_model else img
        xt = rotate_scale(jitter(x, pixels, gen), cfg.rotate, cfg.scale, gen)
        values, _ = evaluator(xt)
        loss = regularized_loss(x, values, cfg, w)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        if to_model is None:
            with torch.no_grad():
                param.x.clamp_(lo, hi)
        history.append(float(loss.detach().mean()))
    with torch.no_grad():
        img = param.image()
        images = to_model(img) if to_model else img
        display = img if to_model else (images - lo) / (hi - lo)
    return finish(evaluator, images, display, history, cfg)


def run_kerasvis(evaluator, n, shape, cfg: ActMaxConfig, w, gen, device) -> ActMaxResult:
    lo, hi = cfg.input_range
    mid, span = (lo + hi) / 2, hi - lo
    noise = torch.rand((n, *shape), generator=gen)
    noise = (noise - noise.mean((1, 2, 3), keepdim=True)) / noise.std(dim=(1, 2, 3), keepdim=True)
    x = (mid + 0.05 * span * noise).to(device).requires_grad_(True)
    cache = torch.zeros_like(x)
    best_loss = torch.full((n,), math.inf, device=device)
    best = x.detach().clone()
    pixels = cfg.jitter or 0
    history = []
    for _ in progress_of(range(cfg.steps), desc="activation maximization (keras-vis)", unit="step",
                      enabled=cfg.progress):
        xt = rotate_scale(jitter(x, pixels, gen), cfg.rotate, cfg.scale, gen)
        values, _ = evaluator(xt)
        loss = regularized_loss(x, values, cfg, w)
        grad = torch.autograd.grad(loss.sum(), x)[0]
        with torch.no_grad():
            improved = loss.detach() < best_loss
            best[improved] = x.detach()[improved]
            best_loss = torch.where(improved, loss.detach(), best_loss)
            grad = grad / (grad.pow(2).mean((1, 2, 3), keepdim=True).sqrt() + 1e-7)
            cache.mul_(0.95).add_(0.05 * grad * grad)
            x -= grad / torch.sqrt(cache + 1e-7)
        history.append(float(loss.detach().mean()))
    mean = best.mean((1, 2, 3), keepdim=True)
    std = best.std(dim=(1, 2, 3), keepdim=True) + 1e-7
    display = ((best - mean) / std * 0.1 + 0.5).clamp(0, 1)
    images = cfg.to_input(display) if cfg.to_input else lo + display * span
    return finish(evaluator, images, display, history, cfg)
