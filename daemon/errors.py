"""The one error the service answers a request with: an errno and a line for the caller."""

from __future__ import annotations


class ControlError(Exception):
    """Refused or failed request: `errno` goes back to the client, `str()` is the line it prints."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.errno = code
