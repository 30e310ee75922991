# transport: wire format, event loop, TCP backend, NIC discovery, fuzzing.
CORE_SRCS += transport/wire.c transport/csum_avx2.c transport/loop.c transport/transport.c transport/tcp.c transport/nic.c
LDLIBS    += -lxxhash -libverbs
$(BUILD)/transport/csum_avx2.o: CFLAGS += -mavx2

# Fuzzing (clang, libFuzzer): `make fuzz` builds build/fuzz/fuzz_wire;
# `make fuzz-run FUZZ_SECONDS=60` runs it from the committed seed corpus
# (new inputs go to build/fuzz/corpus, crashes to build/fuzz/crash-*).
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 60
FUZZ_DIR     := build/fuzz
.PHONY: fuzz fuzz-run
fuzz: $(FUZZ_DIR)/fuzz_wire
FUZZ_FLAGS   := -I. -D_GNU_SOURCE -std=gnu17 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
$(FUZZ_DIR)/fuzz_wire: tests/fuzz/fuzz_wire.c transport/wire.c transport/csum_avx2.c transport/wire.h
	@mkdir -p $(@D)
	$(FUZZ_CC) $(FUZZ_FLAGS) -mavx2 -c transport/csum_avx2.c -o $(FUZZ_DIR)/csum_avx2.o
	$(FUZZ_CC) $(FUZZ_FLAGS) tests/fuzz/fuzz_wire.c transport/wire.c $(FUZZ_DIR)/csum_avx2.o -o $@ -lxxhash -lm
fuzz-run: fuzz
	@mkdir -p $(FUZZ_DIR)/corpus
	$(FUZZ_DIR)/fuzz_wire -max_total_time=$(FUZZ_SECONDS) -max_len=8192 -timeout=10 \
		-artifact_prefix=$(FUZZ_DIR)/ $(FUZZ_DIR)/corpus tests/fuzz/corpus/wire

# The transport benchmark drives Redis with hiredis (libhiredis-dev).
$(BUILD)/bench/transport: LDLIBS += -lhiredis

# The event loop's ThreadSanitizer check is tests/stress/stress_transport.c,
# run by `make test` and by `make SAN=thread test` (Criterion cannot start
# under TSan: Snaipe/Criterion#274). `make tsan-transport` runs it alone.
.PHONY: tsan-transport
tsan-transport:
	$(MAKE) SAN=thread build/san-thread/tests/stress/stress_transport
	build/san-thread/tests/stress/stress_transport

# The RDMA verbs layer and `make test-rdma`.
-include transport/rdma.mk
