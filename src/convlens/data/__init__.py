"""Datasets and image input: shipped MNIST, image files and folders."""
from .mnist import load_mnist, MNIST_FILES  # noqa: F401
