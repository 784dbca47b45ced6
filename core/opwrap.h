/* opwrap.h: the ops table and communicator a run observes through: copies
 * of the backend's and communicator's tables whose entries call the real
 * ones inside a profile span named after the op (core/profile.h), and whose
 * route_forward also shows each routing decision to an observer (the
 * trainer's per-expert token load for TensorBoard and --log-expert-load,
 * and the expert --moe-dropless names when one is over its bound).
 * Installed by moe_opwrap_install only when one of those flags asks
 * (--profile too), so a plain run calls the backend directly.
 *
 * Ops added to the tables later than this file pass through unobserved (the
 * tables are copied whole, then the known entries replaced). One runtime per
 * process: the real tables are process-wide state here.
 *
 * Also the runtime's unit hooks: moe_opwrap_unit is called around every
 * unit's gather and release (the arch's per-layer brackets), giving the
 * per-layer spans and the name of the layer a routing belongs to.
 */
#ifndef MOE_CORE_OPWRAP_H
#define MOE_CORE_OPWRAP_H

#include "core/runtime.h"
#include "moe/plugin.h"

/* Sees route_forward's result: `layer` is the unit gathered around it
 * ("decoder.layers.3"), or NULL. Called right after the op returned OK. */
typedef void (*moe_route_observer)(void *ctx, const char *layer, const moe_route_args *a);

/* Wraps rt's ops table and communicator (moe_runtime_wrap); call before any
 * plugin is built. */
moe_status moe_opwrap_install(moe_runtime *rt);
void moe_opwrap_set_route_observer(moe_route_observer fn, void *ctx);
/* From the runtime: unit `name` gathered (begin = 1) or released (0). */
void moe_opwrap_unit(const char *name, int begin);

#endif
