"""A step that streams its answer with runbell.listeners.progress, then keeps it as the result artifact."""

from metaflow import FlowSpec, step

from runbell.listeners import progress

CHUNKS = 50


class StreamingFlow(FlowSpec):
    @step
    def start(self):
        words = []
        for i in range(CHUNKS):
            words.append(f"w{i} ")
            progress(words[-1])
            progress(round(100 * (i + 1) / CHUNKS), key="percent")
        self.answer = "".join(words)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    StreamingFlow()
