"""The smallest flow: start sets the result artifact, end reads it."""

from metaflow import FlowSpec, step


class TinyFlow(FlowSpec):
    @step
    def start(self):
        self.answer = 42
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    TinyFlow()
