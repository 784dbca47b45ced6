moe_add_test(test_launch LABELS unit SOURCES test_launch.c)
