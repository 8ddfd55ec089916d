"""Figures: every function takes data and a path and writes one PNG atomically.

Layouts are matplotlib's constrained layout, so titles, labels and colour bars get their own room.
The CLI selects matplotlib's non-interactive backend at start-up; importing this package leaves a
notebook's backend alone.
"""
import textwrap


def wrap_title(text: str, width_inches: float, fontsize: float) -> str:
    """Break a title into lines that fit ``width_inches`` (a character ≈ 0.55 × the font size wide)."""
    chars = max(20, int(width_inches * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))
