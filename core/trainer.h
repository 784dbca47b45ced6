/* trainer.h: the training loop (FAIRSEQ_SPEC.md §10) over resolved components.
 *
 * The trainer owns the update: micro-batches of forward, criterion and
 * backward, gradient reduction, statistics, grad norm, loss scaling, clipping,
 * the optimizer and scheduler steps, validation and the log lines of §8. It is
 * not the model: the arch plugin computes forward and backward.
 */
#ifndef MOE_CORE_TRAINER_H
#define MOE_CORE_TRAINER_H

#include "core/runtime.h"

typedef struct moe_components {
    const moe_arch_ops *arch;
    void *model;
    const moe_task_ops *task;
    void *task_state;
    const moe_criterion_ops *criterion;
    const char *criterion_name;   /* "moe_*" criteria log the MoE metrics and inner_loss */
    const moe_optimizer_ops *optimizer;
    const moe_lr_scheduler_ops *lr_scheduler;
    const moe_normalizer_ops *normalizer;
} moe_components;

/* Runs until --max-update / --max-epoch. Parameters must be allocated. */
moe_status moe_train(moe_runtime *rt, const moe_components *c);

#endif
