# The data library's indexed datasets, token blocks and batching
# (data/indexed.c, data/blocks.c, data/batching.c), linked from libmoedata.
# Label unit; files go to a fresh directory under /tmp.
moe_add_test(test_indexed LABELS unit SOURCES test_indexed.c LIBS moedata TIMEOUT 60)
moe_add_test(test_blocks LABELS unit SOURCES test_blocks.c LIBS moedata TIMEOUT 60)
moe_add_test(test_batching LABELS unit SOURCES test_batching.c LIBS moedata TIMEOUT 60)
