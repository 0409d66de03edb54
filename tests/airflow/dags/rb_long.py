"""A run that takes minutes: for cancelling a run whose caller went away."""

import time

from airflow.sdk import dag, task

from runbell.listeners import result


@dag(schedule=None, catchup=False, tags=["runbell-e2e"])
def rb_long():
    @result
    @task
    def answer() -> str:
        time.sleep(300)
        return "too late"

    answer()


rb_long()
