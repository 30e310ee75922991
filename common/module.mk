CORE_SRCS += common/kvm_error.c
