"""The real test data in ``../shared/data`` (relative to the project root), when this checkout has it.

A user's clone has no ``../shared``: tests that need it are marked ``data`` and skip with the reason below.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """``../shared/data/<parts>``, or skip the calling test with a reason naming the missing path."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs the real test data at {path} (../shared/data beside the project; absent in this "
                    f"checkout)")
    return path
