# The transformer_lm arch plugins driven through a cpu runtime: parameter
# counts, variant defaults, finite-difference gradients, checkpointing and
# dropout determinism (tests/test_arch.c). Label unit.
moe_add_test(test_arch LABELS unit SOURCES test_arch.c TIMEOUT 60)
# the plugins test_arch loads from the build tree
foreach(t moe-backend-cpu moe-communicator-single moe-gate-top2 moe-arch-transformer_lm moe-arch-transformer_lm_gpt
          moe-arch-transformer_lm_gpt2_tiny moe-arch-transformer_lm_gpt3_small)
  if(TARGET ${t})
    add_dependencies(test_arch ${t})
  endif()
endforeach()
