"""Fixtures for the data subsystem tests: the shared real data folder and one small synthetic data set."""
from __future__ import annotations

from pathlib import Path

import pytest

from fastinterest.data import generate_synthetic, prepare

#: `../shared/data` beside the checkout (tests skip cleanly when it is absent).
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

KEY = "test-key"
#: Exact fault rows injected into the session's synthetic data (bot bursts: 2 bursts of 12 and 13 rows).
FAULTS = {"duplicate": 23, "missing_field": 17, "bad_timestamp": 13, "timestamp_out_of_range": 11,
          "unknown_action": 7, "bot_burst": 25}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> dict:
    """20k synthetic rows with the exact `FAULTS`, generated and prepared once per session."""
    root = tmp_path_factory.mktemp("synthetic")
    summary = generate_synthetic(20_000, root / "events.csv", seed=7, faults=FAULTS, n_categories=30)
    report = prepare(root / "events.csv", root / "prepared", links=summary["links"], key=KEY)
    return {"root": root, "summary": summary, "report": report, "prepared": root / "prepared", "key": KEY,
            "faults": dict(FAULTS)}
