# Incremental decoding and moelm-generate (tests/test_generate.c): the arch's
# K/V cache against its full forward on the cpu backend, and end-to-end runs
# of the tool. Label e2e.
moe_add_test(test_generate LABELS e2e SOURCES test_generate.c runcmd.c LIBS moedata TIMEOUT 300)
foreach(t moelm-generate moelm-train moelm-preprocess moe-backend-cpu moe-communicator-single moe-gate-top1
          moe-gate-top2 moe-gate-expert_choice moe-arch-transformer_lm_gpt moe-task-language_modeling moe-criterion-moe_cross_entropy
          moe-optimizer-adam moe-lr_scheduler-fixed moe-lr_scheduler-inverse_sqrt)
  if(TARGET ${t})
    add_dependencies(test_generate ${t})
  endif()
endforeach()
