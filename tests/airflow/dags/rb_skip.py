"""A task that skips itself, then the result task (none_failed: a skipped upstream does not stop it).
on_task_instance_skipped fires in the task's worker on every Airflow 3 of the matrix."""

from airflow.sdk import dag, task

from runbell.listeners import result

try:
    from airflow.sdk.exceptions import AirflowSkipException
except ImportError:  # Airflow 3.1: only the core module has it
    from airflow.exceptions import AirflowSkipException


@dag(schedule=None, catchup=False, tags=["runbell-e2e"])
def rb_skip():
    @task
    def nothing_to_do() -> None:
        raise AirflowSkipException("no new rows")

    @result
    @task(trigger_rule="none_failed")
    def answer() -> str:
        return "done"

    nothing_to_do() >> answer()


rb_skip()
