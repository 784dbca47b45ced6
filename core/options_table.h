/* options_table.h: the core's own command-line options, with fairseq's names,
 * types, defaults and (shortened) help.
 *
 * The core lists only the flags no component owns: component selection,
 * precision and loss scaling, logging, distributed launch, batching, the
 * update loop, checkpointing and moelm's own switches. A component's flags
 * (--decoder-layers, --adam-betas, --warmup-updates, ...) come from its
 * plugin's table (fairseq's add_args) and are added at run time.
 *
 * Data only: core/options.c registers it. The table is ordered by help group;
 * a group runs from its first option to the next group's first option.
 * Aliases are other spellings fairseq accepts for the same option; they are
 * stored once, under the option's name, and both names read the same value.
 */
#ifndef MOE_CORE_OPTIONS_TABLE_H
#define MOE_CORE_OPTIONS_TABLE_H

#include "moe/plugin.h"

/* A help group: a title and the name of its first option in moe_core_options. */
typedef struct moe_option_group {
    const char *title;
    const char *first;
} moe_option_group;

/* --alias is accepted and stored as --name. */
typedef struct moe_option_alias {
    const char *alias;
    const char *name;
} moe_option_alias;

extern const moe_option moe_core_options[];
extern const int moe_core_options_count;

extern const moe_option_group moe_core_option_groups[];
extern const int moe_core_option_groups_count;

extern const moe_option_alias moe_core_option_aliases[];
extern const int moe_core_option_aliases_count;

#endif
