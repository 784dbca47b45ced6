# Seeing a run, as a user would: --tensorboard-logdir event files read back
# (by the test's own reader, and by TensorBoard's when build-test/tb-venv has
# it: scripts/test.sh installs it) and --profile traces, on 1 and 2 ranks
# (tests/test_observe.c). Label e2e.
moe_add_test(test_observe LABELS e2e SOURCES test_observe.c runcmd.c TIMEOUT 300)
