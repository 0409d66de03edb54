"""A small stand-in for Airflow's REST API (the parts the gateway calls), to cover each path fast."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.conftest import free_port


@dataclass
class StandInAirflow:
    dags: dict[str, dict] = field(default_factory=lambda: {"etl": {"dag_id": "etl", "is_paused": False}})
    runs: dict[tuple[str, str], dict] = field(default_factory=dict)
    task_instances: dict[tuple[str, str], list[dict]] = field(default_factory=dict)
    xcoms: dict[tuple[str, str, str, int], Any] = field(default_factory=dict)
    posts: list[dict] = field(default_factory=list)
    conflicts: int = 0  # answer 409 to this many trigger POSTs
    errors_after_create: int = 0  # create the run, yet answer 500, this many times (a locked SQLite)
    post_delay: float = 0.0
    url: str = ""

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/api/v2/dags/{dag_id}", self.dag, methods=["GET", "PATCH"]),
                Route("/api/v2/dags/{dag_id}/dagRuns", self.trigger, methods=["POST"]),
                Route("/api/v2/dags/{dag_id}/dagRuns/{run_id}", self.run, methods=["GET"]),
                Route("/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances", self.tis, methods=["GET"]),
                Route("/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}", self.xcom, methods=["GET"]),
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
