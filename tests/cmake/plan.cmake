# The parallel plan (core/plan.h): expert placement, groups, sharding and the
# expert-gradient scale for a world size and expert count.
moe_add_test(test_plan LABELS unit SOURCES test_plan.c TIMEOUT 30)
