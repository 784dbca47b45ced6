# Registry tests: the loader's checks against the broken fixtures, the search
# order and the unknown-name listing (label plugin).
add_subdirectory(${CMAKE_CURRENT_SOURCE_DIR}/fixtures ${CMAKE_BINARY_DIR}/tests/fixtures)

moe_add_test(test_registry LABELS plugin SOURCES test_registry.c TIMEOUT 60)
add_dependencies(test_registry ${MOE_FIXTURE_TARGETS})
# The search-order case compares against the real single-process communicator.
if(TARGET moe-communicator-single)
  add_dependencies(test_registry moe-communicator-single)
endif()
target_compile_definitions(test_registry PRIVATE MOE_TEST_INSTALL_DIR="${MOE_PLUGIN_INSTALL_DIR}")
