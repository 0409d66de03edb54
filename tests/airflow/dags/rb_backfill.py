"""Backfilled over a few days by tests/airflow/test_backfills_e2e.py: daily (so Airflow can backfill
it), one result task that first sleeps conf["sleep"] seconds (so a run can be kept in flight)."""

import time
from datetime import datetime

from airflow.sdk import dag, get_current_context, task

from runbell.listeners import result  # Airflow's own @result on 3.3+, Runbell's before


@dag(schedule="@daily", start_date=datetime(2025, 1, 1), catchup=False, tags=["runbell-e2e"])
def rb_backfill():
    @result
    @task
    def day() -> str:
        context = get_current_context()
        time.sleep(float((context["dag_run"].conf or {}).get("sleep", 0)))
        return context["ds"]

    day()


rb_backfill()
