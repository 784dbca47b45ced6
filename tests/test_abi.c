/* test_abi.c: the plugin ABI (include/moe/plugin.h, "ABI versions").
 *
 * 1. Every struct of plugin.h and ops.h has its size and each member's offset
 *    pinned below, checked at compile time: a layout change that is not an
 *    append recorded under a new minor fails the build here. After appending
 *    a member: bump MOE_ABI_MINOR (once per minor), list the member under it
 *    in plugin.h, and add its PIN line (and the new PIN_SIZE) to this table.
 *    The numbers are those of the LP64 data model (x86-64 and aarch64 Linux);
 *    elsewhere the table is not checked and test_abi_layout_pinned says so.
 * 2. Plugins as another minor built them (tests/fixtures/fixture_abi.c)
 *    against the loader: 1.0 tables load, read as NULL past their size and
 *    run with the core's defaults; a newer minor and sizes above the core's
 *    are refused, naming both versions; a backend's moe_ops size is checked.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core/internal.h"
#include "core/registry.h"
#include "core/runtime.h"

#define ABI_FIXTURES MOE_TEST_FIXTURE_DIR "/abi"

/* ------------------------------------------------------------- layouts */

#if defined(__LP64__) && defined(__linux__)
#define ABI_PINNED 1
#define PIN(type, member, off)                                                                              \
    _Static_assert(offsetof(type, member) == (off), #type "." #member " moved: a member was inserted, "    \
                                                    "removed or retyped (a new major), or this table is stale")
#define PIN_SIZE(type, n)                                                                                   \
    _Static_assert(sizeof(type) == (n), "sizeof(" #type ") changed: record the appended member under a new " \
                                        "minor (plugin.h) and pin it here")

/* moe_matmul_desc, ops.h */
PIN_SIZE(moe_matmul_desc, 168);
PIN(moe_matmul_desc, trans_a, 0);
PIN(moe_matmul_desc, trans_b, 4);
PIN(moe_matmul_desc, m, 8);
PIN(moe_matmul_desc, n, 16);
PIN(moe_matmul_desc, k, 24);
PIN(moe_matmul_desc, alpha, 32);
PIN(moe_matmul_desc, beta, 36);
PIN(moe_matmul_desc, a, 40);
PIN(moe_matmul_desc, lda, 48);
PIN(moe_matmul_desc, stride_a, 56);
PIN(moe_matmul_desc, b, 64);
PIN(moe_matmul_desc, ldb, 72);
PIN(moe_matmul_desc, stride_b, 80);
PIN(moe_matmul_desc, c, 88);
PIN(moe_matmul_desc, ldc, 96);
PIN(moe_matmul_desc, stride_c, 104);
PIN(moe_matmul_desc, ab_dtype, 112);
PIN(moe_matmul_desc, c_dtype, 116);
PIN(moe_matmul_desc, batch, 120);
PIN(moe_matmul_desc, epilogue, 128);
PIN(moe_matmul_desc, bias, 136);
PIN(moe_matmul_desc, stride_bias, 144);
PIN(moe_matmul_desc, aux, 152);
PIN(moe_matmul_desc, act, 160);

/* moe_route_args, ops.h */
PIN_SIZE(moe_route_args, 208);
PIN(moe_route_args, S, 0);
PIN(moe_route_args, E, 8);
PIN(moe_route_args, capacity, 16);
PIN(moe_route_args, k, 24);
PIN(moe_route_args, policy, 28);
PIN(moe_route_args, normalize_before_drop, 32);
PIN(moe_route_args, batch_prioritized, 36);
PIN(moe_route_args, seed, 40);
PIN(moe_route_args, stream, 48);
PIN(moe_route_args, logits, 56);
PIN(moe_route_args, pad, 64);
PIN(moe_route_args, probs, 72);
PIN(moe_route_args, expert, 80);
PIN(moe_route_args, slot, 88);
PIN(moe_route_args, weight, 96);
PIN(moe_route_args, l_aux, 104);
PIN(moe_route_args, metrics, 112);
PIN(moe_route_args, workspace, 120);
PIN(moe_route_args, noise_index, 128); /* 1.3 */
PIN(moe_route_args, topk, 136); /* 1.4 */
PIN(moe_route_args, width, 140); /* 1.4 */
PIN(moe_route_args, score, 144); /* 1.4 */
PIN(moe_route_args, renormalize, 148); /* 1.4 */
PIN(moe_route_args, z_loss_coeff, 152); /* 1.4 */
PIN(moe_route_args, aux, 156); /* 1.4 */
PIN(moe_route_args, seq_len, 160); /* 1.4 */
PIN(moe_route_args, num_groups, 168); /* 1.4 */
PIN(moe_route_args, group_topk, 172); /* 1.4 */
PIN(moe_route_args, expert_bias, 176); /* 1.4 */
PIN(moe_route_args, expert_load, 184); /* 1.4 */
PIN(moe_route_args, gate_metrics, 192); /* 1.4 */
PIN(moe_route_args, expert_choice, 200); /* 1.4 */

/* moe_adam_args, ops.h */
PIN_SIZE(moe_adam_args, 128);
PIN(moe_adam_args, n, 0);
PIN(moe_adam_args, param, 8);
PIN(moe_adam_args, param_dtype, 16);
PIN(moe_adam_args, param_copy, 24);
PIN(moe_adam_args, copy_dtype, 32);
PIN(moe_adam_args, grad, 40);
PIN(moe_adam_args, grad_dtype, 48);
PIN(moe_adam_args, exp_avg, 56);
PIN(moe_adam_args, exp_avg_sq, 64);
PIN(moe_adam_args, state_dtype, 72);
PIN(moe_adam_args, scale_avg, 80);
PIN(moe_adam_args, scale_avg_sq, 88);
PIN(moe_adam_args, lr, 96);
PIN(moe_adam_args, beta1, 100);
PIN(moe_adam_args, beta2, 104);
PIN(moe_adam_args, eps, 108);
PIN(moe_adam_args, weight_decay, 112);
PIN(moe_adam_args, grad_scale, 116);
PIN(moe_adam_args, step, 120);

/* moe_sgd_args, ops.h */
PIN_SIZE(moe_sgd_args, 80);
PIN(moe_sgd_args, n, 0);
PIN(moe_sgd_args, param, 8);
PIN(moe_sgd_args, param_dtype, 16);
PIN(moe_sgd_args, param_copy, 24);
PIN(moe_sgd_args, copy_dtype, 32);
PIN(moe_sgd_args, grad, 40);
PIN(moe_sgd_args, grad_dtype, 48);
PIN(moe_sgd_args, momentum_buf, 56);
PIN(moe_sgd_args, lr, 64);
PIN(moe_sgd_args, momentum, 68);
PIN(moe_sgd_args, weight_decay, 72);
PIN(moe_sgd_args, grad_scale, 76);

/* moe_rowlinear_desc, ops.h (ABI 1.3) */
PIN_SIZE(moe_rowlinear_desc, 152);
PIN(moe_rowlinear_desc, m, 0);
PIN(moe_rowlinear_desc, n, 8);
PIN(moe_rowlinear_desc, k, 16);
PIN(moe_rowlinear_desc, x, 24);
PIN(moe_rowlinear_desc, ldx, 32);
PIN(moe_rowlinear_desc, rows, 40);
PIN(moe_rowlinear_desc, layernorm, 48);
PIN(moe_rowlinear_desc, ln_weight, 56);
PIN(moe_rowlinear_desc, ln_bias, 64);
PIN(moe_rowlinear_desc, ln_eps, 72);
PIN(moe_rowlinear_desc, w, 80);
PIN(moe_rowlinear_desc, bias, 88);
PIN(moe_rowlinear_desc, q_scale, 96);
PIN(moe_rowlinear_desc, q_cols, 104);
PIN(moe_rowlinear_desc, act, 112);
PIN(moe_rowlinear_desc, act_kind, 116);
PIN(moe_rowlinear_desc, beta, 120);
PIN(moe_rowlinear_desc, y, 128);
PIN(moe_rowlinear_desc, ldy, 136);
PIN(moe_rowlinear_desc, y_dtype, 144);
PIN(moe_rowlinear_desc, dt, 148);

/* moe_gate_topk_args, ops.h (ABI 1.3) */
PIN_SIZE(moe_gate_topk_args, 136);
PIN(moe_gate_topk_args, S, 0);
PIN(moe_gate_topk_args, d, 8);
PIN(moe_gate_topk_args, E, 16);
PIN(moe_gate_topk_args, k, 20);
PIN(moe_gate_topk_args, x, 24);
PIN(moe_gate_topk_args, layernorm, 32);
PIN(moe_gate_topk_args, ln_weight, 40);
PIN(moe_gate_topk_args, ln_bias, 48);
PIN(moe_gate_topk_args, ln_eps, 56);
PIN(moe_gate_topk_args, wg, 64);
PIN(moe_gate_topk_args, policy, 72);
PIN(moe_gate_topk_args, seed, 80);
PIN(moe_gate_topk_args, stream, 88);
PIN(moe_gate_topk_args, noise_index, 96);
PIN(moe_gate_topk_args, pad, 104);
PIN(moe_gate_topk_args, expert, 112);
PIN(moe_gate_topk_args, weight, 120);
PIN(moe_gate_topk_args, dt, 128);

/* moe_expert_ffn_args, ops.h (ABI 1.3) */
PIN_SIZE(moe_expert_ffn_args, 160);
PIN(moe_expert_ffn_args, S, 0);
PIN(moe_expert_ffn_args, d, 8);
PIN(moe_expert_ffn_args, f, 16);
PIN(moe_expert_ffn_args, E, 24);
PIN(moe_expert_ffn_args, x, 32);
PIN(moe_expert_ffn_args, layernorm, 40);
PIN(moe_expert_ffn_args, ln_weight, 48);
PIN(moe_expert_ffn_args, ln_bias, 56);
PIN(moe_expert_ffn_args, ln_eps, 64);
PIN(moe_expert_ffn_args, expert, 72);
PIN(moe_expert_ffn_args, weight, 80);
PIN(moe_expert_ffn_args, w1, 88);
PIN(moe_expert_ffn_args, b1, 96);
PIN(moe_expert_ffn_args, w2, 104);
PIN(moe_expert_ffn_args, b2, 112);
PIN(moe_expert_ffn_args, act, 120);
PIN(moe_expert_ffn_args, beta, 124);
PIN(moe_expert_ffn_args, y, 128);
PIN(moe_expert_ffn_args, hidden, 136);
PIN(moe_expert_ffn_args, eout, 144);
PIN(moe_expert_ffn_args, dt, 152);

/* moe_ops, ops.h */
PIN_SIZE(moe_ops, 368);
PIN(moe_ops, fill, 0);
PIN(moe_ops, cast, 8);
PIN(moe_ops, axpby, 16);
PIN(moe_ops, add, 24);
PIN(moe_ops, init_uniform, 32);
PIN(moe_ops, init_normal, 40);
PIN(moe_ops, sum_f32, 48);
PIN(moe_ops, sumsq, 56);
PIN(moe_ops, matmul, 64);
PIN(moe_ops, bias_backward, 72);
PIN(moe_ops, act_forward, 80);
PIN(moe_ops, act_backward, 88);
PIN(moe_ops, dropout_forward, 96);
PIN(moe_ops, dropout_backward, 104);
PIN(moe_ops, layernorm_forward, 112);
PIN(moe_ops, layernorm_backward, 120);
PIN(moe_ops, embedding_forward, 128);
PIN(moe_ops, embedding_backward, 136);
PIN(moe_ops, attention_forward, 144);
PIN(moe_ops, attention_backward, 152);
PIN(moe_ops, cross_entropy, 160);
PIN(moe_ops, route_workspace_bytes, 168);
PIN(moe_ops, route_forward, 176);
PIN(moe_ops, route_backward, 184);
PIN(moe_ops, dispatch_forward, 192);
PIN(moe_ops, dispatch_backward, 200);
PIN(moe_ops, combine_forward, 208);
PIN(moe_ops, combine_backward, 216);
PIN(moe_ops, adam_step, 224);
PIN(moe_ops, sgd_step, 232);
PIN(moe_ops, embedding_at_forward, 240); /* 1.3 */
PIN(moe_ops, rowlinear_forward, 248); /* 1.3 */
PIN(moe_ops, attention_decode, 256); /* 1.3 */
PIN(moe_ops, gate_topk_forward, 264); /* 1.3 */
PIN(moe_ops, expert_ffn_forward, 272); /* 1.3 */
PIN(moe_ops, logits_stats, 280); /* 1.3 */
PIN(moe_ops, graph_begin, 288); /* 1.3 */
PIN(moe_ops, graph_end, 296); /* 1.3 */
PIN(moe_ops, graph_launch, 304); /* 1.3 */
PIN(moe_ops, graph_destroy, 312); /* 1.3 */
PIN(moe_ops, dispatch_wide_forward, 320); /* 1.4 */
PIN(moe_ops, dispatch_wide_backward, 328); /* 1.4 */
PIN(moe_ops, combine_wide_forward, 336); /* 1.4 */
PIN(moe_ops, combine_wide_backward, 344); /* 1.4 */
PIN(moe_ops, expert_rows, 352); /* 1.5 */
PIN(moe_ops, grouped_matmul, 360); /* 1.5 */

/* moe_grouped_matmul_args, ops.h (1.5) */
PIN_SIZE(moe_grouped_matmul_args, 152);
PIN(moe_grouped_matmul_args, trans_a, 0);
PIN(moe_grouped_matmul_args, trans_b, 4);
PIN(moe_grouped_matmul_args, groups, 8);
PIN(moe_grouped_matmul_args, rows, 16);
PIN(moe_grouped_matmul_args, rows_total, 24);
PIN(moe_grouped_matmul_args, m, 32);
PIN(moe_grouped_matmul_args, n, 40);
PIN(moe_grouped_matmul_args, k, 48);
PIN(moe_grouped_matmul_args, alpha, 56);
PIN(moe_grouped_matmul_args, beta, 60);
PIN(moe_grouped_matmul_args, a, 64);
PIN(moe_grouped_matmul_args, lda, 72);
PIN(moe_grouped_matmul_args, b, 80);
PIN(moe_grouped_matmul_args, ldb, 88);
PIN(moe_grouped_matmul_args, c, 96);
PIN(moe_grouped_matmul_args, ldc, 104);
PIN(moe_grouped_matmul_args, dtype, 112);
PIN(moe_grouped_matmul_args, epilogue, 116);
PIN(moe_grouped_matmul_args, bias, 120);
PIN(moe_grouped_matmul_args, aux, 128);
PIN(moe_grouped_matmul_args, act, 136);
PIN(moe_grouped_matmul_args, dbias, 144);

/* moe_option, plugin.h */
PIN_SIZE(moe_option, 56);
PIN(moe_option, name, 0);
PIN(moe_option, type, 8);
PIN(moe_option, default_value, 16);
PIN(moe_option, help, 24);
PIN(moe_option, min, 32);
PIN(moe_option, max, 40);
PIN(moe_option, choices, 48);

/* moe_param_def, plugin.h */
PIN_SIZE(moe_param_def, 48);
PIN(moe_param_def, name, 0);
PIN(moe_param_def, ndim, 8);
PIN(moe_param_def, shape, 16);
PIN(moe_param_def, init, 32);
PIN(moe_param_def, a, 36);
PIN(moe_param_def, zero_row, 40);

/* moe_mem_stats, plugin.h */
PIN_SIZE(moe_mem_stats, 40);
PIN(moe_mem_stats, allocated, 0);
PIN(moe_mem_stats, peak_allocated, 8);
PIN(moe_mem_stats, reserved, 16);
PIN(moe_mem_stats, peak_reserved, 24);
PIN(moe_mem_stats, total, 32);

/* moe_backend_ops, plugin.h */
PIN_SIZE(moe_backend_ops, 144);
PIN(moe_backend_ops, create, 0);
PIN(moe_backend_ops, destroy, 8);
PIN(moe_backend_ops, available, 16);
PIN(moe_backend_ops, alloc, 24);
PIN(moe_backend_ops, free, 32);
PIN(moe_backend_ops, copy_to_host, 40);
PIN(moe_backend_ops, copy_from_host, 48);
PIN(moe_backend_ops, copy, 56);
PIN(moe_backend_ops, synchronize, 64);
PIN(moe_backend_ops, memory_stats, 72);
PIN(moe_backend_ops, reset_peak, 80);
PIN(moe_backend_ops, ops, 88);
PIN(moe_backend_ops, native_stream, 96);
PIN(moe_backend_ops, timer_mark, 104); /* 1.3 */
PIN(moe_backend_ops, timer_elapsed_ms, 112); /* 1.3 */
PIN(moe_backend_ops, timer_free, 120); /* 1.3 */
PIN(moe_backend_ops, ops_size, 128); /* 1.3 */
PIN(moe_backend_ops, side_stream, 136); /* 1.6 */

/* moe_comm_ops, plugin.h */
PIN_SIZE(moe_comm_ops, 120);
PIN(moe_comm_ops, init, 0);
PIN(moe_comm_ops, destroy, 8);
PIN(moe_comm_ops, rank, 16);
PIN(moe_comm_ops, world, 24);
PIN(moe_comm_ops, group_create, 32);
PIN(moe_comm_ops, all_reduce, 40);
PIN(moe_comm_ops, reduce_scatter, 48);
PIN(moe_comm_ops, all_gather, 56);
PIN(moe_comm_ops, all_to_all, 64);
PIN(moe_comm_ops, all_to_allv, 72);
PIN(moe_comm_ops, broadcast, 80);
PIN(moe_comm_ops, barrier, 88);
PIN(moe_comm_ops, all_gather_start, 96); /* 1.1 */
PIN(moe_comm_ops, reduce_scatter_start, 104); /* 1.1 */
PIN(moe_comm_ops, wait, 112); /* 1.1 */

/* moe_host, plugin.h */
PIN_SIZE(moe_host, 256);
PIN(moe_host, size, 0);
PIN(moe_host, log, 8);
PIN(moe_host, error, 16);
PIN(moe_host, opt_set, 24);
PIN(moe_host, opt_int, 32);
PIN(moe_host, opt_float, 40);
PIN(moe_host, opt_flag, 48);
PIN(moe_host, opt_str, 56);
PIN(moe_host, opt_floats, 64);
PIN(moe_host, backend, 72);
PIN(moe_host, ctx, 80);
PIN(moe_host, ops, 88);
PIN(moe_host, act_dtype, 96);
PIN(moe_host, grad_dtype, 100);
PIN(moe_host, unit_add, 104);
PIN(moe_host, param_add, 112);
PIN(moe_host, param_data, 120);
PIN(moe_host, grad_data, 128);
PIN(moe_host, unit_data, 136);
PIN(moe_host, unit_grad, 144);
PIN(moe_host, unit_gather, 152);
PIN(moe_host, unit_release, 160);
PIN(moe_host, seed, 168);
PIN(moe_host, step_seed, 176);
PIN(moe_host, rank, 184);
PIN(moe_host, world, 188);
PIN(moe_host, comm_ops, 192);
PIN(moe_host, comm, 200);
PIN(moe_host, gate_ops, 208);
PIN(moe_host, unit_prefetch, 216); /* 1.1 */
PIN(moe_host, expert_grad_scale, 224); /* 1.2 */
PIN(moe_host, padding_idx, 228); /* 1.3 */
PIN(moe_host, plan, 232); /* 1.4 */
PIN(moe_host, plan_experts, 240); /* 1.4 */
PIN(moe_host, unit_grad_ready, 248); /* 1.6 */

/* moe_parallel_plan, plugin.h (1.4) */
PIN_SIZE(moe_parallel_plan, 72);
PIN(moe_parallel_plan, world, 0);
PIN(moe_parallel_plan, rank, 4);
PIN(moe_parallel_plan, experts, 8);
PIN(moe_parallel_plan, local_experts, 12);
PIN(moe_parallel_plan, local_ids, 16);
PIN(moe_parallel_plan, a2a_world, 24);
PIN(moe_parallel_plan, a2a_group, 32);
PIN(moe_parallel_plan, replicas, 40);
PIN(moe_parallel_plan, replica_group, 48);
PIN(moe_parallel_plan, fully_sharded, 56);
PIN(moe_parallel_plan, shards, 60);
PIN(moe_parallel_plan, expert_grad_scale, 64);

/* moe_batch, plugin.h */
PIN_SIZE(moe_batch, 48);
PIN(moe_batch, B, 0);
PIN(moe_batch, T, 8);
PIN(moe_batch, src, 16);
PIN(moe_batch, tgt, 24);
PIN(moe_batch, ntokens, 32);
PIN(moe_batch, nsentences, 40);

/* moe_task_ops, plugin.h */
PIN_SIZE(moe_task_ops, 72);
PIN(moe_task_ops, init, 0);
PIN(moe_task_ops, destroy, 8);
PIN(moe_task_ops, vocab_size, 16);
PIN(moe_task_ops, padding_idx, 24);
PIN(moe_task_ops, num_batches, 32);
PIN(moe_task_ops, get_batch, 40);
PIN(moe_task_ops, free_batch, 48);
PIN(moe_task_ops, set_epoch, 56); /* 1.2 */
PIN(moe_task_ops, max_batch, 64); /* 1.2 */

/* moe_fwd_out, plugin.h */
PIN_SIZE(moe_fwd_out, 56);
PIN(moe_fwd_out, logits, 0);
PIN(moe_fwd_out, N, 8);
PIN(moe_fwd_out, V, 16);
PIN(moe_fwd_out, n_moe_layers, 24);
PIN(moe_fwd_out, l_aux, 32);
PIN(moe_fwd_out, metrics, 40);
PIN(moe_fwd_out, gate_metrics, 48); /* 1.4 */

/* moe_model_info, plugin.h */
PIN_SIZE(moe_model_info, 64);
PIN(moe_model_info, num_layers, 0);
PIN(moe_model_info, embed_dim, 8);
PIN(moe_model_info, ffn_dim, 16);
PIN(moe_model_info, heads, 24);
PIN(moe_model_info, num_moe_layers, 32);
PIN(moe_model_info, experts, 40);
PIN(moe_model_info, local_experts, 48);
PIN(moe_model_info, flops_per_token, 56);

/* moe_arch_ops, plugin.h */
PIN_SIZE(moe_arch_ops, 80);
PIN(moe_arch_ops, build, 0);
PIN(moe_arch_ops, destroy, 8);
PIN(moe_arch_ops, info, 16);
PIN(moe_arch_ops, setup, 24);
PIN(moe_arch_ops, forward, 32);
PIN(moe_arch_ops, backward, 40);
PIN(moe_arch_ops, decode_setup, 48); /* 1.3 */
PIN(moe_arch_ops, decode_step, 56); /* 1.3 */
PIN(moe_arch_ops, decode_reset, 64); /* 1.3 */
PIN(moe_arch_ops, moe_gate, 72); /* 1.4 */

/* moe_gate_ops, plugin.h */
PIN_SIZE(moe_gate_ops, 64);
PIN(moe_gate_ops, init, 0);
PIN(moe_gate_ops, destroy, 8);
PIN(moe_gate_ops, configure, 16);
PIN(moe_gate_ops, forward, 24);
PIN(moe_gate_ops, backward, 32);
PIN(moe_gate_ops, log_fields, 40); /* 1.4 */
PIN(moe_gate_ops, update, 48); /* 1.4 */
PIN(moe_gate_ops, state, 56); /* 1.4 */

/* moe_crit_in, plugin.h */
PIN_SIZE(moe_crit_in, 48);
PIN(moe_crit_in, fwd, 0);
PIN(moe_crit_in, targets, 8);
PIN(moe_crit_in, sample_size, 16);
PIN(moe_crit_in, grad_scale, 24);
PIN(moe_crit_in, stats, 32);
PIN(moe_crit_in, scratch, 40);

/* moe_criterion_ops, plugin.h */
PIN_SIZE(moe_criterion_ops, 24);
PIN(moe_criterion_ops, init, 0);
PIN(moe_criterion_ops, destroy, 8);
PIN(moe_criterion_ops, compute, 16);

/* moe_opt_tensor, plugin.h */
PIN_SIZE(moe_opt_tensor, 56);
PIN(moe_opt_tensor, param, 0);
PIN(moe_opt_tensor, param_dtype, 8);
PIN(moe_opt_tensor, param_copy, 16);
PIN(moe_opt_tensor, copy_dtype, 24);
PIN(moe_opt_tensor, grad, 32);
PIN(moe_opt_tensor, grad_dtype, 40);
PIN(moe_opt_tensor, n, 48);

/* moe_opt_state_layout, plugin.h (ABI 1.3) */
PIN_SIZE(moe_opt_state_layout, 112);
PIN(moe_opt_state_layout, fields, 0);
PIN(moe_opt_state_layout, field_dtype, 4);
PIN(moe_opt_state_layout, field_scale, 20);
PIN(moe_opt_state_layout, field_name, 40);
PIN(moe_opt_state_layout, scalars, 72);
PIN(moe_opt_state_layout, scalar_name, 80);

/* moe_optimizer_ops, plugin.h */
PIN_SIZE(moe_optimizer_ops, 72);
PIN(moe_optimizer_ops, init, 0);
PIN(moe_optimizer_ops, destroy, 8);
PIN(moe_optimizer_ops, step, 16);
PIN(moe_optimizer_ops, state_bytes_per_param, 24);
PIN(moe_optimizer_ops, state_bytes, 32); /* 1.2 */
PIN(moe_optimizer_ops, save_state, 40); /* 1.2 */
PIN(moe_optimizer_ops, load_state, 48); /* 1.2 */
PIN(moe_optimizer_ops, state_layout, 56); /* 1.3 */
PIN(moe_optimizer_ops, step_range, 64); /* 1.6 */

/* moe_lr_scheduler_ops, plugin.h */
PIN_SIZE(moe_lr_scheduler_ops, 24);
PIN(moe_lr_scheduler_ops, init, 0);
PIN(moe_lr_scheduler_ops, destroy, 8);
PIN(moe_lr_scheduler_ops, lr_at, 16);

/* moe_normalizer_ops, plugin.h */
PIN_SIZE(moe_normalizer_ops, 8);
PIN(moe_normalizer_ops, divisor, 0);

/* moe_plugin_desc, plugin.h */
PIN_SIZE(moe_plugin_desc, 88);
PIN(moe_plugin_desc, abi_major, 0);
PIN(moe_plugin_desc, abi_minor, 4);
PIN(moe_plugin_desc, desc_size, 8);
PIN(moe_plugin_desc, host_size, 12);
PIN(moe_plugin_desc, ops_size, 16);
PIN(moe_plugin_desc, kind, 20);
PIN(moe_plugin_desc, name, 24);
PIN(moe_plugin_desc, version, 32);
PIN(moe_plugin_desc, description, 40);
PIN(moe_plugin_desc, options, 48);
PIN(moe_plugin_desc, n_options, 56);
PIN(moe_plugin_desc, load, 64);
PIN(moe_plugin_desc, unload, 72);
PIN(moe_plugin_desc, ops, 80);
#else
#define ABI_PINNED 0
#endif

static void test_abi_layout_pinned(void **state)
{
    (void)state;
    if (!ABI_PINNED) {
        printf("layouts are pinned for LP64 Linux only; not checked on this platform\n");
        skip();
    }
    /* the static assertions above are the check; this records it ran */
    assert_int_equal(MOE_ABI_MAJOR, 1);
}

/* ------------------------------------------------------------- loading */

static moe_registry *open_fixtures(void)
{
    moe_registry *r = NULL;
    setenv("MOE_PLUGIN_PATH", "", 1);
    moe_error_clear();
    assert_int_equal(moe_registry_create(ABI_FIXTURES, &r), MOE_OK);
    return r;
}

static void assert_contains(const char *text, const char *needle)
{
    if (!strstr(text, needle)) {
        print_error("expected to find\n  \"%s\"\nin\n  \"%s\"\n", needle, text);
        fail();
    }
}

/* The fixture is refused with a message that names it and says `why`. */
static void expect_refused(moe_plugin_kind kind, const char *name, const char *why)
{
    moe_registry *r = open_fixtures();
    const moe_plugin_desc *d = NULL;
    assert_int_equal(moe_registry_load(r, kind, name, &d), MOE_ERR_PLUGIN);
    assert_null(d);
    char file[256];
    snprintf(file, sizeof file, "libmoe-%s-%s.so", moe_kind_name(kind), name);
    assert_contains(moe_error_message(), file);
    assert_contains(moe_error_message(), why);
    moe_error_clear();
    moe_registry_destroy(r);
}

/* A 1.0 communicator: its 1.0 collectives are there, the 1.1 start ops and
 * wait read as NULL (the fixture's own are poisoned), and the core's
 * defaults run the blocking collectives in their place. */
static void test_abi_loads_1_0_communicator(void **state)
{
    (void)state;
    moe_registry *r = open_fixtures();
    const moe_plugin_desc *d = NULL;
    assert_int_equal(moe_registry_load(r, MOE_KIND_COMMUNICATOR, "fixture_abi_1_0", &d), MOE_OK);
    assert_int_equal(d->abi_minor, 0);
    assert_int_equal(d->ops_size, sizeof(moe_comm_ops));
    const moe_comm_ops *o = d->ops;
    assert_non_null(o->barrier);
    assert_int_equal(o->world(NULL), 1);
    assert_null(o->all_gather_start);
    assert_null(o->reduce_scatter_start);
    assert_null(o->wait);

    float send[4] = {1.5f, -2.0f, 3.25f, 4.0f}, recv[4] = {0};
    moe_comm_req *req = (moe_comm_req *)send; /* must come back NULL */
    assert_int_equal(moe_comm_start_all_gather(o, NULL, NULL, recv, send, 4, MOE_F32, &req), MOE_OK);
    assert_null(req);
    assert_memory_equal(recv, send, sizeof send);
    assert_int_equal(moe_comm_wait(o, NULL, req), MOE_OK);

    float reduced[4] = {0};
    req = (moe_comm_req *)send;
    assert_int_equal(
        moe_comm_start_reduce_scatter(o, NULL, NULL, reduced, send, 4, MOE_F32, MOE_REDUCE_SUM, &req), MOE_OK);
    assert_null(req);
    assert_memory_equal(reduced, send, sizeof send);
    assert_int_equal(moe_comm_wait(o, NULL, req), MOE_OK);
    moe_registry_destroy(r);
}

/* A 1.0 backend: no timers, no ops_size, so its moe_ops is the 1.0 ops; the
 * decoding ops past them (one poisoned in the fixture) read as NULL. The
 * table the registry hands out is whole-size and says so. */
static void test_abi_loads_1_0_backend(void **state)
{
    (void)state;
    moe_registry *r = open_fixtures();
    const moe_plugin_desc *d = NULL;
    assert_int_equal(moe_registry_load(r, MOE_KIND_BACKEND, "fixture_abi_1_0", &d), MOE_OK);
    const moe_backend_ops *be = d->ops;
    assert_non_null(be->native_stream);
    assert_null(be->timer_mark);
    assert_null(be->timer_elapsed_ms);
    assert_null(be->timer_free);
    assert_int_equal(be->ops_size, sizeof(moe_ops));
    assert_non_null(be->ops);
    assert_null(be->ops->logits_stats);
    assert_null(be->ops->graph_begin);
    float x[3] = {0};
    assert_int_equal(be->ops->fill(NULL, x, MOE_F32, 3, 2.5f), MOE_OK);
    assert_true(x[0] == 2.5f && x[2] == 2.5f);
    moe_registry_destroy(r);
}

static void test_abi_refuses_newer_minor(void **state)
{
    (void)state;
    char why[128];
    snprintf(why, sizeof why, "built against moelm ABI %d.%d, this moelm is %d.%d", MOE_ABI_MAJOR, MOE_ABI_MINOR + 1,
             MOE_ABI_MAJOR, MOE_ABI_MINOR);
    expect_refused(MOE_KIND_COMMUNICATOR, "fixture_abi_newer", why);
}

static void test_abi_refuses_larger_host(void **state)
{
    (void)state;
    char why[256];
    snprintf(why, sizeof why,
             "expected host services of at most %zu bytes (moe_host of moelm ABI %d.%d), found %zu: the plugin "
             "(ABI %d.%d) was built against newer headers",
             sizeof(moe_host), MOE_ABI_MAJOR, MOE_ABI_MINOR, sizeof(moe_host) + sizeof(void *), MOE_ABI_MAJOR,
             MOE_ABI_MINOR);
    expect_refused(MOE_KIND_COMMUNICATOR, "fixture_abi_long_host", why);
}

static void test_abi_refuses_backend_ops_size(void **state)
{
    (void)state;
    expect_refused(MOE_KIND_BACKEND, "fixture_abi_ops_zero", "expected moe_backend_ops.ops_size to be "
                                                             "sizeof(moe_ops), found 0");
    char why[256];
    snprintf(why, sizeof why, "expected a compute ops table of at most %zu bytes (moe_ops of moelm ABI %d.%d), "
             "found %zu", sizeof(moe_ops), MOE_ABI_MAJOR, MOE_ABI_MINOR, sizeof(moe_ops) + sizeof(void *));
    expect_refused(MOE_KIND_BACKEND, "fixture_abi_ops_long", why);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_abi_layout_pinned),
        cmocka_unit_test(test_abi_loads_1_0_communicator),
        cmocka_unit_test(test_abi_loads_1_0_backend),
        cmocka_unit_test(test_abi_refuses_newer_minor),
        cmocka_unit_test(test_abi_refuses_larger_host),
        cmocka_unit_test(test_abi_refuses_backend_ops_size),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
