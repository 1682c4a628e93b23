"""Errors flagtree reports to users: each names where the problem is and what to do."""

from __future__ import annotations


class FlagtreeError(Exception):
    """Base class: a user-facing error whose message is complete on one line."""


class SourceError(FlagtreeError):
    """An error at a position in FTIR text: `file:line:col: error: message`."""

    def __init__(self, message: str, file: str = "<string>", line: int = 0, col: int = 0):
        self.message = message
        self.file = file
        self.line = line
        self.col = col
        super().__init__(f"{file}:{line}:{col}: error: {message}")


class VerificationError(FlagtreeError):
    """An op breaks an FTIR invariant; the message names the op and its location."""


class PassError(FlagtreeError):
    """A pass failed; the message names the pass and how to replay it."""


class OptionsError(FlagtreeError):
    """A bad compile option or pass option; the message lists the valid ones."""
