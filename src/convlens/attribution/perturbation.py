"""Perturbation and sampling methods: maps from the scores of masked copies of the input.

A masked copy keeps the input where the mask is 1 and the baseline where it is 0:
x̃ = x ⊙ m + b ⊙ (1 − m) (exactly x where m = 1). Every method hands its masks to one engine
(:meth:`PerturbationMethod.masked_scores`) that runs the copies in batches of ``batch_size`` (default: :func:`~convlens.attribution.batching.auto_batch_size`), in
inference mode and channels-last, and skips a copy that equals its input exactly (every pixel
it removes already equals the baseline): its score is the clean score, no forward needed.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..baselines import make_baseline
from ..errors import ConvlensError
from ..runtime import channels_last, channels_last_weights
from .base import Attribution, Method, Target
from .batching import auto_batch_size
from .segment import feature_labels

MaskFn = Callable[[int, int, int], torch.Tensor]  # (sample, start, stop) → (stop − start, H, W) keep masks


class PerturbationMethod(Method):
    """Template: clean scores, masked copies through :meth:`masked_scores`, a map from the score changes.

    ``baseline``: see :func:`convlens.baselines.make_baseline` ('zero', 'mean', 'blur', a number, a tensor);
    ``score``: 'logit' (the explained output) or 'probability' (its softmax).
    """

    score = "logit"

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear", baseline=0.0,
                 batch_size: int | None = None):
        super().__init__(model, layer, output_selector, interpolation)
        if batch_size is not None and batch_size <= 0:
            raise ConvlensError(f"{self.name}: batch size must be positive")
        self.baseline, self.batch_size = baseline, batch_size

    def outputs(self, batch: torch.Tensor) -> torch.Tensor:
        """The model's scores (softmaxed for ``score='probability'``), in inference mode."""
        with torch.inference_mode(), channels_last_weights(self.model):
            out = self.scores(channels_last(batch))
            return F.softmax(out, 1) if self.score == "probability" else out

    def masked_scores(self, x: torch.Tensor, base: torch.Tensor, masks: MaskFn, counts: list[int],
                      clean: torch.Tensor, target: Target) -> list[torch.Tensor]:
        """Per sample n, the scores of its ``counts[n]`` masked copies (``masks(n, start, stop)``)."""
        results = [clean[n].repeat(counts[n]).clone() for n in range(len(x))]
        batch = self.batch_size or auto_batch_size(x, most=256)
        pending: list[tuple[torch.Tensor, int, torch.Tensor]] = []  # (copies, sample, copy indices)

        def flush():
            if not pending:
                return
            batch = torch.cat([p[0] for p in pending])
            rows = torch.cat([torch.full((len(p[2]),), p[1], dtype=torch.long) for p in pending])
            scores = target.select(rows).explained(self.outputs(batch))
            start = 0
            for copies, n, idx in pending:
                results[n][idx] = scores[start:start + len(idx)]
                start += len(idx)
            pending.clear()

        for n in range(len(x)):
            changed = (x[n] != base[n]).any(0)
            chunk = batch
            for start in range(0, counts[n], chunk):
                m = masks(n, start, min(start + chunk, counts[n]))
                needed = ((m < 1) & changed).flatten(1).any(1).nonzero().flatten()
                if len(needed) == 0:
                    continue
                keep = m[needed, None].to(x.dtype)
                pending.append((x[n] * keep + base[n] * (1 - keep), n, needed + start))
                if sum(len(p[2]) for p in pending) >= batch:
                    flush()
        flush()
        return results

    def shared_masked_scores(self, x: torch.Tensor, base: torch.Tensor, masks: Callable[[int, int], torch.Tensor],
                             count: int, clean: torch.Tensor, target: Target) -> torch.Tensor:
        """(count, N) scores when every image gets the same ``count`` masks (``masks(start, stop)``): each
        chunk of masks is applied to the whole batch in one broadcast; unchanged copies are skipped."""
        batch = self.batch_size or auto_batch_size(x, most=256)
        per_chunk = max(1, batch // len(x))
        changed = (x != base).any(1)                                                    # (N, H, W)
        out = clean[None].repeat(count, 1)
        for start in range(0, count, per_chunk):
            m = masks(start, min(start + per_chunk, count))                             # (k, H, W)
            needed = ((m[:, None] < 1) & changed[None]).flatten(2).any(2)               # (k, N)
            if bool(needed.all()):
                keep = m[:, None, None].to(x.dtype)                                     # (k, 1, 1, H, W)
                copies = (x[None] * keep + base[None] * (1 - keep)).flatten(0, 1)
                rows = torch.arange(len(x)).repeat(len(m))
                out[start:start + len(m)] = target.select(rows).explained(self.outputs(copies)).view(len(m), -1)
                continue
            which = needed.nonzero()
            if len(which) == 0:
                continue
            keep = m[which[:, 0], None].to(x.dtype)
            copies = x[which[:, 1]] * keep + base[which[:, 1]] * (1 - keep)
            out[start + which[:, 0], which[:, 1]] = target.select(which[:, 1].cpu()).explained(self.outputs(copies))
        return out

    def prepare(self, x: torch.Tensor, target) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Target]:
        """(x, baseline, clean explained scores, resolved target)."""
        out = self.outputs(x)
        resolved = self.resolve_target(target, out)
        return x, make_baseline(x, self.baseline), resolved.explained(out).clone(), resolved

    def result(self, raw: torch.Tensor, target: Target) -> Attribution:
        return Attribution(self.name, raw, raw, target)


# ------------------------------------------------------------------ occlusion
def pair(value, height: int, width: int) -> tuple[int, int]:
    """(h, w) from an int, a pair, or a fraction in (0, 1) of each side (rounded, at least 1)."""
    a, b = (value, value) if isinstance(value, (int, float)) else value
    if isinstance(a, float) and 0 < a < 1:
        return max(1, round(a * height)), max(1, round(b * width))
    return int(a), int(b)


class Occlusion(PerturbationMethod):
    """Zeiler & Fergus 2014: slide a ``window`` (all channels) by ``stride``, set it to the baseline;
    a pixel's value is the mean of y^c(x) − y^c(x̃) over the windows covering it.

    Windows start at 0, s, 2s, … up to ⌈(H − h)/s⌉·s, clipped at the border (Captum's placement).
    ``window`` / ``stride``: pixels (int or pair) or a fraction of the side (float < 1). Default window: an
    eighth of the shorter side (at least 2), stride half the window.
    """

    name = "occlusion"
    signed = True
    fast_options = {"window": 0.25, "stride": 0.125}

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear", baseline=0.0,
                 batch_size: int | None = None, window=None, stride=None):
        super().__init__(model, layer, output_selector, interpolation, baseline, batch_size)
        self.window, self.stride = window, stride

    def geometry(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        default = min(max(2, round(min(height, width) / 8)), height, width)
        wh, ww = pair(self.window if self.window is not None else default, height, width)
        sh, sw = pair(self.stride if self.stride is not None else (max(1, wh // 2), max(1, ww // 2)), height, width)
        if wh <= 0 or ww <= 0 or sh <= 0 or sw <= 0:
            raise ConvlensError("occlusion window and stride must be positive")
        if wh > height or ww > width:
            raise ConvlensError(f"occlusion window {wh}×{ww} is larger than the input {height}×{width}")
        if (sh > wh and wh < height) or (sw > ww and ww < width):
            raise ConvlensError(f"occlusion stride {sh}×{sw} larger than the window {wh}×{ww} leaves pixels out")
        return (wh, ww), (sh, sw)

    def windows(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """(top, bottom, left, right) of every window, row-major."""
        (wh, ww), (sh, sw) = self.geometry(height, width)
        tops = [k * sh for k in range(math.ceil((height - wh) / sh) + 1)]
        lefts = [k * sw for k in range(math.ceil((width - ww) / sw) + 1)]
        return [(t, min(t + wh, height), l, min(l + ww, width)) for t in tops for l in lefts]

    def compute(self, x, target) -> Attribution:
        wins = self.windows(*x.shape[-2:])
        x, base, clean, target = self.prepare(x, target)
        covered = torch.zeros(len(wins), *x.shape[-2:], dtype=x.dtype, device=x.device)
        for j, (t, b, l, r) in enumerate(wins):
            covered[j, t:b, l:r] = 1
        scores = self.shared_masked_scores(x, base, lambda a, b: 1 - covered[a:b], len(wins), clean, target)
        total = torch.einsum("jn,jhw->nhw", clean[None] - scores, covered)
        return self.result(total / covered.sum(0), target)


# ------------------------------------------------------------------ feature methods
class FeatureMethod(PerturbationMethod):
    """Perturbation over features: pixel groups from ``features`` ('grid' with ``cells`` per side, 'slic'
    superpixels with about ``segments`` of them, or an integer label tensor (H, W) / (N, H, W))."""

    default_features = "grid"

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear", baseline=0.0,
                 batch_size: int | None = None, features=None, cells: int = 4, segments: int = 25):
        super().__init__(model, layer, output_selector, interpolation, baseline, batch_size)
        self.features = features if features is not None else self.default_features
        self.cells, self.segments = cells, segments

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        return feature_labels(self.features, x, self.cells, self.segments)

    def coalition_scores(self, x, base, labels, coalitions: list[torch.Tensor], clean, target: Target):
        """Scores of each sample's coalitions (rows of ``coalitions[n]``, (S_n, F_n) bool). A coalition drawn
        more than once (random draws over few features) is scored once."""
        distinct = [torch.unique(c, dim=0, return_inverse=True) for c in coalitions]
        scores = self.distinct_coalition_scores(x, base, labels, [d for d, _ in distinct], clean, target)
        return [s[inverse] for s, (_, inverse) in zip(scores, distinct)]

    def distinct_coalition_scores(self, x, base, labels, coalitions: list[torch.Tensor], clean, target: Target):
        """:meth:`coalition_scores` without the deduplication; when every image has the same labels and
        coalitions (a grid) they run through the shared, broadcast path."""
        if all(torch.equal(labels[0], lab) and torch.equal(coalitions[0], c) for lab, c in zip(labels, coalitions)):
            shared = self.shared_masked_scores(x, base, lambda a, b: coalitions[0][a:b][:, labels[0]].float(),
                                               len(coalitions[0]), clean, target)
            return list(shared.T)

        def masks(n, start, stop):
            return coalitions[n][start:stop][:, labels[n]].float()

        return self.masked_scores(x, base, masks, [len(c) for c in coalitions], clean, target)

    @staticmethod
    def paint(values: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Per-feature values → (N, H, W) maps."""
        return torch.stack([v.to(labels.device)[lab] for v, lab in zip(values, labels)])


class FeatureAblation(FeatureMethod):
    """Feature ablation: φ_f = y^c(x) − y^c(x with feature f at the baseline), painted on feature f."""

    name = "feature-ablation"
    default_features = "grid"
    signed = True
    fast_options = {"cells": 4}

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear", baseline=0.0,
                 batch_size: int | None = None, features=None, cells: int = 8, segments: int = 25):
        super().__init__(model, layer, output_selector, interpolation, baseline, batch_size, features, cells,
                         segments)

    def compute(self, x, target) -> Attribution:
        x, base, clean, target = self.prepare(x, target)
        labels = self.labels(x)
        coalitions = [~torch.eye(int(lab.max()) + 1, dtype=torch.bool, device=x.device) for lab in labels]
        scores = self.coalition_scores(x, base, labels, coalitions, clean, target)
        return self.result(self.paint([clean[n] - s for n, s in enumerate(scores)], labels), target)


class ShapleySampling(FeatureMethod):
    """Castro et al. 2009: Shapley values estimated over ``permutations`` random feature orders.

    For each order, features are switched from the baseline to the input one at a time; φ_f is the
    mean score change when f is added. Orders are ``torch.randperm`` draws from a generator seeded
    with ``seed`` (Captum's ShapleyValueSampling draws the same ones after ``torch.manual_seed(seed)``).
    Σ_f φ_f = y(x) − y(baseline) exactly, for any number of orders.
    """

    name = "shapley-sampling"
    signed = True
    fast_options = {"permutations": 2}

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear", baseline=0.0,
                 batch_size: int | None = None, features=None, cells: int = 4, segments: int = 16,
                 permutations: int = 4, seed: int = 0):
        super().__init__(model, layer, output_selector, interpolation, baseline, batch_size, features, cells,
                         segments)
        if permutations <= 0:
            raise ConvlensError("Shapley sampling needs permutations > 0")
        self.permutations, self.seed = permutations, seed

    def compute(self, x, target) -> Attribution:
        x, base, clean, target = self.prepare(x, target)
        labels = self.labels(x)
        orders, coalitions = [], []
        for lab in labels:
            f = int(lab.max()) + 1
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            perms = torch.stack([torch.randperm(f, generator=gen) for _ in range(self.permutations)]).to(x.device)
            # state k of an order has its first k features on; state 0 (the baseline) is shared
            ranks = torch.empty_like(perms).scatter_(1, perms, torch.arange(f, device=x.device).expand_as(perms))
            states = ranks[:, None, :] < torch.arange(1, f + 1, device=x.device)[None, :, None]   # (P, F, F)
            orders.append(perms)
            coalitions.append(torch.cat([torch.zeros(1, f, dtype=torch.bool, device=x.device), states.flatten(0, 1)]))
        scores = self.coalition_scores(x, base, labels, coalitions, clean, target)
        values = []
        for perms, s in zip(orders, scores):
            p, f = perms.shape
            chain = torch.cat([s[:1].expand(p, 1), s[1:].view(p, f)], 1)                         # (P, F+1)
            gains = chain[:, 1:] - chain[:, :-1]
            values.append(torch.zeros(f, dtype=s.dtype, device=s.device).index_add_(
                0, perms.flatten(), gains.flatten()) / p)
        return self.result(self.paint(values, labels), target)


def solve_weighted(design: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """argmin_β Σ w (y − Xβ)² + ridge‖β‖², in float64 on the CPU with the minimum-norm solver (gelsd), so a
    rank-deficient design (fewer informative samples than features) gives the same answer on every device."""
    x, y, w = design.detach().cpu().double(), y.detach().cpu().double(), weights.detach().cpu().double()
    gram = x.T @ (w[:, None] * x) + ridge * torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.lstsq(gram, x.T @ (w * y), driver="gelsd").solution.to(design.device)


class KernelSHAP(FeatureMethod):
    """Lundberg & Lee 2017: Shapley values as the weighted least-squares fit of y(z) on coalitions z,
    with the Shapley kernel π(z) = (F − 1) / (C(F, |z|)·|z|·(F − |z|)) and the constraints
    φ₀ = y(baseline), Σφ = y(x) − y(baseline) (one coefficient eliminated).

    When 2^F − 2 ≤ ``samples`` every coalition is enumerated (the result is then the exact Shapley
    values); otherwise coalition sizes are drawn ∝ the kernel's mass per size and members uniformly,
    from a generator seeded with ``seed``, and the fit is unweighted.
    """

    name = "kernel-shap"
    signed = True
    fast_options = {"samples": 32}

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear", baseline=0.0,
                 batch_size: int | None = None, features=None, cells: int = 4, segments: int = 16, samples: int = 128,
                 seed: int = 0):
        super().__init__(model, layer, output_selector, interpolation, baseline, batch_size, features, cells,
                         segments)
        if samples <= 0:
            raise ConvlensError("KernelSHAP needs samples > 0")
        self.samples, self.seed = samples, seed

    def coalitions(self, f: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, F) bool coalitions (neither empty nor full) and their regression weights."""
        if f < 2:
            return torch.zeros(0, f, dtype=torch.bool, device=device), torch.zeros(0, device=device)
        if 2 ** f - 2 <= self.samples:
            codes = torch.arange(1, 2 ** f - 1, device=device)
            z = (codes[:, None] >> torch.arange(f, device=device)) & 1
            size = z.sum(1).double()
            binom = torch.tensor([math.comb(f, int(s)) for s in size.tolist()], dtype=torch.double, device=device)
            return z.bool(), (f - 1) / (binom * size * (f - size))
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        sizes = torch.arange(1, f, dtype=torch.double)
        mass = (f - 1) / (sizes * (f - sizes))
        drawn = torch.multinomial(mass / mass.sum(), self.samples, replacement=True, generator=gen) + 1
        order = torch.rand(self.samples, f, generator=gen).argsort(1)
        z = order < drawn[:, None]
        return z.to(device), torch.ones(self.samples, dtype=torch.double, device=device)

    def compute(self, x, target) -> Attribution:
        x, base, clean, target = self.prepare(x, target)
        labels = self.labels(x)
        drawn = [self.coalitions(int(lab.max()) + 1, x.device) for lab in labels]
        full = [torch.cat([torch.zeros(1, z.shape[1], dtype=torch.bool, device=x.device), z]) for z, _ in drawn]
        scores = self.coalition_scores(x, base, labels, full, clean, target)
        values = []
        for (z, w), s, y_full in zip(drawn, scores, clean):
            values.append(self.shapley_fit(z, w, s[1:], s[0], y_full))
        return self.result(self.paint(values, labels), target)

    @staticmethod
    def shapley_fit(z, w, y, y_empty, y_full) -> torch.Tensor:
        """φ under Σφ = y_full − y_empty: regress y − y_empty − z_F Δ on z_{<F} − z_F."""
        f = z.shape[1]
        delta = (y_full - y_empty).double()
        if f == 1 or len(z) == 0:
            return torch.full((f,), float(delta) / f, dtype=torch.double, device=z.device).to(y.dtype)
        zd = z.double()
        design = zd[:, :-1] - zd[:, -1:]
        head = solve_weighted(design, y.double() - y_empty.double() - zd[:, -1] * delta, w)
        return torch.cat([head, (delta - head.sum())[None]]).to(y.dtype)


class LIME(FeatureMethod):
    """Ribeiro et al. 2016 over superpixels: a weighted ridge fit of y(z) on random coalitions z.

    z: uniform random feature subsets (the first one complete), ``samples`` of them, from a generator
    seeded with ``seed``; weight π(z) = exp(−D(z, 1)²/σ²) with D the cosine distance to the full
    coalition and σ = ``kernel_width``; ridge penalty ``ridge`` on the coefficients, not the intercept.
    The map paints each superpixel with its coefficient. π is the paper's; the authors' ``lime`` package
    weighs by √π (its default width 0.25 is ``kernel_width=0.25·√2`` here); Captum's default ``Lime``
    measures the cosine distance between the perturbed images and fits a Lasso.
    """

    name = "lime"
    default_features = "slic"
    signed = True
    fast_options = {"samples": 32, "segments": 16}

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear", baseline=0.0,
                 batch_size: int | None = None, features=None, cells: int = 4, segments: int = 25, samples: int = 128,
                 seed: int = 0, kernel_width: float = 0.25, ridge: float = 1.0):
        super().__init__(model, layer, output_selector, interpolation, baseline, batch_size, features, cells,
                         segments)
        if samples <= 0 or kernel_width <= 0 or ridge < 0:
            raise ConvlensError("LIME needs samples > 0, kernel_width > 0 and ridge ≥ 0")
        self.samples, self.seed, self.kernel_width, self.ridge = samples, seed, kernel_width, ridge

    def coalitions(self, f: int, device) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        z = torch.randint(0, 2, (self.samples, f), generator=gen).bool()
        z[0] = True
        return z.to(device)

    def weights(self, z: torch.Tensor) -> torch.Tensor:
        zd = z.double()
        cosine = zd.sum(1) / (zd.norm(dim=1) * math.sqrt(z.shape[1])).clamp_min(1e-12)
        distance = 1 - cosine
        return torch.exp(-distance ** 2 / self.kernel_width ** 2)

    def fit(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Coefficients of the weighted ridge regression with an unpenalized intercept."""
        w = self.weights(z)
        zd, yd = z.double(), y.double()
        mean_z = (w[:, None] * zd).sum(0) / w.sum()
        mean_y = (w * yd).sum() / w.sum()
        return solve_weighted(zd - mean_z, yd - mean_y, w, self.ridge).to(y.dtype)

    def compute(self, x, target) -> Attribution:
        x, base, clean, target = self.prepare(x, target)
        labels = self.labels(x)
        coalitions = [self.coalitions(int(lab.max()) + 1, x.device) for lab in labels]
        scores = self.coalition_scores(x, base, labels, coalitions, clean, target)
        return self.result(self.paint([self.fit(z, s) for z, s in zip(coalitions, scores)], labels), target)


# ------------------------------------------------------------------ RISE
class RISE(PerturbationMethod):
    """Petsiuk et al. 2018: S = Σ_i P(c | x ⊙ M_i) M_i / (N·p) over N = ``masks`` random masks.

    M_i: a ``cells × cells`` grid of Bernoulli(p) values, upsampled bilinearly to (cells + 1)·⌈H/cells⌉
    and cropped at a random offset in [0, ⌈H/cells⌉) per axis. The masks depend only on ``seed`` and
    the input size, so every image of a batch sees the same masks.
    """

    name = "rise"
    score = "probability"
    fast_options = {"masks": 64}

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear", baseline=0.0,
                 batch_size: int | None = None, masks: int = 256, cells: int = 7, p: float = 0.5, seed: int = 0):
        super().__init__(model, layer, output_selector, interpolation, baseline, batch_size)
        if masks <= 0 or cells <= 0 or not 0 < p <= 1:
            raise ConvlensError("RISE needs masks > 0, cells > 0 and 0 < p ≤ 1")
        self.count, self.cells, self.p, self.seed = masks, cells, p, seed

    def make_masks(self, height: int, width: int, device=None) -> torch.Tensor:
        """(masks, H, W) in [0, 1]."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        cell_h, cell_w = math.ceil(height / self.cells), math.ceil(width / self.cells)
        grid = (torch.rand(self.count, 1, self.cells, self.cells, generator=gen) < self.p).float()
        shift_y = torch.randint(0, cell_h, (self.count,), generator=gen)
        shift_x = torch.randint(0, cell_w, (self.count,), generator=gen)
        up = F.interpolate(grid.to(device), size=((self.cells + 1) * cell_h, (self.cells + 1) * cell_w),
                           mode="bilinear", align_corners=False)[:, 0]
        return torch.stack([up[i, dy:dy + height, dx:dx + width]
                            for i, (dy, dx) in enumerate(zip(shift_y.tolist(), shift_x.tolist()))])

    def compute(self, x, target) -> Attribution:
        x, base, clean, target = self.prepare(x, target)
        masks = self.make_masks(*x.shape[-2:], device=x.device)
        scores = self.shared_masked_scores(x, base, lambda a, b: masks[a:b], len(masks), clean, target)
        stacked = scores.T.to(masks.dtype)                                   # (N, masks)
        raw = torch.einsum("nm,mhw->nhw", stacked, masks) / (len(masks) * self.p)
        return self.result(raw.to(x.dtype), target)
