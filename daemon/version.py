"""The package version every tool prints for --version."""

from __future__ import annotations

import os
import re


def version() -> str:
    """The installed distribution's version; from a bare checkout, pyproject.toml's."""
    from importlib import metadata

    try:
        return metadata.version("fssd")
    except metadata.PackageNotFoundError:
        pass
    pyproject = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
    try:
        with open(pyproject, encoding="utf-8") as f:
            m = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M)
    except OSError:
        m = None
    return m.group(1) if m else "unknown"
