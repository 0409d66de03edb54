"""The durable store: tables, migrations, queries, and the recorder that fills it from the bus."""
