"""Many small graphs, each with one failing task, built from rb_trigger_rules.json.

The end-to-end test compares the tasks Airflow marks upstream_failed with what
runbell.listeners.propagation predicts from the same JSON: the trigger-rule table checked against the real
scheduler. Components: every trigger rule after one failed upstream (f1_*/d1_*), some next to a
successful upstream (f2_*/ok2_*/d2_*), diamonds (f3*), and setups/teardowns (s4..s7).
"""

import json
from pathlib import Path

from airflow.sdk import dag, task

SPEC = json.loads(Path(__file__).with_suffix(".json").read_text())


@task
def step(fails: bool) -> None:
    if fails:
        raise RuntimeError("fails on purpose")


@dag(schedule=None, catchup=False, tags=["runbell-e2e"])
def rb_trigger_rules():
    ops = {}
    for task_id, spec in SPEC.items():
        op = step.override(task_id=task_id, trigger_rule=spec["rule"])(spec.get("fails", False)).operator
        op.is_setup = spec.get("setup", False)
        op.is_teardown = spec.get("teardown", False)
        ops[task_id] = op
    for task_id, spec in SPEC.items():
        for upstream in spec["up"]:
            ops[upstream] >> ops[task_id]


rb_trigger_rules()
