"""The hook inside a real Airflow (the virtualenv at $RUNBELL_AIRFLOW_VENV, the hook installed there as
a package) publishing to a Redis Cluster of 3 masters and 3 replicas, and a gateway on the same
cluster answering the long-poll waiters of its runs.

Airflow runs the DAG the way its documentation tests one: `python dag_file.py`, whose ``__main__``
calls ``dag.test()`` (what `airflow dags test` calls) once per run, all in one process, on a SQLite
metadata database migrated first. Every hook of a task and of the run's end fires in that process.
``dag.test`` names a run ``manual__<run_after>``: the test picks run_after times whose runs' hash
slots are served by each of the three masters, so the runs' keys spread over every master.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from runbell.bus import keys
from runbell.bus.schema import decode_envelope
from runbell.service.bench import standalone
from runbell.service.bench.measure import free_port
from tests.conftest import IN_CI
from tests.engines import RedisCluster

pytestmark = pytest.mark.airflow

DAG = "rb_cluster_hook"
RESULT = "from the cluster"
AIRFLOW_SECONDS = 300  # the bound on migrating Airflow's database, and on running the DAG (seconds when idle)
DAG_FILE = f"""
import sys
from datetime import datetime

from airflow.sdk import dag, result, task


@dag(schedule=None, catchup=False, tags=["runbell-e2e"])
def {DAG}():
    @result
    @task
    def answer() -> str:
        return {RESULT!r}

    answer()


the_dag = {DAG}()

if __name__ == "__main__":  # one run per argument, each named manual__<run_after>
    for stamp in sys.argv[1:]:
        when = datetime.fromisoformat(stamp)
        run = the_dag.test(run_after=when, logical_date=when)
        print("run", run.run_id, run.state, flush=True)
"""


@pytest.fixture
def airflow_venv() -> Path:
    """The Airflow virtualenv with this tree's hook (skipped without one, failed under CI=true)."""
    try:
        venv = standalone.airflow_venv()
    except standalone.AirflowUnavailable as exc:
        if IN_CI:
            pytest.fail(f"{exc} (and CI=true forbids skipping)", pytrace=False)
        pytest.skip(str(exc))
    standalone.check_hook_installed(venv)
    return venv


def one_run_per_master(cluster: RedisCluster, namespace: str) -> dict[str, int]:
    """run_after (ISO) -> the port of the master serving the slot of its run's keys, one per master."""
    masters = cluster.masters()
    chosen: dict[int, str] = {}
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for second in range(10_000):
        when = (start + timedelta(seconds=second)).isoformat()
        slot = keys.key_slot(keys.run_keys(namespace, DAG, f"manual__{when}").stream)
        (port,) = [master.port for master in masters if master.serves(slot)]
        chosen.setdefault(port, when)
        if len(chosen) == len(masters):
            return {when: port for port, when in chosen.items()}
    raise AssertionError("no run_after found for every master")


async def airflow(venv: Path, env: dict[str, str], *args: str, log: Path) -> None:
    """Runs one Airflow command (bounded); fails with its output's tail."""
    with open(log, "ab") as out:
        process = await asyncio.create_subprocess_exec(*args, env=env, cwd=log.parent, stdout=out, stderr=asyncio.subprocess.STDOUT)
        try:
            code = await asyncio.wait_for(process.wait(), AIRFLOW_SECONDS)
        except TimeoutError:
            process.kill()
            await process.wait()
            code = None
    assert code == 0, f"{' '.join(args)} ended with {code}:\n{log.read_text(errors='replace')[-4000:]}"


async def wait_for_result(http: httpx.AsyncClient, run_id: str) -> httpx.Response:
    """Long-polls the run's result until it is decided (a 202 at each poll's timeout asks again)."""
    while True:
        response = await http.get(f"/v1/dags/{DAG}/runs/{run_id}/result", params={"timeout": 30})
        if response.status_code != 202:
            return response


async def test_the_hook_in_airflow_publishes_to_the_cluster_and_the_gateway_answers_the_waiters(
    airflow_venv, redis_cluster: RedisCluster, gateway_factory, namespace, tmp_path
):
    runs = one_run_per_master(redis_cluster, namespace)
    run_ids = {f"manual__{when}": port for when, port in runs.items()}
    gateway = await gateway_factory(redis_url=redis_cluster.url)
    home = tmp_path / "airflow"
    (home / "dags").mkdir(parents=True)
    dag_file = home / "dags" / f"{DAG}.py"
    dag_file.write_text(DAG_FILE)
    env = standalone.airflow_env(airflow_venv, home, free_port(), namespace, redis_cluster.url)
    log = home / "airflow.log"
    async with gateway.client(timeout=60) as http:
        waiters = {run_id: asyncio.create_task(wait_for_result(http, run_id)) for run_id in run_ids}
        await airflow(airflow_venv, env, str(airflow_venv / "bin" / "airflow"), "db", "migrate", log=log)
        await airflow(airflow_venv, env, str(airflow_venv / "bin" / "python"), str(dag_file), *runs, log=log)
        async with asyncio.timeout(120):
            answers = {run_id: await waiter for run_id, waiter in waiters.items()}

    for run_id, answer in answers.items():  # every waiter got its run's result through the gateway
        assert answer.status_code == 200, (run_id, answer.text)
        assert (answer.json()["status"], answer.json()["result"]) == ("success", RESULT), answer.json()
    with redis_cluster.client(decode_responses=False) as client:
        masters = set()
        for run_id, port in run_ids.items():
            run_keys = keys.run_keys(namespace, DAG, run_id)
            logged = [decode_envelope(fields[b"env"]) for _, fields in client.xrange(run_keys.log)]
            streamed = [e for _, fields in client.xrange(run_keys.stream) if (e := decode_envelope(fields[b"env"])).event.run_id == run_id]
            events = [(e.event.kind.value, e.event.task_id, e.event.state) for e in logged]
            assert events == [("task", "answer", "running"), ("task", "answer", "success"), ("run", None, "success")], events
            assert [e.seq for e in streamed] == [e.seq for e in logged] == [1, 2, 3]  # the partition's stream has them all
            slot = keys.key_slot(run_keys.stream)
            assert {keys.key_slot(key) for key in (run_keys.log, run_keys.seq)} == {slot}  # one slot: one atomic script
            assert redis_cluster.node_for_slot(slot).port == port
            masters.add(port)
    assert len(masters) == 3, masters  # the runs' keys on every master
