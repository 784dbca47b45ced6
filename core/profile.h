/* profile.h: --profile FILE, a Chrome/Perfetto trace (JSON trace-event
 * format) of the updates --profile-updates chooses ("5-6": updates 5 and 6,
 * counted as num_updates is, from 1): per layer and per op, the forward,
 * backward, communication and optimizer spans; each rank is a process row
 * ("rank r"), its spans nested on one track. Open the file in Perfetto
 * (ui.perfetto.dev) or chrome://tracing.
 *
 * Times: on a backend that computes synchronously (cpu) a span is the host's
 * wall time between its begin and end. On a backend with device timers
 * (cuda: backend->timer_*, CUDA events) a span's begin and end are events
 * queued on the compute stream, so it measures when the device ran the
 * work, not when the host queued it; communication is seen from the compute
 * stream (a collective's span covers the compute stream's wait for it).
 * Timestamps are microseconds from the earliest rank's start of recording,
 * ranks aligned by their wall clocks.
 *
 * Who makes spans: the trainer (update, forward, backward, gradient
 * reduction, statistics, optimizer), the runtime (a span per parameter unit
 * between its gather and release: the arch brackets each layer's forward
 * and backward that way, so layers appear as "decoder.layers.<i>"), and the
 * ops table and communicator wrappers (core/opwrap.h: one span per op call,
 * named after the op). A span's category is its own or, for ops, that of
 * the span around it; collectives are "communication".
 *
 * Cost when off: no wrappers are installed unless --profile (or
 * --tensorboard-logdir) is given; otherwise the trainer's and runtime's few
 * calls per update and layer return at the first test of a flag.
 *
 * Not here: anything outside the chosen updates; the file is written once,
 * by rank 0, when the last chosen update ends (a collective: every rank
 * calls moe_profile_step_end at the same updates), or at the end of
 * training with what was recorded.
 */
#ifndef MOE_CORE_PROFILE_H
#define MOE_CORE_PROFILE_H

#include <stdint.h>

#include "moe/plugin.h"

enum {
    MOE_PROF_INHERIT = -1, /* the category of the enclosing span */
    MOE_PROF_STEP = 0,
    MOE_PROF_FORWARD,
    MOE_PROF_BACKWARD,
    MOE_PROF_COMM,
    MOE_PROF_OPTIMIZER,
    MOE_PROF_OTHER,
    MOE_PROF_NCATS
};

/* --profile FILE and --profile-updates "N" or "N-M"; path NULL: off. */
moe_status moe_profile_configure(const char *path, const char *updates);
int moe_profile_wanted(void);
/* The backend (timers, copies) and communicator (the gather) to use. */
void moe_profile_attach(const moe_host *h);
/* Around every update; `update` is the number the update will have
 * (num_updates + 1). step_end may write the file (a collective). */
void moe_profile_step_begin(int64_t update);
moe_status moe_profile_step_end(int64_t num_updates);
/* End of training: writes what was recorded and not yet written (a
 * collective), then frees everything. */
moe_status moe_profile_finish(void);
void moe_profile_reset(void);

/* A span; returns its id (-1 when not recording). Ending a span ends every
 * span begun inside it that is still open; ending one that is no longer
 * open does nothing. `name` must live until the file is written. */
int moe_profile_begin(int cat, const char *name);
void moe_profile_end(int id);

#endif
