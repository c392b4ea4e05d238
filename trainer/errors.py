"""Errors that describe a user's input, shown as one line without a traceback."""


class TrainerError(Exception):
    """Bad input found at run time: a path, a file, a dataset row or a model that does not fit."""


class ConfigError(TrainerError, ValueError):
    """A parameter has a value outside what it allows (raised before any work starts)."""
