"""Option sets are `StrEnum`s; `parse_choice` is the one place a text becomes one of their members."""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

Choice = TypeVar("Choice", bound=StrEnum)


def parse_choice(kind: type[Choice], text: str, what: str) -> Choice:
    """The member of `kind` named `text`; ValueError naming the allowed values otherwise."""
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"'{text}' is not a {what}; choose one of {', '.join(kind)}") from None
