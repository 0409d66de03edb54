"""start → middle → end; the result artifact `answer` is set in middle and read at the end."""

from metaflow import FlowSpec, step


class LinearFlow(FlowSpec):
    @step
    def start(self):
        self.x = 20
        self.next(self.middle)

    @step
    def middle(self):
        self.answer = self.x * 2 + 2
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    LinearFlow()
