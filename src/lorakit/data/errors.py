"""The one error type for bad training data."""

from __future__ import annotations


class DataError(ValueError):
    """Training data that cannot be used as given.

    A ValueError so callers that only know "bad input" still catch it; the message
    starts with where the problem is (``file:line`` or ``record N``) so it can be fixed.
    """
