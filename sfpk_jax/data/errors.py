"""Errors raised by the dataset loaders."""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is missing, incomplete or unreadable.

    The message names the paths that were looked at and says how to provide
    the data. Subclassing :class:`FileNotFoundError` lets callers that already
    handle missing files catch it without knowing this package.
    """
