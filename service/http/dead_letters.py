"""The recorder's dead letters (role admin): list them, and re-drive one or all.

A dead letter is a stream entry the store refused on its own (runbell.service.store.dead_letters).
A re-drive records it through the same path as the recorder: recorded, it leaves the table; refused
again, it stays with the new error. An entry that is no event (the bus schema refused it) and still is
none stays too, answered with a 409. While the database is down the answer is a 503 and nothing changes.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from runbell.bus.schema import INT_MAX
from runbell.service.http.auth import Role, authorize
from runbell.service.http.contract import DeadLetterList, DeadLetterView, Redriven, RedrivenAll
from runbell.service.http.errors import ApiError
from runbell.service.http.params import ascii_int, int_param
from runbell.service.store.dead_letters import DeadLetters, StillMalformed, is_outage

DEFAULT_LIMIT, MAX_LIMIT = 50, 500
ID_DIGITS = 18  # a longer id is a 400; a shorter one past MAX_ID is no row's (a 404)
MAX_ID = INT_MAX  # the id column is an INTEGER (32 bits on PostgreSQL)

T = TypeVar("T")


async def list_dead_letters(request: Request) -> Response:
    dead = dead_letters(request)
    after, limit = parse_page(request)
    letters, more = await unless_outage(dead.page(after=after, limit=limit))
    next_after = letters[-1].id if more else None
    return JSONResponse(DeadLetterList(dead_letters=[DeadLetterView.of(d) for d in letters], next_after=next_after).model_dump(mode="json"))


async def redrive_dead_letter(request: Request) -> Response:
    dead = dead_letters(request)
    raw = request.path_params["letter_id"]
    letter_id = ascii_int(raw, ID_DIGITS)
    if letter_id is None:
        raise ApiError(400, "bad_dead_letter_id", "a dead letter's id is a positive integer", accepted="integer >= 1")
    letter = await unless_outage(dead.get(letter_id)) if letter_id <= MAX_ID else None  # past the id column: no row's
    if letter is None:
        raise ApiError(404, "unknown_dead_letter", f"there is no dead letter {raw}")
    try:
        again = await unless_outage(dead.redrive(letter))
    except StillMalformed as still:
        raise ApiError(
            409,
            "still_malformed",
            f"dead letter {letter.id} is still not an event ({still.error}); it stays",
            accepted="a stream entry the bus schema reads as an envelope (runbell.bus.schema)",
        ) from None
    body = Redriven(id=letter.id, recorded=again is None, dead_letter=None if again is None else DeadLetterView.of(again))
    return JSONResponse(body.model_dump(mode="json"))


async def redrive_all(request: Request) -> Response:
    """Re-drive the dead letters after ``after``, oldest first, up to limit of them: a bounded call,
    repeated with after=next_after until next_after is null."""
    dead = dead_letters(request)
    after, limit = parse_page(request)
    letters, more = await unless_outage(dead.page(after=after, limit=limit))
    recorded = failed = 0
    for letter in letters:
        try:
            again = await unless_outage(dead.redrive(letter))
        except StillMalformed:
            again = letter
        if again is None:
            recorded += 1
        else:
            failed += 1
    remaining = await unless_outage(dead.count())
    next_after = letters[-1].id if more else None
    return JSONResponse(RedrivenAll(recorded=recorded, failed=failed, remaining=remaining, next_after=next_after).model_dump(mode="json"))


def dead_letters(request: Request) -> DeadLetters:
    """Authorize (admin) and return the dead letters of this gateway's store."""
    authorize(request, Role.ADMIN)
    return DeadLetters(request.app.state.store)


async def unless_outage(awaitable: Awaitable[T]) -> T:
    """The awaitable's result; a 503 when the database cannot be used now."""
    try:
        return await awaitable
    except Exception as exc:
        if is_outage(exc):
            raise ApiError(503, "store_unavailable", "the store cannot be reached; try again later", headers={"Retry-After": "5"}) from None
        raise


def parse_page(request: Request) -> tuple[int, int]:
    """after (a dead letter's id: those after it) and limit."""
    after = int_param(request, "after", minimum=0, maximum=MAX_ID, default=0)
    return after, int_param(request, "limit", minimum=1, maximum=MAX_LIMIT, default=DEFAULT_LIMIT)
