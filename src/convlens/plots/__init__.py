"""Figures: every function takes data and a path and writes one PNG atomically."""
import matplotlib

matplotlib.use("Agg")
