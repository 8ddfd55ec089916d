"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class ConvlensError(Exception):
    """An error caused by the user's input (bad argument, file, model...)."""
