# Unit tests of the cpu backend (kernels/cpu). Its sources are compiled
# straight into the test, which calls the moe_cpu_* functions directly.
set(cpu_ops_dir ${PROJECT_SOURCE_DIR}/kernels/cpu)
set(cpu_ops_sources test_cpu_ops.c ${cpu_ops_dir}/backend.c ${cpu_ops_dir}/matmul.c ${cpu_ops_dir}/nn.c
  ${cpu_ops_dir}/attention.c)

# route.c and optim.c complete the ops table that backend.c defines. Should
# one be missing from a checkout, the table links against stand-ins that
# return MOE_ERR_UNSUPPORTED (this test exercises none of those ops).
set(cpu_ops_stubs "")
if(EXISTS ${cpu_ops_dir}/route.c)
  list(APPEND cpu_ops_sources ${cpu_ops_dir}/route.c)
else()
  string(APPEND cpu_ops_stubs
    "int64_t moe_cpu_route_workspace_bytes(int64_t S, int E) { return 0; }\n"
    "moe_status moe_cpu_route_forward(moe_ctx *c, const moe_route_args *a) { return MOE_ERR_UNSUPPORTED; }\n"
    "moe_status moe_cpu_route_backward(moe_ctx *c, const moe_route_args *a, const float *dw, float dl,\n"
    "  float *dlogits) { return MOE_ERR_UNSUPPORTED; }\n"
    "moe_status moe_cpu_dispatch_forward(moe_ctx *c, void *out, const void *x, const int32_t *e,\n"
    "  const int32_t *s, int64_t S, int E, int64_t C, int64_t d, moe_dtype dt) { return MOE_ERR_UNSUPPORTED; }\n"
    "moe_status moe_cpu_dispatch_backward(moe_ctx *c, void *dx, const void *dout, const int32_t *e,\n"
    "  const int32_t *s, int64_t S, int E, int64_t C, int64_t d, moe_dtype dt) { return MOE_ERR_UNSUPPORTED; }\n"
    "moe_status moe_cpu_combine_forward(moe_ctx *c, void *y, const void *eo, const int32_t *e, const int32_t *s,\n"
    "  const float *w, int64_t S, int E, int64_t C, int64_t d, moe_dtype dt) { return MOE_ERR_UNSUPPORTED; }\n"
    "moe_status moe_cpu_combine_backward(moe_ctx *c, void *deo, float *dw, const void *dy, const void *eo,\n"
    "  const int32_t *e, const int32_t *s, const float *w, int64_t S, int E, int64_t C, int64_t d,\n"
    "  moe_dtype dt) { return MOE_ERR_UNSUPPORTED; }\n")
endif()
if(EXISTS ${cpu_ops_dir}/optim.c)
  list(APPEND cpu_ops_sources ${cpu_ops_dir}/optim.c)
else()
  string(APPEND cpu_ops_stubs
    "moe_status moe_cpu_adam_step(moe_ctx *c, const moe_adam_args *a) { return MOE_ERR_UNSUPPORTED; }\n"
    "moe_status moe_cpu_sgd_step(moe_ctx *c, const moe_sgd_args *a) { return MOE_ERR_UNSUPPORTED; }\n")
endif()
# decode.c (the decoding ops) likewise
if(EXISTS ${cpu_ops_dir}/decode.c)
  list(APPEND cpu_ops_sources ${cpu_ops_dir}/decode.c)
endif()
if(cpu_ops_stubs)
  set(cpu_ops_stub_file ${CMAKE_CURRENT_BINARY_DIR}/cpu_ops_stubs.c)
  file(WRITE ${cpu_ops_stub_file} "#include \"kernels/cpu/cpu.h\"\n${cpu_ops_stubs}")
  list(APPEND cpu_ops_sources ${cpu_ops_stub_file})
endif()

moe_add_test(test_cpu_ops LABELS unit SOURCES ${cpu_ops_sources} TIMEOUT 60)
