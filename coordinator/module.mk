# Coordinator: durable state (embedded store; etcd to come), the KV ledger.
CORE_SRCS += coordinator/state.c coordinator/ledger.c
LDLIBS += -lxxhash
