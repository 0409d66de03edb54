"""The Airflow plugin that registers Runbell's listener (entry point ``airflow.plugins: runbell``)."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from runbell.listeners import hook


class RunbellPlugin(AirflowPlugin):
    name = "runbell"
    # A module, not functions: Airflow registers each listener object with pluggy.
    listeners = [hook]
