"""(e) A task marked critical (not on the way to the result) fails; an all_done leaf runs after it,
so Airflow ends the run SUCCESS."""

from airflow.sdk import dag, result, task

from listeners.marks import critical


@dag(schedule=None, catchup=False, tags=["runbell-e2e"])
def rb_all_done_leaf():
    @result
    @task
    def answer() -> str:
        return "fine"

    @task
    def load_table() -> None:
        raise OSError("table locked")

    @task(trigger_rule="all_done")
    def report() -> None:
        pass

    answer()
    critical(load_table()) >> report()


rb_all_done_leaf()
