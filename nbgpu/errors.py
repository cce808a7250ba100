"""The error a person can cause: its message says what was wrong and what to do instead."""


class UsageError(ValueError):
    """A request that cannot be carried out as given; nothing was changed."""
