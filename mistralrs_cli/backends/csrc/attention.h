// What attention.c exports to decoder.c (and, through ctypes, to native.py's AttnSeq).
#pragma once
#include <stdint.h>

typedef struct {
    const float *q;      // this sequence's first query row (row stride ldq)
    int64_t n;           // its query rows
    float *out;          // its first output row (row stride ldo)
    const int64_t *pos;  // their positions
    const void *k, *v;   // its keys / values (nkv, S, hd), f32 or f16, with strides (sh, ss) in elements
    int64_t S, sh, ss;
    const int64_t *span_end;  // NULL, or per query row the last key a bidirectional span (an
                              // image's rows, Gemma 3) lets it see past its own position; -1: none
} attn_seq;

void rope_rows(float *qkv, int64_t T, int64_t ldq, int nq, int nkv, int hd, int rot,
               const float *cos_t, const float *sin_t, const float *qn, const float *kn, float eps);
void attn_batch(const attn_seq *seqs, int nseq, int64_t ldq, int64_t ldo, int nq, int nkv, int hd,
                int64_t window, float scale, float softcap, int n_threads, int kv16);
void kv_store(const attn_seq *seqs, int nseq, int64_t ldq, int nq, int nkv, int hd, int kv16);
