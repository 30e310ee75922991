# Protocol buffers: C code generated with protoc-c into $(BUILD)/gen at build
# time (never committed), compiled into the core library. Sources include
# them as "proto/NAME.pb-c.h".
PROTOS    := $(wildcard proto/*.proto)
GEN_DIR   := $(BUILD)/gen
GEN_SRCS  := $(PROTOS:%.proto=$(GEN_DIR)/%.pb-c.c)
GEN_HDRS  := $(GEN_SRCS:.c=.h)
GEN_OBJS  := $(GEN_SRCS:.c=.o)
CPPFLAGS  += -I$(GEN_DIR)

$(GEN_DIR)/proto/%.pb-c.c $(GEN_DIR)/proto/%.pb-c.h: proto/%.proto
	@mkdir -p $(GEN_DIR)
	protoc-c -I. --c_out=$(GEN_DIR) $<

$(GEN_DIR)/%.o: $(GEN_DIR)/%.c
	$(CC) $(CPPFLAGS) $(CFLAGS) -c $< -o $@
