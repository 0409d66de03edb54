"""The one time module: parsing a client's ISO 8601 text, epoch seconds, the API's ISO text, the
bounds both stores hold; and that an out-of-range time is a 400 at the HTTP layer, never a 500."""

from __future__ import annotations

import math
from datetime import date, datetime, timedelta, timezone

import pytest

from runbell.bus.schema import Envelope, Event, EventKind
from runbell.service.core import clock
from tests.conftest import ADMIN_TOKEN
from tests.test_runs import api  # noqa: F401 (the fixture: the gateway's routes over this test's store)

UTC = timezone.utc


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# -- parse ------------------------------------------------------------------------------------------

PARSED = [
    # (text, the instant it means)
    ("2026-05-01T12:00:00Z", utc(2026, 5, 1, 12)),
    ("2026-05-01T12:00:00+00:00", utc(2026, 5, 1, 12)),
    ("2026-05-01T12:00:00-00:00", utc(2026, 5, 1, 12)),
    ("2026-05-01T14:30:00+02:30", utc(2026, 5, 1, 12)),
    ("2026-05-01T07:00:00-05:00", utc(2026, 5, 1, 12)),
    ("2026-05-01T12:00:00+0000", utc(2026, 5, 1, 12)),
    ("2026-05-01T12:00:00.123456Z", utc(2026, 5, 1, 12, 0, 0, 123456)),
    ("2026-05-01T12:00", utc(2026, 5, 1, 12)),
    ("2026-05-01 12:00:00", utc(2026, 5, 1, 12)),  # naive: UTC
    ("2026-05-01T12:00:00", utc(2026, 5, 1, 12)),
    ("2026-05-01", utc(2026, 5, 1)),
    ("  2026-05-01T12:00:00Z  ", utc(2026, 5, 1, 12)),
    # an unencoded '+' in a query string arrives as a space
    ("2026-05-01T14:00:00 02:00", utc(2026, 5, 1, 12)),
    ("2026-05-01T14:00:00 0200", utc(2026, 5, 1, 12)),
    ("2026-05-01 14:00:00 02:00", utc(2026, 5, 1, 12)),
    ("2026-05-01 12:30", utc(2026, 5, 1, 12, 30)),  # a time, not a spaced offset
    # the edges of what both stores hold
    ("0001-01-01T00:00:00Z", utc(1, 1, 1)),
    ("0001-01-01T00:00:00", utc(1, 1, 1)),
    ("0001-01-01T00:00:00-01:00", utc(1, 1, 1, 1)),
    ("9999-12-31T23:59:59.999999Z", datetime.max.replace(tzinfo=UTC)),
    ("9999-12-31T22:59:59+01:00", utc(9999, 12, 31, 21, 59, 59)),
]


@pytest.mark.parametrize(("text", "expected"), PARSED)
def test_parse_reads_the_accepted_forms_as_aware_utc(text, expected):
    parsed = clock.parse(text)
    assert parsed == expected
    assert parsed.tzinfo is UTC


NOT_TIMES = [
    "",
    "yesterday",
    "2026-13-01T00:00:00Z",
    "2026-05-01T25:00:00Z",
    "2026-05-01T12:00:00z",  # lower-case z was never accepted
    "2026-05-01T12:00:00+25:00",
    "2026-05-01T12:00:00Zjunk",
    "10000-01-01T00:00:00Z",
]


@pytest.mark.parametrize("text", NOT_TIMES)
def test_parse_refuses_what_is_not_a_time(text):
    with pytest.raises(ValueError):
        clock.parse(text)


OUT_OF_RANGE = [
    "0001-01-01T00:00:00+00:01",  # one minute before year 1 in UTC
    "0001-01-01T00:59:59+01:00",
    "9999-12-31T23:59:59-00:01",
    "9999-12-31T23:00:00-01:00",
    "0001-01-01T00:00:00 01:00",  # a query string's '+01:00'
]


@pytest.mark.parametrize("text", OUT_OF_RANGE)
def test_parse_of_an_instant_outside_year_1_to_9999_is_a_value_error_naming_the_bounds(text):
    with pytest.raises(ValueError, match="outside 0001-01-01T00:00:00\\+00:00 to 9999-12-31T23:59:59.999999\\+00:00"):
        clock.parse(text)


# -- as_utc -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (datetime(2026, 5, 1, 12), utc(2026, 5, 1, 12)),  # naive: UTC, not the machine's zone
        (utc(2026, 5, 1, 12), utc(2026, 5, 1, 12)),
        (datetime(2026, 5, 1, 14, tzinfo=timezone(timedelta(hours=2))), utc(2026, 5, 1, 12)),
        (datetime.min, datetime.min.replace(tzinfo=UTC)),
        (datetime.max, datetime.max.replace(tzinfo=UTC)),
    ],
)
def test_as_utc(moment, expected):
    converted = clock.as_utc(moment)
    assert converted == expected
    assert converted.tzinfo is UTC


@pytest.mark.parametrize(
    "moment",
    [
        datetime.min.replace(tzinfo=timezone(timedelta(seconds=1))),
        datetime.max.replace(tzinfo=timezone(timedelta(seconds=-1))),
    ],
)
def test_as_utc_out_of_range_is_a_value_error_not_an_overflow_error(moment):
    with pytest.raises(ValueError, match="outside"):
        clock.as_utc(moment)


# -- epoch seconds ----------------------------------------------------------------------------------

EPOCHS = [
    (0, utc(1970, 1, 1)),
    (0.5, utc(1970, 1, 1, 0, 0, 0, 500000)),
    (-1, utc(1969, 12, 31, 23, 59, 59)),
    (1_700_000_000, utc(2023, 11, 14, 22, 13, 20)),
    (utc(1, 1, 1).timestamp(), utc(1, 1, 1)),
    (utc(9999, 12, 31, 23, 59, 59).timestamp(), utc(9999, 12, 31, 23, 59, 59)),
]


@pytest.mark.parametrize(("seconds", "expected"), EPOCHS)
def test_from_epoch(seconds, expected):
    moment = clock.from_epoch(seconds)
    assert moment == expected
    assert moment.tzinfo is UTC


@pytest.mark.parametrize(
    ("seconds", "says"),
    [
        (math.nan, "must be finite"),
        (math.inf, "must be finite"),
        (-math.inf, "must be finite"),
        (1e20, "outside"),  # the stdlib: OverflowError
        (2.0**63, "outside"),  # the stdlib: OverflowError
        (-1e20, "outside"),
        (utc(9999, 12, 31, 23, 59, 59).timestamp() + 1, "outside"),  # the stdlib: ValueError, year 10000
        (utc(1, 1, 1).timestamp() - 1, "outside"),
    ],
)
def test_from_epoch_out_of_range_or_not_finite_is_a_value_error(seconds, says):
    with pytest.raises(ValueError, match=says):
        clock.from_epoch(seconds)


def test_now_is_aware_utc_and_epoch_round_trips():
    moment = clock.now()
    assert moment.tzinfo is UTC
    assert clock.from_epoch(moment.timestamp()) == moment


# -- iso --------------------------------------------------------------------------------------------

ISO = [
    # (moment, as the API writes it, as webhook payloads write it)
    (utc(2026, 5, 1, 12), "2026-05-01T12:00:00+00:00", "2026-05-01T12:00:00Z"),
    (utc(2026, 5, 1, 12, 0, 0, 1), "2026-05-01T12:00:00.000001+00:00", "2026-05-01T12:00:00.000001Z"),
    (datetime(2026, 5, 1, 14, tzinfo=timezone(timedelta(hours=2))), "2026-05-01T12:00:00+00:00", "2026-05-01T12:00:00Z"),
    (datetime(2026, 5, 1, 12), "2026-05-01T12:00:00+00:00", "2026-05-01T12:00:00Z"),  # naive: UTC
    (utc(1, 1, 1), "0001-01-01T00:00:00+00:00", "0001-01-01T00:00:00Z"),
    (datetime.max.replace(tzinfo=UTC), "9999-12-31T23:59:59.999999+00:00", "9999-12-31T23:59:59.999999Z"),
]


@pytest.mark.parametrize(("moment", "api", "zulu"), ISO)
def test_iso_writes_utc_and_parse_reads_it_back(moment, api, zulu):
    assert clock.iso(moment) == api
    assert clock.iso(moment, zulu=True) == zulu
    assert clock.parse(api) == clock.parse(zulu) == clock.as_utc(moment)


def test_iso_of_none_is_none():
    assert clock.iso(None) is None


def test_a_date_alone_is_midnight_utc():
    assert clock.parse(date(2026, 5, 1).isoformat()) == utc(2026, 5, 1)


# -- the edges, stored and read back on both backends ------------------------------------------------


async def test_both_stores_hold_year_1_and_9999(store):
    edges = {"first": utc(1, 1, 1), "last": datetime.max.replace(tzinfo=UTC)}
    envelopes = [
        Envelope(seq=1, event=Event(kind=EventKind.RUN, dag_id="edges", run_id=run_id, state="queued", run_after=clock.iso(moment)))
        for run_id, moment in edges.items()
    ]
    await store.record(envelopes)
    for run_id, moment in edges.items():
        run = await store.get_run("edges", run_id)
        assert run is not None
        assert run.run_after == moment


# -- the HTTP layer: out of range is a 400 -----------------------------------------------------------


@pytest.mark.parametrize("name", ["run_after_gte", "run_after_lte"])
async def test_runs_listing_answers_an_out_of_range_time_with_400(api, name):
    for text in OUT_OF_RANGE:
        response = await api.get("/v1/runs", params={name: text})
        assert (response.status_code, response.json()["error"]) == (400, f"bad_{name}"), text


async def test_runs_listing_accepts_the_edges(api):
    params = {"run_after_gte": "0001-01-01T00:00:00Z", "run_after_lte": "9999-12-31T23:59:59.999999Z"}
    response = await api.get("/v1/runs", params=params)
    assert response.status_code == 200, response.text
    assert response.json()["runs"] == []


async def test_webhooks_answer_an_out_of_range_since_with_a_4xx(gateway_factory):
    gateway = await gateway_factory(webhook_allowed_hosts="127.0.0.1", webhooks=False)
    async with gateway.client(ADMIN_TOKEN) as admin:
        created = await admin.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"})
        assert created.status_code == 201, created.text
        base = f"/v1/webhooks/{created.json()['id']}"
        for text in OUT_OF_RANGE:
            response = await admin.get(base + "/messages", params={"since": text})
            assert (response.status_code, response.json()["error"]) == (400, "bad_since"), text
            response = await admin.post(base + "/recover", json={"since": text.replace(" ", "+")})
            assert (response.status_code, response.json()["error"]) == (422, "bad_body"), text
        for text in ("0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z"):
            assert (await admin.get(base + "/messages", params={"since": text})).status_code == 200, text
            assert (await admin.post(base + "/recover", json={"since": text})).status_code == 202, text
