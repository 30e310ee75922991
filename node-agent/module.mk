# kvmesh-agent, the node agent daemon (node-agent/agent.h says which file does what).
AGENT_OBJS := $(addprefix $(BUILD)/node-agent/,agent.o workers.o blocks.o homeseq.o gpus.o)
BINS += $(BUILD)/bin/kvmesh-agent
$(BUILD)/bin/kvmesh-agent: $(AGENT_OBJS) $(CORE_LIB)
	@mkdir -p $(@D)
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)
LDLIBS += -ldl # gpus.c: dlopen of the CUDA driver (in libc since glibc 2.34; harmless)

# The tests' fake CUDA driver (tests/fake/libcuda.c): two fixed GPUs, loaded
# by agents started with KVMESH_LIBCUDA pointing at it.
FAKE_LIBCUDA := $(BUILD)/tests/fake/libcuda.so.1
BINS += $(FAKE_LIBCUDA)
$(FAKE_LIBCUDA): tests/fake/libcuda.c
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -fPIC -shared -Wl,-soname,libcuda.so.1 $< -o $@
