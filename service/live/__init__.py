"""Live delivery: the hub (one pub/sub connection fanned out to local subscribers) and its Redis."""
