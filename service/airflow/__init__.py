"""Airflow access: its REST API, idempotent triggering, the reconciler."""
