# libkvmesh: the client library (client/kvmesh.h), static and shared, and the
# main job `kvmesh-demo` (client/demo/).
#
# The shared library carries what the client needs from the other modules,
# compiled a second time as position-independent code under $(BUILD)/pic.
CLIENT_SRCS := client/kvmesh.c
CLIENT_DEPS := common/kvm_error.c common/rpc.c common/log.c common/auth.c common/addr.c \
	common/metrics.c kvstore/key.c \
	transport/wire.c transport/csum_avx2.c transport/loop.c transport/transport.c \
	transport/tcp.c transport/nic.c
CLIENT_PIC  := $(addprefix $(BUILD)/pic/,$(CLIENT_SRCS:.c=.o) $(CLIENT_DEPS:.c=.o)) \
	$(BUILD)/pic/gen/kvmesh.pb-c.o
CLIENT_LIB_A  := $(BUILD)/lib/libkvmesh.a
CLIENT_LIB_SO := $(BUILD)/lib/libkvmesh.so
CLIENT_LIBS := $(shell pkg-config --libs grpc gpr libprotobuf-c 2>/dev/null) -lxxhash -libverbs -lm

$(BUILD)/pic/%.o: %.c | $(GEN_HDRS)
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) $(CFLAGS) -fPIC -c $< -o $@
$(BUILD)/pic/transport/csum_avx2.o: CFLAGS += -mavx2
$(BUILD)/pic/gen/kvmesh.pb-c.o: $(GEN_DIR)/proto/kvmesh.pb-c.c
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) $(CFLAGS) -fPIC -c $< -o $@

$(CLIENT_LIB_SO): $(CLIENT_PIC)
	@mkdir -p $(@D)
	$(CC) -shared $(LDFLAGS) -Wl,-soname,libkvmesh.so.0 -Wl,--no-undefined $^ -o $@ $(CLIENT_LIBS)
# The static library: the same objects (link with $(CLIENT_LIBS)).
$(CLIENT_LIB_A): $(CLIENT_PIC)
	@mkdir -p $(@D)
	rm -f $@ && $(AR) rcs $@ $^

BINS += $(CLIENT_LIB_A) $(CLIENT_LIB_SO)

# kvmesh-demo: a local cluster doing real distributed attention (`make run`).
DEMO_OBJS := $(BUILD)/client/demo/main.o $(BUILD)/client/demo/model.o $(BUILD)/client/demo/launch.o \
	$(BUILD)/client/demo/nodes.o
BINS += $(BUILD)/bin/kvmesh-demo
$(BUILD)/bin/kvmesh-demo: $(DEMO_OBJS) $(BUILD)/client/kvmesh.o $(CORE_LIB)
	@mkdir -p $(@D)
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)

# The attention and drain benchmarks start a cluster the same way and link the client.
$(BUILD)/bench/attention $(BUILD)/bench/drain: $(BUILD)/bench/%: $(BUILD)/bench/%.o $(BUILD)/client/demo/launch.o $(BUILD)/client/demo/nodes.o \
		$(BUILD)/client/kvmesh.o \
		$(CORE_LIB)
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)

.PHONY: run
run:
	@deploy/deps.sh build
	@$(MAKE) --no-print-directory all
	$(BUILD)/bin/kvmesh-demo $(DEMO_ARGS)

# The client's tests start a local cluster (launch.c) and link the client.
$(BUILD)/tests/unit/test_client: $(BUILD)/tests/unit/test_client.o $(BUILD)/client/kvmesh.o \
		$(BUILD)/client/demo/launch.o $(BUILD)/client/demo/nodes.o $(CORE_LIB)
	$(CC) $(LDFLAGS) $^ -o $@ $(CRITERION_LIBS) $(LDLIBS)
