"""Idempotency-Key for triggering: the same key and body give the first call's run, never a second.

Kept in Redis so every replica agrees. A record is `triggering` while its first call talks to
Airflow (under a short lease), then `done`. A caller that finds an expired lease (the first call's
process died mid-trigger) takes over with the same run id, so Airflow's 409 then means "it did".
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from runbell.bus import keys
from runbell.service.http.errors import ApiError

LEASE_SECONDS = 60.0
MAX_KEY_LENGTH = 255

# Replace the record only if it is still the one we read (a take-over after an expired lease).
_COMPARE_AND_SET = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  return 1
end
return 0
"""


@dataclass(frozen=True)
class Claim:
    run_id: str
    must_trigger: bool  # False: the first call already triggered this run
    resumed: bool = False  # taking over from a first call that died mid-trigger


def fingerprint(dag_id: str, body: dict[str, Any]) -> str:
    canonical = json.dumps({"dag_id": dag_id, "body": body}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class IdempotencyKeys:
    def __init__(self, client: aioredis.Redis, namespace: str, ttl: float):
        self.client, self.namespace, self.ttl = client, namespace, ttl
        self._cas = client.register_script(_COMPARE_AND_SET)

    async def claim(self, key: str, print_: str, run_id: str) -> Claim:
        """Take the key for this call (it must trigger `run_id`), or learn the first call's run."""
        if not key or len(key) > MAX_KEY_LENGTH:
            raise ApiError(400, "bad_idempotency_key", f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters")
        name = keys.idempotency_key(self.namespace, key)
        for _ in range(3):  # a record can expire between our SET and GET: look again
            mine = _record(print_, run_id, "triggering")
            if await self.client.set(name, mine, nx=True, ex=int(self.ttl)):
                return Claim(run_id, must_trigger=True)
            raw = await self.client.get(name)
            if raw is None:
                continue
            found = json.loads(raw)
            if found["fp"] != print_:
                raise ApiError(422, "idempotency_key_reused", "this Idempotency-Key was used with a different request")
            if found["state"] == "done":
                return Claim(found["run_id"], must_trigger=False)
            if found["lease_until"] > time.time():
                raise ApiError(
                    409,
                    "idempotency_in_progress",
                    "the first call with this Idempotency-Key is still triggering",
                    headers={"Retry-After": "1"},
                )
            takeover = _record(print_, found["run_id"], "triggering")
            if await self._cas(keys=[name], args=[raw, takeover]):
                return Claim(found["run_id"], must_trigger=True, resumed=True)
        raise ApiError(409, "idempotency_in_progress", "this Idempotency-Key is contended; retry", headers={"Retry-After": "1"})

    async def done(self, key: str, print_: str, run_id: str) -> None:
        await self.client.set(keys.idempotency_key(self.namespace, key), _record(print_, run_id, "done"), ex=int(self.ttl))

    async def release(self, key: str) -> None:
        """The trigger failed: the key may be used again."""
        await self.client.delete(keys.idempotency_key(self.namespace, key))


def _record(print_: str, run_id: str, state: str) -> str:
    return json.dumps({"fp": print_, "run_id": run_id, "state": state, "lease_until": time.time() + LEASE_SECONDS})
