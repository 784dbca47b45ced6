# The command line: the option store, the core's table (test_options) and the
# checks of flag combinations (test_config).
moe_add_test(test_options LABELS unit SOURCES test_options.c TIMEOUT 30)
moe_add_test(test_config LABELS unit SOURCES test_config.c TIMEOUT 30)
