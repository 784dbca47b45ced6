# The cuda backend against the cpu backend, op by op (label parity: needs a
# GPU; without one the program prints "SKIP: no CUDA device visible" and
# exits 77, which CTest reports as skipped). Built only with the cuda backend.
if(TARGET moe-backend-cuda)
  moe_add_test(test_parity LABELS parity SOURCES test_parity.c LIBS ${CMAKE_DL_LIBS} TIMEOUT 300)
  set_tests_properties(test_parity PROPERTIES SKIP_RETURN_CODE 77)
  add_dependencies(test_parity moe-backend-cpu moe-backend-cuda)
endif()
