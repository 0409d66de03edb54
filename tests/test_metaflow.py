"""The @runbell Metaflow decorator on real Metaflow (PyPI, its own virtualenv) running real local flows.

The virtualenv is made by tests/run ($RUNBELL_METAFLOW_VENV, default ~/.cache/runbell/metaflow-VERSION)
with only the hook side of this repo installed into it; without it these tests skip, and fail under
CI=true. The flows (tests/metaflow_flows/) run with the local datastore and no metadata service. The
flows the tests only read are started together, once per module, so the file stays quick.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from runbell.bus import keys
from runbell.bus.schema import INT_MAX, Envelope, decode_envelope
from runbell.listeners.config import PublisherConfig
from runbell.listeners.metaflow_hook import RUN_TYPE, Settings, event_id, foreach_map_index
from runbell.listeners.publisher import Publisher
from runbell.service.core.outcome import DecidedBy, Outcome, OutcomeStatus, decide
from tests.conftest import IN_CI, READ_TOKEN, REDIS_URL, TOKENS, require_server
from tests.readme_blocks import code_blocks, commands

METAFLOW_VERSION = "2.19.39"
VENV = Path(os.environ.get("RUNBELL_METAFLOW_VENV") or Path.home() / ".cache" / "runbell" / f"metaflow-{METAFLOW_VERSION}")
FLOWS = Path(__file__).resolve().parent / "metaflow_flows"
FLOW_TIMEOUT = 120


@pytest.fixture(scope="module")
def metaflow_python() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        message = f"no Metaflow virtualenv at {VENV} (tests/run makes it)"
        if IN_CI:
            pytest.fail(message + " and CI=true forbids skipping", pytrace=False)
        pytest.skip(message)
    return python


@dataclass
class FlowRun:
    returncode: int
    run_id: str | None
    output: str


class Metaflow:
    """Runs flows with the Metaflow virtualenv's Python, publishing to `redis_url` under `namespace`."""

    def __init__(self, python: Path, work: Path, redis_url: str, namespace: str):
        self.python, self.work, self.redis_url, self.namespace = python, work, redis_url, namespace
        self.spool = work / "spool"

    def env(self, **extra: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "METAFLOW_", "RUNBELL_"))}
        return (
            base
            | {
                "METAFLOW_HOME": str(self.work / "mfhome"),
                "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(self.work / "store"),
                "METAFLOW_USER": "runbell-test",
                "RUNBELL_REDIS_URL": self.redis_url,
                "RUNBELL_NAMESPACE": self.namespace,
                "RUNBELL_SPOOL_DIR": str(self.spool),
            }
            | extra
        )

    def start(
        self, flow: str, *args: str, command: str = "run", after: tuple[str, ...] = (), **env: str
    ) -> tuple[subprocess.Popen[str], Path]:
        """Start `python FLOW --no-pylint ARGS COMMAND AFTER --run-id-file FILE`."""
        self.work.mkdir(parents=True, exist_ok=True)
        id_file = self.work / f"run-id-{flow}-{time.monotonic_ns()}"
        argv = [str(self.python), str(FLOWS / flow), "--no-pylint", *args, command, *after, "--run-id-file", str(id_file)]
        process = subprocess.Popen(argv, cwd=self.work, env=self.env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return process, id_file

    def run(self, flow: str, *args: str, command: str = "run", after: tuple[str, ...] = (), **env: str) -> FlowRun:
        process, id_file = self.start(flow, *args, command=command, after=after, **env)
        output, _ = process.communicate(timeout=FLOW_TIMEOUT)
        run_id = id_file.read_text().strip() if id_file.exists() else None
        return FlowRun(process.returncode, run_id, output)

    def envelopes(self, dag_id: str, run_id: str) -> list[Envelope]:
        client = redis.Redis.from_url(self.redis_url)
        try:
            entries = client.xrange(keys.run_keys(self.namespace, dag_id, run_id).log)
        finally:
            client.close()
        return [decode_envelope(fields[b"env"]) for _, fields in entries]

    def outcome(self, dag_id: str, run_id: str) -> Outcome:
        return decide(self.envelopes(dag_id, run_id))


def with_runbell(**attributes: str) -> tuple[str, ...]:
    spec = ",".join(f"{k}={v}" for k, v in attributes.items())
    return ("--with", f"runbell:{spec}" if spec else "runbell")


def task_events(envelopes: list[Envelope], step: str) -> list[tuple[str, int, int | None]]:
    return [(e.event.state, e.event.map_index, e.event.try_number) for e in envelopes if e.event.task_id == step]


def run_states(envelopes: list[Envelope]) -> list[str]:
    return [e.event.state for e in envelopes if e.event.kind.value == "run"]


@pytest.fixture(scope="module")
def module_namespace() -> str:
    return f"rbtest-mf-{os.getpid()}-{time.monotonic_ns() % 10**9}"


@pytest.fixture(scope="module")
def metaflow(metaflow_python, tmp_path_factory, module_namespace) -> Metaflow:
    require_server(REDIS_URL, "Redis")
    yield Metaflow(metaflow_python, tmp_path_factory.mktemp("metaflow"), REDIS_URL, module_namespace)
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{module_namespace}:*", count=1000):
        client.delete(key)
    client.close()


# The flows only read by the tests below, all started at once: (flow file, arguments, environment).
FLOW_CASES = {
    "linear": ("linear_flow.py", with_runbell(result_artifact="answer"), {}),
    "branch": ("branch_flow.py", with_runbell(result_artifact="answer"), {}),
    "foreach": ("foreach_flow.py", with_runbell(result_artifact="answer"), {}),
    "retry_ok": ("retry_flow.py", with_runbell(result_artifact="answer"), {}),
    "retry_exhausted": ("retry_flow.py", with_runbell(result_artifact="answer"), {"RB_FLAKY_FAILS": "always"}),
    "catch": ("catch_flow.py", with_runbell(result_artifact="answer"), {}),
    "streaming": ("streaming_flow.py", with_runbell(result_artifact="answer", result_step="start"), {}),
    "critical": ("gated_flow.py", with_runbell(critical="start,work"), {"RB_FAIL": "1"}),
    # A hook that cannot even be configured (every publish raises inside) must not harm the flow.
    "broken_hook": ("tiny_flow.py", with_runbell(result_artifact="answer"), {"RUNBELL_PUBLISH_TIMEOUT": "soon"}),
    # No --with: Metaflow's default decorator configuration adds it to every step of every run.
    "default_decospecs": ("tiny_flow.py", (), {"METAFLOW_DEFAULT_DECOSPECS": "runbell:result_artifact=answer"}),
}


@pytest.fixture(scope="module")
def flows(metaflow) -> dict[str, FlowRun]:
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(FLOW_CASES) + 1) as pool:
        futures = {name: pool.submit(metaflow.run, flow, *args, **env) for name, (flow, args, env) in FLOW_CASES.items()}
        futures["resumed"] = pool.submit(fail_then_resume, metaflow)
        done = {name: future.result() for name, future in futures.items()}
    print(f"\n{len(done) + 1} Metaflow flows, run together, took {time.monotonic() - started:.1f} s")
    return done


def finished(flows: dict[str, FlowRun], name: str, ok: bool = True) -> FlowRun:
    run = flows[name]
    assert (run.returncode == 0) is ok, run.output[-3000:]
    assert run.run_id, run.output[-3000:]
    return run


# -- the mapping, without Metaflow -----------------------------------------------------------------


def test_foreach_map_index_encoding():
    assert foreach_map_index(None) == foreach_map_index([]) == -1
    assert foreach_map_index([(7, 9, "x")]) == 7
    assert foreach_map_index([(1, 3, "b"), (0, 2, 1)]) == 1 << 15
    assert foreach_map_index([(2, 3, "c"), (1, 2, 2)]) == 2 << 15 | 1
    assert foreach_map_index([(1, 5, None), (2, 5, None), (3, 5, None)]) == (1 << 20) | (2 << 10) | 3
    # Independent of the number of splits (a ragged nest cannot collide), ordered like the index path.
    assert foreach_map_index([(0, 3, None), (2, 3, None)]) == foreach_map_index([(0, 9, None), (2, 9, None)])
    paths = [(i, j) for i in range(4) for j in range(40)]
    encoded = [foreach_map_index([(i, 4, None), (j, 40, None)]) for i, j in paths]
    assert encoded == sorted(encoded) and len(set(encoded)) == len(paths)
    # Past a level's share: hashed, still a valid map_index and still the same each time.
    wide = [(1, 2, None), (40_000, 50_000, None)]
    assert 0 <= foreach_map_index(wide) <= INT_MAX and foreach_map_index(wide) == foreach_map_index(list(wide))


def test_settings_from_the_decorator_attributes():
    assert Settings.from_attributes({"result_artifact": None, "result_step": "end", "critical": None}) == Settings()
    assert Settings.from_attributes({"critical": "a,b"}).critical == {"a", "b"}  # --with runbell:critical=a,b
    assert Settings.from_attributes({"critical": ["a", "c"], "result_step": "train"}) == Settings(
        result_step="train", critical=frozenset({"a", "c"})
    )


def test_event_ids_are_deterministic_and_fit_the_schema():
    assert event_id("F", "1", "start", "2", 0, "running") == event_id("F", "1", "start", "2", 0, "running")
    assert event_id("F", "1", "start", "2", 0, "running") != event_id("F", "1", "start", "2", 1, "running")
    assert len(event_id("F" * 250, "1", "s", "2", 0, "success")) <= 64


# -- real flows -------------------------------------------------------------------------------------


def test_linear_flow_publishes_every_step_and_the_result(flows, metaflow):
    run = finished(flows, "linear")
    envelopes = metaflow.envelopes("LinearFlow", run.run_id)
    assert [e.seq for e in envelopes] == list(range(1, len(envelopes) + 1))
    assert run_states(envelopes) == ["running", "success"]
    for step in ("start", "middle", "end"):
        assert task_events(envelopes, step) == [("running", -1, 1), ("success", -1, 1)]
    first = envelopes[0].event
    assert first.kind.value == "run" and first.run_type == RUN_TYPE and first.dag_id == "LinearFlow" and first.run_id == run.run_id
    assert len({e.event.id for e in envelopes}) == len(envelopes)
    outcome = metaflow.outcome("LinearFlow", run.run_id)
    assert (outcome.status, outcome.decided_by, outcome.result) == (OutcomeStatus.SUCCESS, DecidedBy.RESULT_TASK, 42)
    # Decided by the end step's success, before the run's own end.
    assert outcome.decided_seq < envelopes[-1].seq and envelopes[outcome.decided_seq - 1].event.task_id == "end"


def test_a_step_streams_its_progress_in_order_before_its_end(flows, metaflow):
    run = finished(flows, "streaming")
    envelopes = metaflow.envelopes("StreamingFlow", run.run_id)
    assert [e.seq for e in envelopes] == list(range(1, len(envelopes) + 1))
    progress = [e for e in envelopes if e.event.kind.value == "progress"]
    assert progress and all((e.event.task_id, e.event.try_number) == ("start", 1) for e in progress)
    chunks = [item.value for e in progress for item in e.event.progress.items if item.key is None]
    percents = [item.value for e in progress for item in e.event.progress.items if item.key == "percent"]
    assert chunks == [f"w{i} " for i in range(50)] and percents[-1] == 100
    ended = next(e.seq for e in envelopes if e.event.task_id == "start" and e.event.state == "success")
    assert max(e.seq for e in progress) < ended  # the step's progress goes out before its end
    outcome = metaflow.outcome("StreamingFlow", run.run_id)
    assert outcome.status is OutcomeStatus.SUCCESS and outcome.result == "".join(chunks)


def test_a_duplicate_is_dropped_not_taken_for_a_new_attempt(flows, metaflow):
    run = finished(flows, "linear")
    envelopes = metaflow.envelopes("LinearFlow", run.run_id)
    publisher = Publisher(PublisherConfig(redis_url=metaflow.redis_url, namespace=metaflow.namespace, spool_dir=metaflow.work / "dup"))
    end_success = next(e for e in envelopes if e.event.task_id == "end" and e.event.state == "success")
    assert publisher.publish(end_success.event) == end_success.seq  # the seq it already had
    assert metaflow.envelopes("LinearFlow", run.run_id) == envelopes


def test_branch_and_join(flows, metaflow):
    run = finished(flows, "branch")
    envelopes = metaflow.envelopes("BranchFlow", run.run_id)
    for step in ("start", "left", "right", "join", "end"):
        assert task_events(envelopes, step) == [("running", -1, 1), ("success", -1, 1)], step
    assert metaflow.outcome("BranchFlow", run.run_id).result == [1, 2]


def test_foreach_and_nested_foreach_get_stable_map_indexes(flows, metaflow):
    run = finished(flows, "foreach")
    envelopes = metaflow.envelopes("ForeachFlow", run.run_id)
    outer = {m for state, m, _ in task_events(envelopes, "outer") if state == "success"}
    inner = {m for state, m, _ in task_events(envelopes, "inner") if state == "success"}
    inner_join = {m for state, m, _ in task_events(envelopes, "inner_join") if state == "success"}
    assert outer == {0, 1} and inner_join == {0, 1}
    assert inner == {i << 15 | j for i in range(2) for j in range(2)}
    assert {m for _, m, _ in task_events(envelopes, "outer_join")} == {-1}
    assert metaflow.outcome("ForeachFlow", run.run_id).result == ["a1", "a2", "b1", "b2"]


def test_retry_that_succeeds_on_the_second_try(flows, metaflow):
    run = finished(flows, "retry_ok")
    envelopes = metaflow.envelopes("RetryFlow", run.run_id)
    assert task_events(envelopes, "flaky") == [("running", -1, 1), ("up_for_retry", -1, 1), ("running", -1, 2), ("success", -1, 2)]
    retried = next(e.event for e in envelopes if e.event.state == "up_for_retry")
    assert retried.error.type == "RuntimeError"
    outcome = metaflow.outcome("RetryFlow", run.run_id)
    assert (outcome.status, outcome.result) == (OutcomeStatus.SUCCESS, 1)  # the artifact is the retry count


def test_retry_that_exhausts_its_tries_fails_the_run(flows, metaflow):
    run = finished(flows, "retry_exhausted", ok=False)
    envelopes = metaflow.envelopes("RetryFlow", run.run_id)
    assert task_events(envelopes, "flaky") == [("running", -1, 1), ("up_for_retry", -1, 1), ("running", -1, 2), ("failed", -1, 2)]
    assert run_states(envelopes) == ["running", "failed"]
    outcome = metaflow.outcome("RetryFlow", run.run_id)
    assert outcome.status is OutcomeStatus.FAILED and outcome.decided_by is DecidedBy.RUN  # flaky is not critical
    assert (outcome.failure.task_id, outcome.failure.try_number, outcome.failure.error["type"]) == ("flaky", 2, "RuntimeError")


def test_a_failure_catch_handles_is_a_success(flows, metaflow):
    run = finished(flows, "catch")
    envelopes = metaflow.envelopes("CatchFlow", run.run_id)
    assert task_events(envelopes, "start") == [("running", -1, 1), ("success", -1, 1)]
    caught = [e.event for e in envelopes if e.event.task_id == "start" and e.event.state == "success"][0]
    assert caught.msg == "@catch handled ValueError" and caught.error is None
    assert metaflow.outcome("CatchFlow", run.run_id).result == "caught"


def test_a_critical_step_failure_decides_the_run_at_once(flows, metaflow):
    run = finished(flows, "critical", ok=False)
    envelopes = metaflow.envelopes("GatedFlow", run.run_id)
    outcome = metaflow.outcome("GatedFlow", run.run_id)
    assert outcome.status is OutcomeStatus.FAILED and outcome.decided_by is DecidedBy.CRITICAL_TASK
    assert envelopes[outcome.decided_seq - 1].event.task_id == "work"  # before the run's failed event
    assert outcome.decided_seq < envelopes[-1].seq and run_states(envelopes) == ["running", "failed"]


def test_a_broken_hook_never_harms_the_flow(flows, metaflow):
    run = finished(flows, "broken_hook")
    assert "Done!" in run.output and metaflow.envelopes("TinyFlow", run.run_id) == []
    assert "runbell: task_pre_step dropped an event" in run.output  # logged (once per process and kind)


def test_the_default_decorator_configuration_enables_it_without_with(flows, metaflow):
    run = finished(flows, "default_decospecs")
    assert metaflow.outcome("TinyFlow", run.run_id).result == 42


def fail_then_resume(metaflow: Metaflow) -> FlowRun:
    """A run that fails in `work`, then `resume` of it with the cause gone; the resumed run's
    output starts with the failed run's id on a line of its own."""
    failed = metaflow.run("gated_flow.py", *with_runbell(result_artifact="answer"), RB_FAIL="1")
    assert failed.returncode != 0 and failed.run_id, failed.output[-3000:]
    resumed = metaflow.run(
        "gated_flow.py", *with_runbell(result_artifact="answer"), command="resume", after=("--origin-run-id", failed.run_id)
    )
    return FlowRun(resumed.returncode, resumed.run_id, f"{failed.run_id}\n{resumed.output}")


def test_resume_of_a_failed_run(flows, metaflow):
    resumed = finished(flows, "resumed")
    failed_run_id = resumed.output.split("\n", 1)[0]
    assert resumed.run_id != failed_run_id  # resume makes a new run; start is cloned, not run again
    assert metaflow.outcome("GatedFlow", failed_run_id).status is OutcomeStatus.FAILED
    envelopes = metaflow.envelopes("GatedFlow", resumed.run_id)
    assert task_events(envelopes, "start") == []
    assert task_events(envelopes, "work") == [("running", -1, 1), ("success", -1, 1)]
    outcome = metaflow.outcome("GatedFlow", resumed.run_id)
    assert (outcome.status, outcome.result) == (OutcomeStatus.SUCCESS, {"rows": 3})


async def test_redis_down_while_the_flow_runs_spools_then_republishes(metaflow, own_redis):
    """Redis dies while `work` runs (after the run's first events went out): the rest is spooled,
    the flow is not harmed, and once Redis is back the spool goes out in order, gap-free."""
    down = Metaflow(metaflow.python, metaflow.work / "down", own_redis.url, metaflow.namespace)
    gate = down.work / "go"
    process, run_id = await started_run(down, "gated_flow.py", *with_runbell(result_artifact="answer"), RB_GATE=str(gate))
    try:
        deadline = time.monotonic() + FLOW_TIMEOUT
        while ("running", -1, 1) not in task_events(down.envelopes("GatedFlow", run_id), "work"):
            assert time.monotonic() < deadline and process.poll() is None, "work never started"
            await asyncio.sleep(0.05)
        own_redis.kill()
        gate.touch()
    finally:
        output, _ = process.communicate(timeout=FLOW_TIMEOUT)
    assert process.returncode == 0, output[-3000:]
    spooled = list((down.spool / down.namespace).glob("*.event.json"))
    # work success, end running and success, run success; and work's running event again when Redis
    # died between its replay log and the global stream (that publish failed, so it was spooled
    # whole): re-sent, it is dropped by its id and keeps its seq.
    assert len(spooled) in (4, 5)
    spooled_ids = [json.loads(path.read_text())["id"] for path in spooled]
    own_redis.start()  # the same data (append-only file)
    publisher = Publisher(PublisherConfig(redis_url=own_redis.url, namespace=down.namespace, spool_dir=down.spool))
    assert publisher.flush() == len(spooled)
    envelopes = down.envelopes("GatedFlow", run_id)
    # The seq goes on after the restart; the restarted server starts a new epoch (publish.lua).
    assert [e.seq for e in envelopes] == list(range(1, 9))
    assert [e.position for e in envelopes] == sorted(e.position for e in envelopes) and len({e.epoch for e in envelopes}) <= 2
    assert {e.event.id for e in envelopes} >= set(spooled_ids) and len({e.event.id for e in envelopes}) == 8
    assert task_events(envelopes, "work") == [("running", -1, 1), ("success", -1, 1)]
    assert run_states(envelopes) == ["running", "success"]
    assert down.outcome("GatedFlow", run_id).result == {"rows": 3}


# -- waiters on a gateway ---------------------------------------------------------------------------


async def started_run(metaflow: Metaflow, flow: str, *args: str, **env: str) -> tuple[subprocess.Popen[str], str]:
    """Start a flow and return once its run id is known (the runtime writes it before the first step)."""
    process, id_file = metaflow.start(flow, *args, **env)
    deadline = time.monotonic() + FLOW_TIMEOUT
    while not (id_file.exists() and id_file.read_text().strip()):
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no run id"
        await asyncio.sleep(0.02)
    return process, id_file.read_text().strip()


@pytest.mark.parametrize("fail", [False, True], ids=["result", "critical_failure"])
async def test_long_poll_and_sse_waiters_get_the_outcome(gateway_factory, metaflow_python, tmp_path, fail):
    from tests.test_gateway import read_sse, until, waiting

    gateway = await gateway_factory()
    flows = Metaflow(metaflow_python, tmp_path, gateway.redis_url, gateway.namespace)
    gate = tmp_path / "go"
    args = with_runbell(result_artifact="answer", critical="work")
    process, run_id = await started_run(flows, "gated_flow.py", *args, RB_GATE=str(gate), **({"RB_FAIL": "1"} if fail else {}))
    try:
        async with gateway.client() as client:
            base = f"/v1/dags/GatedFlow/runs/{run_id}"
            long_poll = asyncio.create_task(client.get(base + "/result", params={"timeout": 60}))
            sse = asyncio.create_task(read_sse(client, base + "/events", until_event="outcome"))
            await until(waiting(gateway, 2))
            gate.touch()
            response = await asyncio.wait_for(long_poll, 60)
            answered_at = time.time()
            _, _, events = await asyncio.wait_for(sse, 60)
    finally:
        output, _ = process.communicate(timeout=FLOW_TIMEOUT)
    assert response.status_code == 200, response.text
    body = response.json()
    sse_outcome = events[-1].json()
    assert events[-1].event == "outcome"
    decided = next(e.event for e in flows.envelopes("GatedFlow", run_id) if e.seq == body["decided_seq"])
    # A figure for the report, not an assertion: from the deciding event's publish to the answer.
    print(
        f"\nMetaflow {'critical failure' if fail else 'result'}: long-poll answered {1000 * (answered_at - decided.ts):.0f} ms after the event"
    )
    if fail:
        assert process.returncode != 0
        assert (body["status"], body["decided_by"], body["failure"]["task_id"]) == ("failed", "critical_task", "work")
        assert (sse_outcome["status"], sse_outcome["failure"]["error"]["type"]) == ("failed", "RuntimeError")
    else:
        assert process.returncode == 0, output[-3000:]
        assert (body["status"], body["decided_by"], body["result"]) == ("success", "result_task", {"rows": 3})
        assert (sse_outcome["status"], sse_outcome["result"]) == ("success", {"rows": 3})


async def test_a_long_step_beats_and_its_run_lists_running_past_the_cutoff(gateway_factory, metaflow_python, tmp_path):
    """work waits for its gate far longer than the (small) cutoff without publishing an event: its
    heartbeats, every second, are recorded while it runs and keep the run listed running."""
    cutoff = 5.0  # stale_after; four heartbeat intervals of margin
    gateway = await gateway_factory(stale_after=cutoff)
    store = gateway.app.state.store
    flows = Metaflow(metaflow_python, tmp_path, gateway.redis_url, gateway.namespace)
    gate = tmp_path / "go"
    process, run_id = await started_run(flows, "gated_flow.py", *with_runbell(), RB_GATE=str(gate), RUNBELL_METAFLOW_HEARTBEAT_SECONDS="1")
    beats, listed = set(), []
    try:
        async with gateway.client() as client:
            deadline = time.monotonic() + FLOW_TIMEOUT
            while True:  # until the last event (work's start) is older than the cutoff
                run = await store.get_run("GatedFlow", run_id)
                if run is not None and run.heartbeat_at is not None and run.heartbeat_at > run.last_event_at:
                    beats.add(run.heartbeat_at)
                    if time.time() - run.last_event_at.timestamp() > cutoff + 0.5:
                        break
                assert process.poll() is None and time.monotonic() < deadline, "no heartbeat recorded"
                await asyncio.sleep(0.1)
            listed = [(await client.get(f"/v1/dags/GatedFlow/runs/{run_id}")).json()["state"]]
            running = (await client.get("/v1/runs", params={"status": "running"})).json()["runs"]
            listed.append(next((r["state"] for r in running if r["run_id"] == run_id), "not listed running"))
            gate.touch()
            output, _ = process.communicate(timeout=FLOW_TIMEOUT)
    finally:
        gate.touch()
        if process.poll() is None:
            process.communicate(timeout=FLOW_TIMEOUT)
    assert process.returncode == 0, output[-3000:]
    assert len(beats) >= 2 and listed == ["running", "running"]
    envelopes = flows.envelopes("GatedFlow", run_id)  # heartbeats are no events: none in the replay log
    assert task_events(envelopes, "work") == [("running", -1, 1), ("success", -1, 1)]


def descendants(pid: int) -> list[int]:
    """The processes started (directly or not) by pid, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


async def beating_in(store, run_id: str, step: str) -> bool:
    """Whether the step has started and a heartbeat came after it did."""
    run = await store.get_run("GatedFlow", run_id)
    started = [t for t in await store.task_instances("GatedFlow", run_id) if t.task_id == step]
    return run is not None and run.heartbeat_at is not None and bool(started) and run.heartbeat_at >= run.last_event_at


async def test_a_run_killed_without_a_word_lists_failed_once_its_heartbeats_are_older_than_the_cutoff(
    gateway_factory, metaflow_python, tmp_path
):
    cutoff = 3.0
    gateway = await gateway_factory(stale_after=cutoff)
    store = gateway.app.state.store
    flows = Metaflow(metaflow_python, tmp_path, gateway.redis_url, gateway.namespace)
    process, run_id = await started_run(
        flows, "gated_flow.py", *with_runbell(), RB_GATE=str(tmp_path / "never"), RUNBELL_METAFLOW_HEARTBEAT_SECONDS="1"
    )
    try:
        deadline = time.monotonic() + FLOW_TIMEOUT
        while not await beating_in(store, run_id, "work"):
            assert process.poll() is None and time.monotonic() < deadline, "no heartbeat recorded"
            await asyncio.sleep(0.05)
    finally:
        for pid in [process.pid, *descendants(process.pid)]:  # kill -9: the runtime and the task, no event
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.communicate(timeout=FLOW_TIMEOUT)
    async with gateway.client() as client:
        url = f"/v1/dags/GatedFlow/runs/{run_id}"
        deadline = time.monotonic() + FLOW_TIMEOUT
        while (await client.get(url)).json()["state"] != "failed":
            assert time.monotonic() < deadline, "still running long after its heartbeats stopped"
            await asyncio.sleep(0.1)
    run = await store.get_run("GatedFlow", run_id)
    assert run is not None and run.state == "running"  # as stored: the listing reads it failed (branch 5)
    assert [e.event.state for e in flows.envelopes("GatedFlow", run_id) if e.event.task_id == "work"] == ["running"]


def test_the_extension_is_installed_as_metaflow_finds_it(metaflow_python):
    found = subprocess.run(
        [
            str(metaflow_python),
            "-c",
            "import json, sys; from metaflow.plugins import STEP_DECORATORS; "
            "d = {c.name: c for c in STEP_DECORATORS}['runbell']; "
            "import metaflow; "
            "print(json.dumps([d.__module__, sorted(d.defaults), 'runbell.listeners.metaflow_hook' in sys.modules, metaflow.__version__]))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
        cwd="/",
    )
    assert found.returncode == 0, found.stderr[-3000:]
    module, attributes, loaded, version = json.loads(found.stdout.strip().splitlines()[-1])
    assert version == METAFLOW_VERSION and f"METAFLOW_VERSION={METAFLOW_VERSION}" in (FLOWS.parent / "run").read_text()
    assert module == "metaflow_extensions.runbell.plugins.runbell_decorator"
    assert attributes == ["critical", "result_artifact", "result_step"]
    assert loaded is False  # the Runbell side loads with the first hook, not with Metaflow


def test_the_readme_quickstart(metaflow_python, served_gateway, redis_url, namespace, tmp_path):
    """The README's flow and commands as written: `python` is the Metaflow virtualenv's, `runbell`
    this one's (the client), the gateway a real `runbell serve`."""
    (flow,) = [block for block in code_blocks("python") if "FlowSpec" in block]
    (block,) = [block for block in code_blocks("sh") if "--with runbell" in block]
    run, wait = commands(block)
    gateway = served_gateway(auth=True, RUNBELL_TOKENS=TOKENS)
    (tmp_path / "flow.py").write_text(flow)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{metaflow_python}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    env = Metaflow(metaflow_python, tmp_path, redis_url, namespace).env(PATH=path, TOKEN=READ_TOKEN, RUNBELL_URL=gateway.url)
    ran = subprocess.run(["bash", "-c", run], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=FLOW_TIMEOUT)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    waited = subprocess.run(["bash", "-c", wait], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert waited.returncode == 0, waited.stdout[-3000:] + waited.stderr[-3000:]
    assert json.loads(waited.stdout)["result"] == {"answer": 42}
