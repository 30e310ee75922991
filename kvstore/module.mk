# kvstore: arenas, block keys, the prefix index and the block/sequence store.
CORE_SRCS += kvstore/geom.c kvstore/key.c kvstore/arena.c kvstore/index.c kvstore/store.c
LDLIBS += -lxxhash

# The GPU arena (arena_cuda.c, one cudaMalloc) is built only for the GPU
# tests: programs link these objects ahead of the core library, whose arena.o
# keeps the -ENOSYS stub, so ordinary binaries never need libcudart.
ifneq ($(KVM_HAVE_CUDA),)
KVS_GPU_OBJS := $(BUILD)/gpu/kvstore/arena.o $(BUILD)/gpu/kvstore/arena_cuda.o
$(BUILD)/gpu/kvstore/%.o: kvstore/%.c
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) $(KVM_GPU_CPPFLAGS) $(CFLAGS) -c $< -o $@

KVS_GPU_TEST := $(BUILD)/tests/gpu/test_kvstore_gpu
$(KVS_GPU_TEST): $(BUILD)/tests/gpu/test_kvstore_gpu.o $(KVS_GPU_OBJS) $(KVM_GPU_DEPS) $(CORE_LIB)
	$(CC) $(LDFLAGS) $(BUILD)/tests/gpu/test_kvstore_gpu.o $(KVS_GPU_OBJS) -o $@ \
		$(KVM_GPU_LIBS) $(CORE_LIB) $(CRITERION_LIBS) $(LDLIBS)
cuda: $(KVS_GPU_TEST)
GPU_EXTRA_TESTS += $(KVS_GPU_TEST)
endif
