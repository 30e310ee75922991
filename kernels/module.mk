# DistAttention kernels: the portable path, the AVX2/F16C path (picked at run
# time), and the CUDA path when nvcc is present.
CORE_SRCS += kernels/distattn.c kernels/distattn_portable.c kernels/distattn_avx2.c \
	kernels/distattn_avx512.c

$(BUILD)/kernels/distattn_avx2.o: CFLAGS += -O3 -mavx2 -mfma -mf16c
$(BUILD)/kernels/distattn_avx512.o: CFLAGS += -O3 -mavx512f -mavx2 -mfma -mf16c
-include kernels/cuda.mk
