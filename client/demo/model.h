/* The demo's synthetic transformer: seeded random weights, real matrix
 * products in C. Pre-norm decoder layers (RMSNorm, multi-head attention with
 * GQA and rotary positions, a SiLU MLP), tied to nothing: the point is that
 * its attention reads a KV cache, and that a wrong KV gives wrong tokens.
 *
 * The attention itself is not here: a caller computes q, k, v with
 * demo_qkv, runs attention wherever the KV lives, and gives the output back
 * to demo_finish_layer. */
#ifndef KVMESH_CLIENT_DEMO_MODEL_H
#define KVMESH_CLIENT_DEMO_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "client/kvmesh.h"

typedef struct demo_model {
	uint32_t vocab, width, layers, q_heads, kv_heads, head_dim, ffn;
	kvm_dtype dtype;
	float *embed;                  /* [vocab][width] */
	float *wq, *wk, *wv, *wo;      /* per layer */
	float *w_up, *w_down;          /* per layer: [ffn][width], [width][ffn] */
	float *norm_attn, *norm_mlp;   /* per layer: [width] */
	float *norm_out;               /* [width] */
	float *unembed;                /* [vocab][width] */
} demo_model;

/* Allocates and fills the weights from seed. 0 or -ENOMEM. */
int demo_model_init(demo_model *m, uint32_t vocab, uint32_t width, uint32_t layers, uint32_t q_heads,
		    uint32_t kv_heads, uint32_t ffn, kvm_dtype dtype, uint64_t seed);
void demo_model_free(demo_model *m);

/* x[width] = the embedding of token. */
void demo_embed(const demo_model *m, uint32_t token, float *x);

/* For layer `layer` at position pos: q[q_heads*head_dim] (fp32) and the K, V
 * rows to store, k_row and v_row[kv_heads*head_dim] in the model's dtype. */
void demo_qkv(const demo_model *m, uint32_t layer, const float *x, uint32_t pos, float *q, void *k_row,
	      void *v_row);

/* x += Wo o; x += MLP(norm(x)). o is the attention output [q_heads*head_dim]. */
void demo_finish_layer(const demo_model *m, uint32_t layer, float *x, const float *o);

/* logits[vocab] from the last hidden state. */
void demo_logits(const demo_model *m, const float *x, float *logits);

/* The index of the largest logit (the first on ties). */
uint32_t demo_argmax(const float *v, uint32_t n);

/* Bytes of one K or V row: kv_heads * head_dim * dtype size. */
size_t demo_row_bytes(const demo_model *m);

#endif
