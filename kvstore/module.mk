# kvstore: arenas, block keys, the prefix index and the block/sequence store.
CORE_SRCS += kvstore/geom.c kvstore/key.c kvstore/arena.c kvstore/index.c kvstore/store.c
LDLIBS += -lxxhash

# The GPU arena, when the CUDA build rules (kernels/cuda.mk) or the command
# line set KVMESH_HAVE_CUDA. arena.c drops its -ENOSYS stub then.
ifneq ($(strip $(KVMESH_HAVE_CUDA)),)
KVS_CUDA_HOME ?= $(or $(CUDA_HOME),/usr/local/cuda)
CORE_SRCS += kvstore/arena_cuda.c
$(BUILD)/kvstore/arena.o $(BUILD)/kvstore/arena_cuda.o: CPPFLAGS += -DKVMESH_HAVE_CUDA -I$(KVS_CUDA_HOME)/include
LDLIBS += -L$(KVS_CUDA_HOME)/lib64 -lcudart
endif
