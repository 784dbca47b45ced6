# Checkpoints: save, resume bit for bit (fp32, fp16, fully sharded on 2 MPI
# ranks when mpirun is there), refusal of damaged or foreign files, atomicity.
moe_add_test(test_checkpoint LABELS e2e SOURCES test_checkpoint.c runcmd.c TIMEOUT 300)
# Checkpoints across world sizes and moelm-checkpoint (info, consolidate,
# reshard, export): round trips byte for byte, resumes on other world sizes
# (MPI ranks; those parts skipped without mpirun), safetensors read back.
moe_add_test(test_checkpoint_tool LABELS dist SOURCES test_checkpoint_tool.c runcmd.c TIMEOUT 300)
