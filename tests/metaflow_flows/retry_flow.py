"""`flaky` fails on its first attempt and succeeds on the second (under @retry(times=1)); with
RB_FLAKY_FAILS=always it fails every attempt, so the retries are exhausted."""

import os

from metaflow import FlowSpec, current, retry, step


class RetryFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.flaky)

    @retry(times=1, minutes_between_retries=0)
    @step
    def flaky(self):
        if os.environ.get("RB_FLAKY_FAILS") == "always" or current.retry_count == 0:
            raise RuntimeError(f"flaky failed on attempt {current.retry_count}")
        self.answer = current.retry_count
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    RetryFlow()
