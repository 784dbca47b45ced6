# Optimizer kernels, loss scaler, and the small components (optimizers, lr
# schedulers, normalizers, criteria, dummy_lm, the single communicator).
moe_add_test(test_optim LABELS unit SOURCES test_optim.c ${PROJECT_SOURCE_DIR}/kernels/cpu/optim.c TIMEOUT 60)
moe_add_test(test_scaler LABELS unit SOURCES test_scaler.c TIMEOUT 60)
moe_add_test(test_components LABELS unit plugin SOURCES test_components.c TIMEOUT 60)
# the plugins test_components loads from the build tree
add_dependencies(test_components moe-backend-cpu moe-communicator-single moe-optimizer-adam moe-optimizer-sgd
  moe-lr_scheduler-fixed moe-lr_scheduler-inverse_sqrt moe-normalizer-world_size moe-normalizer-sqrt_world_size
  moe-criterion-cross_entropy moe-criterion-moe_cross_entropy moe-task-dummy_lm)
