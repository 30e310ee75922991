# RDMA verbs layer (libibverbs) and `make test-rdma`, its tests in an emulated
# machine with soft-RoCE (tests/rdma/run-qemu.sh; docs/rdma.md).
# Included from transport/module.mk.

# This file is read before the top-level Makefile names `all`; without this, the
# first rule below would become the default goal.
ifeq ($(.DEFAULT_GOAL),)
.DEFAULT_GOAL := all
endif

CORE_SRCS += transport/rdma.c transport/rdma_xport.c
LDLIBS    += -libverbs

# A plain program, not a Criterion suite: it runs inside the guest's initramfs.
# Linked to the objects it needs rather than the whole core library, so that it
# stays small and its ldd closure (copied into the initramfs) stays short.
RDMA_TEST_BIN := $(BUILD)/tests/rdma/test_rdma_verbs
$(RDMA_TEST_BIN): $(BUILD)/tests/rdma/test_rdma_verbs.o $(BUILD)/transport/rdma.o \
		  $(BUILD)/common/kvm_error.o
	$(CC) $(LDFLAGS) $^ -o $@ -libverbs

# The RDMA backend of the data plane (transport/rdma_xport.c) between two
# processes: it needs the loop and the TCP backend (its control channel) too.
RDMA_XPORT_BIN := $(BUILD)/tests/rdma/test_rdma_xport
RDMA_XPORT_OBJS := tests/rdma/test_rdma_xport.o transport/rdma_xport.o transport/rdma.o \
		   transport/tcp.o transport/loop.o transport/transport.o transport/wire.o \
		   transport/csum_avx2.o common/kvm_error.o common/log.o common/auth.o
$(RDMA_XPORT_BIN): $(addprefix $(BUILD)/,$(RDMA_XPORT_OBJS))
	$(CC) $(LDFLAGS) $^ -o $@ -libverbs -lxxhash -lpthread

# The real daemons over RDMA: a plain program that starts a coordinator and three
# agents (client/demo/launch.c) and drives them with the client library. In the
# guest it runs from /cluster, next to kvmesh-coordinator and kvmesh-agent.
RDMA_CLUSTER_BIN := $(BUILD)/tests/rdma/test_rdma_cluster
$(RDMA_CLUSTER_BIN): $(BUILD)/tests/rdma/test_rdma_cluster.o $(BUILD)/client/kvmesh.o \
		     $(BUILD)/client/demo/launch.o $(BUILD)/client/demo/nodes.o $(CORE_LIB)
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)
RDMA_DAEMONS := $(BUILD)/bin/kvmesh-coordinator $(BUILD)/bin/kvmesh-agent

all: $(RDMA_TEST_BIN) $(RDMA_XPORT_BIN) $(RDMA_CLUSTER_BIN)

# Boots Debian's stock kernel under QEMU (pure emulation) with rdma_rxe and runs
# the verbs tests there, one node and two nodes. Last line: the guest's
# "N passed, N failed". The downloads are cached in build/rdma-vm, shared by every
# build flavour (SAN=...), so not under $(BUILD).
RDMA_VM_DIR ?= build/rdma-vm
.PHONY: test-rdma
test-rdma: $(RDMA_TEST_BIN) $(RDMA_XPORT_BIN) $(RDMA_CLUSTER_BIN) $(RDMA_DAEMONS)
	RDMA_VM_DIR=$(RDMA_VM_DIR) tests/rdma/run-qemu.sh $(RDMA_TEST_BIN) $(RDMA_XPORT_BIN) \
		--cluster $(RDMA_CLUSTER_BIN) $(RDMA_DAEMONS)
