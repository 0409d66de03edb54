"""What every subsystem shares: the outcome rules, metrics, time, supervised background loops."""
