"""convlens: see what a convolutional network has learned and why it decides what it decides."""
__version__ = "0.1.0"
