"""Webhooks: endpoints and the outbox, the dispatcher, Standard Webhooks signing, the target guard."""
