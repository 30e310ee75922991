CORE_SRCS += common/kvm_error.c
CORE_SRCS += common/log.c
