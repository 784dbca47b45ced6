/* moe_layer.h: the MoE layer's interface to the decoder of the transformer_lm
 * archs (plugins/archs/moe_layer.c). Private to plugins/archs/: nothing here
 * is ABI. The decoder calls, in order: tlm_moe_plan (build, once the layer
 * kinds are known), tlm_moe_register_experts (per MoE layer, after the
 * layer's own unit), tlm_moe_setup, tlm_moe_alloc_acts and
 * tlm_moe_alloc_scratch (setup), tlm_moe_forward and tlm_moe_backward (per
 * MoE layer and micro-batch), tlm_moe_free (destroy).
 */
#ifndef MOE_PLUGINS_ARCHS_MOE_LAYER_H
#define MOE_PLUGINS_ARCHS_MOE_LAYER_H

#include "plugins/archs/transformer_lm.h"

/* Declares the expert count to the core and takes the layout (local
 * experts, their ids, the all-to-all group) from its parallel plan. */
moe_status tlm_moe_plan(tlm *m);
/* Registers the local expert units of MoE layer i ("decoder.layers.<i>"). */
moe_status tlm_moe_register_experts(tlm *m, int i, const char *pfx);
/* The gates, and the capacity m->C for micro-batches of up to N tokens. */
moe_status tlm_moe_setup(tlm *m, int64_t N);
/* One set of MoE activations, for m->Nmax tokens at capacity m->C. */
moe_status tlm_moe_alloc_acts(tlm *m, tlm_acts *a);
/* The scratch all MoE layers share. */
moe_status tlm_moe_alloc_scratch(tlm *m);
/* y (N,d) = MoE(a->h2) for decoder layer i. */
moe_status tlm_moe_forward(tlm *m, int i, tlm_acts *a, void *y);
/* m->dh (N,d) = d loss / d a->h2 given dy = m->dres; accumulates the gate's
 * and the local experts' gradients. */
moe_status tlm_moe_backward(tlm *m, int i, tlm_acts *a, float dl_aux);
/* The gates' state and the expert tables. */
void tlm_moe_free(tlm *m);

#endif
