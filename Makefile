# kvmesh — one non-recursive Makefile.
#
# Each folder contributes a module.mk that appends to the variables below.
# Objects go to $(BUILD) (out of tree); header dependencies come from -MMD.
#
#   make                  build every library, binary, test and benchmark
#   make test             run every unit test suite; last line "N passed, N failed, N skipped"
#   make SAN=address,undefined test    the same under ASan + UBSan (own build dir)
#   make SAN=thread test  under ThreadSanitizer
#   make test-gpu         CUDA tests and the GPU benchmark (needs nvcc and a GPU)
#   make bench-NAME       run bench/NAME.c (see bench/)

.DEFAULT_GOAL := all
comma := ,
SAN   ?=
BUILD ?= build$(if $(SAN),/san-$(subst $(comma),-,$(SAN)))

CC      ?= cc
NVCC    ?= $(firstword $(wildcard /usr/local/cuda/bin/nvcc) $(shell command -v nvcc 2>/dev/null))
OPT     ?= -O2 -g
CPPFLAGS += -I. -D_GNU_SOURCE
CFLAGS  += -std=gnu17 $(OPT) -Wall -Wextra -fno-strict-aliasing -pthread -MMD -MP
LDFLAGS += -pthread -Wl,--as-needed
LDLIBS  += -lm

ifneq ($(SAN),)
CFLAGS  += -fsanitize=$(SAN) -fno-omit-frame-pointer -fno-sanitize-recover=all
LDFLAGS += -fsanitize=$(SAN)
endif

# The library every program links; module.mk rules may name it.
CORE_LIB := $(BUILD)/libkvmesh-core.a

# Filled in by the module.mk files.
CORE_SRCS :=          # sources of libkvmesh-core.a (every module's library code)
BINS      :=          # daemons and tools under $(BUILD)/bin
CUDA_SRCS :=          # .cu files, built only when nvcc is present

include kernels/module.mk
include proto/module.mk
include common/module.mk
-include kvstore/module.mk
-include transport/module.mk
-include coordinator/module.mk
-include node-agent/module.mk
-include client/module.mk
-include ctl/module.mk

CORE_OBJS := $(CORE_SRCS:%.c=$(BUILD)/%.o) $(GEN_OBJS)

# Unit tests: every tests/unit/test_*.c is one Criterion suite, linked to the core.
CRITERION_LIBS := $(shell pkg-config --libs criterion 2>/dev/null || echo -lcriterion)
UNIT_SRCS  := $(wildcard tests/unit/test_*.c)
UNIT_BINS  := $(UNIT_SRCS:%.c=$(BUILD)/%)
# Stress programs: every tests/stress/stress_*.c is a plain program printing
# "N passed, N failed" (Criterion cannot run under ThreadSanitizer, see
# Snaipe/Criterion#274, so concurrency checks live here).
STRESS_SRCS := $(wildcard tests/stress/stress_*.c)
STRESS_BINS := $(STRESS_SRCS:%.c=$(BUILD)/%)
# Benchmarks: every bench/NAME.c is a program; `make bench-NAME` builds and runs it.
BENCH_SRCS := $(wildcard bench/*.c)
BENCH_BINS := $(BENCH_SRCS:%.c=$(BUILD)/%)

.PHONY: all test clean format deps cuda test-gpu
all: $(CORE_LIB) $(BINS) $(UNIT_BINS) $(STRESS_BINS) $(BENCH_BINS) cuda

$(BUILD)/%.o: %.c | $(GEN_HDRS)
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) $(CFLAGS) -c $< -o $@

$(CORE_LIB): $(CORE_OBJS)
	@mkdir -p $(@D)
	rm -f $@ && $(AR) rcs $@ $^

$(BUILD)/tests/unit/%: $(BUILD)/tests/unit/%.o $(CORE_LIB)
	$(CC) $(LDFLAGS) $^ -o $@ $(CRITERION_LIBS) $(LDLIBS)

$(BUILD)/tests/stress/%: $(BUILD)/tests/stress/%.o $(CORE_LIB)
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/bench/%: $(BUILD)/bench/%.o $(CORE_LIB)
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)

bench-%: $(BUILD)/bench/%
	$(BUILD)/bench/$*

# Installs missing packages first, so that a fresh machine needs only this.
# Under ThreadSanitizer only the stress programs run (Criterion cannot).
TEST_DIRS := $(if $(filter thread,$(SAN)),,$(BUILD)/tests/unit tests/integration) $(BUILD)/tests/stress
test:
	@deploy/deps.sh build
	@$(MAKE) --no-print-directory all
	@KVMESH_BUILD=$(abspath $(BUILD)) tests/run-unit.sh $(TEST_DIRS)

deps:
	deploy/deps.sh

format:
	clang-format -i $$(git ls-files '*.c' '*.h' '*.cu')

clean:
	rm -rf build

# Keep objects of pattern rules so rebuilds stay incremental.
.SECONDARY:

-include $(shell find $(BUILD) -type f -name '*.d' 2>/dev/null)
