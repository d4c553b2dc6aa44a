"""Where the team's real third-party test data lives: `shared/data` beside the checkout.

SHARED_DATA overrides it; CI clones the repository with `shared/` beside it.
"""
import os
from pathlib import Path


def _find() -> Path:
    if os.environ.get("SHARED_DATA"):
        return Path(os.environ["SHARED_DATA"])
    beside = Path(__file__).resolve().parents[2] / "shared" / "data"
    return beside if beside.exists() else Path("/work/shared/data")


SHARED_DATA = _find()
