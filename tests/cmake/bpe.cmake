# GPT-2 byte-level BPE of the data library (data/bpe.c): small vocabularies
# written by the test into a temporary directory, no real GPT-2 files.
moe_add_test(test_bpe LABELS unit SOURCES test_bpe.c LIBS moedata TIMEOUT 120)
