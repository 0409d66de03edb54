"""Exit codes of the runbell command: 0 success, 1 failed, 2 still pending, 64 usage (sysexits EX_USAGE)."""

EXIT_SUCCESS, EXIT_FAILED, EXIT_PENDING, EXIT_USAGE = 0, 1, 2, 64
