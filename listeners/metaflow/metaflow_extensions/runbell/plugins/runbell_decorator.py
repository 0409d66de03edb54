"""The ``@runbell`` step decorator: Metaflow's hooks, handed to ``runbell.listeners.metaflow_hook``.

Kept thin: it only gathers what each hook is told. The Runbell module is imported on the first hook
that runs, so loading Metaflow's decorators (which every Metaflow command does) costs nothing more.
No hook raises into Metaflow: whatever goes wrong is logged once and the event dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from metaflow.decorators import StepDecorator

log = logging.getLogger("runbell.metaflow")
_logged: set[str] = set()


def _safely(hook: str, call: Callable[[Any], None]) -> None:
    """Run call(runbell.listeners.metaflow_hook); nothing escapes."""
    try:
        from runbell.listeners import metaflow_hook

        call(metaflow_hook)
    except Exception as exc:
        kind = f"{hook}:{type(exc).__name__}"
        if kind not in _logged:
            _logged.add(kind)
            log.warning("runbell: %s dropped an event: %r", hook, exc)


class RunbellDecorator(StepDecorator):  # type: ignore[misc]  # Metaflow is untyped
    """Publish this flow's run and task events to Runbell (see runbell.listeners.metaflow_hook).

    Attributes: ``result_artifact`` (the artifact whose value is the run's result), ``result_step``
    (the step that produces it, default ``end``), ``critical`` (steps whose terminal failure fails
    the run at once: a list, or names separated by commas).
    """

    name = "runbell"
    defaults = {"result_artifact": None, "result_step": "end", "critical": None}

    # -- the runtime (the `run` / `resume` process): the run's events ------------------------------

    def runtime_init(self, flow: Any, graph: Any, package: Any, run_id: Any) -> None:
        self._run = (flow.name, str(run_id))
        _safely("runtime_init", lambda hook: hook.run_started(*self._run))

    def runtime_finished(self, exception: Any) -> None:
        run = getattr(self, "_run", None)
        if run is not None:
            _safely("runtime_finished", lambda hook: hook.run_ended(*run, exception))

    # -- a task's process: the attempt's events ---------------------------------------------------

    def task_pre_step(
        self,
        step_name: str,
        task_datastore: Any,
        metadata: Any,
        run_id: Any,
        task_id: Any,
        flow: Any,
        graph: Any,
        retry_count: int,
        max_user_code_retries: int,
        ubf_context: Any,
        inputs: Any,
    ) -> None:
        def start(hook: Any) -> None:
            self._settings = hook.Settings.from_attributes(self.attributes)
            self._attempt = hook.Attempt(
                flow=flow.name,
                run_id=str(run_id),
                step=step_name,
                task_id=str(task_id),
                retry_count=int(retry_count),
                max_user_code_retries=int(max_user_code_retries or 0),
                map_index=hook.foreach_map_index(flow.foreach_stack()),
            )
            hook.publish_started(self._attempt, self._settings)

        _safely("task_pre_step", start)

    def task_post_step(self, step_name: str, flow: Any, graph: Any, retry_count: int, max_user_code_retries: int) -> None:
        attempt = getattr(self, "_attempt", None)
        if attempt is not None:
            _safely("task_post_step", lambda hook: hook.keep_result(attempt, self._settings, flow))

    def task_exception(
        self, exception: BaseException, step_name: str, flow: Any, graph: Any, retry_count: int, max_user_code_retries: int
    ) -> None:
        # Not handled here (None): whether @catch handles it is known only in task_finished.
        attempt = getattr(self, "_attempt", None)
        if attempt is not None:
            attempt.exception = exception

    def task_finished(self, step_name: str, flow: Any, graph: Any, is_task_ok: bool, retry_count: int, max_user_code_retries: int) -> None:
        attempt = getattr(self, "_attempt", None)
        if attempt is not None:
            _safely("task_finished", lambda hook: hook.publish_finished(attempt, self._settings, flow, bool(is_task_ok)))
