"""(c) The result task fails on its first try and succeeds on the retry (retry_delay 1 s)."""

from datetime import timedelta

from airflow.sdk import dag, get_current_context, task

from runbell.listeners import result  # Airflow's own @result on 3.3+, Runbell's before


@dag(schedule=None, catchup=False, tags=["runbell-e2e"])
def rb_retry_once():
    @result
    @task(retries=1, retry_delay=timedelta(seconds=1))
    def flaky() -> str:
        if get_current_context()["ti"].try_number == 1:
            raise RuntimeError("first try fails on purpose")
        return "second try worked"

    flaky()


rb_retry_once()
