# RDMA verbs layer (libibverbs) and `make test-rdma`, its tests in an emulated
# machine with soft-RoCE (tests/rdma/run-qemu.sh; docs/rdma.md).
# Included from transport/module.mk.

# This file is read before the top-level Makefile names `all`; without this, the
# first rule below would become the default goal.
ifeq ($(.DEFAULT_GOAL),)
.DEFAULT_GOAL := all
endif

CORE_SRCS += transport/rdma.c
LDLIBS    += -libverbs

# A plain program, not a Criterion suite: it runs inside the guest's initramfs.
# Linked to the objects it needs rather than the whole core library, so that it
# stays small and its ldd closure (copied into the initramfs) stays short.
RDMA_TEST_BIN := $(BUILD)/tests/rdma/test_rdma_verbs
$(RDMA_TEST_BIN): $(BUILD)/tests/rdma/test_rdma_verbs.o $(BUILD)/transport/rdma.o \
		  $(BUILD)/common/kvm_error.o
	$(CC) $(LDFLAGS) $^ -o $@ -libverbs

all: $(RDMA_TEST_BIN)

# Boots Debian's stock kernel under QEMU (pure emulation) with rdma_rxe and runs
# the verbs tests there, one node and two nodes. Last line: the guest's
# "N passed, N failed". The downloads are cached in build/rdma-vm, shared by every
# build flavour (SAN=...), so not under $(BUILD).
RDMA_VM_DIR ?= build/rdma-vm
.PHONY: test-rdma
test-rdma: $(RDMA_TEST_BIN)
	RDMA_VM_DIR=$(RDMA_VM_DIR) tests/rdma/run-qemu.sh $(RDMA_TEST_BIN)
