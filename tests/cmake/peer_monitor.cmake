# The NCCL communicator's rendezvous and rank watchdog, without a GPU or NCCL:
# peer_monitor.c is compiled into the test; three forked ranks on 127.0.0.1.
find_package(Threads REQUIRED)
moe_add_test(test_peer_monitor LABELS unit dist
  SOURCES test_peer_monitor.c ${PROJECT_SOURCE_DIR}/plugins/communicators/peer_monitor.c
  LIBS Threads::Threads TIMEOUT 60)
