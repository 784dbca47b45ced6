# MoE routing: the cpu backend's route/dispatch/combine (kernels/cpu/route.c,
# compiled into the test) and the top1/top2 gate plugins, which the test loads
# from the build tree with a fake host.
moe_add_test(test_route LABELS unit plugin
  SOURCES test_route.c ${PROJECT_SOURCE_DIR}/kernels/cpu/route.c
  LIBS ${CMAKE_DL_LIBS}
  TIMEOUT 60)
add_dependencies(test_route moe-gate-top1 moe-gate-top2)

# the general top-k router (kernels/cpu/route.c with moe_route_args.topk = 1)
# and the topk gate plugin
moe_add_test(test_route_topk LABELS unit plugin
  SOURCES test_route_topk.c ${PROJECT_SOURCE_DIR}/kernels/cpu/route.c
  LIBS ${CMAKE_DL_LIBS}
  TIMEOUT 60)
add_dependencies(test_route_topk moe-gate-topk)

# expert-choice routing (kernels/cpu/route.c with moe_route_args.expert_choice
# = 1), dispatch and combine over its E columns, and the expert_choice plugin
moe_add_test(test_route_ec LABELS unit plugin
  SOURCES test_route_ec.c ${PROJECT_SOURCE_DIR}/kernels/cpu/route.c
  LIBS ${CMAKE_DL_LIBS}
  TIMEOUT 60)
add_dependencies(test_route_ec moe-gate-expert_choice)
