"""Airflow access: its REST API client and the reconciler that asks it about runs gone quiet."""
