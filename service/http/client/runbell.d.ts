// Types of runbell.js (the npm package runbell-client). The data of each event is as the gateway's
// AsyncAPI document (GET /asyncapi.json) describes it; the fields used most are typed here.

export interface Position {
  epoch: string;
  seq: number;
}

export function parsePosition(id: string | null | undefined): Position | null;

export interface ProgressItem {
  key?: string | null;
  value: unknown;
}

/** A run's event as the `task`, `run` and `progress` events carry it. */
export interface RunEvent {
  epoch: string;
  seq: number;
  kind: "task" | "run" | "progress";
  dag_id: string;
  run_id: string;
  state: string;
  ts: number;
  task_id?: string;
  map_index?: number;
  try_number?: number;
  result_task?: boolean;
  critical?: boolean;
  result?: { value?: unknown; ref?: Record<string, unknown>; size: number };
  error?: { type: string; message: string };
  progress?: { items: ProgressItem[]; dropped: number };
  msg?: string;
  trace?: { traceparent: string; tracestate?: string };
}

export interface Outcome {
  dag_id: string;
  run_id: string;
  status: "success" | "failed";
  run_state: string;
  epoch: string;
  seq: number;
  decided_epoch: string | null;
  decided_seq: number | null;
  decided_by: "result_task" | "critical_task" | "run" | null;
  result: unknown;
  result_task: { task_id: string; map_index: number; try_number: number | null; is_ref: boolean; size: number } | null;
  failure: { task_id: string | null; map_index: number; try_number: number | null; error: { type: string; message: string } } | null;
  needs_input: NeedsInput[];
}

export interface NeedsInput {
  dag_id: string;
  run_id: string;
  task_id: string;
  map_index: number;
  try_number: number | null;
  position: string;
  subject: string;
  body: string | null;
  options: string[];
  respond: string;
  [field: string]: unknown;
}

export interface Recovery {
  recovered: boolean;
  from: string;
}

export interface RunEvents {
  recovery: Recovery;
  task: RunEvent;
  run: RunEvent;
  progress: RunEvent;
  needs_input: NeedsInput;
  input_received: Record<string, unknown>;
  outcome: Outcome;
  end: { run_state: string; status: string; epoch: string; seq: number } | null;
  gone: { message: string };
}

export interface AssetEvents {
  ready: { asset: string; seq: number };
  asset: Record<string, unknown> & { seq: number };
  end: null;
  gone: { message: string };
}

export interface BackfillEvents {
  slot: Record<string, unknown>;
  progress: { done: number; failed: number; running: number; skipped: number; total: number };
  end: { done: number; failed: number; running: number; skipped: number; total: number } | null;
  gone: { message: string };
}

export interface StreamOptions {
  /** The gateway's URL; default: this page's origin. */
  base?: string;
  /** A bearer token (sent as ?access_token=, which is all EventSource can do). */
  token?: string | null;
  /** Called for a new token when the gateway refuses the one the stream has (e.g. a run-scoped token expired). */
  refreshToken?: (() => Promise<string>) | null;
  /** Resume after this event id (EPOCH-SEQ). */
  lastEventId?: string | null;
}

export interface StreamStats {
  opened: number;
  reopened: number;
  refreshed: number;
  duplicates: number;
  unrecovered: number;
}

export declare class RunbellStream<Events> {
  constructor(options: StreamOptions & { path: string; kind: "run" | "asset" | "backfill"; probePath?: string | null });
  on<K extends keyof Events>(type: K, listener: (data: Events[K], id: string | null) => void): this;
  readonly lastEventId: string | null;
  readonly stats: StreamStats;
  token: string | null;
  close(): void;
}

export interface RunStream extends RunbellStream<RunEvents> {
  /** The run's outcome once decided; rejected when the run is gone, or ended without one. */
  result(): Promise<Outcome>;
}

export function followRun(options: StreamOptions & { dagId: string; runId: string }): RunStream;
export function followAsset(options: StreamOptions & { name: string }): RunbellStream<AssetEvents>;
export function followBackfill(options: StreamOptions & { backfillId: string | number }): RunbellStream<BackfillEvents>;
