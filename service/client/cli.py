"""The `runbell` command: serve, emit, wait, tail, run, bench, dead-letters.

`emit` works with the base install (the hook side, e.g. inside an Airflow environment); the others
need the gateway extra and import it only when called.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from runbell.service.client.exits import (
    EXIT_FAILED,
    EXIT_PENDING,
    EXIT_SUCCESS,
    EXIT_USAGE,
)

log = logging.getLogger("runbell.serve")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    return args.handler(args)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose arguments may be added only when it is used (`add_later`)."""

    def __init__(self, *args, add_later=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._add_later = add_later

    def parse_known_args(self, args=None, namespace=None):
        if self._add_later is not None:
            add, self._add_later = self._add_later, None
            add(self)
        return super().parse_known_args(args, namespace)


def _serve_flags(parser: argparse.ArgumentParser) -> None:
    # The settings model imports gateway dependencies, which a hook-only install (`runbell emit`) lacks.
    from runbell.service.settings import add_serve_flags

    add_serve_flags(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runbell", description="Push Airflow run outcomes to whoever waits on them.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    serve = sub.add_parser(
        "serve",
        help="run the gateway (settings: flags or RUNBELL_* environment variables)",
        description="Run the gateway. Every setting is a flag or its RUNBELL_* environment variable (the flag wins); "
        "tokens, secrets and Airflow's password and database URL are environment variables only.",
        add_later=_serve_flags,
    )
    serve.set_defaults(handler=cmd_serve)

    emit = sub.add_parser("emit", help="publish one event exactly as the Airflow hook would")
    emit.add_argument("--dag", required=True)
    emit.add_argument("--run", required=True)
    emit.add_argument("--task", help="task id: a task event (else a run event)")
    emit.add_argument(
        "--state",
        help="run: queued, running, success, failed; task: running, success, failed, up_for_retry, skipped (required, but with --progress)",
    )
    emit.add_argument("--map-index", type=int, default=-1)
    emit.add_argument("--try-number", type=int)
    emit.add_argument("--result", help="the result value as JSON")
    emit.add_argument("--result-task", action="store_true", help="this task's value is the run's result")
    emit.add_argument("--critical", action="store_true", help="a terminal failure of this task fails the run")
    emit.add_argument("--error", help="error message of a failure")
    emit.add_argument("--error-type", help="error type of a failure (default: error)")
    emit.add_argument("--progress", metavar="JSON", help="publish this value as the task's progress (needs --task; no --state)")
    emit.add_argument("--key", help="with --progress: the key the value is the latest of (percent, status); none: a chunk")
    emit.set_defaults(handler=cmd_emit)

    bench = sub.add_parser(
        "bench",
        help="measure the gateway against the Redis floor and polling on this machine; "
        "on SQLite and PostgreSQL; writes DIR/report.json, DIR/samples.json, DIR/summary.md and PNG charts",
    )
    bench.add_argument("--out", default="bench-out")
    bench.add_argument("--quick", action="store_true", help="smaller counts: under a minute")
    bench.add_argument(
        "--airflow", action="store_true", help="add the comparison with Airflow's own /wait on a real Airflow (minutes more)"
    )
    bench.add_argument(
        "--profile",
        action="store_true",
        help="one more round of the largest crowds and of the spread callers (SSE, long-poll) and one more webhook "
        "burst, with py-spy recording the gateway: where its "
        "time goes, in report.json and summary.md, raw stacks in DIR/profile-*.txt (needs py-spy: runbell[bench])",
    )
    bench.add_argument("--redraw", action="store_true", help="only draw the charts of --out DIR again from its samples.json")
    bench.add_argument("--redis-url", dest="redis_url", default=os.environ.get("RUNBELL_REDIS_URL", "redis://127.0.0.1:6379/0"))
    bench.add_argument(
        "--database-url",
        dest="database_url",
        help="the PostgreSQL server the bench runs the gateway on besides SQLite, in a scratch database "
        "(default: postgresql://postgres@127.0.0.1:5432/postgres where it answers; else reported as not reachable)",
    )
    bench.add_argument(
        "--listing",
        action="store_true",
        help="instead: p50/p99 of filtered, paged GET /v1/runs over 100,000 runs bulk-loaded into a "
        "scratch database on the PostgreSQL server of --database-url; writes DIR/listing.json",
    )
    bench.add_argument(
        "--scale-out",
        dest="scale_out",
        action="store_true",
        help="instead: recorder events/s against the stream partitions (and recorders), and SSE fan-out with 1 against "
        "3 gateways, as ratios and per-core figures; writes DIR/scale_out.json and DIR/scale_out_samples.json",
    )
    bench.set_defaults(handler=cmd_bench)

    run = sub.add_parser("run", help="trigger a run and show its progress; exit 0 success, 1 failed, 2 pending")
    run.add_argument("dag_id")
    run.add_argument("--conf", default="{}", help="the run's conf as JSON")
    run.add_argument("--timeout", type=float, default=300.0, help="seconds to wait in all (default 300)")
    run.add_argument("--unpause", action="store_true", help="unpause the DAG first if it is paused (else a paused DAG is refused)")
    run.add_argument("--url", default=os.environ.get("RUNBELL_URL", "http://127.0.0.1:8080"))
    run.add_argument("--token", default=os.environ.get("RUNBELL_TOKEN"), help="bearer token with the trigger role")
    run.set_defaults(handler=cmd_run)

    dead = sub.add_parser("dead-letters", help="list or re-drive the recorder's dead letters (admin token)")
    dead_sub = dead.add_subparsers(dest="action", required=True)
    listing = dead_sub.add_parser("list", help="the dead letters, oldest first, as JSON")
    listing.add_argument("--after", type=int, default=0, help="only those with a larger id (next_after of a previous page)")
    listing.add_argument("--limit", type=int, default=50)
    redrive = dead_sub.add_parser("redrive", help="record dead letters again; exit 1 if any is refused again")
    which = redrive.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", type=int, help="the dead letter's id")
    which.add_argument("--all", action="store_true", help="every dead letter")
    for p in (listing, redrive):
        p.add_argument("--url", default=os.environ.get("RUNBELL_URL", "http://127.0.0.1:8080"))
        p.add_argument("--token", default=os.environ.get("RUNBELL_TOKEN"), help="bearer token with the admin role")
    dead.set_defaults(handler=cmd_dead_letters)

    for name, handler, text in (
        ("wait", cmd_wait, "wait for a run's outcome; exit 0 success, 1 failed, 2 pending"),
        ("tail", cmd_tail, "follow a run's events"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("dag_id")
        p.add_argument("run_id")
        p.add_argument("--url", default=os.environ.get("RUNBELL_URL", "http://127.0.0.1:8080"))
        p.add_argument("--token", default=os.environ.get("RUNBELL_TOKEN"), help="bearer token (or RUNBELL_TOKEN)")
        if name == "wait":
            p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait in all (default 300)")
            p.add_argument("--resolve", action="store_true", help="a result too large for the bus: read its value from Airflow")
        p.set_defaults(handler=handler)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    from runbell.service.core.redaction import install_log_redaction
    from runbell.service.http.app import create_app
    from runbell.service.http.server import known_secrets, serve
    from runbell.service.live.broker import resolve_redis
    from runbell.service.settings import load_settings, serve_overrides, startup_line

    try:
        settings = load_settings(serve_overrides(args))
        settings.check()
    except ValueError as exc:
        print(f"runbell serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_redaction(known_secrets(settings))  # before the first line: URLs may carry ?password=
    redis_url, embedded = resolve_redis(settings.redis_url)
    log.info("%s", startup_line(settings, redis_url, embedded is not None))
    app = create_app(settings.model_copy(update={"redis_url": redis_url}), embedded=embedded)
    serve(app, settings)
    return EXIT_SUCCESS


def cmd_emit(args: argparse.Namespace) -> int:
    from runbell.listeners.publisher import emit

    if args.progress is not None:
        return emit_progress_value(args)
    if args.state is None or args.key is not None:
        print("runbell emit: give --state (or --progress, with --key if the value has one)", file=sys.stderr)
        return EXIT_USAGE
    kwargs = {}
    if args.result is not None:
        try:
            kwargs["result"] = json.loads(args.result)
        except ValueError as exc:
            print(f"runbell emit: --result is not JSON: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        seq = emit(
            args.dag,
            args.run,
            args.state,
            task_id=args.task,
            map_index=args.map_index,
            try_number=args.try_number,
            result_task=args.result_task,
            critical=args.critical,
            error=args.error,
            error_type=args.error_type,
            **kwargs,
        )
    except ValueError as exc:
        print(f"runbell emit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps({"seq": seq} if seq is not None else {"spooled": True}))
    return EXIT_SUCCESS


def emit_progress_value(args: argparse.Namespace) -> int:
    """`runbell emit --progress JSON`: one progress value of a task, published at once as the hook would."""
    from runbell.listeners.partial_output import emit_progress
    from runbell.listeners.publisher import SpoolUnavailable

    if args.task is None or args.state not in (None, "running") or args.result is not None or args.error is not None:
        print("runbell emit: --progress needs --task, and takes no --state, --result or --error", file=sys.stderr)
        return EXIT_USAGE
    try:
        value = json.loads(args.progress)
    except ValueError as exc:
        print(f"runbell emit: --progress is not JSON: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        seq = emit_progress(args.dag, args.run, args.task, value, key=args.key, map_index=args.map_index, try_number=args.try_number)
    except (ValueError, SpoolUnavailable) as exc:
        print(f"runbell emit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps({"seq": seq} if seq is not None else {"spooled": True}))
    return EXIT_SUCCESS


def cmd_wait(args: argparse.Namespace) -> int:
    from runbell.service.client.client import RunbellClient, RunbellError, RunPending

    with RunbellClient(args.url, args.token) as client:
        try:
            outcome = client.wait(args.dag_id, args.run_id, timeout=args.timeout, resolve=args.resolve)
        except RunPending as pending:
            print(json.dumps(pending.body, indent=2))
            return EXIT_PENDING
        except RunbellError as error:
            print(f"runbell wait: {error}", file=sys.stderr)
            return EXIT_USAGE
    print(json.dumps(outcome.body, indent=2))
    return EXIT_SUCCESS if outcome.succeeded else EXIT_FAILED


def cmd_run(args: argparse.Namespace) -> int:
    from runbell.service.client.client import RunbellClient
    from runbell.service.client.progress import run_command

    try:
        conf = json.loads(args.conf)
    except ValueError as exc:
        print(f"runbell run: --conf is not JSON: {exc}", file=sys.stderr)
        return EXIT_USAGE
    with RunbellClient(args.url, args.token) as client:
        return run_command(client, args.dag_id, conf, args.timeout, unpause=args.unpause)


def cmd_tail(args: argparse.Namespace) -> int:
    from runbell.service.client.client import RunbellClient

    with RunbellClient(args.url, args.token) as client:
        for event in client.events(args.dag_id, args.run_id):
            print(f"{event.id or '-':>5} {event.event:<8} {event.data}", flush=True)
    return EXIT_SUCCESS


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from runbell.service.client.client import RunbellClient, RunbellError

    with RunbellClient(args.url, args.token) as client:
        try:
            if args.action == "list":
                print(json.dumps(client.dead_letters(after=args.after, limit=args.limit), indent=2))
                return EXIT_SUCCESS
            if not args.all:
                try:
                    answer = client.redrive(args.id)
                except RunbellError as error:
                    if error.status != 409:
                        raise
                    print(f"runbell dead-letters: {error}", file=sys.stderr)  # still not an event: it stays
                    return EXIT_FAILED
                print(json.dumps(answer, indent=2))
                return EXIT_SUCCESS if answer["recorded"] else EXIT_FAILED
            totals, after = {"recorded": 0, "failed": 0}, 0
            while True:  # page by page: each call is bounded
                answer = client.redrive(after=after)
                totals = {key: totals[key] + answer[key] for key in totals}
                if answer["next_after"] is None:
                    break
                after = answer["next_after"]
            print(json.dumps({**totals, "remaining": answer["remaining"]}, indent=2))
            return EXIT_FAILED if totals["failed"] else EXIT_SUCCESS
        except RunbellError as error:
            print(f"runbell dead-letters: {error}", file=sys.stderr)
            return EXIT_USAGE


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from runbell.service.bench import run

    if args.redraw:
        from runbell.service.bench.report import redraw

        print(f"drawn: {', '.join(redraw(Path(args.out)))}")
        return EXIT_SUCCESS
    if args.listing:
        from runbell.service.bench import run_listing

        if not args.database_url:
            print("runbell bench --listing: give --database-url postgresql://user@host:port/db", file=sys.stderr)
            return EXIT_USAGE
        print(json.dumps(run_listing(Path(args.out), args.redis_url, args.database_url), indent=2))
        return EXIT_SUCCESS
    if args.scale_out:
        from runbell.service.bench.report import scale_out_summary
        from runbell.service.bench.scaleout import run_scale_out

        report = run_scale_out(Path(args.out), args.redis_url, args.quick, args.database_url)
        print(scale_out_summary(report))
        print(f"\nwritten to {args.out}/: {', '.join(report['files'])} ({report['seconds']} s)")
        return EXIT_SUCCESS
    from runbell.service.bench import summary

    if args.database_url and not args.database_url.startswith(("postgresql", "postgres")):
        print("runbell bench: SQLite always runs on fresh files; --database-url names the PostgreSQL server", file=sys.stderr)
        return EXIT_USAGE
    report = run(Path(args.out), args.redis_url, args.quick, args.database_url, airflow=args.airflow, profile=args.profile)
    print(summary(report))
    print(f"\nwritten to {args.out}/: {', '.join(report['files'])} ({report['seconds']} s)")
    return EXIT_SUCCESS


if __name__ == "__main__":
    sys.exit(main())
