/* world_size.c: the `world_size` expert-gradient normalizer, fairseq's default
 * --moe-normalize-expert-grad (FAIRSEQ_SPEC.md §2.9): expert gradients are
 * divided by num_experts = data-parallel world / expert-group size, which
 * makes them the exact gradient of the global token-mean loss.
 *
 * Only the divisor lives here; the trainer applies it.
 */
#include "moe/plugin.h"

static double world_size_divisor(int num_experts)
{
    /* a world of fewer than one rank cannot happen; never divide by <= 0 */
    return num_experts >= 1 ? (double)num_experts : 1.0;
}

static const moe_normalizer_ops world_size_ops = {world_size_divisor};

MOE_PLUGIN_DEFINE(MOE_KIND_NORMALIZER, moe_normalizer_ops, "world_size", "1.0",
                  "divide expert gradients by world / expert group size (the exact gradient)",
                  NULL, 0, NULL, NULL, &world_size_ops)
