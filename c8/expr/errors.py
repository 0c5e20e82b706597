"""Errors of the filter language; every one is an ``ExprError``.

Messages name where the problem is (``at column N``) and what was expected or
which field is wrong, because they are shown verbatim to whoever wrote the
filter (a subscriber's BAD_FILTER reply, a rule file's load error).
"""

from __future__ import annotations


class ExprError(ValueError):
    """Base of every filter-language error.

    ``position`` is the 0-based offset into the expression text (or None when
    unknown); ``column`` is the 1-based column shown in messages; ``reason``
    is the message without the location prefix.
    """

    def __init__(self, reason: str, position: int | None = None):
        self.reason = reason
        self.position = position
        self.column = None if position is None else position + 1
        text = reason if position is None else f"at column {position + 1}: {reason}"
        super().__init__(text)

    @property
    def message(self) -> str:
        return str(self)


class ExprSyntaxError(ExprError):
    """The text does not parse: names the column and what was expected."""


class ExprFieldError(ExprError):
    """An unknown (or unusable) field: names it and lists close matches."""

    def __init__(self, reason: str, position: int | None = None, field: str = "",
                 suggestions: tuple[str, ...] = ()):
        super().__init__(reason, position)
        self.field = field
        self.suggestions = suggestions


class ExprTypeError(ExprError):
    """A value or operator that does not suit the field's type: names the field."""

    def __init__(self, reason: str, position: int | None = None, field: str = ""):
        super().__init__(reason, position)
        self.field = field


class ExprLimitError(ExprSyntaxError):
    """The text exceeds a bound on its cost: ``limit`` names which (``number_digits``,
    ``terms``) and ``maximum`` its value, so callers can name their configuration key."""

    def __init__(self, reason: str, position: int | None = None, limit: str = "", maximum: int = 0):
        super().__init__(reason, position)
        self.limit = limit
        self.maximum = maximum
