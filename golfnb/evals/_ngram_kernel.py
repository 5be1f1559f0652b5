"""C source of the causal n-gram hint kernel, kept as a string so the single-file submission packer can
inline it next to the Python that compiles it (golfnb.evals.ngram builds and loads it lazily).

The hash constants live here once, as Python integers, and are substituted into the C text; the
Python reference in golfnb.evals.ngram reads the same `HASH` dict, so the two implementations cannot
drift apart silently (tests/test_ngram.py compares them element for element).

Semantics (the docstring of golfnb.evals.ngram is the full statement): for each target index p >= 1 the
kernel emits (hint, beta) from tables built on v[0..p-1] only, then folds v[p] into the tables.
Hashing: a context of k tokens is folded with `step` from the nearest token backwards and finished
with the murmur3 64-bit finaliser (`fmix`); every table key is a full 64-bit hash (0 = empty slot,
remapped to 1), slots are `key & mask` with linear probing over at most PROBES slots.
"""
from __future__ import annotations

__all__ = ["HASH", "PROBES", "AHEAD", "MAX_ORDER", "KERNEL_SOURCE", "KERNEL_SYMBOL"]

# Odd 64-bit multipliers and salts (golden ratio, murmur3 fmix, wyhash primes).
HASH: dict[str, int] = {
    "STEP_MUL": 0x9E3779B97F4A7C15,
    "STEP_SHIFT": 29,
    "FMIX_MUL1": 0xFF51AFD7ED558CCD,
    "FMIX_MUL2": 0xC4CEB9FE1A85EC53,
    "PAIR_MUL": 0xD6E8FEB86659FD93,
    "ORDER_SALT": 0xA0761D6478BD642F,
    "LEN_SALT": 0xE7037ED1A0B428DB,
    "TOKEN_SEED": 0x8EBC6AF09C88C6E3,
    "WORD_SEED": 0x589965CC75374CC3,
    "WORDCTX_SEED": 0x1D8E4E27C47D124F,
}
PROBES = 256  # linear-probe limit; an insert that finds no slot within it is dropped (and counted)
AHEAD = 16  # prefetch distance in tokens for the token-expert context slots
AHEAD2 = 8  # distance of the second stage (pair slots, only where the update will need one)
MAX_ORDER = 32
KERNEL_SYMBOL = "golfnb_ngram_precompute"

_TEMPLATE = r"""
/* golfnb causal n-gram hint kernel (C99, no dependencies). Generated from golfnb/evals/_ngram_kernel.py.
 * Idea and gates from the n-gram tilt of PR #1420 / #1514; tables, hashing and the causal gating of the
 * word experts are golfnb's own. */
#if !defined(_DEFAULT_SOURCE)
#define _DEFAULT_SOURCE 1   /* MAP_ANONYMOUS and MADV_HUGEPAGE under -std=c99 */
#endif
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#define NG_STEP_MUL   0x%(STEP_MUL)016xULL
#define NG_STEP_SHIFT %(STEP_SHIFT)d
#define NG_FMIX_MUL1  0x%(FMIX_MUL1)016xULL
#define NG_FMIX_MUL2  0x%(FMIX_MUL2)016xULL
#define NG_PAIR_MUL   0x%(PAIR_MUL)016xULL
#define NG_ORDER_SALT 0x%(ORDER_SALT)016xULL
#define NG_LEN_SALT   0x%(LEN_SALT)016xULL
#define NG_TOKEN_SEED 0x%(TOKEN_SEED)016xULL
#define NG_WORD_SEED  0x%(WORD_SEED)016xULL
#define NG_WORDCTX_SEED 0x%(WORDCTX_SEED)016xULL
#define NG_PROBES %(PROBES)d
#define NG_AHEAD %(AHEAD)d
#define NG_AHEAD2 %(AHEAD2)d
#define NG_RING 64          /* power of two > NG_AHEAD */
#define NG_MAX_ORDER %(MAX_ORDER)d
#define NG_BEST_MAX 65535u

#if defined(__GNUC__) || defined(__clang__)
#define NG_PREFETCH(p) __builtin_prefetch((p), 1, 3)
#define NG_LIKELY(x) __builtin_expect(!!(x), 1)
#else
#define NG_PREFETCH(p) ((void)0)
#define NG_LIKELY(x) (x)
#endif

/* A context slot: 16 bytes, four to a cache line. */
typedef struct { uint64_t key; uint32_t count; uint16_t best_tok; uint16_t best_count; } ng_ctx;
/* A (context, next token) slot. */
typedef struct { uint64_t key; uint32_t count; uint32_t pad; } ng_pair;

typedef struct { void *mem; size_t bytes; int mapped; } ng_block;

static int ng_alloc(ng_block *b, size_t bytes) {
    b->mem = NULL; b->bytes = bytes; b->mapped = 0;
#if defined(__linux__) && defined(MAP_ANONYMOUS)
    if (bytes >= ((size_t)1 << 21)) {
        void *m = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m != MAP_FAILED) {
#ifdef MADV_HUGEPAGE
            /* 2 MiB pages: the probes are random over GiBs, 4 KiB pages would miss the TLB on each. */
            madvise(m, bytes, MADV_HUGEPAGE);
#endif
            b->mem = m; b->mapped = 1;
            return 0;
        }
    }
#endif
    b->mem = calloc(1, bytes);
    return b->mem ? 0 : -1;
}

static void ng_free(ng_block *b) {
    if (!b->mem) return;
#if defined(__linux__) && defined(MAP_ANONYMOUS)
    if (b->mapped) { munmap(b->mem, b->bytes); b->mem = NULL; return; }
#endif
    free(b->mem);
    b->mem = NULL;
}

static inline uint64_t ng_step(uint64_t h, uint64_t x) {
    h = (h ^ (x + 1u)) * NG_STEP_MUL;
    return h ^ (h >> NG_STEP_SHIFT);
}

static inline uint64_t ng_fmix(uint64_t h) {
    h ^= h >> 33; h *= NG_FMIX_MUL1;
    h ^= h >> 33; h *= NG_FMIX_MUL2;
    h ^= h >> 33;
    return h ? h : 1u;
}

static inline uint64_t ng_pair_key(uint64_t ctx_key, int32_t tok) {
    return ng_fmix(ctx_key ^ ((uint64_t)(tok + 1) * NG_PAIR_MUL));
}

static inline ng_ctx *ng_ctx_get(ng_ctx *tab, uint64_t mask, uint64_t key) {
    uint64_t s = key & mask;
    for (int i = 0; i < NG_PROBES; ++i) {
        ng_ctx *e = &tab[(s + (uint64_t)i) & mask];
        if (NG_LIKELY(e->key == key)) return e;
        if (e->key == 0) { e->key = key; return e; }
    }
    return NULL;
}

/* Pair tables start small and double (rehash) as they fill, up to the context table's size: with the
 * update rule below only non-best continuations of seen contexts ever reach them. */
typedef struct { ng_block b; ng_pair *e; uint64_t mask, used, max_slots; } ng_ptab;

static inline ng_pair *ng_pair_get(ng_ptab *pt, uint64_t key) {
    uint64_t s = key & pt->mask;
    for (int i = 0; i < NG_PROBES; ++i) {
        ng_pair *e = &pt->e[(s + (uint64_t)i) & pt->mask];
        if (NG_LIKELY(e->key == key)) return e;
        if (e->key == 0) { e->key = key; pt->used += 1u; return e; }
    }
    return NULL;
}

static int ng_ptab_init(ng_ptab *pt, uint64_t slots, uint64_t max_slots) {
    pt->mask = slots - 1u; pt->used = 0; pt->max_slots = max_slots; pt->e = NULL;
    if (ng_alloc(&pt->b, (size_t)slots * sizeof(ng_pair))) return -1;
    pt->e = (ng_pair *)pt->b.mem;
    return 0;
}

/* Make room for two more inserts: double while more than half full (until max_slots). -1 = no memory. */
static int ng_ptab_reserve(ng_ptab *pt) {
    uint64_t slots = pt->mask + 1u, j;
    ng_ptab nt;
    if ((pt->used + 2u) * 2u <= slots || slots >= pt->max_slots) return 0;
    if (ng_ptab_init(&nt, slots * 2u, pt->max_slots)) return -1;
    for (j = 0; j < slots; ++j) {
        const ng_pair *e = &pt->e[j];
        uint64_t s, i;
        if (e->key == 0) continue;
        for (i = 0, s = e->key & nt.mask; nt.e[(s + i) & nt.mask].key != 0; ++i) {}
        nt.e[(s + i) & nt.mask] = *e;
        nt.used += 1u;
    }
    ng_free(&pt->b);
    *pt = nt;
    return 0;
}

/* Fold the true next token t into context slot c (key ckey) with the #1420 best-token rule:
 *   count += 1; pc(t) += 1; if t == best_tok: best_count += 1 (saturating at 65535)
 *   else if pc(t) > best_count: best_tok = t, best_count = min(pc(t), 65535).
 * Below saturation best_count always equals pc(best_tok), so the pair table need not hold the best
 * token's count: it is written back only when that token is overtaken (or best_count saturates).
 * A context seen for the first time (98%% of updates at orders >= 8 on the validation prefix) and a
 * repeat of the best token then cost no pair-table access at all; the counts are exactly the eager
 * rule's (the Python reference in golfnb.evals.ngram runs the eager rule and must agree).
 * Returns the number of pair inserts dropped (0 or 1). */
static inline int ng_update(ng_ptab *pt, ng_ctx *c, uint64_t ckey, uint64_t pk, int32_t t) {
    ng_pair *pr;
    uint32_t pc;
    if (c->count == 0) {
        c->count = 1; c->best_tok = (uint16_t)t; c->best_count = 1;
        return 0;
    }
    if ((uint32_t)c->best_tok == (uint32_t)t) {
        if (c->best_count < NG_BEST_MAX - 1u) {
            c->best_count += 1u;
        } else {
            pr = ng_pair_get(pt, pk);
            if (pr == NULL) return 1;
            if (c->best_count == NG_BEST_MAX - 1u) { pr->count = NG_BEST_MAX; c->best_count = NG_BEST_MAX; }
            else if (pr->count != UINT32_MAX) pr->count += 1u;
        }
        if (c->count != UINT32_MAX) c->count += 1u;
        return 0;
    }
    pr = ng_pair_get(pt, pk);
    if (pr == NULL) return 1;
    if (c->count != UINT32_MAX) c->count += 1u;
    if (pr->count != UINT32_MAX) pr->count += 1u;
    pc = pr->count;
    if (pc > (uint32_t)c->best_count) {
        int dropped = 0;
        if (c->best_count < NG_BEST_MAX) {   /* the overtaken token's count lived in best_count */
            ng_pair *pb = ng_pair_get(pt, ng_pair_key(ckey, (int32_t)c->best_tok));
            if (pb != NULL) pb->count = c->best_count; else dropped = 1;
        }
        c->best_tok = (uint16_t)t;
        c->best_count = (uint16_t)(pc < NG_BEST_MAX ? pc : NG_BEST_MAX);
        return dropped;
    }
    return 0;
}

/* Read-only probe of the first slots (used to decide a pair prefetch; a miss just skips it). */
static inline const ng_ctx *ng_ctx_peek(const ng_ctx *tab, uint64_t mask, uint64_t key) {
    uint64_t s = key & mask;
    int i;
    for (i = 0; i < 4; ++i) {
        const ng_ctx *e = &tab[(s + (uint64_t)i) & mask];
        if (e->key == key) return e;
        if (e->key == 0) return NULL;
    }
    return NULL;
}

/* Returns 1 and sets *conf when the slot passes (min_count, thr). count >= min_count >= 1 first. */
static inline int ng_gate(const ng_ctx *c, int32_t min_count, double thr, double *conf) {
    double cf;
    if (c == NULL || c->count < (uint32_t)min_count) return 0;
    cf = (double)c->best_count / (double)c->count;
    if (cf < thr) return 0;
    *conf = cf;
    return 1;
}

typedef struct { ng_block cb; ng_ctx *ctx; uint64_t mask; ng_ptab pt; } ng_table;

static int ng_table_init(ng_table *t, int bits) {
    uint64_t slots = (uint64_t)1 << bits;
    uint64_t pslots = slots >> 4 > 1024u ? slots >> 4 : (slots < 1024u ? slots : 1024u);
    memset(t, 0, sizeof *t);
    t->mask = slots - 1u;
    if (ng_alloc(&t->cb, (size_t)slots * sizeof(ng_ctx))) return -1;
    t->ctx = (ng_ctx *)t->cb.mem;
    if (ng_ptab_init(&t->pt, pslots, slots)) { ng_free(&t->cb); t->ctx = NULL; return -1; }
    return 0;
}

static void ng_table_free(ng_table *t) { ng_free(&t->cb); ng_free(&t->pt.b); }

/* Keys of position q (its k-token contexts and its (context, v[q]) pairs) for every active order. */
static inline void ng_keys(const int32_t *tok, int64_t q, int32_t n_orders, const int32_t *orders,
                           uint64_t *ck, uint64_t *pk) {
    uint64_t h = NG_TOKEN_SEED;
    int32_t oi = 0, j;
    int32_t kmax = orders[n_orders - 1];
    if ((int64_t)kmax > q) kmax = (int32_t)q;
    for (j = 1; j <= kmax; ++j) {
        h = ng_step(h, (uint64_t)(uint32_t)tok[q - j]);
        if (j == orders[oi]) {
            ck[oi] = ng_fmix(h ^ ((uint64_t)j * NG_ORDER_SALT));
            pk[oi] = ng_pair_key(ck[oi], tok[q]);
            ++oi;
        }
    }
}

/* stats: [0] token-context inserts dropped, [1] token-pair inserts dropped,
 *        [2] word-expert inserts dropped, [3] positions given a hint. Returns 0, -1 (out of memory),
 *        -2 (bad arguments). */
int64_t golfnb_ngram_precompute(
    const int32_t *tok, int64_t n,
    int32_t n_orders, const int32_t *orders, const double *thr, const int32_t *min_count,
    int32_t token_bits, double base_beta, double agree_bonus,
    const uint8_t *is_boundary, const uint8_t *leading_space, int64_t lut_size,
    double within_beta, double within_thr, int32_t within_min_count, int32_t within_bits,
    double word_beta, double word_thr, int32_t word_min_count, int32_t word_bits,
    int32_t *out_hint, float *out_beta, int64_t *stats)
{
    ng_table tt[NG_MAX_ORDER];
    ng_table wt, dt;                     /* within-word and word-context tables */
    uint64_t ring_c[NG_RING][NG_MAX_ORDER], ring_p[NG_RING][NG_MAX_ORDER];
    ng_ctx *ent[NG_MAX_ORDER];
    int use_tok = (base_beta > 0.0) && n_orders > 0;
    int use_in = within_beta > 0.0;
    int use_wd = word_beta > 0.0;
    int use_words = use_in || use_wd;
    int32_t n_tab = 0, i;
    int64_t p, rc = 0;
    /* word state after v[0..p-1]: current word prefix hash and length, the 3 previous words */
    uint64_t cur = 0, hist[3] = {0, 0, 0};
    int32_t cur_len = 0, n_hist = 0;

    for (i = 0; i < 4; ++i) stats[i] = 0;
    for (p = 0; p < n; ++p) { out_hint[p] = -1; out_beta[p] = 0.0f; }
    if (n <= 1) return 0;
    if (n_orders < 0 || n_orders > NG_MAX_ORDER) return -2;
    for (i = 0; i < n_orders; ++i)
        if (orders[i] < 1 || orders[i] > NG_MAX_ORDER || (i && orders[i] <= orders[i - 1]) || min_count[i] < 1)
            return -2;
    if (use_words && (is_boundary == NULL || leading_space == NULL)) return -2;
    if ((use_in && within_min_count < 1) || (use_wd && word_min_count < 1)) return -2;
    if (!use_tok && !use_words) return 0;

    memset(&wt, 0, sizeof wt); memset(&dt, 0, sizeof dt);   /* mem = NULL: safe to free */
    if (use_tok) {
        for (n_tab = 0; n_tab < n_orders; ++n_tab)
            if (ng_table_init(&tt[n_tab], token_bits)) { rc = -1; goto done; }
    }
    if (use_in && ng_table_init(&wt, within_bits)) { rc = -1; goto done; }
    if (use_wd && ng_table_init(&dt, word_bits)) { rc = -1; goto done; }

    if (use_tok) {
        int64_t q;
        for (q = 0; q < NG_AHEAD && q < n; ++q)
            ng_keys(tok, q, n_orders, orders, ring_c[q & (NG_RING - 1)], ring_p[q & (NG_RING - 1)]);
    }

    for (p = 0; p < n; ++p) {
        int32_t t = tok[p];
        int32_t ch[3]; double cb[3]; int nc = 0;
        int32_t n_av = 0;               /* orders with k <= p */
        uint64_t *ck = NULL, *pk = NULL;
        uint64_t in_key = 0, wd_key = 0;
        ng_ctx *in_e = NULL, *wd_e = NULL;

        if (use_tok) {
            int64_t q = p + NG_AHEAD;
            if (q < n) {
                uint64_t *qc = ring_c[q & (NG_RING - 1)], *qp = ring_p[q & (NG_RING - 1)];
                ng_keys(tok, q, n_orders, orders, qc, qp);
                for (i = 0; i < n_orders && orders[i] <= q; ++i)
                    NG_PREFETCH(&tt[i].ctx[qc[i] & tt[i].mask]);
            }
            /* Second stage, closer in: the context slots of r are in cache by now; fetch a pair slot
             * only where the update will need one (seen context, next token not its best). */
            q = p + NG_AHEAD2;
            if (q < n) {
                uint64_t *qc = ring_c[q & (NG_RING - 1)], *qp = ring_p[q & (NG_RING - 1)];
                uint32_t tq = (uint32_t)tok[q];
                for (i = 0; i < n_orders && orders[i] <= q; ++i) {
                    const ng_ctx *e = ng_ctx_peek(tt[i].ctx, tt[i].mask, qc[i]);
                    if (e != NULL && e->count != 0
                        && ((uint32_t)e->best_tok != tq || e->best_count >= NG_BEST_MAX - 1u))
                        NG_PREFETCH(&tt[i].pt.e[qp[i] & tt[i].pt.mask]);
                }
            }
            ck = ring_c[p & (NG_RING - 1)]; pk = ring_p[p & (NG_RING - 1)];
            while (n_av < n_orders && orders[n_av] <= p) ++n_av;
            /* Find-or-insert every available context now; a fresh slot has count 0 and fails every gate
             * (min_count >= 1), so inserting before the lookup equals looking up first. */
            for (i = 0; i < n_av; ++i) {
                ent[i] = ng_ctx_get(tt[i].ctx, tt[i].mask, ck[i]);
                if (ent[i] == NULL) stats[0] += 1;
            }
            if (p >= 1) {
                double conf;
                for (i = n_av - 1; i >= 0; --i) {
                    if (ng_gate(ent[i], min_count[i], thr[i], &conf)) {
                        ch[nc] = (int32_t)ent[i]->best_tok; cb[nc] = base_beta * conf; ++nc;
                        break;
                    }
                }
            }
        }
        if (use_words && cur_len >= 1) {
            /* Gated on v[p-1] only: cur_len >= 1 means v[p-1] exists and is not a boundary token. */
            if (use_in) {
                double conf;
                in_key = ng_fmix(cur ^ ((uint64_t)cur_len * NG_LEN_SALT));
                in_e = ng_ctx_get(wt.ctx, wt.mask, in_key);
                if (in_e == NULL) stats[2] += 1;
                if (ng_gate(in_e, within_min_count, within_thr, &conf)) {
                    ch[nc] = (int32_t)in_e->best_tok; cb[nc] = within_beta; ++nc;
                }
            }
            if (use_wd) {
                double conf;
                uint64_t h = ng_step(NG_WORDCTX_SEED, cur);
                for (i = 0; i < n_hist; ++i) h = ng_step(h, hist[i]);
                wd_key = ng_fmix(h ^ ((uint64_t)(n_hist + 1) * NG_LEN_SALT));
                wd_e = ng_ctx_get(dt.ctx, dt.mask, wd_key);
                if (wd_e == NULL) stats[2] += 1;
                if (ng_gate(wd_e, word_min_count, word_thr, &conf)) {
                    ch[nc] = (int32_t)wd_e->best_tok; cb[nc] = word_beta; ++nc;
                }
            }
        }
        if (nc > 0) {
            int a, b, w = 0;
            double fb[3];
            for (a = 0; a < nc; ++a) {
                fb[a] = cb[a];
                for (b = 0; b < nc; ++b)
                    if (b != a && ch[b] == ch[a]) { fb[a] = cb[a] + agree_bonus; break; }
            }
            for (a = 1; a < nc; ++a) if (fb[a] > fb[w]) w = a;
            out_hint[p] = ch[w];
            out_beta[p] = (float)fb[w];
            stats[3] += 1;
        }

        /* ---- only now is v[p] read into any table ---- */
        if (use_tok) {
            for (i = 0; i < n_av; ++i) {
                if (ent[i] == NULL) continue;
                if (ng_ptab_reserve(&tt[i].pt)) { rc = -1; goto done; }
                stats[1] += ng_update(&tt[i].pt, ent[i], ck[i], pk[i], t);
            }
        }
        if (use_words) {
            if (in_e != NULL) {
                if (ng_ptab_reserve(&wt.pt)) { rc = -1; goto done; }
                stats[2] += ng_update(&wt.pt, in_e, in_key, ng_pair_key(in_key, t), t);
            }
            if (wd_e != NULL) {
                if (ng_ptab_reserve(&dt.pt)) { rc = -1; goto done; }
                stats[2] += ng_update(&dt.pt, wd_e, wd_key, ng_pair_key(wd_key, t), t);
            }
            if ((int64_t)t >= lut_size || is_boundary[t]) {
                cur = 0; cur_len = 0; n_hist = 0;
            } else if (leading_space[t] || cur_len == 0) {
                if (cur_len >= 1) {
                    hist[2] = hist[1]; hist[1] = hist[0]; hist[0] = cur;
                    if (n_hist < 3) ++n_hist;
                }
                cur = ng_step(NG_WORD_SEED, (uint64_t)(uint32_t)t); cur_len = 1;
            } else {
                cur = ng_step(cur, (uint64_t)(uint32_t)t); ++cur_len;
            }
        }
    }

done:
    if (use_tok) for (i = 0; i < n_tab; ++i) ng_table_free(&tt[i]);
    ng_table_free(&wt);
    ng_table_free(&dt);
    return rc;
}
"""

KERNEL_SOURCE: str = _TEMPLATE % {**HASH, "PROBES": PROBES, "AHEAD": AHEAD, "AHEAD2": AHEAD2, "MAX_ORDER": MAX_ORDER}
