# transport: wire format, event loop, TCP backend, NIC discovery, fuzzing.
CORE_SRCS += transport/wire.c transport/loop.c transport/transport.c transport/tcp.c transport/nic.c
LDLIBS    += -lxxhash -libverbs
