"""`convlens summary`: a model's profile and its layer table (any CNN)."""
from __future__ import annotations

import torch

from ..hooks import evaluating, observe_outputs
from .labnet import LabNet, summary_table
from .registry import LoadedModel


def layer_rows(loaded: LoadedModel) -> list[tuple[str, str, str, int]]:
    """(module path, type, output shape, own parameters) of every module that ran, in execution order."""
    with observe_outputs(loaded.model) as seen, torch.no_grad(), evaluating(loaded.model):
        loaded.model(loaded.profile.example(loaded.device))
    rows, done = [], set()
    for path, shape, module in seen:
        if path in done:
            continue
        done.add(path)
        own = sum(p.numel() for p in module.parameters(recurse=False))
        rows.append((path, type(module).__name__, "×".join(map(str, shape[1:])), own))
    return rows


def describe(loaded: LoadedModel) -> str:
    """The profile, then the layer table (the report's Keras-style table for the lab network)."""
    p = loaded.profile
    names = ", ".join(p.class_names[:5]) + (f", … ({len(p.class_names)})" if len(p.class_names) > 5 else "")
    lines = [f"model: {p.name}",
             f"input: {p.channels}×{p.size[0]}×{p.size[1]} ({p.image_mode}), values {p.value_range[0]:.4g} … "
             f"{p.value_range[1]:.4g}",
             f"preprocessing: {getattr(p.preprocess, '__name__', repr(p.preprocess))}",
             f"classes: {names}" + (f" (segmentation: a {p.output_grid[0]}×{p.output_grid[1]} output grid)"
                                    if p.output_grid is not None else ""),
             f"statistics layers: {', '.join(p.stats_layers or []) or '-'}",
             f"explain layer: {p.explain_layer or 'automatic (last spatial layer before the head)'}"
             + (f" (tokens, {p.explain_tokens.drop_tokens} dropped)" if p.explain_tokens is not None else ""),
             ""]
    if isinstance(loaded.model, LabNet):
        return "\n".join(lines + [summary_table(loaded.model)])
    rows = layer_rows(loaded)
    width = max(len(r[0]) for r in rows) + 2 if rows else 10
    lines.append(f"{'layer':<{width}}{'type':<22}{'output':<18}{'params':>10}")
    lines += [f"{path:<{width}}{kind[:21]:<22}{shape:<18}{params:>10,}" for path, kind, shape, params in rows]
    total = sum(p.numel() for p in loaded.model.parameters())
    lines.append(f"Total params: {total:,}")
    return "\n".join(lines)
