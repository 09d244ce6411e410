"""Option sets are `StrEnum`s; `parse_choice` is the one place a text becomes one of their members."""

from __future__ import annotations

import difflib
from enum import StrEnum
from typing import TypeVar

Choice = TypeVar("Choice", bound=StrEnum)


def parse_choice(kind: type[Choice], text: str, what: str) -> Choice:
    """The member of `kind` named `text`; ValueError naming the allowed values, and the nearest, otherwise."""
    try:
        return kind(text)
    except ValueError:
        nearest = difflib.get_close_matches(text.lower(), list(kind), n=1)
        guess = f" (did you mean '{nearest[0]}'?)" if nearest else ""
        raise ValueError(f"'{text}' is not a {what}{guess}; choose one of {', '.join(kind)}") from None
