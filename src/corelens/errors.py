"""Errors that name the problem and the fix."""


class CorelensError(Exception):
    """Base class of corelens's own errors."""


class UnknownFamilyError(CorelensError, ValueError):
    """The model's architecture is not one corelens supports."""


class LayoutError(CorelensError, ValueError):
    """Images, placeholders, tokens and boxes do not line up."""


class InputError(CorelensError, ValueError):
    """Bad user input to ``prepare`` and friends."""
