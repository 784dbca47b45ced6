# Checkpoints: save, resume bit for bit (fp32, fp16, fully sharded on 2 MPI
# ranks when mpirun is there), refusal of damaged or foreign files, atomicity.
moe_add_test(test_checkpoint LABELS e2e SOURCES test_checkpoint.c runcmd.c TIMEOUT 300)
