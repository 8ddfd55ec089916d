"""Checkpoint integrity: a digest of the tensors, written at save time and verified at load time,
and a refusal of non-finite weights (they would end as NaN figures and a JSON error much later)."""
from __future__ import annotations

import hashlib
from typing import Mapping

import torch

from .errors import ConvlensError

DIGEST_ALGORITHM = "sha256-tensors-v1"


def tensor_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def digest_record(state_dict: Mapping[str, torch.Tensor]) -> dict:
    return {"algorithm": DIGEST_ALGORITHM, "sha256": tensor_digest(state_dict)}


def verify_checkpoint(ckpt: dict, source: str) -> None:
    """Check the stored digest (when the checkpoint has one: older ones load unchecked) and
    that every floating-point weight is finite."""
    state = ckpt["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvlensError(f"{source}: not a convlens checkpoint (state_dict is not a set of tensors)")
    record = ckpt.get("digest")
    if record is not None:
        if not isinstance(record, dict) or record.get("algorithm") != DIGEST_ALGORITHM:
            raise ConvlensError(f"{source}: unknown digest format {record!r:.60}")
        if tensor_digest(state) != record.get("sha256"):
            raise ConvlensError(f"{source}: damaged checkpoint (its weights do not match their stored SHA-256)")
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ConvlensError(f"{source}: weight {name} holds NaN or infinite values")
