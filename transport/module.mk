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

# ThreadSanitizer check of the event loop. Criterion cannot start under TSan
# (Snaipe/Criterion#274), so `make SAN=thread test` cannot run the suites;
# `make tsan-transport` builds a plain stress program with -fsanitize=thread
# and runs it (pipelining from two threads, deadlines, closes under load).
.PHONY: tsan-transport stress-transport
stress-transport: $(BUILD)/tests/tsan/stress_transport
	$(BUILD)/tests/tsan/stress_transport
$(BUILD)/tests/tsan/stress_transport: $(BUILD)/tests/tsan/stress_transport.o $(BUILD)/libkvmesh-core.a
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)
tsan-transport:
	$(MAKE) SAN=thread stress-transport
