"""Runbell's publishing side: the Airflow listener and the plain publishing API.

Installs into an Airflow environment needing only ``redis`` and ``pydantic``.
"""

from runbell.listeners.marks import add_result, critical, result
from runbell.listeners.partial_output import emit_progress, progress
from runbell.listeners.publisher import emit

__all__ = ["add_result", "critical", "emit", "emit_progress", "progress", "result"]
