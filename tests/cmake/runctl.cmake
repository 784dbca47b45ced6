# Run control, run as a user would: stop signals (one rank and 2 MPI ranks),
# --save-dir checked at start, --patience, --stop-time-hours, --log-file, and
# ranks that stop when mpirun is killed (tests/test_runctl.c). Label e2e.
moe_add_test(test_runctl LABELS e2e SOURCES test_runctl.c runcmd.c TIMEOUT 300)
