"""Human in the loop: tell the bus when a task of Airflow's HITL operators waits for a person.

Airflow calls no listener hook when a task defers (3.1, 3.2: onto the HITL trigger) or parks in
awaiting_input (3.3): the task runner calls only the success, skipped and failed hooks at its end.
What HITLOperator.execute does call, after Airflow has stored the request (upsert_hitl_detail, so an
answer sent at once is taken) and before the task waits, is each of the operator's notifiers. So the
worker's on_task_instance_running gives a HITL operator one more notifier, Runbell's, on this
process's own copy of the task (the DAG is not changed): it publishes awaiting_input with what is asked.

Feature-detected (the operators are imported, never a version compared), idempotent, and not
attached when the task instance resumes into execute_complete (the answer came: execute does not run
again). The notifier never raises: an exception there would fail the user's task.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, cast

from pydantic import ValidationError

from runbell.bus.schema import (
    ID_MAX,
    INPUT_BODY_MAX,
    OPTION_MAX,
    OPTIONS_MAX,
    PARAMS_MAX_BYTES,
    SUBJECT_MAX,
    UNNAMED_OPTION,
    USERS_MAX,
    AssignedUser,
    InputKind,
    InputRequest,
    json_bytes,
    truncate,
)
from runbell.listeners.guard import LogOnce

_log_once = LogOnce(logging.getLogger("runbell.hook"))
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_classes: dict[str, type] | None = None  # the HITL operator classes of this Airflow (empty: none)


def hitl_classes() -> dict[str, type]:
    """The HITL operators, by name, when this Airflow has them (the standard provider, Airflow 3.1+)."""
    global _classes
    if _classes is None:
        try:
            from airflow.providers.standard.operators import hitl

            names = ("HITLOperator", "ApprovalOperator", "HITLBranchOperator", "HITLEntryOperator")
            _classes = {name: getattr(hitl, name) for name in names if isinstance(getattr(hitl, name, None), type)}
        except Exception:  # no provider, or an Airflow before 3.1 (the module raises): nothing waits for a person
            _classes = {}
    return _classes


class RunbellNotifier:
    """Called by HITLOperator.execute as `notifier(context)`, once the request is stored."""

    def __init__(self, notify: Callable[[Any, InputRequest], None]):
        self.notify = notify

    def __call__(self, context: Any) -> None:
        try:
            task_instance = context["ti"] if "ti" in context else context["task_instance"]
            self.notify(task_instance, input_request(context["task"]))
        except Exception as exc:  # never into the user's task
            _log_once(f"hitl_request:{type(exc).__name__}", "runbell: the input request was not published: %r", exc)


def attach(task_instance: Any, notify: Callable[[Any, InputRequest], None]) -> bool:
    """Give the task instance's HITL operator Runbell's notifier (True when it was given now)."""
    base = hitl_classes().get("HITLOperator")
    task: Any = getattr(task_instance, "task", None)
    if base is None or not isinstance(task, base) or _resuming(task_instance):
        return False
    notifiers = list(getattr(task, "notifiers", None) or [])
    if any(isinstance(n, RunbellNotifier) for n in notifiers):
        return False
    cast(Any, task).notifiers = [*notifiers, RunbellNotifier(notify)]
    return True


def _resuming(task_instance: Any) -> bool:
    """Resuming into execute_complete after the answer (or the deadline): the server says which method."""
    context = getattr(task_instance, "_ti_context_from_server", None)
    return bool(getattr(context, "next_method", None) or getattr(task_instance, "next_method", None))


def input_request(task: Any) -> InputRequest:
    """What the operator asks, within the bus's bounds: what does not fit is left out (truncated)."""
    truncated = False
    options, dropped = _fitting(getattr(task, "options", None) or [])
    defaults, _ = _fitting(getattr(task, "defaults", None) or [])
    defaults = [d for d in defaults if d in options]
    params = _params(task)
    if json_bytes(params) > PARAMS_MAX_BYTES:
        params, truncated = {}, True
    users_given = list(getattr(task, "assigned_users", None) or [])
    users = [AssignedUser(id=_name(u.get("id")) or "?", name=_name(u.get("name"))) for u in users_given[:USERS_MAX] if isinstance(u, dict)]
    body = getattr(task, "body", None)
    fields: dict[str, Any] = dict(
        kind=_kind(task),
        subject=truncate(_text(getattr(task, "subject", "")), SUBJECT_MAX),
        body=truncate(_text(body), INPUT_BODY_MAX) if body else None,
        options=options or [UNNAMED_OPTION],  # none can be named exactly (dropped says so): Airflow's UI answers it
        defaults=defaults or None,
        multiple=bool(getattr(task, "multiple", False)),
        params=params,
        deadline=_deadline(task),
        assigned_users=users,
        truncated=truncated or dropped or len(users_given) > USERS_MAX or len(_text(body)) > INPUT_BODY_MAX,
    )
    try:
        return InputRequest(**fields)
    except ValidationError:  # over the whole request's bound: the form and the body go
        return InputRequest(**{**fields, "params": {}, "body": None, "truncated": True})


def _kind(task: Any) -> InputKind:
    classes = hitl_classes()
    for name, kind in (
        ("ApprovalOperator", InputKind.APPROVAL),
        ("HITLBranchOperator", InputKind.BRANCH),
        ("HITLEntryOperator", InputKind.ENTRY),
    ):
        if name in classes and isinstance(task, classes[name]):
            return kind
    return InputKind.CHOICE


def _fitting(values: Sequence[Any]) -> tuple[list[str], bool]:
    """The options an answer can name exactly (the first OPTIONS_MAX that fit); whether any was left out."""
    texts = [_text(v) for v in values] if isinstance(values, (list, tuple)) else [_text(values)]
    fitting = [t for t in texts if 0 < len(t) <= OPTION_MAX and not _CONTROL.search(t)][:OPTIONS_MAX]
    return fitting, len(fitting) != len(texts)


def _params(task: Any) -> dict[str, Any]:
    """Airflow's serialized params {name: {value, schema, description}}, as JSON."""
    params: Any
    try:
        params = task.serialized_params
    except Exception:  # a provider without it: the ParamsDict's own dump
        params = getattr(task, "params", None)
        params = params.dump() if params is not None and hasattr(params, "dump") else params
    if not isinstance(params, dict):
        return {}
    try:
        value = json.loads(json.dumps(params, default=str))
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _deadline(task: Any) -> str | None:
    """When the defaults are taken: the time execute computed (hitl_summary_extra), else its rule."""
    extra = getattr(task, "hitl_summary_extra", None)
    if isinstance(extra, dict) and isinstance(extra.get("timeout_datetime"), str):
        return str(extra["timeout_datetime"])
    timeout = getattr(task, "response_timeout", None)
    if isinstance(timeout, timedelta):
        return (datetime.now(timezone.utc) + timeout).isoformat()
    return None


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _name(value: Any) -> str:
    return _CONTROL.sub(" ", _text(value))[:ID_MAX]
