"""(b) A task on the way to the result fails; an 8 s teardown keeps the run going afterwards."""

import time

from airflow.sdk import dag, setup, task, teardown

from runbell.listeners import result  # Airflow's own @result on 3.3+, Runbell's before


@dag(schedule=None, catchup=False, tags=["runbell-e2e"])
def rb_critical_teardown():
    @setup
    def prepare() -> None:
        pass

    @task
    def transform() -> int:
        raise ValueError("transform exploded: bad row 17")

    @result
    @task
    def answer(value: int) -> int:
        return value

    @teardown
    def cleanup() -> None:
        time.sleep(8)

    ready = prepare()
    value = transform()
    ready >> value
    answer(value)
    value >> cleanup().as_teardown(setups=ready)


rb_critical_teardown()
