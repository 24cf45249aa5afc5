// Every decoder layer of one forward in one call (backends/native_model.py): the same kernel calls
// native_model.py would make layer by layer, minus the Python between them (a third of a
// 135M model's decode step). Per layer:
//   qkv  = [norm ->] h @ Wqkv (+ bias)                  qmm_parts
//   q, k : per-head norm, rotary                        rope_rows
//   the new keys/values into each sequence's cache      kv_store
//   att  = softmax(q k^T) v                             attn_batch
//   h   += [post-norm] att @ Wo                         qmm_parts (its opts point the residual at h)
//   gu   = [norm ->] h @ W[gate|up]                     qmm_parts
//   h   += [post-norm] act(gate) * up @ Wdown           qmm_parts
#include <stdint.h>

#include "attention.h"

// qmatmul.c's entry point; its parts and opts are passed through untouched
int qmm_parts(const void *parts, int nparts, int64_t k, const float *x, int64_t ldx, int64_t m, float *y,
              int64_t ldy, int n_threads, const void *opts);

#ifdef NATIVE_PROF  // qmatmul.c's timers (scripts/decode_budget.py): roles 1-4 the projections
#include <omp.h>
enum { PROF_QKV = 1, PROF_O, PROF_GU, PROF_DOWN, PROF_ROPE, PROF_KV, PROF_ATTN, PROF_LAYERS };
extern double prof_acc[9][8];
extern int prof_role;
#define PROF_AS(r) (prof_role = (r))
#define PROF_T(r, call) do { const double t_ = omp_get_wtime(); call; prof_acc[r][0] += 1; \
                             prof_acc[r][1] += omp_get_wtime() - t_; } while (0)
#else
#define PROF_AS(r) ((void)0)
#define PROF_T(r, call) call
#endif

// rope_rows over a prompt's rows split across the threads (each row's result is its own: the same
// values whichever thread computes it); a few rows on this thread
static void rope_par(float *qkv, int64_t T, int64_t ldq, int nq, int nkv, int hd, int rot, const float *cos_t,
                     const float *sin_t, const float *qn, const float *kn, float eps, int n_threads) {
    if (T < 16 || n_threads < 2) {
        rope_rows(qkv, T, ldq, nq, nkv, hd, rot, cos_t, sin_t, qn, kn, eps);
        return;
    }
    const int64_t step = 16;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t t0 = 0; t0 < T; t0 += step) {
        const int64_t n = T - t0 < step ? T - t0 : step;
        rope_rows(qkv + t0 * ldq, n, ldq, nq, nkv, hd, rot, cos_t + t0 * rot, sin_t + t0 * rot, qn, kn, eps);
    }
}

typedef struct {
    const void *qkv, *qkv_opts, *o, *o_opts, *gu, *gu_opts, *down, *down_opts;  // plans and qmm_opts
    int qkv_n, o_n, gu_n, down_n;                                                 // parts per plan
    const float *cos_t, *sin_t;  // this forward's rotary tables (T, rot)
    int rot;
    const float *qn, *kn;  // per-head q/k RMSNorm weights, or NULL
    float eps, scale, softcap;
    int64_t window;
} dec_layer;

// kv: per layer, per sequence, the key and value cache addresses (nl x nseq x 2); each sequence's
// S, sh, ss (the same in every layer) are set in seqs. Returns 0, or the failing layer + 1.
int decoder_layers(const dec_layer *L, int nl, attn_seq *seqs, int nseq, const float *const *kv, float *h,
                   float *qkv, float *att, float *gu, float *y, int64_t T, int64_t d, int nq, int nkv, int hd,
                   int64_t gu_rows, int f16, int n_threads) {  // f16: the caches hold f16
    const int64_t ldq = (int64_t)(nq + 2 * nkv) * hd, ldo = (int64_t)nq * hd;
#ifdef NATIVE_PROF
    const double t_all = omp_get_wtime();
#endif
    int failed = 0;
    for (int i = 0; i < nl && !failed; i++) {
        const dec_layer *l = &L[i];
        PROF_AS(PROF_QKV);
        if (qmm_parts(l->qkv, l->qkv_n, d, h, d, T, qkv, ldq, n_threads, l->qkv_opts)) {
            failed = i + 1;
            break;
        }
        PROF_T(PROF_ROPE, rope_par(qkv, T, ldq, nq, nkv, hd, l->rot, l->cos_t, l->sin_t, l->qn, l->kn, l->eps, n_threads));
        for (int s = 0; s < nseq; s++) {
            seqs[s].k = kv[((int64_t)i * nseq + s) * 2];
            seqs[s].v = kv[((int64_t)i * nseq + s) * 2 + 1];
        }
        PROF_T(PROF_KV, kv_store(seqs, nseq, ldq, nq, nkv, hd, f16));
        PROF_T(PROF_ATTN, attn_batch(seqs, nseq, ldq, ldo, nq, nkv, hd, l->window, l->scale, l->softcap, n_threads, f16));
        PROF_AS(PROF_O);
        if (qmm_parts(l->o, l->o_n, ldo, att, ldo, T, y, d, n_threads, l->o_opts)) failed = i + 1;
        PROF_AS(PROF_GU);
        if (!failed && qmm_parts(l->gu, l->gu_n, d, h, d, T, gu, gu_rows, n_threads, l->gu_opts)) failed = i + 1;
        PROF_AS(PROF_DOWN);
        if (!failed && qmm_parts(l->down, l->down_n, gu_rows / 2, gu, gu_rows, T, y, d, n_threads, l->down_opts))
            failed = i + 1;
    }
    PROF_AS(0);
#ifdef NATIVE_PROF
    prof_acc[PROF_LAYERS][0] += 1, prof_acc[PROF_LAYERS][1] += omp_get_wtime() - t_all;
#endif
    return failed;
}
