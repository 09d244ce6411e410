"""The README's tables and commands stay true to the code."""

from __future__ import annotations

import re

from app.settings import settings_help
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_settings_table_is_the_apps():
    assert settings_help() in README


def test_scripts_named_in_the_readme_exist():
    for script in set(re.findall(r"scripts/\w+\.sh", README)):
        assert (REPO / script).stat().st_mode & 0o111, script


def test_no_unfilled_placeholders():
    assert not re.search(r"\b[A-Z]+_TABLE\b", README)
