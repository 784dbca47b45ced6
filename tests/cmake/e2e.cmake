# End-to-end tests: moelm-train run as a user would.
moe_add_test(test_dryrun LABELS e2e SOURCES test_dryrun.c runcmd.c TIMEOUT 60)
moe_add_test(test_train LABELS e2e SOURCES test_train.c runcmd.c TIMEOUT 600)
# Multi-rank runs through mpirun on the CPU backend.
moe_add_test(test_dist LABELS dist SOURCES test_dist.c runcmd.c TIMEOUT 900)
moe_add_test(test_cli LABELS e2e SOURCES test_cli.c runcmd.c TIMEOUT 120)
