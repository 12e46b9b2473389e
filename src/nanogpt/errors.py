"""Errors a user can fix. The CLI prints their message on one line and exits with status 2."""


class NanoGPTError(Exception):
    """Base class: the message names the problem and the fix."""


class ConfigError(NanoGPTError, ValueError):
    """A config value or combination of values is invalid."""


class DataError(NanoGPTError):
    """Input data is missing, empty or inconsistent with the model."""


class CheckpointError(NanoGPTError):
    """A checkpoint is missing, corrupt, unsafe or does not fit the model."""
