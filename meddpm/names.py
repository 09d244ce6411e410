"""Names taken from input data (file names, DICOM attributes): made safe here, and only here.

A mask's name becomes one folder inside the output folder, and appears in logs and the run's summary. So a name
must be usable alone as one folder name (no separator, not `.` or `..`, not hidden, bounded), and text from
input data is escaped before it reaches a log line.
"""

from __future__ import annotations

import hashlib
import os

NAME_BYTES = 200  # a folder name may have 255; the staging folder beside it adds up to 20 (meddpm.output_folders)
_SEPARATORS = ("/", "\\", "\0")
_SERIES_NUMBER_DIGITS = 12  # a Series Number is an Integer String (IS): at most 12 characters, digits and a sign


def name_problem(name: str) -> str | None:
    """Why `name` cannot name an output folder, or None when it can."""
    if not name:
        return "the name is empty before its suffix"
    if name in (".", ".."):
        return f"the name is '{name}'"
    if name.startswith("."):
        return "the name starts with '.' (hidden, and the app's own staging folders are named so)"
    if any(separator in name for separator in _SEPARATORS):
        return "the name holds a path separator"
    if not name.isprintable():
        return "the name holds control characters"
    if len(os.fsencode(name)) > NAME_BYTES:
        return f"the name is longer than {NAME_BYTES} bytes"
    return None


def printable(text: str) -> str:
    """`text` with control characters escaped, safe for one log line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def name_digest(text: str) -> str:
    """A short digest that names an output folder without the text it comes from (UIDs, paths)."""
    return hashlib.sha256(text.encode(errors="surrogateescape")).hexdigest()[:8]


def dicom_mask_name(kind: str, series_number: object, identity: str) -> str:
    """`KIND_NUMBER_DIGEST` for a DICOM mask: its Series Number when that is a plain integer (any other value is
    left out: it is input data, not a name), and a digest of what identifies the object (a UID)."""
    number = str(series_number if series_number is not None else "").strip()
    shown = number if number.isdigit() and len(number) <= _SERIES_NUMBER_DIGITS else ""
    return f"{kind}_{shown}_{name_digest(identity)}"
