"""The gateway: live delivery, the HTTP API, the store, webhooks, Airflow access, and the client side."""
