"""A small stand-in for Airflow's REST API (the parts the gateway calls), to cover each path fast.

Backfills: given `backfill_db` (an engine on Airflow's backfill, backfill_dag_run and dag_run tables,
as tests/test_backfills.py writes them), it answers `GET /api/v2/backfills/{id}` as every Airflow 3
does and, with `backfill_dag_runs` on, `GET /api/v2/backfills/{id}/dag_runs` in the shape of
apache/airflow PR #67381 (Airflow 3.4, which cannot be installed here): limit/offset pages capped at
`page_cap` (Airflow's maximum_page_limit), sort_ordinal then id. Without it, that path gets what
Airflow 3.1 to 3.3 answer any unknown API route: 404 {"error": "API route not found"}.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from runbell.service.http.backfills import backfill_dag_run_table, backfill_table, dag_run_table
from tests.conftest import free_port


@dataclass
class StandInAirflow:
    dags: dict[str, dict] = field(default_factory=lambda: {"etl": {"dag_id": "etl", "is_paused": False}})
    runs: dict[tuple[str, str], dict] = field(default_factory=dict)
    task_instances: dict[tuple[str, str], list[dict]] = field(default_factory=dict)
    xcoms: dict[tuple[str, str, str, int], Any] = field(default_factory=dict)
    posts: list[dict] = field(default_factory=list)
    run_patches: list[tuple[str, str, dict]] = field(default_factory=list)  # (dag, run, body) of each PATCH of a run
    conflicts: int = 0  # answer 409 to this many trigger POSTs
    errors_after_create: int = 0  # create the run, yet answer 500, this many times (a locked SQLite)
    post_delay: float = 0.0
    backfill_db: AsyncEngine | None = None
    backfill_dag_runs: bool = False  # an Airflow 3.4+ (the route of PR #67381)
    backfill_dag_runs_errors: int = 0  # answer 500 to this many requests of that route
    page_cap: int = 100  # Airflow's [api] maximum_page_limit
    backfill_requests: list[str] = field(default_factory=list)  # path?query of each backfill request
    url: str = ""
    # -- human in the loop (HITL details) --
    hitl: dict[tuple[str, str, str, int], dict] = field(default_factory=dict)  # (dag, run, task, map_index): the detail
    hitl_patches: list[dict] = field(default_factory=list)
    hitl_validates: bool = True  # 3.3 answers 400 to options not offered; 3.1 and 3.2 accept them
    parks_after: int = 0  # the task instance reads running this many times, then awaiting_input
    hitl_state_reads: list[tuple[str, str, str, int]] = field(default_factory=list)
    # -- end human in the loop --

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/api/v2/dags/{dag_id}", self.dag, methods=["GET", "PATCH"]),
                Route("/api/v2/dags/{dag_id}/dagRuns", self.trigger, methods=["POST"]),
                Route("/api/v2/dags/{dag_id}/dagRuns/{run_id}", self.run, methods=["GET", "PATCH"]),
                Route("/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances", self.tis, methods=["GET"]),
                Route("/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}", self.xcom, methods=["GET"]),
                Route("/api/v2/backfills/{backfill_id}", self.backfill, methods=["GET"]),
                Route("/api/v2/backfills/{backfill_id}/dag_runs", self.dag_runs_of_backfill, methods=["GET"]),
                *self.hitl_routes(),
                Route("/api/{rest:path}", self.api_route_not_found, methods=["GET"]),  # Airflow 3.1-3.3's catch-all
            ]
        )

    async def dag(self, request: Request) -> JSONResponse:
        dag = self.dags.get(request.path_params["dag_id"])
        if dag is None:
            return JSONResponse({"detail": "DAG not found"}, status_code=404)
        if request.method == "PATCH":
            dag["is_paused"] = (await request.json())["is_paused"]
        return JSONResponse(dag)

    async def trigger(self, request: Request) -> JSONResponse:
        dag_id = request.path_params["dag_id"]
        if dag_id not in self.dags:
            return JSONResponse({"detail": "DAG not found"}, status_code=404)
        body = await request.json()
        self.posts.append(body)
        await asyncio.sleep(self.post_delay)
        key = (dag_id, body["dag_run_id"])
        if self.conflicts > 0 or key in self.runs:
            self.conflicts = max(0, self.conflicts - 1)
            return JSONResponse({"detail": "exists"}, status_code=409)
        self.runs[key] = {"dag_id": dag_id, "dag_run_id": body["dag_run_id"], "state": "queued", "conf": body["conf"]}
        if self.errors_after_create > 0:
            self.errors_after_create -= 1
            return JSONResponse({"detail": "database is locked"}, status_code=500)
        return JSONResponse(self.runs[key])

    async def run(self, request: Request) -> JSONResponse:
        run = self.runs.get((request.path_params["dag_id"], request.path_params["run_id"]))
        if run and request.method == "PATCH":  # Airflow 3.1-3.3: {"state": ..., "note": ...}, as the UI marks a run
            body = await request.json()
            self.run_patches.append((request.path_params["dag_id"], request.path_params["run_id"], body))
            run.update(body)
        return JSONResponse(run) if run else JSONResponse({"detail": "not found"}, status_code=404)

    async def tis(self, request: Request) -> JSONResponse:
        items = self.task_instances.get((request.path_params["dag_id"], request.path_params["run_id"]), [])
        return JSONResponse({"task_instances": items, "total_entries": len(items)})

    async def xcom(self, request: Request) -> JSONResponse:
        p = request.path_params
        key = (p["dag_id"], p["run_id"], p["task_id"], int(request.query_params.get("map_index", -1)))
        if key not in self.xcoms:
            return JSONResponse({"detail": "no xcom"}, status_code=404)
        return JSONResponse({"key": p["key"], "value": self.xcoms[key]})

    async def api_route_not_found(self, request: Request) -> JSONResponse:
        return JSONResponse({"error": "API route not found"}, status_code=404)

    def _backfill_id(self, request: Request) -> int | None:
        self.backfill_requests.append(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
        raw = request.path_params["backfill_id"]
        return int(raw) if raw.isdigit() else None

    async def backfill(self, request: Request) -> JSONResponse:
        backfill_id = self._backfill_id(request)
        if backfill_id is None:
            return JSONResponse({"detail": [{"loc": ["path", "backfill_id"], "msg": "not a non-negative int"}]}, status_code=422)
        if self.backfill_db is None:  # an Airflow without backfills
            return JSONResponse({"detail": "Backfill not found"}, status_code=404)
        async with self.backfill_db.connect() as conn:
            row = (await conn.execute(select(backfill_table).where(backfill_table.c.id == backfill_id))).first()
        if row is None:
            return JSONResponse({"detail": "Backfill not found"}, status_code=404)
        return JSONResponse({"id": row.id, "dag_id": row.dag_id, "completed_at": _iso(row.completed_at), "is_paused": False})

    async def dag_runs_of_backfill(self, request: Request) -> JSONResponse:
        backfill_id = self._backfill_id(request)
        if not self.backfill_dag_runs:
            return await self.api_route_not_found(request)
        if self.backfill_dag_runs_errors > 0:
            self.backfill_dag_runs_errors -= 1
            return JSONResponse({"detail": "Internal Server Error"}, status_code=500)
        if backfill_id is None:
            return JSONResponse({"detail": [{"loc": ["path", "backfill_id"], "msg": "not a non-negative int"}]}, status_code=422)
        limit = min(int(request.query_params.get("limit", 50)), self.page_cap)
        offset = int(request.query_params.get("offset", 0))
        order = request.query_params.getlist("order_by") or ["sort_ordinal"]
        assert order == ["sort_ordinal"], order  # the gateway relies on the route's order, and asks for it
        bdr, dr = backfill_dag_run_table, dag_run_table
        if self.backfill_db is None:
            return JSONResponse({"detail": f"Backfill with id {backfill_id} not found"}, status_code=404)
        async with self.backfill_db.connect() as conn:
            backfill = (await conn.execute(select(backfill_table).where(backfill_table.c.id == backfill_id))).first()
            if backfill is None:
                return JSONResponse({"detail": f"Backfill with id {backfill_id} not found"}, status_code=404)
            total = (await conn.execute(select(func.count()).select_from(bdr).where(bdr.c.backfill_id == backfill_id))).scalar_one()
            rows = (
                await conn.execute(
                    select(bdr, dr.c.run_id, dr.c.state)
                    .select_from(bdr.outerjoin(dr, dr.c.id == bdr.c.dag_run_id))
                    .where(bdr.c.backfill_id == backfill_id)
                    .order_by(bdr.c.sort_ordinal, bdr.c.id)
                    .offset(offset)
                    .limit(limit)
                )
            ).all()
        entries = [
            {
                "id": r.id,
                "backfill_id": r.backfill_id,
                "dag_id": backfill.dag_id,
                "dag_run_id": r.run_id,
                "logical_date": _iso(r.logical_date),
                "partition_key": None,
                "sort_ordinal": r.sort_ordinal,
                "exception_reason": r.exception_reason,
                "dag_run_state": r.state,
            }
            for r in rows
        ]
        return JSONResponse({"backfill_dag_runs": entries, "total_entries": total})

    # -- human in the loop: PATCH .../taskInstances/{task_id}/{map_index}/hitlDetails, as Airflow 3.1-3.3 --------

    def hitl_routes(self) -> list[Route]:
        path = "/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/hitlDetails"
        ti = "/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
        return [
            Route(path, self.answer_hitl, methods=["PATCH"]),
            Route(ti, self.hitl_ti, methods=["GET"]),
            Route(ti + "/{map_index:int}", self.hitl_ti, methods=["GET"]),
        ]

    async def hitl_ti(self, request: Request) -> JSONResponse:
        """A task instance's state: running until it parks (parks_after GETs), then awaiting_input."""
        p = request.path_params
        key = (p["dag_id"], p["run_id"], p["task_id"], int(p.get("map_index", -1)))
        if key not in self.hitl:
            return JSONResponse({"detail": "not found"}, 404)
        self.hitl_state_reads.append(key)
        parked = len([k for k in self.hitl_state_reads if k == key]) > self.parks_after
        return JSONResponse({"task_id": key[2], "map_index": key[3], "state": "awaiting_input" if parked else "running"})

    def ask(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1, *, options: list[str], multiple: bool = False) -> None:
        """A task instance stores its request, as HITLOperator.execute does."""
        self.hitl[(dag_id, run_id, task_id, map_index)] = {"options": options, "multiple": multiple, "response_received": False}

    async def answer_hitl(self, request: Request) -> JSONResponse:
        p = request.path_params
        key = (p["dag_id"], p["run_id"], p["task_id"], int(p["map_index"]))
        body = await request.json()
        self.hitl_patches.append({"key": key, **body})
        chosen = body.get("chosen_options")
        if not isinstance(chosen, list) or not chosen:  # FastAPI's validation of UpdateHITLDetailPayload
            return JSONResponse(
                {"detail": [{"loc": ["body", "chosen_options"], "msg": "List should have at least 1 item"}]}, status_code=422
            )
        detail = self.hitl.get(key)
        if detail is None:
            return JSONResponse({"detail": f"The Task Instance with task_id: `{key[2]}` and map_index: `{key[3]}` was not found"}, 404)
        if detail["response_received"]:
            return JSONResponse({"detail": "Human-in-the-loop detail has already been updated and is not allowed to write again."}, 409)
        if self.hitl_validates and (set(chosen) - set(detail["options"]) or (len(chosen) > 1 and not detail["multiple"])):
            return JSONResponse({"detail": f"Invalid options; allowed options are {sorted(detail['options'])}."}, 400)
        detail.update(response_received=True, chosen_options=chosen, params_input=body.get("params_input") or {})
        answer = {"responded_by": {"id": "admin", "name": "admin"}, "responded_at": "2026-01-01T00:00:00Z"}
        return JSONResponse({**answer, "chosen_options": chosen, "params_input": detail["params_input"]})

    # -- end human in the loop --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serve_stand_in(stand_in: StandInAirflow):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(stand_in.app(), host="127.0.0.1", port=port, log_level="warning"))
    server.capture_signals = contextlib.nullcontext
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "stand-in Airflow did not start"
        await asyncio.sleep(0.01)
    stand_in.url = f"http://127.0.0.1:{port}"
    try:
        yield stand_in
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def _iso(moment: Any) -> str | None:
    """As Airflow's API writes a UTC time: 2026-01-01T00:00:00Z."""
    return moment.isoformat().replace("+00:00", "Z") if moment is not None else None
