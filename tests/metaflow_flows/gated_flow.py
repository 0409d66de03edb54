"""start → work → end, where work waits for the file named by RB_GATE (at most 60 s) before it
goes on, so a test can attach its waiters first; with RB_FAIL=1 work then raises (a step failure
that resume can fix: run again without RB_FAIL)."""

import os
import time

from metaflow import FlowSpec, step


class GatedFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.work)

    @step
    def work(self):
        gate = os.environ.get("RB_GATE")
        deadline = time.monotonic() + 60
        while gate and not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.02)
        if os.environ.get("RB_FAIL") == "1":
            raise RuntimeError("work failed")
        self.answer = {"rows": 3}
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    GatedFlow()
