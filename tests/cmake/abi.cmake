# The plugin ABI: every struct's layout pinned at compile time, and plugins
# of an older minor (and of a newer one) against the loader (label plugin).
# The fixtures come from tests/fixtures (added by registry.cmake).
moe_add_test(test_abi LABELS unit plugin SOURCES test_abi.c TIMEOUT 60)
foreach(f communicator-fixture_abi_1_0 communicator-fixture_abi_newer communicator-fixture_abi_long_host
          backend-fixture_abi_1_0 backend-fixture_abi_ops_zero backend-fixture_abi_ops_long)
  add_dependencies(test_abi moe-fixture-abi-${f})
endforeach()
