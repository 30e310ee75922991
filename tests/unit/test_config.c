/* Configuration: precedence flags > environment > YAML > defaults, value
 * syntax, and errors that name the option and where its value came from. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/config.h"

static char listen_addr[KVM_OPT_STRING_MAX], name[KVM_OPT_STRING_MAX];
static int64_t threads, heartbeat_ms;
static uint64_t host_bytes;
static bool verbose;

static const kvm_option opts[] = {
	{"listen", KVM_OPT_STRING, listen_addr, "127.0.0.1:7400", "address to serve on"},
	{"name", KVM_OPT_STRING, name, "", "node name"},
	{"threads", KVM_OPT_INT, &threads, "2", "kernel threads"},
	{"pool.host-bytes", KVM_OPT_BYTES, &host_bytes, "1GiB", "host pool size"},
	{"heartbeat", KVM_OPT_DURATION, &heartbeat_ms, "1s", "heartbeat period"},
	{"verbose", KVM_OPT_BOOL, &verbose, "false", "log more"},
};
#define N (sizeof(opts) / sizeof(opts[0]))

static char *write_yaml(const char *text)
{
	static char path[64];
	snprintf(path, sizeof(path), "/tmp/kvmesh-config-XXXXXX");
	int fd = mkstemp(path);
	cr_assert(fd >= 0);
	FILE *f = fdopen(fd, "w");
	fputs(text, f);
	fclose(f);
	return path;
}

static int load(int argc, const char **args, char *err)
{
	char *argv[16];
	for (int i = 0; i < argc; i++)
		argv[i] = (char *)args[i];
	return kvm_config_load(opts, N, &argc, argv, err, 256);
}

Test(config, defaults)
{
	char err[256];
	const char *a[] = {"prog"};
	cr_assert_eq(load(1, a, err), 0);
	cr_assert_str_eq(listen_addr, "127.0.0.1:7400");
	cr_assert_eq(threads, 2);
	cr_assert_eq(host_bytes, 1ull << 30);
	cr_assert_eq(heartbeat_ms, 1000);
	cr_assert_eq(verbose, false);
}

Test(config, flags_beat_environment_beat_file)
{
	char *path = write_yaml("listen: 0.0.0.0:1\nthreads: 9\npool:\n  host-bytes: 8G\n"
				"heartbeat: 250ms\nname: from-file\n");
	setenv("KVMESH_THREADS", "5", 1);
	setenv("KVMESH_LISTEN", "10.0.0.1:2", 1);
	char err[256];
	const char *a[] = {"prog", "--config", path, "--listen=127.0.0.1:9", "--verbose", "extra"};
	int argc = 6;
	char *argv[6];
	memcpy(argv, a, sizeof(a));
	cr_assert_eq(kvm_config_load(opts, N, &argc, argv, err, sizeof(err)), 0, "%s", err);
	cr_assert_str_eq(listen_addr, "127.0.0.1:9");  /* flag */
	cr_assert_eq(threads, 5);                       /* environment */
	cr_assert_eq(host_bytes, 8ull << 30);           /* nested YAML */
	cr_assert_eq(heartbeat_ms, 250);                /* YAML */
	cr_assert_str_eq(name, "from-file");
	cr_assert(verbose);                             /* bare boolean flag */
	cr_assert_eq(argc, 2);                          /* non-flags stay */
	cr_assert_str_eq(argv[1], "extra");
	remove(path);
}

Test(config, errors_name_option_and_source)
{
	char err[256];
	const char *bad_flag[] = {"prog", "--threads=many"};
	cr_assert_eq(load(2, bad_flag, err), -EINVAL);
	cr_assert(strstr(err, "threads") && strstr(err, "many") && strstr(err, "flag"), "%s", err);

	const char *unknown[] = {"prog", "--nope=1"};
	cr_assert_eq(load(2, unknown, err), -EINVAL);
	cr_assert(strstr(err, "unknown flag --nope"), "%s", err);

	setenv("KVMESH_POOL_HOST_BYTES", "12 parsecs", 1);
	const char *a[] = {"prog"};
	cr_assert_eq(load(1, a, err), -EINVAL);
	cr_assert(strstr(err, "KVMESH_POOL_HOST_BYTES") && strstr(err, "size"), "%s", err);
	unsetenv("KVMESH_POOL_HOST_BYTES");

	char *path = write_yaml("threads: 3\nbogus: 1\n");
	const char *y[] = {"prog", "--config", path};
	cr_assert_eq(load(3, y, err), -EINVAL);
	cr_assert(strstr(err, ":2:") && strstr(err, "bogus"), "%s", err);
	remove(path);

	path = write_yaml("threads: [1, 2\n");
	const char *m[] = {"prog", "--config", path};
	cr_assert_eq(load(3, m, err), -EINVAL);
	cr_assert(strstr(err, path), "%s", err);
	remove(path);

	const char *missing[] = {"prog", "--config", "/nonexistent/kvmesh.yaml"};
	cr_assert_eq(load(3, missing, err), -ENOENT);
	cr_assert(strstr(err, "/nonexistent/kvmesh.yaml"), "%s", err);

	const char *help[] = {"prog", "--help"};
	cr_assert_eq(load(2, help, err), KVM_CONFIG_HELP);
}

Test(config, value_syntax)
{
	uint64_t b;
	int64_t ms;
	bool v;
	cr_assert_eq(kvm_parse_bytes("4096", &b), 0);
	cr_assert_eq(b, 4096);
	cr_assert_eq(kvm_parse_bytes("64K", &b), 0);
	cr_assert_eq(b, 65536);
	cr_assert_eq(kvm_parse_bytes("512MiB", &b), 0);
	cr_assert_eq(b, 512ull << 20);
	cr_assert_eq(kvm_parse_bytes("1TiB", &b), 0);
	cr_assert_eq(b, 1ull << 40);
	cr_assert_eq(kvm_parse_bytes("-1", &b), -EINVAL);
	cr_assert_eq(kvm_parse_bytes("99999999999999T", &b), -ERANGE);
	cr_assert_eq(kvm_parse_bytes("12X", &b), -EINVAL);
	cr_assert_eq(kvm_parse_duration_ms("5s", &ms), 0);
	cr_assert_eq(ms, 5000);
	cr_assert_eq(kvm_parse_duration_ms("2m", &ms), 0);
	cr_assert_eq(ms, 120000);
	cr_assert_eq(kvm_parse_duration_ms("250", &ms), 0);
	cr_assert_eq(ms, 250);
	cr_assert_eq(kvm_parse_duration_ms("soon", &ms), -EINVAL);
	cr_assert_eq(kvm_parse_bool("Yes", &v), 0);
	cr_assert(v);
	cr_assert_eq(kvm_parse_bool("off", &v), 0);
	cr_assert(!v);
	cr_assert_eq(kvm_parse_bool("maybe", &v), -EINVAL);
}

Test(config, usage_lists_every_option)
{
	char buf[4096] = "";
	FILE *f = fmemopen(buf, sizeof(buf), "w");
	kvm_config_usage(f, "kvmesh-agent", "The node agent.", opts, N);
	fclose(f);
	for (size_t i = 0; i < N; i++)
		cr_assert(strstr(buf, opts[i].name), "%s missing", opts[i].name);
	cr_assert(strstr(buf, "KVMESH_POOL_HOST_BYTES"));
	cr_assert(strstr(buf, "--config"));
}
