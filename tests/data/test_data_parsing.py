"""Timestamp and value parsing, and the string normalisation of the chunk encoder."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from fastinterest.data.encode import dictionary_codes, merge_dictionaries, parse_timestamps, parse_values


def utc(*args) -> int:
    return int(dt.datetime(*args, tzinfo=dt.timezone.utc).timestamp())


CASES = [
    ("1511544070", 1511544070),
    ("  1511544070 ", 1511544070),
    ("1511544070.9", 1511544070),          # decimals floor
    ("-5", -5),
    ("1.5e9", 1_500_000_000),
    ("2024-01-05T12:34:56Z", utc(2024, 1, 5, 12, 34, 56)),
    ("2024-01-05 12:34:56", utc(2024, 1, 5, 12, 34, 56)),          # no offset = UTC
    ("2024-01-05T12:34:56+08:00", utc(2024, 1, 5, 4, 34, 56)),
    ("2024-01-05T12:34:56-0130", utc(2024, 1, 5, 14, 4, 56)),
    ("2024-01-05T12:34:56.789Z", utc(2024, 1, 5, 12, 34, 56)),     # fractions dropped
    ("2024-01-05T12:34", utc(2024, 1, 5, 12, 34)),
    ("2024-01-05", utc(2024, 1, 5)),
    ("2024-02-29T00:00:00Z", utc(2024, 2, 29)),                    # leap day exists
]
BAD = ["not-a-time", "2024-13-01T00:00:00Z", "2023-02-29T00:00:00Z", "2024-02-30 10:00:00", "12/31/2024 10:00",
       "1.7e9x", "2024-01-05T25:00:00Z", "yesterday", "²", "١٧٠٠٠٠٠٠٠٠", "1" * 30, "2024-01-05T12:34:56+",
       "2024-01-05T"]


def test_parse_timestamps_text():
    texts = [c[0] for c in CASES] + BAD + [None, "", "   "]
    seconds, present, parsed = parse_timestamps(pa.array(texts, pa.string()))
    n_good, n_bad = len(CASES), len(BAD)
    assert seconds[:n_good].tolist() == [c[1] for c in CASES]
    assert parsed.tolist() == [True] * n_good + [False] * (n_bad + 3)
    assert present.tolist() == [True] * (n_good + n_bad) + [False] * 3


def test_parse_timestamps_typed_and_dictionary_columns():
    ints = pa.array([1, None, 1_700_000_000], pa.int64())
    s, present, parsed = parse_timestamps(ints)
    assert s.tolist()[::2] == [1, 1_700_000_000] and present.tolist() == [True, False, True]
    floats = pa.array([1.9, float("nan"), None])
    s, present, parsed = parse_timestamps(floats)
    assert s[0] == 1 and parsed.tolist() == [True, False, False]
    stamps = pa.array([dt.datetime(2024, 1, 5, 12, 0, tzinfo=dt.timezone.utc)], pa.timestamp("ms", tz="UTC"))
    assert parse_timestamps(stamps)[0].tolist() == [utc(2024, 1, 5, 12)]
    dictionary = pa.array(["2024-01-05", "x", "2024-01-05", None]).dictionary_encode()
    s, present, parsed = parse_timestamps(dictionary)
    assert s[[0, 2]].tolist() == [utc(2024, 1, 5)] * 2
    assert parsed.tolist() == [True, False, True, False] and present.tolist() == [True, True, True, False]


def test_parse_values():
    values = parse_values(pa.array(["4.5", "", None, "abc", " 7 ", "1e3", "1e999", "-.5"]), 8)
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, np.array([4.5, np.nan, np.nan, np.nan, 7, 1000, np.nan, -0.5], np.float32))
    np.testing.assert_array_equal(parse_values(pa.array(["1", "inf", "nan"]), 3), [1, np.nan, np.nan])
    np.testing.assert_array_equal(parse_values(pa.array([1.5, None, float("inf")]), 3), [1.5, np.nan, np.nan])
    assert np.isnan(parse_values(None, 3)).all()


def test_dictionary_codes_normalise_merge_and_blank():
    codes, values = dictionary_codes(pa.array(["View", " view", None, "", "cart"]), 5,
                                     lambda v: pa.compute.utf8_lower(pa.compute.utf8_trim_whitespace(v)))
    assert values.to_pylist() == ["view", "cart"]
    assert codes.tolist() == [0, 0, -1, -1, 1]


def test_merge_dictionaries_maps_chunks_to_global_codes():
    merged, maps = merge_dictionaries([pa.array(["a", "b"]), pa.array(["c", "a"])])
    assert merged.to_pylist() == ["a", "b", "c"]
    assert maps[0].tolist() == [0, 1, -1] and maps[1].tolist() == [2, 0, -1]  # last slot: code -1 stays -1


@pytest.mark.parametrize("bad", BAD)
def test_each_bad_timestamp_alone(bad):
    _, present, parsed = parse_timestamps(pa.array([bad]))
    assert present[0] and not parsed[0]


def test_iso8601_against_python_datetime():
    """Random instants in random layouts parse to what Python's datetime says; broken ones fail."""
    rng = np.random.default_rng(0)
    texts, expected = [], []
    layouts = ["%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"]
    for _ in range(400):
        moment = dt.datetime(1990, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=int(rng.integers(0, 2**31)))
        minutes = int(rng.integers(-14 * 60, 14 * 60 + 1))
        zone = dt.timezone(dt.timedelta(minutes=minutes))
        local = moment.astimezone(zone)
        layout = layouts[rng.integers(len(layouts))]
        text = local.strftime(layout)
        if layout != "%Y-%m-%d":
            if layout.endswith("%S") and rng.random() < 0.3:
                text += ".123456"[: int(rng.integers(2, 8))]
            sign, hh, mm = "+" if minutes >= 0 else "-", abs(minutes) // 60, abs(minutes) % 60
            text += [f"{sign}{hh:02d}:{mm:02d}", f"{sign}{hh:02d}{mm:02d}", "Z" if minutes == 0 else
                     f"{sign}{hh:02d}:{mm:02d}"][rng.integers(3)]
            want = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        else:
            want = dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc)
        texts.append(text)
        expected.append(int(want.replace(microsecond=0).timestamp()))
    seconds, _, parsed = parse_timestamps(pa.array(texts))
    assert parsed.all()
    assert seconds.tolist() == expected
    broken = [t[:5] + "13" + t[7:] if i % 3 == 0 else t[:-1] + "x" if i % 3 == 1 else t + "+"
              for i, t in enumerate(texts[:60])]
    assert not parse_timestamps(pa.array(broken))[2].any()
