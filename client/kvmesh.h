/* libkvmesh: the C API a front-end (an inference engine) links to use a
 * kvmesh cluster.
 *
 * Control calls (models, sequences, prefixes) go to the coordinator over
 * gRPC. Prompt blocks are written to the agents the coordinator placed them
 * on (Agent.PutBlocks). Decode steps go over the data plane (TCP, or RDMA
 * where both ends have it) to each sequence's home agent, which runs
 * attention where the KV lives and merges the partial results: only queries,
 * new K/V rows and (o, lse) cross the network. docs/api.md has an example;
 * docs/cluster-attention.md describes the protocol.
 *
 * Errors. Every function returns 0 (or a count, where said) or a negative
 * errno code; kvm_strerror(rc) names it and kvm_client_error() gives the
 * detail of the calling thread's last failure on that client (the server's
 * message, which peer failed, ...). gRPC statuses map to errno codes:
 * INVALID_ARGUMENT -EINVAL, NOT_FOUND -ENOENT, ALREADY_EXISTS -EEXIST,
 * RESOURCE_EXHAUSTED -ENOSPC, FAILED_PRECONDITION -EBUSY, DEADLINE_EXCEEDED
 * -ETIMEDOUT, UNAVAILABLE -EHOSTUNREACH, others -EIO.
 *
 * Threads. A client may be used from any number of threads at once. It holds
 * no global state: two clients in one process are independent.
 *
 * Ownership. Pointers passed in are only read during the call (outputs
 * written before it returns); nothing is kept. */
#ifndef KVMESH_CLIENT_KVMESH_H
#define KVMESH_CLIENT_KVMESH_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The message for a return code (0 or a negative errno); never NULL. */
const char *kvm_strerror(int rc);

typedef struct kvm_client kvm_client;

typedef struct kvm_client_opts {
	int control_timeout_ms; /* deadline of coordinator and agent gRPC calls (default 5000) */
	int data_timeout_ms;    /* deadline of data-plane requests (default 5000) */
	/* The cluster's shared token, for a cluster whose daemons run with
	 * --auth-token-file: sent as gRPC metadata `authorization: Bearer
	 * <token>` on every call and in the data plane's HELLO. Either the
	 * token itself (printable ASCII, at most 1024 bytes) or a file holding
	 * it (mode 0600, as the daemons' --auth-token-file); NULL for none.
	 * auth_token wins when both are set. Copied at open. */
	const char *auth_token;
	const char *auth_token_file;
} kvm_client_opts;

/* Connects to the coordinator at "host:port" (lazily: an unreachable
 * coordinator shows on the first call). opts may be NULL for the defaults.
 * *out is the caller's: kvm_client_close. A token file that cannot be used
 * fails here (-EPERM: readable by group or others, run chmod 600; -EINVAL:
 * empty; or open's errno), with the reason logged on stderr
 * (event=auth_token_failed). A cluster that wants a token and got none or
 * another answers later calls with -EACCES. */
int kvm_client_open(const char *coordinator, const kvm_client_opts *opts, kvm_client **out);
/* Closes every connection and frees the client. Calls in progress on other
 * threads must have returned. */
void kvm_client_close(kvm_client *c);
/* The detail of the calling thread's last failed call on c ("" if none). The
 * string stays valid until that thread's next call on c. */
const char *kvm_client_error(kvm_client *c);

/* ---- models ----------------------------------------------------------------- */

typedef enum kvm_dtype { KVM_F32 = 1, KVM_F16 = 2, KVM_BF16 = 3 } kvm_dtype;

typedef struct kvm_model {
	char id[64];
	uint32_t layers;
	uint32_t q_heads;  /* a multiple of kv_heads */
	uint32_t kv_heads;
	uint32_t head_dim;
	uint32_t block_tokens;
	kvm_dtype dtype;   /* of the KV cache */
} kvm_model;

/* Registers a model (registering the same model again is not an error;
 * a different one under the same id is -EEXIST). */
int kvm_model_register(kvm_client *c, const kvm_model *m);
/* Looks a registered model up; -ENOENT. */
int kvm_model_get(kvm_client *c, const char *id, kvm_model *out);
/* Bytes of one block of m: layers * 2 * block_tokens * kv_heads * head_dim * dtype size. */
size_t kvm_block_bytes(const kvm_model *m);
/* Bytes of one token's K (or V) of one layer: kv_heads * head_dim * dtype size. */
size_t kvm_row_bytes(const kvm_model *m);

/* ---- sequences -------------------------------------------------------------- */

typedef struct kvm_seq_info {
	char id[64];
	char model_id[64];
	char home[64];              /* the home agent's node id */
	uint64_t tokens;            /* tokens the sequence has room for */
	uint32_t blocks;            /* blocks placed */
	uint32_t borrowed_blocks;   /* of which on nodes other than home */
	uint32_t written_blocks;    /* full blocks stored (prompt or sealed) */
	uint32_t shared_prefix_blocks; /* leading blocks shared with other sequences */
	int degraded;               /* some blocks were lost with a dead node */
} kvm_seq_info;

/* Creates a sequence of model_id. seq_id NULL or "": the coordinator picks
 * one. prompt[0..n_prompt) (may be NULL, 0) is matched against the blocks
 * stored anywhere in the cluster: the leading full blocks found are shared
 * (info->shared_prefix_blocks) and need not be written. home NULL or "": the
 * coordinator picks the home agent. info may be NULL. */
int kvm_seq_create(kvm_client *c, const char *model_id, const char *seq_id, const uint32_t *prompt,
		   uint32_t n_prompt, const char *home, kvm_seq_info *info);
/* The sequence as the coordinator knows it. */
int kvm_seq_get(kvm_client *c, const char *seq_id, kvm_seq_info *info);
/* Where one block of a sequence lives. */
typedef struct kvm_block_info {
	uint32_t index;
	char node[64];       /* the node holding it */
	int borrowed;        /* not on the sequence's home */
	int written;         /* stored (has a handle); 0 for the tail and unwritten blocks */
	uint32_t slot, generation; /* the handle, when written */
	uint32_t tokens;
} kvm_block_info;

/* The sequence's block map: fills out[0 .. min(cap, total)) and sets *total
 * to the number of blocks placed. */
int kvm_seq_blocks(kvm_client *c, const char *seq_id, kvm_block_info *out, uint32_t cap, uint32_t *total);

/* Reserves room for n more tokens (placing new blocks, borrowing from other
 * agents when the home is full); -ENOSPC when the cluster is full. Its cost
 * does not grow with the sequence's length, unless info is asked for (then
 * it is a kvm_seq_get as well). */
int kvm_seq_extend(kvm_client *c, const char *seq_id, uint32_t n, kvm_seq_info *info);
/* Releases the sequence: its blocks return to the pools (blocks shared with
 * other sequences stay while they are used). */
int kvm_seq_release(kvm_client *c, const char *seq_id);
/* How many leading full blocks of tokens[0..n) are stored in the cluster. */
int kvm_match_prefix(kvm_client *c, const char *model_id, const uint32_t *tokens, uint32_t n,
		     uint32_t *matched_blocks);

/* ---- writing and reading KV ------------------------------------------------- */

/* Prefill write-back: stores the sequence's first n_blocks full blocks.
 * blocks[i] is block i in the block layout [layer][k|v][token][kv_head]
 * [head_dim] (kvm_block_bytes bytes); tokens[0 .. n_blocks*block_tokens) are
 * their token ids (for the blocks' keys, so that later sequences can share
 * them). The sequence is extended to cover them when needed; blocks already
 * stored (shared prefix, or written before) are skipped. *n_written (may be
 * NULL) gets the blocks actually sent. The sequence's next token position
 * becomes n_blocks*block_tokens in every layer. */
int kvm_seq_write_blocks(kvm_client *c, const char *seq_id, const uint32_t *tokens, uint32_t n_blocks,
			 const void *const *blocks, uint32_t *n_written);

/* Appends n_tokens tokens' K and V of one layer (k and v each n_tokens
 * rows of kvm_row_bytes) at the layer's next position, on the home agent,
 * without attention (the rest of a prompt that does not fill a block). */
int kvm_append_kv(kvm_client *c, const char *seq_id, uint32_t layer, uint32_t n_tokens, const void *k,
		  const void *v);

/* One decode query of kvm_attend_append. */
typedef struct kvm_attend {
	const char *seq_id;
	const float *q;    /* [q_heads][head_dim] */
	const void *k_new; /* [kv_heads][head_dim] in the model's dtype */
	const void *v_new;
	float *o;          /* out: [q_heads][head_dim], normalised */
	float *lse;        /* out: [q_heads], natural log */
	int status;        /* out: 0 or a negative errno for this query */
} kvm_attend;

/* One decode step of one layer for a batch of sequences of one model: each
 * query's k_new, v_new are appended to its sequence, then attention runs over
 * the whole sequence on the nodes holding it, and o, lse come back. scale 0
 * means 1/sqrt(head_dim). Sequences with different home agents go to them in
 * parallel. Returns 0 when every query succeeded, else the first query's
 * error; each query's status says which failed, and kvm_client_error names
 * the node that failed and the blocks it held. */
int kvm_attend_append(kvm_client *c, uint32_t layer, float scale, kvm_attend *q, uint32_t n);

/* Reads full blocks [first, first+n) of a sequence back from the nodes that
 * hold them (over the data plane) into bufs[i] (kvm_block_bytes each). */
int kvm_seq_read_blocks(kvm_client *c, const char *seq_id, uint32_t first, uint32_t n, void *const *bufs);

/* ---- accounting --------------------------------------------------------------- */

typedef struct kvm_client_stats {
	uint64_t data_bytes_out; /* data-plane bytes this client sent (frames, bulk) */
	uint64_t data_bytes_in;
	uint64_t attend_queries;
	uint64_t blocks_written;
	uint64_t blocks_written_bytes;
} kvm_client_stats;
void kvm_client_get_stats(kvm_client *c, kvm_client_stats *out);

#ifdef __cplusplus
}
#endif
#endif
