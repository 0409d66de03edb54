"""(e) A task marked critical (its failure does not reach the result) fails; the result task and an
all_done leaf run after it, so Airflow ends the run SUCCESS. The result task waits for the failing
task (all_done) so the failure always lands first: run side by side, the result could win the race."""

from airflow.sdk import dag, task

from runbell.listeners import critical, result


@dag(schedule=None, catchup=False, tags=["runbell-e2e"])
def rb_all_done_leaf():
    @result
    @task(trigger_rule="all_done")
    def answer() -> str:
        return "fine"

    @task
    def load_table() -> None:
        raise OSError("table locked")

    @task(trigger_rule="all_done")
    def report() -> None:
        pass

    critical(load_table()) >> [answer(), report()]


rb_all_done_leaf()
