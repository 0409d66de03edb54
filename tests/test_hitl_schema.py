"""The bus contract of human in the loop: awaiting_input carries an input request, bounded."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from runbell.bus import schema as S
from runbell.bus.schema import Event, EventKind, InputRequest

ASK = {"subject": "Ship it?", "options": ["Approve", "Reject"]}


def task(state: str, **kw) -> Event:
    return Event(kind=EventKind.TASK, dag_id="d", run_id="r", task_id="t", state=state, **kw)


def test_awaiting_input_needs_its_request_and_only_it_carries_one():
    assert task("awaiting_input", input_request=InputRequest(**ASK)).input_request.kind is S.InputKind.CHOICE
    with pytest.raises(ValidationError, match="needs input_request"):
        task("awaiting_input")
    for state in ("running", "input_received", "success"):
        with pytest.raises(ValidationError, match="only with"):
            task(state, input_request=InputRequest(**ASK))
    assert not S.TaskState.AWAITING_INPUT.terminal and not S.TaskState.INPUT_RECEIVED.terminal
    assert max(len(s.value) for s in S.TaskState) <= S.STATE_MAX  # the store's state column


@pytest.mark.parametrize(
    "change,says",
    [
        ({"subject": "s" * (S.SUBJECT_MAX + 1)}, "subject"),
        ({"body": "b" * (S.INPUT_BODY_MAX + 1)}, "body"),
        ({"options": []}, "options"),
        ({"options": [str(i) for i in range(S.OPTIONS_MAX + 1)]}, "options"),
        ({"options": ["o" * (S.OPTION_MAX + 1)]}, "options"),
        ({"options": ["a\nb"]}, "options"),
        ({"params": {"p": "v" * S.PARAMS_MAX_BYTES}}, "params"),
        ({"assigned_users": [{"id": "u"}] * (S.USERS_MAX + 1)}, "assigned_users"),
        ({"deadline": "soon"}, "deadline"),
        ({"kind": "vote"}, "kind"),
    ],
)
def test_every_field_is_bounded(change, says):
    with pytest.raises(ValidationError, match=says):
        InputRequest(**{**ASK, **change})


def test_the_whole_request_is_bounded_so_its_event_fits_the_smallest_cap():
    crowded = {
        "subject": "\x00" * S.SUBJECT_MAX,  # 6 bytes each as JSON
        "body": "\U0001f600" * S.INPUT_BODY_MAX,  # 4 bytes each
        "options": [f"{i:03}" + "o" * (S.OPTION_MAX - 3) for i in range(S.OPTIONS_MAX)],
        "params": {"p": "v" * (S.PARAMS_MAX_BYTES - 20)},
        "assigned_users": [{"id": "u" * S.ID_MAX, "name": "n" * S.ID_MAX}] * S.USERS_MAX,
    }
    with pytest.raises(ValidationError, match="over the bound"):
        InputRequest(**crowded)
    as_dumped = {"kind": "choice", "defaults": None, "multiple": False, "deadline": None, "truncated": False, **crowded}
    over = S.json_bytes(as_dumped) - S.INPUT_REQUEST_MAX_BYTES
    largest = InputRequest(**{**crowded, "params": {"p": "v" * (S.PARAMS_MAX_BYTES - 20 - over)}})
    assert S.json_bytes(largest.model_dump(mode="json")) == S.INPUT_REQUEST_MAX_BYTES
    ids = {"dag_id": "d" * S.ID_MAX, "run_id": "r" * S.ID_MAX, "task_id": "t" * S.ID_MAX, "host": "h" * S.HOST_MAX}
    event = Event(kind=EventKind.TASK, state="awaiting_input", input_request=largest, try_number=S.INT_MAX, **ids)
    assert len(event.to_json().encode()) < 64 * 1024  # the smallest event cap (runbell.listeners.config)
