"""Never unpaused by the tests: triggering it through the gateway must answer 409 dag_paused."""

from airflow.sdk import dag, task


@dag(schedule=None, catchup=False, tags=["runbell-e2e"])
def rb_paused():
    @task
    def nothing() -> None:
        return None

    nothing()


rb_paused()
