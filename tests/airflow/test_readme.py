"""The README's example DAG, loaded as written by each Airflow's DagBag in its virtualenv (the portable
`from runbell.listeners import result` marks the result task on every version).

The DAG imports runbell.listeners from this tree (put first on the path), not the copy installed in
the virtualenv, which may be older: the test is of the README against the code beside it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from runbell.service.bench import standalone
from tests.readme_blocks import code_blocks

pytestmark = pytest.mark.airflow

REPO = Path(__file__).resolve().parents[2]
MATRIX = standalone.matrix_venvs()

PROBE = """
import json, sys
try:
    from airflow.dag_processing.dagbag import DagBag
except ImportError:  # Airflow 3.1
    from airflow.models.dagbag import DagBag
from runbell.listeners.propagation import is_marked_critical, result_task_ids
import runbell.listeners

bag = DagBag(sys.argv[1])
print(json.dumps({
    "errors": {str(k): str(v) for k, v in bag.import_errors.items()},
    "dags": {
        dag_id: {
            "tasks": sorted(t.task_id for t in dag.tasks),
            "result": sorted(result_task_ids(dag.tasks, None)),
            "critical": sorted(t.task_id for t in dag.tasks if is_marked_critical(t)),
        }
        for dag_id, dag in bag.dags.items()
    },
    "listeners": runbell.listeners.__path__[0],
}))
"""


def this_tree_as_runbell(root: Path) -> Path:
    """A path entry under which runbell.listeners and runbell.bus are this tree's folders."""
    package = root / "runbell"
    package.mkdir(parents=True)
    (package / "listeners").symlink_to(REPO / "listeners")
    (package / "bus").symlink_to(REPO / "listeners" / "bus")
    return root


@pytest.mark.parametrize("version", list(MATRIX), ids=[f"airflow-{v}" for v in MATRIX])
def test_the_readme_dag_loads_in_airflow_with_its_markers(version, airflow_redis_url, tmp_path):
    (block,) = [code for code in code_blocks("python") if "@dag" in code]
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "answer_question.py").write_text(block)
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow-home"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PYTHONPATH": str(this_tree_as_runbell(tmp_path / "src")),
    }
    python = standalone.checked_venv(MATRIX[version]) / "bin" / "python"
    done = subprocess.run([str(python), "-c", PROBE, str(dags)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.splitlines()[-1])
    assert Path(loaded["listeners"]).resolve() == (REPO / "listeners").resolve()  # this tree's hook side
    assert loaded["errors"] == {}
    assert loaded["dags"] == {"answer_question": {"tasks": ["answer", "cleanup", "load"], "result": ["answer"], "critical": ["load"]}}
