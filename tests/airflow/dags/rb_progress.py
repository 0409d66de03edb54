"""A task that streams its answer: 200 chunks through runbell.listeners.progress, then the whole text as
the run's result. Each chunk carries when the task offered it, for the task-to-browser latency."""

import time

from airflow.sdk import dag, task

from runbell.listeners import progress, result

CHUNKS = 200


@dag(schedule=None, catchup=False, tags=["runbell-e2e"])
def rb_progress():
    @result
    @task
    def answer() -> str:
        words = []
        for i in range(CHUNKS):
            word = f"w{i} "
            progress({"i": i, "text": word, "offered_at": time.time()})
            progress(round(100 * (i + 1) / CHUNKS), key="percent")
            words.append(word)
            time.sleep(0.01)  # a model's pace: tokens arrive over two seconds
        return "".join(words)

    answer()


rb_progress()
