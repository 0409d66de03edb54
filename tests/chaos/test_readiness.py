"""Readiness on the real engines: `runbell serve` processes behind HAProxy (its checks on /readyz),
PostgreSQL, and Redis (the machine's, or one of the test's own that it hangs with SIGSTOP).

- A gateway started while the partitions' streams hold a backlog answers 503 "catching up" until its
  recorder has stored all of it, and HAProxy sends it no request until then.
- Redis hanging for two seconds (a blip of what every replica shares) leaves every gateway ready and in
  the load balancer; hanging past the grace, every gateway is 503 and out, and back once it answers.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import redis.asyncio as aioredis

from tests.engines import SERVED_BY, LoadBalancer, RedisServer, wait_until
from tests.served import ServedGateway
from tests.test_readiness import fill_backlog

BACKLOG_RUNS = 1000  # 5 events each: 5,000 stream entries
GRACE = 4.0  # RUNBELL_READINESS_GRACE of the Redis scenario, seconds
BLIP = 2.0  # a hang of Redis within it, longer than a ping's timeout (1 s): the checks see it


def readyz(gateway: ServedGateway) -> httpx.Response | None:
    try:
        return httpx.get(gateway.url + "/readyz", timeout=2)
    except httpx.TransportError:
        return None  # not listening yet


async def stored_events(postgres_url: str) -> int:
    import asyncpg

    connection = await asyncpg.connect(postgres_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return await connection.fetchval("SELECT count(*) FROM events")
    finally:
        await connection.close()


async def test_a_new_gateway_gets_no_request_until_it_has_caught_up_with_the_backlog(
    served_gateway, load_balancer, postgres_url, redis_url, namespace, chaos_summary
):
    serving = served_gateway(RUNBELL_DATABASE_URL=postgres_url, RUNBELL_RECORDER="false")  # answers, records nothing
    client = aioredis.Redis.from_url(redis_url)
    total = sum((await fill_backlog(client, namespace, runs=BACKLOG_RUNS)).values())
    await client.aclose()
    started = time.monotonic()
    joining = served_gateway.spawn(RUNBELL_DATABASE_URL=postgres_url, RUNBELL_READINESS_MAX_BACKLOG="0")
    lb: LoadBalancer = load_balancer([serving.address, joining.address], health_path="/readyz")
    wait_until(lambda: lb.stats()[joining.address].status == "DOWN", "the joining gateway out of the load balancer", logs=lb.logs)

    answers: list[dict] = []  # the joining gateway's /readyz bodies, until its first 200
    served_by: Counter[str] = Counter()  # who answered requests through the load balancer meanwhile
    async with httpx.AsyncClient(base_url=lb.url, timeout=10) as http:
        while True:
            answer = await asyncio.to_thread(readyz, joining)
            if answer is not None:
                answers.append(answer.json())
                if answer.status_code == 200:
                    break
                assert answer.status_code == 503, answer.text
            assert time.monotonic() - started < 180, f"not ready in 180 s: {answers[-1:]}\n{joining.log_tail()}"
            for _ in range(5):
                served_by[(await http.get("/healthz")).headers[SERVED_BY]] += 1
            await asyncio.sleep(0.1)
        ready_after = time.monotonic() - started
        stored = await stored_events(postgres_url)
        sent_before_ready = lb.stats()[joining.address].sessions_total
        wait_until(lambda: lb.stats()[joining.address].status == "UP", "the joining gateway in the load balancer", logs=lb.logs)
        after = Counter([(await http.get("/healthz")).headers[SERVED_BY] for _ in range(10)])

    catching_up = [a for a in answers if a["checks"]["recorder"].startswith("catching up")]
    chaos_summary(
        extra={
            "backlog": total,
            "ready_after_s": round(ready_after, 1),
            "readyz_503_answers": len(answers) - 1,
            "first_answer": answers[0]["checks"]["recorder"],
            "requests_while_catching_up": dict(served_by),
        }
    )
    assert catching_up and answers[0]["status"] == "not ready", answers[:3]
    assert any("entries behind" in a["checks"]["recorder"] for a in catching_up), answers
    assert stored == total  # bound 0: ready once the store has every entry of the backlog
    assert set(served_by) == {serving.address} and sent_before_ready == 0, (served_by, sent_before_ready)
    assert joining.address in after, after  # and now it takes its share


async def test_redis_hanging_within_the_grace_keeps_every_gateway_in_then_out_past_it(
    served_gateway, load_balancer, own_redis: RedisServer, postgres_url, chaos_summary
):
    gateways = served_gateway.many(
        2, RUNBELL_REDIS_URL=own_redis.url, RUNBELL_DATABASE_URL=postgres_url, RUNBELL_READINESS_GRACE=str(GRACE)
    )
    lb: LoadBalancer = load_balancer([g.address for g in gateways], health_path="/readyz")
    every_up = lambda: all(s.status == "UP" for s in lb.stats().values())  # noqa: E731
    wait_until(every_up, "every gateway up in the load balancer", logs=lb.logs)

    # A blip: every answer is 200 and HAProxy keeps both, while the checks say Redis did not answer.
    own_redis.hang()
    hung, seen, statuses, lb_states = time.monotonic(), Counter(), Counter(), Counter()
    while time.monotonic() - hung < BLIP:
        for gateway in gateways:
            answer = readyz(gateway)
            assert answer is not None
            statuses[answer.status_code] += 1
            seen[answer.json()["checks"]["redis"].split(" ")[0]] += 1
        lb_states.update(s.status for s in lb.stats().values())
        time.sleep(0.05)
    own_redis.resume()
    for _ in range(10):  # HAProxy's checks of the blip's last moments
        lb_states.update(s.status for s in lb.stats().values())
        time.sleep(0.1)
    assert set(statuses) == {200} and set(lb_states) == {"UP"}, (statuses, lb_states)
    assert "TimeoutError" in seen, seen  # reported, not held against them

    # Past the grace: 503 on both, out of the load balancer; back once Redis answers.
    wait_until(lambda: all(readyz(g).json()["checks"]["redis"] == "ok" for g in gateways), "Redis ok again")
    own_redis.hang()
    hung = time.monotonic()
    try:
        out = [wait_until(lambda g=g: (a := readyz(g)).status_code == 503 and a.json(), f"{g.address} not ready") for g in gateways]
        out_after = time.monotonic() - hung
        wait_until(lambda: all(s.status == "DOWN" for s in lb.stats().values()), "every gateway out", logs=lb.logs)
    finally:
        own_redis.resume()
    resumed = time.monotonic()
    for gateway in gateways:
        gateway.wait_ready()
    back_after = time.monotonic() - resumed
    wait_until(every_up, "every gateway back in the load balancer", logs=lb.logs)
    chaos_summary(
        extra={
            "grace_s": GRACE,
            "blip_s": BLIP,
            "blip_readyz": dict(statuses),
            "blip_redis_checks": dict(seen),
            "not_ready_after_s": round(out_after, 1),
            "ready_again_after_s": round(back_after, 1),
        }
    )
    assert all(body["checks"]["redis"].startswith("TimeoutError") for body in out), out
