# Text reading, the dictionary and moelm-preprocess (fairseq-preprocess
# --only-source): units on the data library, end-to-end runs of the tool.
moe_add_test(test_text LABELS unit SOURCES test_text.c LIBS moedata TIMEOUT 60)
moe_add_test(test_dictionary LABELS unit SOURCES test_dictionary.c LIBS moedata TIMEOUT 60)
moe_add_test(test_preprocess LABELS e2e SOURCES test_preprocess.c runcmd.c LIBS moedata TIMEOUT 120)
