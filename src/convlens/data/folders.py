"""Labelled image folders (one sub-folder per class), streamed in batches with memory flat in the folder size.

Class folders are matched to the model's class names (case-insensitive). When none matches and
there are as many folders as model outputs, the sorted folders are the classes 0…K−1 in order
(the usual ``ImageFolder`` convention), and their names become the class names.
"""
from __future__ import annotations

import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConvlensError
from ..io import display, file_kind, stat_input
from .images import IMAGE_SUFFIXES, open_image


@dataclass
class LabelledFolder:
    """The images of a labelled folder: ``items[i] = (path, folder class)``; ``model_index[c]`` is the
    model output of folder class ``c``."""

    root: Path
    classes: list[str]
    items: list[tuple[Path, int]]
    model_index: list[int]

    def __len__(self) -> int:
        return len(self.items)

    def labels(self) -> torch.Tensor:
        return torch.tensor([c for _, c in self.items], dtype=torch.long)


def is_labelled_folder(path: str | Path) -> bool:
    """A folder with class sub-folders holding images, and no images of its own."""
    p = Path(path)
    if not p.is_dir():
        return False
    entries = list(p.iterdir())
    if any(e.is_file() and e.suffix.lower() in IMAGE_SUFFIXES for e in entries):
        return False
    return any(e.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in e.iterdir()) for e in entries)


def image_files(folder: Path) -> list[Path]:
    """Entries of a folder named like images, sorted. What is not a regular image file (a sub-folder
    named 'x.png', a pipe, a device) stays in, to be named and skipped when read (never opened)."""
    return sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)


def match_classes(folders: list[str], class_names: list[str]) -> tuple[list[int], list[str]]:
    """Model output index of each class folder, and the class names to show."""
    lowered = {name.lower(): i for i, name in enumerate(class_names)}
    found = [lowered.get(f.lower()) for f in folders]
    if all(i is not None for i in found):
        return found, list(class_names)
    if not any(i is not None for i in found) and len(folders) == len(class_names):
        return list(range(len(folders))), list(folders)
    unknown = [f for f, i in zip(folders, found) if i is None]
    raise ConvlensError(f"class folder(s) {', '.join(unknown[:5])} match no class of the model "
                        f"({len(class_names)} classes, e.g. {', '.join(class_names[:3])}); name folders after "
                        "the model's classes or give class_names in --profile")


def scan_labelled_folder(root: str | Path, class_names: list[str]) -> tuple[LabelledFolder, list[str]]:
    """The folder's classes and images; returns it with the class names to show."""
    root = Path(root)
    mode = stat_input(root).st_mode
    if not stat.S_ISDIR(mode):
        raise ConvlensError(f"{display(root)}: is {file_kind(mode)}, not a folder of class sub-folders")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ConvlensError(f"{root}: expected one sub-folder per class, found none")
    model_index, names = match_classes(folders, class_names)
    items = [(path, c) for c, name in enumerate(folders) for path in image_files(root / name)]
    if not items:
        raise ConvlensError(f"{root}: no images in its class folders")
    return LabelledFolder(root, folders, items, model_index), names


class ImageFiles(Dataset):
    """(tensor or None, label, index, error) per image file; unreadable files give an error, not an exception."""

    def __init__(self, items: list[tuple[Path, int]], preprocess: Callable, mode: str):
        self.items, self.preprocess, self.mode = items, preprocess, mode

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        try:
            return self.preprocess(open_image(path, self.mode)), label, i, None
        except ConvlensError as exc:
            return None, label, i, str(exc)


def _collate(rows):
    good = [r for r in rows if r[0] is not None]
    errors = [r[3] for r in rows if r[0] is None]
    if not good:
        return None, None, None, errors
    return (torch.stack([r[0] for r in good]), torch.tensor([r[1] for r in good]),
            torch.tensor([r[2] for r in good]), errors)


def stream_batches(items: list[tuple[Path, int]], preprocess: Callable, mode: str, batch_size: int = 64,
                   workers: int = 0, skipped: list[str] | None = None,
                   report: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches ``(images, labels, item indices)``; unreadable files are named on stderr, added to ``skipped``
    and left out."""
    loader = DataLoader(ImageFiles(items, preprocess, mode), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate, persistent_workers=False)
    for x, y, idx, errors in loader:
        for message in errors:
            if report:
                print(f"convlens: skipped: {message}", file=sys.stderr)
            if skipped is not None:
                skipped.append(message)
        if x is not None:
            yield x, y, idx
