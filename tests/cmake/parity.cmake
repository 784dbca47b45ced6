# The cuda backend against the cpu backend, op by op (label parity: needs a
# GPU; without one the program prints "SKIP: no CUDA device visible" and
# exits 77, which CTest reports as skipped). Built only with the cuda backend.
if(TARGET moe-backend-cuda)
  moe_add_test(test_parity LABELS parity SOURCES test_parity.c LIBS ${CMAKE_DL_LIBS} TIMEOUT 300)
  set_tests_properties(test_parity PROPERTIES SKIP_RETURN_CODE 77)
  add_dependencies(test_parity moe-backend-cpu moe-backend-cuda)
  # --moe-dropless trained on the GPU (grouped expert products) against the cpu
  add_test(NAME test_dropless_gpu COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/dropless_gpu.sh ${CMAKE_BINARY_DIR}/bin/moelm-train)
  set_tests_properties(test_dropless_gpu PROPERTIES LABELS parity TIMEOUT 300 SKIP_RETURN_CODE 77
    ENVIRONMENT "MOE_PLUGIN_PATH=")
endif()
# Two NCCL ranks on the GPU(s): fully_sharded and data parallel against one rank.
if(TARGET moe-communicator-nccl)
  add_test(NAME test_dist_gpu COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/dist_gpu.sh ${CMAKE_BINARY_DIR}/bin/moelm-train)
  set_tests_properties(test_dist_gpu PROPERTIES LABELS "parity;dist" TIMEOUT 300 SKIP_RETURN_CODE 77
    ENVIRONMENT "MOE_PLUGIN_PATH=")
endif()
