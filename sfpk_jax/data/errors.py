"""Errors raised by the dataset loaders."""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is missing, incomplete or unreadable.

    The message names the paths that were looked at and says how to provide
    the data. Subclassing :class:`FileNotFoundError` lets callers that already
    handle missing files catch it without knowing this package.
    """


class InvalidDatasetError(DatasetNotFoundError):
    """A dataset file is there but holds values a model cannot use.

    Labels that are not integers or lie outside [0, classes), pixels that are
    not integers in [0, 255], an empty split. The message names the file (or
    split) and the first bad example. It subclasses
    :class:`DatasetNotFoundError` because the remedy is the same, replacing
    the data, and callers stop on either with the message.
    """
