# Coordinator: durable state (embedded store; etcd to come), the KV ledger.
CORE_SRCS += coordinator/state.c coordinator/ledger.c coordinator/coordinator.c coordinator/links.c coordinator/sequences.c coordinator/blocks.c coordinator/drain.c coordinator/commit.c coordinator/metrics.c
LDLIBS += -lxxhash

BINS += $(BUILD)/bin/kvmesh-coordinator
$(BUILD)/bin/kvmesh-coordinator: $(BUILD)/coordinator/main.o $(CORE_LIB)
	@mkdir -p $(@D)
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)
