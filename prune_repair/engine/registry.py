"""One table per method family: a ``str`` Enum whose members carry their own description.

Each member is ``NAME = "value", "one-line summary", "where it comes from"``. The same
value works in Python, on the command line (``click.Choice(Family.choices())``) and in
JSON; help texts and error messages are generated from the table, so a new method is one
new line here plus the file that implements it.

Example:
    >>> class Color(MethodEnum):
    ...     RED = "red", "the colour of fire", "folklore"
    ...     BLUE = "blue", "the colour of the sea"
    >>> Color("red").summary, Color.choices()
    ('the colour of fire', ['red', 'blue'])
    >>> Color.parse("green", "colour")
    Traceback (most recent call last):
    ...
    ValueError: unknown colour 'green': use one of red, blue
    >>> print(Color.describe())
    red: the colour of fire (folklore); blue: the colour of the sea
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

M = TypeVar("M", bound="MethodEnum")


class MethodEnum(str, Enum):
    """Base of the method registries (see the module docstring)."""

    summary: str
    source: str

    def __new__(cls, value: str, summary: str = "", source: str = "") -> "MethodEnum":
        member = str.__new__(cls, value)
        member._value_ = value
        member.summary = summary
        member.source = source
        return member

    def __str__(self) -> str:
        return self.value

    @classmethod
    def choices(cls) -> list[str]:
        """The accepted values, in table order."""
        return [m.value for m in cls]

    @classmethod
    def describe(cls) -> str:
        """``value: summary (source); ...`` for help texts."""
        return "; ".join(f"{m.value}: {m.summary}" + (f" ({m.source})" if m.source else "") for m in cls)

    @classmethod
    def parse(cls: type[M], value: "M | str", what: str = "method") -> M:
        """``value`` as a member, or a one-line ``ValueError`` listing the known values."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown {what} {str(value)!r}: use one of {', '.join(cls.choices())}") from None
