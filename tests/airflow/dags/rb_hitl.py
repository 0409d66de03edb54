"""A run that waits for people: an approval, then a choice with a form, then the result.

Rejecting the approval skips what follows (ApprovalOperator's own rule). The result task is named by
the run's conf (runbell_result_task), which every Airflow 3 release honours."""

from datetime import timedelta

from airflow.providers.standard.operators.hitl import ApprovalOperator, HITLOperator
from airflow.sdk import Param, dag, task


@dag(schedule=None, catchup=False, tags=["runbell-e2e"])
def rb_hitl():
    approve = ApprovalOperator(
        task_id="approve",
        subject="Ship {{ dag_run.conf.get('what', 'it') }}?",
        body="Runbell's end-to-end test asks.",
        response_timeout=timedelta(hours=1),
    )
    choose = HITLOperator(
        task_id="choose",
        subject="Which size?",
        options=["S", "M", "L"],
        defaults=["M"],
        params={"note": Param("none", type="string", description="why")},
        response_timeout=timedelta(hours=1),
    )

    @task
    def result(ti=None) -> dict:
        answer = ti.xcom_pull(task_ids="choose")
        return {"size": answer["chosen_options"], "note": answer["params_input"]["note"]}

    approve >> choose >> result()


rb_hitl()
