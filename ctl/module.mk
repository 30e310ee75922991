# kvmeshctl, the admin CLI.
BINS += $(BUILD)/bin/kvmeshctl
$(BUILD)/bin/kvmeshctl: $(BUILD)/ctl/kvmeshctl.o $(CORE_LIB)
	@mkdir -p $(@D)
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)
