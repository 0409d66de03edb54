"""The smallest DAG with a result: for trigger-to-outcome timings."""

from airflow.sdk import dag, task

from runbell.listeners import result  # Airflow's own @result on 3.3+, Runbell's before


@dag(schedule=None, catchup=False, tags=["runbell-e2e"])
def rb_trivial():
    @result
    @task
    def answer(conf_value: str = "pong") -> str:
        return conf_value

    answer()


rb_trivial()
