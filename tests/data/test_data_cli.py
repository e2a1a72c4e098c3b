"""`fastinterest generate` / `fastinterest prepare` through the real command-line entry point."""
from __future__ import annotations

import json

import pytest

from fastinterest.cli import main


def test_generate_then_prepare(tmp_path, capsys):
    events = tmp_path / "events.parquet"
    assert main(["generate", "--events", "3000", "--out", str(events), "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "wrote 3,000 rows" in out and "events.links.csv" in out and "injected faults" in out
    assert events.exists() and (tmp_path / "events.links.csv").exists() and (tmp_path / "events.truth.json").exists()
    truth = json.loads((tmp_path / "events.truth.json").read_text())

    rc = main(["prepare", "--events", str(events), "--links", str(tmp_path / "events.links.csv"), "--out",
               str(tmp_path / "prep"), "--key", "k", "--min-count", "2", "--max-events-per-second", "10",
               "--write-mapping"])
    assert rc == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "prep" / "report.json").read_text())
    assert f"{report['rows_kept']:,} of 3,000 rows kept" in out and "dropped:" in out
    assert report["persons"] == truth["persons"]
    assert {k: v for k, v in report["dropped"].items() if k != "malformed_row"} == truth["faults"]
    config = json.loads((tmp_path / "prep" / "config.json").read_text())
    assert config["min_count"] == 2 and config["write_mapping"] is True
    assert (tmp_path / "prep" / "mapping.parquet").exists()


def test_prepare_error_is_a_message_not_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,platform\nu,shop\n")
    assert main(["prepare", "--events", str(bad), "--out", str(tmp_path / "o"), "--key", "k"]) == 1
    err = capsys.readouterr().err
    assert "bad.csv, line 1: missing required column(s) timestamp, action, item_id" in err


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prepare", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--events", "--links", "--format", "--out", "--max-events-per-second", "--min-count", "--key",
                   "--write-mapping", "amazon-cdsr", "movielens", "taobao"):
        assert option in text
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "--events N" in capsys.readouterr().out
