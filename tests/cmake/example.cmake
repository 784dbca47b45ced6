# The out-of-tree example plugin (examples/linear_decay_lr), built as a user
# would: install this build into a staging prefix, configure the example with
# find_package(moelm), list it with moelm-train --user-dir. A second test then
# loads the built example with the registry and runs its schedule
# (test_registry --example, reading MOE_TEST_EXAMPLE_DIR). Label plugin.
set(MOE_EXAMPLE_WORK ${CMAKE_BINARY_DIR}/tests/example_linear_decay)

add_test(NAME test_example_build
  COMMAND sh ${CMAKE_CURRENT_SOURCE_DIR}/example_build.sh ${CMAKE_COMMAND} ${CMAKE_BINARY_DIR}
          ${PROJECT_SOURCE_DIR}/examples/linear_decay_lr ${MOE_EXAMPLE_WORK}
          $<TARGET_FILE:moelm-train> lr_scheduler example_linear_decay ${CMAKE_C_COMPILER})
set_tests_properties(test_example_build PROPERTIES LABELS plugin TIMEOUT 120
  ENVIRONMENT "MOE_PLUGIN_PATH=" FIXTURES_SETUP moe_example)

# The example gate (examples/top3_sigmoid_gate): built the same way against the
# gate SDK (moe/gate.h), then trains a tiny model for a few updates.
add_test(NAME test_example_gate
  COMMAND sh ${CMAKE_CURRENT_SOURCE_DIR}/example_build.sh ${CMAKE_COMMAND} ${CMAKE_BINARY_DIR}
          ${PROJECT_SOURCE_DIR}/examples/top3_sigmoid_gate ${CMAKE_BINARY_DIR}/tests/example_top3_sigmoid
          $<TARGET_FILE:moelm-train> gate example_top3_sigmoid ${CMAKE_C_COMPILER})
set_tests_properties(test_example_gate PROPERTIES LABELS plugin TIMEOUT 180 ENVIRONMENT "MOE_PLUGIN_PATH=")

add_test(NAME test_example_load COMMAND test_registry --example)
set_tests_properties(test_example_load PROPERTIES LABELS plugin TIMEOUT 60
  ENVIRONMENT "MOE_PLUGIN_PATH=;CMOCKA_MESSAGE_OUTPUT=STDOUT;MOE_TEST_EXAMPLE_DIR=${MOE_EXAMPLE_WORK}/build"
  FIXTURES_REQUIRED moe_example)
