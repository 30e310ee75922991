# kvmesh-agent, the node agent daemon.
BINS += $(BUILD)/bin/kvmesh-agent
$(BUILD)/bin/kvmesh-agent: $(BUILD)/node-agent/agent.o $(CORE_LIB)
	@mkdir -p $(@D)
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)
