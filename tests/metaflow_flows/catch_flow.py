"""`start` always raises; @catch swallows it, so the run goes on and succeeds."""

from metaflow import FlowSpec, catch, step


class CatchFlow(FlowSpec):
    @catch(var="caught")
    @step
    def start(self):
        self.number = int("not a number")  # ValueError: swallowed by @catch
        self.next(self.end)

    @step
    def end(self):
        self.answer = "caught" if self.caught else "clean"


if __name__ == "__main__":
    CatchFlow()
