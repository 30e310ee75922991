# kvmesh-agent, the node agent daemon (node-agent/agent.h says which file does what).
AGENT_OBJS := $(addprefix $(BUILD)/node-agent/,agent.o workers.o blocks.o homeseq.o)
BINS += $(BUILD)/bin/kvmesh-agent
$(BUILD)/bin/kvmesh-agent: $(AGENT_OBJS) $(CORE_LIB)
	@mkdir -p $(@D)
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)
