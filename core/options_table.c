/* options_table.c: the core's option table (see options_table.h).
 *
 * Defaults are fairseq's (FAIRSEQ_SPEC.md §9, §5.3, §7.4) except where the
 * help says otherwise; a NULL default is Python's None. Ranges (min < max)
 * reject values fairseq would crash on later (a zero log interval, a negative
 * batch size), not values it accepts. Upper bounds of INFINITY mean "at least
 * min". Lists (--lr, --update-freq) are strings here and are checked by
 * moe_config_check, since an option has one scalar type.
 */
#include "core/options_table.h"

#include <math.h>

#define NOLIMIT 0, 0
#define AT_LEAST(v) (v), INFINITY
/* Integer options all have ranges (sizes and counts derived from them stay
 * exact): counts of updates up to 2^53, of everything else up to 2^31 - 1. */
#define I32_MAX 2147483647.0
#define U53_MAX 9007199254740992.0

const moe_option moe_core_options[] = {
    /* components */
    {"arch", MOE_OPT_STRING, NULL, "model architecture: an arch plugin (required; see --list-plugins)", NOLIMIT, NULL},
    {"task", MOE_OPT_STRING, "translation",
     "task: a task plugin such as dummy_lm or language_modeling", NOLIMIT, NULL},
    {"criterion", MOE_OPT_STRING, "cross_entropy", "training criterion: a criterion plugin", NOLIMIT, NULL},
    {"optimizer", MOE_OPT_STRING, NULL, "optimizer: an optimizer plugin (required)", NOLIMIT, NULL},
    {"lr-scheduler", MOE_OPT_STRING, "fixed", "learning rate scheduler: an lr_scheduler plugin", NOLIMIT, NULL},
    {"moe-gate", MOE_OPT_STRING, NULL,
     "gate plugin that routes tokens to experts (default: None = top2, or top1 when --moe-top1-expert is given)",
     NOLIMIT, NULL},
    {"moe-top1-expert", MOE_OPT_FLAG, NULL, "use top-1 gating instead of top-2 (selects the top1 gate)", NOLIMIT, NULL},
    {"moe-normalize-expert-grad", MOE_OPT_CHOICE, "world_size",
     "divide expert gradients by the number of experts (world_size) or its square root (sqrt_world_size); "
     "names the normalizer plugin",
     NOLIMIT, "world_size|sqrt_world_size"},
    {"user-dir", MOE_OPT_STRING, NULL, "directory searched first for plugins (libmoe-<kind>-<name>.so)", NOLIMIT,
     NULL},

    /* common */
    {"seed", MOE_OPT_INT, "1", "pseudo random number generator seed", 0, 4294967295.0, NULL},
    {"cpu", MOE_OPT_FLAG, NULL, "use CPU instead of CUDA", NOLIMIT, NULL},
    {"fp16", MOE_OPT_FLAG, NULL, "use FP16: fp16 activations and gradients, fp32 master weights, loss scaling",
     NOLIMIT, NULL},
    {"bf16", MOE_OPT_FLAG, NULL, "use BF16: bf16 activations and gradients, fp32 master weights, no loss scaling",
     NOLIMIT, NULL},
    {"memory-efficient-fp16", MOE_OPT_FLAG, NULL,
     "use a memory-efficient version of FP16 training (fp16 parameters, no fp32 master copy); implies --fp16",
     NOLIMIT, NULL},
    {"memory-efficient-bf16", MOE_OPT_FLAG, NULL,
     "use a memory-efficient version of BF16 training (bf16 parameters, no fp32 master copy); implies --bf16",
     NOLIMIT, NULL},
    {"fp16-init-scale", MOE_OPT_INT, "128", "default FP16 loss scale", 1, 1099511627776.0, NULL},
    {"fp16-scale-window", MOE_OPT_INT, NULL,
     "number of updates before increasing loss scale (default: None = 2^14 / world size / update freq)",
     1, I32_MAX, NULL},
    {"fp16-scale-tolerance", MOE_OPT_FLOAT, "0.0", "pct of updates that can overflow before decreasing the loss scale",
     0.0, 1.0, NULL},
    {"threshold-loss-scale", MOE_OPT_FLOAT, NULL, "threshold FP16 loss scale from below", AT_LEAST(0.0), NULL},
    {"min-loss-scale", MOE_OPT_FLOAT, "1e-4", "minimum FP16 loss scale, after which training is stopped",
     AT_LEAST(0.0), NULL},
    {"log-format", MOE_OPT_CHOICE, NULL,
     "log format to use (default: None = tqdm on a terminal, simple otherwise)", NOLIMIT, "json|simple|none|tqdm"},
    {"log-interval", MOE_OPT_INT, "100", "log progress every N updates", 1, I32_MAX, NULL},
    {"no-progress-bar", MOE_OPT_FLAG, NULL, "disable progress bar", NOLIMIT, NULL},
    {"log-file", MOE_OPT_STRING, NULL,
     "log file to copy metrics to: every log line is also appended to it (each rank appends its own lines)",
     NOLIMIT, NULL},
    {"tensorboard-logdir", MOE_OPT_STRING, NULL,
     "path to save logs for tensorboard, should match --logdir of running tensorboard (default: no tensorboard "
     "logging); rank 0 writes train, train_inner and valid event files below it",
     NOLIMIT, NULL},
    {"log-expert-load", MOE_OPT_FLAG, NULL,
     "after each train_inner line, one line with the tokens routed to each expert of each MoE layer (before "
     "capacity), summed over the log interval and the ranks: 'expert_load | <layer>: n0 n1 ... | <layer>: ...' "
     "(with --tensorboard-logdir the expert_load histograms then sum the interval too)",
     NOLIMIT, NULL},

    /* distributed training */
    {"distributed-world-size", MOE_OPT_INT, NULL,
     "total number of GPUs across all nodes (default: None = all visible GPUs)", 1, 1048576.0, NULL},
    {"distributed-rank", MOE_OPT_INT, "0", "rank of the current worker", 0, 1048575.0, NULL},
    {"distributed-backend", MOE_OPT_CHOICE, "nccl", "distributed backend (the communicator plugin)", NOLIMIT,
     "nccl|mpi|gloo|single"},
    {"distributed-init-method", MOE_OPT_STRING, NULL,
     "typically tcp://hostname:port that will be used to establish the initial connection", NOLIMIT, NULL},
    {"distributed-port", MOE_OPT_INT, "-1", "port number (not required if using --distributed-init-method)",
     NOLIMIT, NULL},
    {"device-id", MOE_OPT_INT, "0", "which GPU to use (usually configured automatically)", 0, 65535.0, NULL},
    {"ddp-backend", MOE_OPT_CHOICE, "pytorch_ddp",
     "data-parallel backend; fully_sharded shards non-expert parameters and is required when experts < GPUs",
     NOLIMIT, "pytorch_ddp|c10d|legacy_ddp|no_c10d|fully_sharded"},
    {"bucket-cap-mb", MOE_OPT_INT, "25", "bucket size for reduction", 0, I32_MAX, NULL},
    {"distributed-timeout", MOE_OPT_FLOAT, "1800",
     "seconds a rendezvous or collective may wait for the other ranks before every rank fails, naming what "
     "is missing",
     AT_LEAST(1), NULL},

    /* dataset */
    {"num-workers", MOE_OPT_INT, "1", "how many subprocesses to use for data loading", 0, 4096.0, NULL},
    {"num-workers-valid", MOE_OPT_INT, "0", "how many subprocesses to use for validation data loading",
     0, 4096.0, NULL},
    {"data", MOE_OPT_STRING, NULL,
     "DATA (positional): the task's data directory; ':'-separated directories are shards used one per epoch",
     NOLIMIT, NULL},
    {"max-tokens", MOE_OPT_INT, NULL, "maximum number of tokens in a batch", 1, 1099511627776.0, NULL},
    {"batch-size", MOE_OPT_INT, NULL, "number of examples in a batch (per GPU and micro-batch)", 1, I32_MAX, NULL},
    {"required-batch-size-multiple", MOE_OPT_INT, "8", "batch size will be a multiple of this value", 1, I32_MAX,
     NULL},
    {"batch-size-valid", MOE_OPT_INT, NULL, "batch size of the validation batch (default: None = --batch-size)",
     1, I32_MAX, NULL},
    {"max-tokens-valid", MOE_OPT_INT, NULL,
     "maximum number of tokens in a validation batch (default: None = --max-tokens)", 1, 1099511627776.0, NULL},
    {"skip-invalid-size-inputs-valid-test", MOE_OPT_FLAG, NULL,
     "ignore too long or too short lines in valid and test set", NOLIMIT, NULL},
    {"train-subset", MOE_OPT_STRING, "train", "data subset to use for training (e.g. train, valid, test)", NOLIMIT,
     NULL},
    {"valid-subset", MOE_OPT_STRING, "valid",
     "comma separated list of data subsets to use for validation (e.g. train, valid, test)", NOLIMIT, NULL},
    {"validate-interval", MOE_OPT_INT, "1", "validate every N epochs", 1, I32_MAX, NULL},
    {"validate-interval-updates", MOE_OPT_INT, "0", "validate every N updates", 0, U53_MAX, NULL},
    {"disable-validation", MOE_OPT_FLAG, NULL, "disable validation", NOLIMIT, NULL},
    {"max-valid-steps", MOE_OPT_INT, NULL, "how many batches to evaluate (default: None = all)", 0, U53_MAX, NULL},

    /* optimization */
    {"max-epoch", MOE_OPT_INT, "0", "force stop training at specified epoch (0: no limit)", 0, I32_MAX, NULL},
    {"max-update", MOE_OPT_INT, "0", "force stop training at specified update (0: no limit)", 0, U53_MAX, NULL},
    {"clip-norm", MOE_OPT_FLOAT, "0.0", "clip threshold of gradients (0: no clipping)", AT_LEAST(0.0), NULL},
    {"optimizer-overlap", MOE_OPT_FLAG, NULL,
     "step each unit's parameters as soon as the backward has finished its gradient, beside the rest of the "
     "backward (on a GPU, on a second stream); the same numbers as stepping after the backward. One process, "
     "--update-freq 1, no --clip-norm, no loss scaling (--bf16 or fp32), no --fp16-adam-stats, not with "
     "fully_sharded or --moe-dropless",
     NOLIMIT, NULL},
    {"update-freq", MOE_OPT_STRING, "1",
     "update parameters every N_i batches, when in epoch i (a comma-separated list of integers)", NOLIMIT, NULL},
    {"lr", MOE_OPT_STRING, "0.25",
     "learning rate for the first N epochs; all epochs >N using LR_N (a comma-separated list of numbers)", NOLIMIT,
     NULL},
    {"stop-min-lr", MOE_OPT_FLOAT, "-1.0", "stop training when the learning rate reaches this minimum", NOLIMIT,
     NULL},
    {"stop-time-hours", MOE_OPT_FLOAT, "0",
     "force stop training after specified cumulative time (if >0); counts this run's time only (a checkpoint does "
     "not record earlier runs' time)",
     AT_LEAST(0.0), NULL},

    /* checkpoint */
    {"save-dir", MOE_OPT_STRING, "checkpoints", "path to save checkpoints", NOLIMIT, NULL},
    {"no-save", MOE_OPT_FLAG, NULL, "don't save models or checkpoints", NOLIMIT, NULL},
    {"restore-file", MOE_OPT_STRING, "checkpoint_last.pt",
     "filename from which to load checkpoint (default: <save-dir>/checkpoint_last.pt; each rank reads its "
     "<name>-rank-<r>.pt)",
     NOLIMIT, NULL},
    {"reset-dataloader", MOE_OPT_FLAG, NULL, "if set, does not reload dataloader state from the checkpoint",
     NOLIMIT, NULL},
    {"reset-lr-scheduler", MOE_OPT_FLAG, NULL, "if set, does not load lr scheduler state from the checkpoint",
     NOLIMIT, NULL},
    {"reset-meters", MOE_OPT_FLAG, NULL, "if set, does not load meters from the checkpoint", NOLIMIT, NULL},
    {"reset-optimizer", MOE_OPT_FLAG, NULL, "if set, does not load optimizer state from the checkpoint", NOLIMIT,
     NULL},
    {"save-interval", MOE_OPT_INT, "1", "save a checkpoint every N epochs", 1, I32_MAX, NULL},
    {"save-interval-updates", MOE_OPT_INT, "0", "save a checkpoint (and validate) every N updates",
     0, U53_MAX, NULL},
    {"keep-interval-updates", MOE_OPT_INT, "-1",
     "keep the last N checkpoints saved with --save-interval-updates", -1, I32_MAX, NULL},
    {"no-epoch-checkpoints", MOE_OPT_FLAG, NULL, "only store last and best checkpoints", NOLIMIT, NULL},
    {"no-last-checkpoints", MOE_OPT_FLAG, NULL, "don't store last checkpoints", NOLIMIT, NULL},
    {"patience", MOE_OPT_INT, "-1",
     "early stop training if valid performance doesn't improve for N consecutive validation runs; note that this "
     "is influenced by --validate-interval",
     -1, 2147483647.0, NULL},
    {"save-on-sigint", MOE_OPT_FLAG, NULL,
     "treat SIGINT (Ctrl-C) as SIGTERM and SIGUSR1 are: finish the update in flight, save checkpoint_last on every "
     "rank and exit 0 (default: SIGINT ends the run without saving)",
     NOLIMIT, NULL},

    /* MoE runtime (the layer's own flags belong to the arch) */
    {"record-a2a-perf-stats", MOE_OPT_FLAG, NULL, "record all-to-all CPU and CUDA times in the logs", NOLIMIT, NULL},
    {"dummy-a2a", MOE_OPT_FLAG, NULL, "skip the all-to-all exchange (benchmarking only: results are wrong)",
     NOLIMIT, NULL},

    /* moelm */
    {"help", MOE_OPT_FLAG, NULL, "show this help message and exit", NOLIMIT, NULL},
    {"version", MOE_OPT_FLAG, NULL, "print the version and plugin ABI and exit", NOLIMIT, NULL},
    {"list-plugins", MOE_OPT_FLAG, NULL, "list the installed plugins by kind and exit", NOLIMIT, NULL},
    {"dry-run", MOE_OPT_FLAG, NULL,
     "resolve every component and print parameter counts, memory and FLOPs per rank without training", NOLIMIT,
     NULL},
    {"profile", MOE_OPT_STRING, NULL,
     "write a Chrome/Perfetto trace (JSON trace events) of the updates --profile-updates chooses to FILE: per "
     "layer and per op the forward, backward, communication and optimizer spans, each rank a process row",
     NOLIMIT, NULL},
    {"profile-updates", MOE_OPT_STRING, "2-3", "the updates --profile records: N or N-M (counted from 1)", NOLIMIT,
     NULL},
};
const int moe_core_options_count = (int)(sizeof moe_core_options / sizeof moe_core_options[0]);

const moe_option_group moe_core_option_groups[] = {
    {"components", "arch"},
    {"common", "seed"},
    {"distributed training", "distributed-world-size"},
    {"dataset", "num-workers"},
    {"optimization", "max-epoch"},
    {"checkpoint", "save-dir"},
    {"MoE runtime", "record-a2a-perf-stats"},
    {"moelm", "help"},
};
const int moe_core_option_groups_count = (int)(sizeof moe_core_option_groups / sizeof moe_core_option_groups[0]);

const moe_option_alias moe_core_option_aliases[] = {
    {"max-sentences", "batch-size"},
    {"max-sentences-valid", "batch-size-valid"},
};
const int moe_core_option_aliases_count = (int)(sizeof moe_core_option_aliases / sizeof moe_core_option_aliases[0]);
