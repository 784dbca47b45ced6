/* batching.c: numpy's legacy RNG, fairseq's ordering, size filter,
 * batch_by_size_vec, epoch shuffle and sharding (data/batching.h).
 *
 * The generator is MT19937 as numpy's RandomState runs it: np.random.seed(s)
 * is init_genrand(s) with the next draw regenerating the state, and
 * random_interval draws 32 bits while max fits them, else two 32-bit words
 * (high word first). moe_batch_by_size transcribes data_utils_fast.pyx's
 * loop (the running batch, the tail behind it, and the corner case where the
 * tail alone overflows) rather than the older list-based batch_by_size_fast,
 * whose batches differ.
 */
#include "data/batching.h"

#include <stdlib.h>
#include <string.h>

#include "data/error.h"

/* ------------------------------------------------------------ numpy RNG */

enum { MT_N = 624, MT_M = 397 };

void moe_np_seed(moe_np_rng *r, uint32_t seed)
{
    r->mt[0] = seed;
    for (int i = 1; i < MT_N; i++)
        r->mt[i] = 1812433253u * (r->mt[i - 1] ^ (r->mt[i - 1] >> 30)) + (uint32_t)i;
    r->pos = MT_N;
}

static void mt_generate(moe_np_rng *r)
{
    uint32_t *mt = r->mt;
    for (int k = 0; k < MT_N; k++) {
        uint32_t y = (mt[k] & 0x80000000u) | (mt[(k + 1) % MT_N] & 0x7fffffffu);
        mt[k] = mt[(k + MT_M) % MT_N] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
    }
    r->pos = 0;
}

uint32_t moe_np_next_u32(moe_np_rng *r)
{
    if (r->pos >= MT_N)
        mt_generate(r);
    uint32_t y = r->mt[r->pos++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

uint64_t moe_np_interval(moe_np_rng *r, uint64_t max)
{
    if (max == 0)
        return 0;
    uint64_t mask = max;
    mask |= mask >> 1;
    mask |= mask >> 2;
    mask |= mask >> 4;
    mask |= mask >> 8;
    mask |= mask >> 16;
    mask |= mask >> 32;
    uint64_t v;
    if (max <= 0xffffffffu) {
        do
            v = moe_np_next_u32(r) & mask;
        while (v > max);
    } else {
        do {
            uint64_t hi = moe_np_next_u32(r);
            v = ((hi << 32) | moe_np_next_u32(r)) & mask;
        } while (v > max);
    }
    return v;
}

void moe_np_shuffle(moe_np_rng *r, int64_t *x, int64_t n)
{
    for (int64_t i = n - 1; i >= 1; i--) {
        int64_t j = (int64_t)moe_np_interval(r, (uint64_t)i);
        int64_t t = x[i];
        x[i] = x[j];
        x[j] = t;
    }
}

void moe_np_permutation(moe_np_rng *r, int64_t *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = i;
    moe_np_shuffle(r, x, n);
}

/* ------------------------------------------------------------ ordering */

/* Stable merge sort of ids x[0..n) by key[id]; tmp holds n. */
static void sort_by_key(int64_t *x, int64_t *tmp, int64_t n, const int64_t *key)
{
    for (int64_t w = 1; w < n; w *= 2) {
        for (int64_t lo = 0; lo < n; lo += 2 * w) {
            int64_t mid = lo + w < n ? lo + w : n, hi = lo + 2 * w < n ? lo + 2 * w : n;
            int64_t a = lo, b = mid, o = lo;
            while (a < mid && b < hi)
                tmp[o++] = key[x[b]] < key[x[a]] ? x[b++] : x[a++];
            while (a < mid)
                tmp[o++] = x[a++];
            while (b < hi)
                tmp[o++] = x[b++];
        }
        memcpy(x, tmp, (size_t)n * sizeof *x);
    }
}

moe_status moe_order_by_size(const int64_t *sizes, int64_t n, uint32_t seed, int shuffle, int64_t **out)
{
    *out = NULL;
    if (n < 0)
        return moe_data_fail(MOE_ERR_INVALID_ARG, "ordering: %lld samples", (long long)n);
    size_t bytes = (size_t)(n > 0 ? n : 1) * sizeof(int64_t);
    int64_t *x = malloc(bytes), *tmp = malloc(bytes);
    if (!x || !tmp) {
        free(x);
        free(tmp);
        return moe_data_fail(MOE_ERR_NOMEM, "out of host memory ordering %lld samples", (long long)n);
    }
    if (shuffle) {
        /* lexsort([perm, sizes]): by size, then by perm[id]; walking ids in
         * the order of their perm value and sorting stably by size gives it */
        moe_np_rng rng;
        moe_np_seed(&rng, seed);
        moe_np_permutation(&rng, tmp, n);
        for (int64_t i = 0; i < n; i++)
            x[tmp[i]] = i;
    } else {
        for (int64_t i = 0; i < n; i++)
            x[i] = i;
    }
    sort_by_key(x, tmp, n, sizes);
    free(tmp);
    *out = x;
    return MOE_OK;
}

int64_t moe_filter_by_size(int64_t *indices, int64_t n, const int64_t *sizes, int64_t max_positions,
                           int64_t *dropped, int max_report, int64_t *n_dropped)
{
    int64_t kept = 0, gone = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t id = indices[i];
        if (sizes[id] > max_positions) {
            if (dropped && gone < max_report)
                dropped[gone] = id;
            gone++;
        } else {
            indices[kept++] = id;
        }
    }
    if (n_dropped)
        *n_dropped = gone;
    return kept;
}

/* ------------------------------------------------------------ batching */

void moe_batch_list_free(moe_batch_list *b)
{
    if (!b)
        return;
    free(b->offsets);
    free(b->indices);
    memset(b, 0, sizeof *b);
}

moe_status moe_batch_by_size(const int64_t *indices, int64_t n, const int64_t *sizes, int64_t max_tokens,
                             int64_t max_sentences, int64_t multiple, int drop_last, moe_batch_list *out)
{
    memset(out, 0, sizeof *out);
    if (multiple < 1)
        return moe_data_fail(MOE_ERR_INVALID_ARG,
                             "batching: --required-batch-size-multiple %lld, expected 1 or more", (long long)multiple);
    if (n < 0)
        return moe_data_fail(MOE_ERR_INVALID_ARG, "batching: %lld samples", (long long)n);
    if (max_tokens > 0)
        for (int64_t p = 0; p < n; p++)
            if (sizes[indices[p]] > max_tokens)
                return moe_data_fail(MOE_ERR_INVALID_ARG,
                                     "Sentences lengths should not exceed max_tokens=%lld: sample %lld (position %lld "
                                     "of the ordered samples) has %lld tokens; raise --max-tokens or drop longer "
                                     "samples (max positions)",
                                     (long long)max_tokens, (long long)indices[p], (long long)p,
                                     (long long)sizes[indices[p]]);
    size_t cells = (size_t)n + 2;
    int64_t *ends = calloc(cells, sizeof *ends);
    out->offsets = malloc(cells * sizeof *out->offsets);
    out->indices = malloc((size_t)(n > 0 ? n : 1) * sizeof *out->indices);
    if (!ends || !out->offsets || !out->indices) {
        free(ends);
        moe_batch_list_free(out);
        return moe_data_fail(MOE_ERR_NOMEM, "out of host memory batching %lld samples", (long long)n);
    }
    memcpy(out->indices, indices, (size_t)n * sizeof *indices);
    out->offsets[0] = 0;
    if (n == 0) {
        free(ends);
        return MOE_OK;
    }
    /* [batch_start, ends[c]) is the last complete batch, [ends[c], pos] its tail */
    int64_t c = 0, batch_start = 0, tail_max = 0, batch_max = 0;
    for (int64_t pos = 0; pos < n; pos++) {
        int64_t ntok = sizes[indices[pos]];
        if (ntok > tail_max)
            tail_max = ntok;
        int64_t end = pos + 1;
        int64_t new_max = batch_max > tail_max ? batch_max : tail_max;
        int64_t sentences = end - batch_start;
        int overflow = (max_sentences > 0 && sentences > max_sentences) ||
                       (max_tokens > 0 && sentences * new_max > max_tokens);
        int fits = sentences < multiple || sentences % multiple == 0;
        if (overflow) {
            if (max_tokens > 0 && tail_max * (end - ends[c]) > max_tokens) {
                /* the tail alone overflows: it closes before pos, pos starts anew */
                ends[++c] = pos;
                tail_max = ntok;
            }
            batch_start = ends[c];
            c++;
            new_max = tail_max;
        }
        if (overflow || fits) {
            ends[c] = end;
            batch_max = new_max;
            tail_max = 0;
        }
    }
    if (ends[c] != n)
        c++;
    /* np.split(indices, ends[:c]) */
    for (int64_t b = 0; b < c; b++)
        out->offsets[b + 1] = ends[b];
    out->offsets[c + 1] = n;
    out->n = c + 1;
    free(ends);
    if (drop_last && multiple > 1 && (out->offsets[out->n] - out->offsets[out->n - 1]) % multiple != 0)
        out->n--;
    return MOE_OK;
}

/* ------------------------------------------------------------ epochs, shards */

moe_status moe_epoch_batch_order(int64_t nb, uint32_t seed, int64_t epoch, int shuffle, int64_t **order)
{
    *order = NULL;
    if (nb < 0)
        return moe_data_fail(MOE_ERR_INVALID_ARG, "epoch order: %lld batches", (long long)nb);
    int64_t s = (int64_t)seed + epoch;
    if (shuffle && (epoch < -(int64_t)seed || s > (int64_t)UINT32_MAX))
        return moe_data_fail(MOE_ERR_INVALID_ARG,
                             "epoch order: seed %lu + epoch %lld is outside numpy's seed range 0..2^32-1; use a "
                             "smaller --seed",
                             (unsigned long)seed, (long long)epoch);
    int64_t *x = malloc((size_t)(nb > 0 ? nb : 1) * sizeof *x);
    if (!x)
        return moe_data_fail(MOE_ERR_NOMEM, "out of host memory for the order of %lld batches", (long long)nb);
    for (int64_t i = 0; i < nb; i++)
        x[i] = i;
    if (shuffle) {
        moe_np_rng rng;
        moe_np_seed(&rng, (uint32_t)s);
        moe_np_shuffle(&rng, x, nb);
    }
    *order = x;
    return MOE_OK;
}

int64_t moe_shard_count(int64_t nb, int world)
{
    if (world < 1 || nb <= 0)
        return 0;
    return (nb + world - 1) / world;
}

int64_t moe_shard_batch(const int64_t *order, int64_t nb, int world, int rank, int64_t i)
{
    if (world < 1 || rank < 0 || rank >= world || i < 0 || i >= moe_shard_count(nb, world))
        return -1;
    int64_t at = i * world + rank;
    if (at >= nb)
        return -1;
    return order ? order[at] : at;
}
