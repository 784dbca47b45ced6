# scripts/test.sh --sanitize (MOE_SANITIZE): tests that ask for a huge block
# on purpose, to see the out-of-memory message, get a null pointer from the
# sanitizer's allocator instead of a report. The other options repeat
# scripts/test.sh's (a test's ASAN_OPTIONS replaces the inherited one).
if(MOE_SANITIZE)
  foreach(t test_cpu_ops)
    if(TEST ${t})
      set_property(TEST ${t} APPEND PROPERTY ENVIRONMENT
        "ASAN_OPTIONS=detect_leaks=1:fast_unwind_on_malloc=0:strict_string_checks=1:allocator_may_return_null=1")
    endif()
  endforeach()
endif()
