# Shared code: errors, logging, configuration, the gRPC C-core wrapper, health, metrics.
CORE_SRCS += common/kvm_error.c common/rpc.c common/health.c common/config.c common/log.c \
	common/metrics.c common/metrics_http.c common/addr.c \
	common/auth.c
LDLIBS += $(shell pkg-config --libs grpc gpr libprotobuf-c yaml-0.1 libsystemd libmicrohttpd 2>/dev/null)
