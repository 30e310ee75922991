# CUDA DistAttention kernels (included from kernels/module.mk).
#
#   make cuda       builds libkvmesh-cuda.a, the GPU test and the GPU benchmark
#                   when nvcc is present; without nvcc it says so and succeeds
#   make test-gpu   builds and runs both (needs nvcc and a CUDA device)
#
#   make test-gpu-emu  runs the CUDA kernels' code on the CPU under an emulation
#                   (tests/gpu/emu): no nvcc or GPU needed; a few minutes
#
# For other modules:
#   KVM_HAVE_CUDA   1 when nvcc is present, else empty
#   KVM_GPU_LIBS    what a program links for the da_cuda_* functions, before
#                   $(CORE_LIB): libkvmesh-cuda.a and cudart, or the stub
#                   libkvmesh-nocuda.a whose functions return -ENOSYS
#   KVM_GPU_DEPS    the library file of KVM_GPU_LIBS, for prerequisites
#   KVM_GPU_CPPFLAGS  -I for cuda_runtime_api.h and -DKVMESH_HAVE_CUDA=1
#                   (empty without CUDA)

# This file is read before the top Makefile defines `all`, so its rules would
# otherwise become the default goal.
.DEFAULT_GOAL := all

CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
NVCC_GENCODE ?= -gencode arch=compute_90,code=[sm_90,compute_90]
NVCCFLAGS ?= -O3 -std=c++17 -lineinfo
NVCC_XFLAGS := -Xcompiler -Wall,-Wextra,-fno-strict-aliasing

NOCUDA_LIB := $(BUILD)/libkvmesh-nocuda.a
CUDA_LIB   := $(BUILD)/libkvmesh-cuda.a
GPU_TEST   := $(BUILD)/tests/gpu/test_distattn_gpu
GPU_BENCH  := $(BUILD)/bench/gpu_kernel
# $(CORE_LIB) is defined after this file is read; prerequisites need it now.
GPU_CORE_LIB := $(BUILD)/libkvmesh-core.a

$(NOCUDA_LIB): $(BUILD)/kernels/distattn_nocuda.o
	@mkdir -p $(@D)
	rm -f $@ && $(AR) rcs $@ $^

# The emulation: distattn.cu rewritten for tests/gpu/emu/cuda_emu.h, built
# with the host C++ compiler (C++20 for std::barrier).
GPU_EMU_DIR := $(BUILD)/tests/gpu/emu
GPU_EMU     := $(GPU_EMU_DIR)/emu_test
EMU_CXXFLAGS := -std=c++20 -O1 -g -Wall -Wextra -Wno-unknown-pragmas -pthread -MMD -MP

$(GPU_EMU_DIR)/distattn_emu.cpp: kernels/distattn.cu tests/gpu/emu/emu_transform.py
	@mkdir -p $(@D)
	python3 tests/gpu/emu/emu_transform.py $< $@

$(GPU_EMU_DIR)/distattn_emu.o: $(GPU_EMU_DIR)/distattn_emu.cpp
	$(CXX) $(CPPFLAGS) $(EMU_CXXFLAGS) -c $< -o $@

$(GPU_EMU_DIR)/emu_test.o: tests/gpu/emu/emu_test.cpp
	@mkdir -p $(@D)
	$(CXX) $(CPPFLAGS) $(EMU_CXXFLAGS) -c $< -o $@

$(GPU_EMU): $(GPU_EMU_DIR)/emu_test.o $(GPU_EMU_DIR)/distattn_emu.o $(GPU_CORE_LIB)
	$(CXX) -pthread $(LDFLAGS) $^ -o $@ $(LDLIBS)

.PHONY: test-gpu-emu
test-gpu-emu: $(GPU_EMU)
	$(GPU_EMU)

ifneq ($(NVCC),)
KVM_HAVE_CUDA    := 1
KVM_GPU_CPPFLAGS := -I$(CUDA_HOME)/include -DKVMESH_HAVE_CUDA=1
KVM_GPU_DEPS     := $(CUDA_LIB)
KVM_GPU_LIBS     := $(CUDA_LIB) -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcudart -lstdc++
CUDA_SRCS        += kernels/distattn.cu

# .cu objects get a .cu.o name so they never meet the %.o: %.c rule.
$(BUILD)/%.cu.o: %.cu
	@mkdir -p $(@D)
	$(NVCC) $(CPPFLAGS) $(NVCCFLAGS) $(NVCC_GENCODE) $(NVCC_XFLAGS) -MMD -MP -MF $(@:.o=.d) -c $< -o $@

$(CUDA_LIB): $(BUILD)/kernels/distattn.cu.o
	@mkdir -p $(@D)
	rm -f $@ && $(AR) rcs $@ $^

$(BUILD)/tests/gpu/test_distattn_gpu.o: CPPFLAGS += $(KVM_GPU_CPPFLAGS)

$(GPU_TEST): $(BUILD)/tests/gpu/test_distattn_gpu.o $(CUDA_LIB) $(GPU_CORE_LIB)
	$(CC) $(LDFLAGS) $< -o $@ $(KVM_GPU_LIBS) $(GPU_CORE_LIB) $(LDLIBS)

$(GPU_BENCH): $(BUILD)/bench/gpu_kernel.cu.o $(CUDA_LIB) $(GPU_CORE_LIB)
	$(CC) $(LDFLAGS) $< -o $@ $(KVM_GPU_LIBS) $(GPU_CORE_LIB) $(LDLIBS)

cuda: $(NOCUDA_LIB) $(CUDA_LIB) $(GPU_TEST) $(GPU_BENCH)

# The test exits at once, non-zero, where no CUDA device is present.
# Other modules add their GPU test programs to GPU_EXTRA_TESTS.
test-gpu: cuda
	$(GPU_TEST)
	@for t in $(GPU_EXTRA_TESTS); do echo "$$t"; $$t || exit 1; done
	$(GPU_BENCH)
else
KVM_HAVE_CUDA    :=
KVM_GPU_CPPFLAGS :=
KVM_GPU_DEPS     := $(NOCUDA_LIB)
KVM_GPU_LIBS     := $(NOCUDA_LIB)

cuda: $(NOCUDA_LIB)
	@echo "cuda: CUDA kernels skipped: nvcc not found (looked in /usr/local/cuda/bin and PATH; set NVCC=...)"

test-gpu:
	@echo "test-gpu: cannot run: nvcc not found, so the CUDA kernels are not built" >&2
	@false
endif
