"""Installed package versions, recorded next to every result (run configs, conversion and benchmark reports)."""

from __future__ import annotations

import importlib.metadata as md
from collections.abc import Iterable


def installed_versions(packages: Iterable[str]) -> dict[str, str]:
    """`{package: version}` for those of `packages` that are installed; missing ones are left out."""
    out = {}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
