/* sqrt_world_size.c: the `sqrt_world_size` expert-gradient normalizer
 * (FAIRSEQ_SPEC.md §2.9): expert gradients are divided by sqrt(num_experts)
 * instead of num_experts, so they are sqrt(num_experts) times the exact
 * gradient (fairseq: "similar to reducing the LR on expert params"); the
 * factor shows in the logged gnorm and in clipping.
 *
 * Only the divisor lives here; the trainer applies it.
 */
#include <math.h>

#include "moe/plugin.h"

static double sqrt_world_size_divisor(int num_experts)
{
    return num_experts >= 1 ? sqrt((double)num_experts) : 1.0;
}

static const moe_normalizer_ops sqrt_world_size_ops = {sqrt_world_size_divisor};

MOE_PLUGIN_DEFINE(MOE_KIND_NORMALIZER, moe_normalizer_ops, "sqrt_world_size", "1.0",
                  "divide expert gradients by sqrt(world / expert group size)", NULL, 0, NULL, NULL,
                  &sqrt_world_size_ops)
