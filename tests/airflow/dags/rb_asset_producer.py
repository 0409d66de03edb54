"""A task with an outlet Asset whose name holds ':' and '/': its success makes one asset event."""

from airflow.sdk import Asset, dag, task

ORDERS = Asset(name="runbell-e2e:orders/daily", uri="file:///tmp/runbell-e2e/orders.parquet", group="runbell-e2e")


@dag(schedule=None, catchup=False, tags=["runbell-e2e"])
def rb_asset_producer():
    @task(outlets=[ORDERS])
    def write(**context) -> int:
        context["outlet_events"][ORDERS].extra = {"rows": 42, "run_id": context["run_id"]}
        return 42

    write()


rb_asset_producer()
