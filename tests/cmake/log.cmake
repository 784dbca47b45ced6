# Errors, logger and meters of the core: exact strings, no plugins, no files
# outside the build.
find_package(Threads REQUIRED)
moe_add_test(test_error LABELS unit SOURCES test_error.c LIBS Threads::Threads TIMEOUT 30)
moe_add_test(test_log LABELS unit SOURCES test_log.c TIMEOUT 30)
moe_add_test(test_meters LABELS unit SOURCES test_meters.c TIMEOUT 30)
