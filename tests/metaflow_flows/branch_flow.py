"""A static branch (left, right) joined again."""

from metaflow import FlowSpec, step


class BranchFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.left, self.right)

    @step
    def left(self):
        self.part = 1
        self.next(self.join)

    @step
    def right(self):
        self.part = 2
        self.next(self.join)

    @step
    def join(self, inputs):
        self.answer = sorted(i.part for i in inputs)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    BranchFlow()
