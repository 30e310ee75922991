#include "common/config.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <yaml.h>

/* Where a value came from, for error messages. */
typedef struct source {
	const char *what; /* "flag", "environment", "config file", "default" */
	char where[KVM_OPT_STRING_MAX];
} source;

static int failf(char *err, size_t errlen, int rc, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
static int failf(char *err, size_t errlen, int rc, const char *fmt, ...)
{
	if (err && errlen) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(err, errlen, fmt, ap);
		va_end(ap);
	}
	return rc;
}

/* ---- Parsers ------------------------------------------------------------------ */

int kvm_parse_bool(const char *s, bool *out)
{
	static const char *yes[] = {"true", "yes", "on", "1"}, *no[] = {"false", "no", "off", "0"};
	for (int i = 0; i < 4; i++) {
		if (strcasecmp(s, yes[i]) == 0)
			return *out = true, 0;
		if (strcasecmp(s, no[i]) == 0)
			return *out = false, 0;
	}
	return -EINVAL;
}

/* A decimal number followed by a unit from `units` (multipliers). */
static int parse_scaled(const char *s, const char *const *names, const uint64_t *mult, int n,
			uint64_t *out)
{
	errno = 0;
	char *end;
	if (!isdigit((unsigned char)*s))
		return -EINVAL;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno == ERANGE)
		return -ERANGE;
	while (*end == ' ')
		end++;
	for (int i = 0; i < n; i++) {
		if (strcasecmp(end, names[i]) == 0) {
			if (mult[i] && v > UINT64_MAX / mult[i])
				return -ERANGE;
			*out = (uint64_t)v * mult[i];
			return 0;
		}
	}
	return -EINVAL;
}

int kvm_parse_bytes(const char *s, uint64_t *out)
{
	static const char *const names[] = {"",    "b",  "k",   "kb", "kib", "m",  "mb",
					    "mib", "g",  "gb",  "gib", "t",  "tb", "tib"};
	static const uint64_t K = 1024, mult[] = {1,         1,         K,         K,
						  K,         K * K,     K * K,     K * K,
						  K * K * K, K * K * K, K * K * K, K * K * K * K,
						  K * K * K * K, K * K * K * K};
	return parse_scaled(s, names, mult, 14, out);
}

int kvm_parse_duration_ms(const char *s, int64_t *out)
{
	static const char *const names[] = {"", "ms", "s", "m", "h"};
	static const uint64_t mult[] = {1, 1, 1000, 60000, 3600000};
	uint64_t v;
	int rc = parse_scaled(s, names, mult, 5, &v);
	if (rc == 0 && v > INT64_MAX)
		rc = -ERANGE;
	if (rc == 0)
		*out = (int64_t)v;
	return rc;
}

static int set_value(const kvm_option *o, const char *val, const source *src, char *err,
		     size_t errlen)
{
	int rc = 0;
	switch (o->kind) {
	case KVM_OPT_STRING:
		if (strlen(val) >= KVM_OPT_STRING_MAX)
			rc = -ERANGE;
		else
			strcpy(o->dest, val);
		break;
	case KVM_OPT_INT: {
		errno = 0;
		char *end;
		long long v = strtoll(val, &end, 10);
		if (errno == ERANGE)
			rc = -ERANGE;
		else if (end == val || *end)
			rc = -EINVAL;
		else
			*(int64_t *)o->dest = v;
		break;
	}
	case KVM_OPT_BOOL:
		rc = kvm_parse_bool(val, o->dest);
		break;
	case KVM_OPT_BYTES:
		rc = kvm_parse_bytes(val, o->dest);
		break;
	case KVM_OPT_DURATION:
		rc = kvm_parse_duration_ms(val, o->dest);
		break;
	}
	if (rc == 0)
		return 0;
	static const char *expect[] = {
		[KVM_OPT_STRING] = "a string",
		[KVM_OPT_INT] = "an integer",
		[KVM_OPT_BOOL] = "true or false",
		[KVM_OPT_BYTES] = "a size such as 4096, 64K, 512MiB or 8G",
		[KVM_OPT_DURATION] = "a duration such as 250ms, 5s, 2m or 1h",
	};
	return failf(err, errlen, rc, "%s %s: bad value \"%s\" for %s: %s%s", src->what, src->where,
		     val, o->name, rc == -ERANGE ? "out of range; expected " : "expected ",
		     expect[o->kind]);
}

/* ---- Names ------------------------------------------------------------------- */

/* KVMESH_ + upper-case name with '.' and '-' as '_'. */
static void env_name(const char *name, char *buf, size_t cap)
{
	size_t n = (size_t)snprintf(buf, cap, "KVMESH_");
	for (const char *p = name; *p && n + 1 < cap; p++)
		buf[n++] = (*p == '.' || *p == '-') ? '_' : (char)toupper((unsigned char)*p);
	buf[n] = '\0';
}

/* Names match with '-' and '_' taken as equal, so YAML may use either. */
static bool same_name(const char *a, const char *b)
{
	for (; *a && *b; a++, b++) {
		char x = *a == '_' ? '-' : *a, y = *b == '_' ? '-' : *b;
		if (x != y)
			return false;
	}
	return *a == *b;
}

static const kvm_option *find(const kvm_option *opts, size_t n, const char *name)
{
	for (size_t i = 0; i < n; i++)
		if (same_name(opts[i].name, name))
			return &opts[i];
	return NULL;
}

/* ---- YAML --------------------------------------------------------------------- */

/* Walks a YAML document of nested mappings of scalars, calling set_value for
 * each leaf with its dotted path. */
static int load_yaml(const kvm_option *opts, size_t n, const char *path, bool *from_flags,
		     bool *from_env, char *err, size_t errlen)
{
	FILE *f = fopen(path, "r");
	if (!f)
		return failf(err, errlen, -errno, "config file %s: %s", path, strerror(errno));
	yaml_parser_t parser;
	yaml_parser_initialize(&parser);
	yaml_parser_set_input_file(&parser, f);

	char prefix[KVM_OPT_STRING_MAX] = "";
	size_t prefix_len[16];
	int depth = 0; /* mapping nesting */
	bool want_key = false;
	char key[KVM_OPT_STRING_MAX] = "";
	int rc = 0;
	source src = {.what = "config file"};

	for (bool done = false; !done && rc == 0;) {
		yaml_event_t ev;
		if (!yaml_parser_parse(&parser, &ev)) {
			rc = failf(err, errlen, -EINVAL, "config file %s:%zu: %s", path,
				   parser.problem_mark.line + 1,
				   parser.problem ? parser.problem : "malformed YAML");
			break;
		}
		size_t line = ev.start_mark.line + 1;
		switch (ev.type) {
		case YAML_STREAM_END_EVENT:
			done = true;
			break;
		case YAML_MAPPING_START_EVENT:
			if (depth >= 16) {
				rc = failf(err, errlen, -EINVAL, "config file %s:%zu: nested too deep",
					   path, line);
				break;
			}
			if (depth > 0) { /* the key just read names this mapping */
				size_t l = strlen(prefix);
				prefix_len[depth] = l;
				snprintf(prefix + l, sizeof(prefix) - l, "%s%s", l ? "." : "", key);
			} else {
				prefix_len[0] = 0;
			}
			depth++;
			want_key = true;
			break;
		case YAML_MAPPING_END_EVENT:
			depth--;
			if (depth > 0)
				prefix[prefix_len[depth]] = '\0';
			want_key = true;
			break;
		case YAML_SCALAR_EVENT: {
			const char *val = (const char *)ev.data.scalar.value;
			if (depth == 0) {
				rc = failf(err, errlen, -EINVAL,
					   "config file %s:%zu: expected a mapping of option: value",
					   path, line);
			} else if (want_key) {
				snprintf(key, sizeof(key), "%s", val);
				want_key = false;
			} else {
				char full[KVM_OPT_STRING_MAX * 2];
				snprintf(full, sizeof(full), "%s%s%s", prefix, prefix[0] ? "." : "", key);
				const kvm_option *o = find(opts, n, full);
				if (!o) {
					rc = failf(err, errlen, -EINVAL,
						   "config file %s:%zu: unknown option \"%s\"", path,
						   line, full);
				} else if (!from_flags[o - opts] && !from_env[o - opts]) {
					snprintf(src.where, sizeof(src.where), "%s:%zu", path, line);
					rc = set_value(o, val, &src, err, errlen);
				}
				want_key = true;
			}
			break;
		}
		case YAML_SEQUENCE_START_EVENT:
			rc = failf(err, errlen, -EINVAL,
				   "config file %s:%zu: lists are not supported (option \"%s\")", path,
				   line, key);
			break;
		default:
			break;
		}
		yaml_event_delete(&ev);
	}
	yaml_parser_delete(&parser);
	fclose(f);
	return rc;
}

/* ---- Loading ------------------------------------------------------------------- */

int kvm_config_load(const kvm_option *opts, size_t n, int *argc, char **argv, char *err,
		    size_t errlen)
{
	if (!opts || !argc || !argv)
		return -EINVAL;
	bool *from_flags = calloc(n + 1, sizeof(bool)), *from_env = calloc(n + 1, sizeof(bool));
	if (!from_flags || !from_env) {
		free(from_flags);
		free(from_env);
		return -ENOMEM;
	}
	int rc = 0;
	source src;

	/* Defaults first, so that every dest holds a value. */
	src.what = "default for";
	for (size_t i = 0; i < n && rc == 0; i++) {
		snprintf(src.where, sizeof(src.where), "--%s", opts[i].name);
		rc = set_value(&opts[i], opts[i].def ? opts[i].def : "", &src, err, errlen);
		if (rc != 0 && opts[i].kind == KVM_OPT_STRING)
			rc = 0;
	}

	/* Flags win over everything: read them first, remember which were set. */
	char config_path[KVM_OPT_STRING_MAX] = "";
	int kept = 1;
	src.what = "flag";
	for (int i = 1; i < *argc && rc == 0; i++) {
		char *a = argv[i];
		if (strcmp(a, "--") == 0) {
			while (++i < *argc)
				argv[kept++] = argv[i];
			break;
		}
		if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
			rc = KVM_CONFIG_HELP;
			break;
		}
		if (strncmp(a, "--", 2) != 0) {
			argv[kept++] = a;
			continue;
		}
		char name[KVM_OPT_STRING_MAX];
		const char *eq = strchr(a + 2, '='), *val = NULL;
		size_t len = eq ? (size_t)(eq - a - 2) : strlen(a + 2);
		if (len >= sizeof(name)) {
			rc = failf(err, errlen, -EINVAL, "flag %.40s...: name too long", a);
			break;
		}
		memcpy(name, a + 2, len);
		name[len] = '\0';
		if (eq)
			val = eq + 1;
		if (strcmp(name, "config") == 0) {
			if (!val && i + 1 < *argc)
				val = argv[++i];
			if (!val || strlen(val) >= sizeof(config_path)) {
				rc = failf(err, errlen, -EINVAL, "flag --config needs a file path");
				break;
			}
			strcpy(config_path, val);
			continue;
		}
		const kvm_option *o = find(opts, n, name);
		if (!o) {
			rc = failf(err, errlen, -EINVAL, "unknown flag --%s (see --help)", name);
			break;
		}
		if (!val) {
			if (o->kind == KVM_OPT_BOOL && (i + 1 >= *argc || kvm_parse_bool(argv[i + 1], &(bool){0}) != 0))
				val = "true"; /* a bare boolean flag */
			else if (i + 1 < *argc)
				val = argv[++i];
			else {
				rc = failf(err, errlen, -EINVAL, "flag --%s needs a value", name);
				break;
			}
		}
		snprintf(src.where, sizeof(src.where), "--%s", o->name);
		rc = set_value(o, val, &src, err, errlen);
		from_flags[o - opts] = true;
	}
	if (rc == 0)
		*argc = kept;

	/* Environment next, for what no flag set. */
	src.what = "environment variable";
	for (size_t i = 0; i < n && rc == 0; i++) {
		char env[KVM_OPT_STRING_MAX];
		env_name(opts[i].name, env, sizeof(env));
		const char *val = getenv(env);
		if (!val || from_flags[i])
			continue;
		snprintf(src.where, sizeof(src.where), "%s", env);
		rc = set_value(&opts[i], val, &src, err, errlen);
		from_env[i] = true;
	}

	/* The file last: it fills in only what flags and environment left. */
	if (rc == 0 && !config_path[0] && getenv("KVMESH_CONFIG"))
		snprintf(config_path, sizeof(config_path), "%s", getenv("KVMESH_CONFIG"));
	if (rc == 0 && config_path[0])
		rc = load_yaml(opts, n, config_path, from_flags, from_env, err, errlen);

	free(from_flags);
	free(from_env);
	return rc;
}

void kvm_config_usage(FILE *out, const char *prog, const char *summary, const kvm_option *opts,
		      size_t n)
{
	static const char *kind[] = {"STRING", "N", "BOOL", "SIZE", "DURATION"};
	fprintf(out, "usage: %s [options]\n%s\n\noptions (flag, environment variable, default):\n",
		prog, summary);
	for (size_t i = 0; i < n; i++) {
		char env[KVM_OPT_STRING_MAX];
		env_name(opts[i].name, env, sizeof(env));
		fprintf(out, "  --%s=%s\n      %s\n      env %s, default \"%s\"\n", opts[i].name,
			kind[opts[i].kind], opts[i].help, env, opts[i].def ? opts[i].def : "");
	}
	fprintf(out, "  --config=FILE\n      YAML file of option: value (nested mappings allowed); "
		     "flags and environment win over it\n      env KVMESH_CONFIG\n"
		     "  -h, --help\n      this text\n");
}
