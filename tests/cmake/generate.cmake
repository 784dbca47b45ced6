# Incremental decoding and moelm-generate (tests/test_generate.c): the arch's
# K/V cache against its full forward on the cpu backend, and end-to-end runs
# of the tool. Label e2e.
moe_add_test(test_generate LABELS e2e SOURCES test_generate.c TIMEOUT 120)
foreach(t moe-backend-cpu moe-communicator-single moe-gate-top1 moe-gate-top2 moe-arch-transformer_lm_gpt)
  if(TARGET ${t})
    add_dependencies(test_generate ${t})
  endif()
endforeach()
