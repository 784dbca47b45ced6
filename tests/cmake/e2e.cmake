# End-to-end tests: moelm-train run as a user would.
moe_add_test(test_dryrun LABELS e2e SOURCES test_dryrun.c runcmd.c TIMEOUT 60)
moe_add_test(test_train LABELS e2e SOURCES test_train.c runcmd.c TIMEOUT 600)
moe_add_test(test_dropless LABELS e2e SOURCES test_dropless.c runcmd.c TIMEOUT 300)
# Multi-rank runs through mpirun on the CPU backend.
moe_add_test(test_dist LABELS dist SOURCES test_dist.c runcmd.c TIMEOUT 900)
# The fully sharded parameter store on 2 ranks (starts itself under mpirun).
moe_add_test(test_fsdp LABELS dist SOURCES test_fsdp.c TIMEOUT 120)
set_tests_properties(test_fsdp PROPERTIES SKIP_RETURN_CODE 77)
moe_add_test(test_cli LABELS e2e SOURCES test_cli.c runcmd.c TIMEOUT 120)
# A stopped rank is named by the others (the MPI communicator's watchdog):
# rank 1 of 2, and rank 2 of 4 (a group where MPI alone cannot tell who is missing).
add_test(NAME test_dist_stalled_rank COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/dist_stall.sh ${CMAKE_BINARY_DIR}/bin/moelm-train 2 1)
set_tests_properties(test_dist_stalled_rank PROPERTIES LABELS dist TIMEOUT 120 SKIP_RETURN_CODE 77)
add_test(NAME test_dist_stalled_rank4 COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/dist_stall.sh ${CMAKE_BINARY_DIR}/bin/moelm-train 4 2)
set_tests_properties(test_dist_stalled_rank4 PROPERTIES LABELS dist TIMEOUT 120 SKIP_RETURN_CODE 77)
# The language_modeling task over data directories the test writes.
moe_add_test(test_language_modeling LABELS plugin SOURCES test_language_modeling.c LIBS moedata TIMEOUT 120)
# Real text from raw files to a trained model (license texts, a BPE trained by the test).
moe_add_test(test_real_text LABELS e2e SOURCES test_real_text.c runcmd.c LIBS moedata TIMEOUT 600)
# moelm-eval-lm against the trainer's validation, on 1 and 2 ranks.
moe_add_test(test_eval_lm LABELS e2e SOURCES test_eval_lm.c runcmd.c TIMEOUT 300)
