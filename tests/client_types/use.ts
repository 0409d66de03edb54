// A consumer of the npm package runbell-client, compiled with tsc --strict by tests/browser/test_browser_client.py:
// its types must describe what the module gives (and refuse what it does not: the last line).
import { followRun, followAsset, followBackfill, parsePosition, type Outcome } from "runbell-client";

const run = followRun({ dagId: "etl", runId: "r1", token: "t", refreshToken: async () => "t2" });
run.on("progress", (data) => {
  const items = data.progress?.items ?? [];
  const n: number = items.length + data.seq;
  void n;
});
run.on("outcome", (o: Outcome) => { const s: "success" | "failed" = o.status; void s; });
const done: Promise<Outcome> = run.result();
void done;
followAsset({ name: "s3://x" }).on("asset", (e) => { const seq: number = e.seq; void seq; });
followBackfill({ backfillId: 7 }).on("progress", (p) => { const total: number = p.total; void total; });
const pos = parsePosition("abc-5");
if (pos) { const seq: number = pos.seq; void seq; }
// @ts-expect-error: not an event of a run
run.on("slot", () => {});
