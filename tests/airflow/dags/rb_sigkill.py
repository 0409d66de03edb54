"""(d) A task on the way to the result is killed with SIGKILL, as the OOM killer would.

Two DAGs of that shape: rb_sigkill, and rb_sigkill_silent, which the hook is told to stay silent
about (RUNBELL_HOOK_SKIP_DAGS), so that only the gateway's reconciler can settle its runs."""

import os
import signal

from airflow.sdk import dag, task

from runbell.listeners import result  # Airflow's own @result on 3.3+, Runbell's before


def sigkilled(dag_id: str):
    @dag(dag_id=dag_id, schedule=None, catchup=False, tags=["runbell-e2e"])
    def pipeline():
        @task
        def hog() -> int:
            os.kill(os.getpid(), signal.SIGKILL)
            return 1

        @result
        @task
        def answer(value: int) -> int:
            return value

        answer(hog())

    return pipeline()


rb_sigkill = sigkilled("rb_sigkill")
rb_sigkill_silent = sigkilled("rb_sigkill_silent")
