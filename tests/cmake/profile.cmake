# The trace recorder (core/profile.c) with a fake backend's device timers:
# exact timestamps, nesting, categories, the file's JSON (tests/test_profile.c).
moe_add_test(test_profile LABELS unit SOURCES test_profile.c TIMEOUT 30)
