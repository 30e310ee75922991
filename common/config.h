/* Configuration of a daemon or tool from, in order of precedence:
 * command-line flags (--name=value or --name value), environment variables
 * (KVMESH_NAME), a YAML file (--config PATH or KVMESH_CONFIG), and each
 * option's default. Every option appears in --help with its default and its
 * environment variable.
 *
 * Option names are lower case with dots or dashes ("pool.host-bytes"); the
 * YAML file may write them flat ("pool.host-bytes: 8GiB") or nested
 * ("pool: {host-bytes: 8GiB}"); the environment variable is KVMESH_ followed
 * by the name in upper case with '.' and '-' as '_' (KVMESH_POOL_HOST_BYTES). */
#ifndef KVMESH_COMMON_CONFIG_H
#define KVMESH_COMMON_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef enum kvm_opt_kind {
	KVM_OPT_STRING,   /* dest: char[KVM_OPT_STRING_MAX] */
	KVM_OPT_INT,      /* dest: int64_t; decimal, may be negative */
	KVM_OPT_BOOL,     /* dest: bool; true/false/yes/no/on/off/1/0; a bare flag is true */
	KVM_OPT_BYTES,    /* dest: uint64_t; 4096, 64K, 512MiB, 8G, 1TiB (binary units) */
	KVM_OPT_DURATION, /* dest: int64_t milliseconds; 250ms, 5s, 2m, 1h (bare number: ms) */
} kvm_opt_kind;

#define KVM_OPT_STRING_MAX 512

typedef struct kvm_option {
	const char *name;     /* "listen", "pool.host-bytes" */
	kvm_opt_kind kind;
	void *dest;           /* where the value goes; see kvm_opt_kind */
	const char *def;      /* default, in the same syntax as a flag's value */
	const char *help;     /* one line */
} kvm_option;

/* The outcome of kvm_config_load. */
enum { KVM_CONFIG_OK = 0, KVM_CONFIG_HELP = 1 };

/* Fills every option's dest. Returns KVM_CONFIG_OK, KVM_CONFIG_HELP when
 * --help or -h was given (the caller prints kvm_config_usage and exits 0),
 * or a negative errno with a message in err naming the option, its source
 * and what was wrong (unknown flag, bad value, unreadable or malformed YAML,
 * unknown YAML key). Arguments that are not flags are left in argv: *argc is
 * updated to the count of those (argv[0] stays). */
int kvm_config_load(const kvm_option *opts, size_t n, int *argc, char **argv, char *err,
		    size_t errlen);

/* Prints usage: the summary line, then one line per option with its flag,
 * environment variable, default and help, then --config and --help. */
void kvm_config_usage(FILE *out, const char *prog, const char *summary, const kvm_option *opts,
		      size_t n);

/* Parsers used by kvm_config_load, for callers with values of their own.
 * Each returns 0 or -EINVAL (-ERANGE on overflow). */
int kvm_parse_bytes(const char *s, uint64_t *out);
int kvm_parse_duration_ms(const char *s, int64_t *out);
int kvm_parse_bool(const char *s, bool *out);

#endif
