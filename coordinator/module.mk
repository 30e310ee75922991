# Coordinator: durable state (embedded store; etcd to come).
CORE_SRCS += coordinator/state.c
LDLIBS += -lxxhash
