"""(a) The result task is followed by a slow (~4 s) task: the result is known long before the run ends."""

import time

from airflow.sdk import dag, task

from runbell.listeners import result  # Airflow's own @result on 3.3+, Runbell's before


@dag(schedule=None, catchup=False, tags=["runbell-e2e"])
def rb_result_then_slow():
    @result
    @task
    def answer() -> dict:
        return {"answer": 42, "items": [1, 2, 3]}

    @task
    def slow_cleanup() -> None:
        time.sleep(4)

    answer() >> slow_cleanup()


rb_result_then_slow()
