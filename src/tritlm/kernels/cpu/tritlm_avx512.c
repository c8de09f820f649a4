/*
 * AVX-512 VNNI route for ternary weights (tt_ctx.isa == 2): vpdpbusd multiplies the unsigned
 * 2-bit codes (0..2) by the signed int8 activations and adds groups of 4 products straight into
 * int32 lanes, so there is no int16 stage to saturate and no madd widening. A 64-byte vector holds
 * two rows' 32-byte slices of one 128-weight block (the i2s_r4 layout keeps a group's 4 rows
 * adjacent), and each 32-byte activation quarter is broadcast to both halves. Per 512 weights
 * (one block of a 4-row group): 2 weight loads, 14 shift/and, 8 vpdpbusd, against the AVX2
 * route's 4 weight loads, 28 shift/and, 16 maddubs and 16 adds (4 activation loads each).
 *
 * The int8, int4 and binary kinds' VNNI routes are in tritlm_intk.c (next to their epilogues).
 *
 * Included by tritlm_cpu.c (it uses tt_job, tt_store and the chunking). The dots are the same
 * exact integers as the other routes and the epilogue is the shared tt_store, so the results are
 * bit-identical to the portable and AVX2 routes.
 *
 * Compiled with target attributes only: the library is built for baseline x86-64 and calls
 * this code only after tt_cpu_has_avx512vnni() says the CPU and the OS (XCR0 opmask/ZMM state)
 * support it. Tests run tt_vnni_dots and tt_cpu_has_avx512vnni in an instruction-set emulator
 * (Bochs) when the test machine lacks AVX-512, and natively when it has it.
 */
#if TT_X86
#include <cpuid.h>

#define TT_VNNI_TARGET "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma"
#define TT_VNNI_FN __attribute__((target(TT_VNNI_TARGET)))
#define TT_VNNI_INLINE static inline __attribute__((always_inline, target(TT_VNNI_TARGET)))
/* the inner loops as functions of their own: inlined into the task, GCC spilled their
 * accumulators to the stack */
#define TT_VNNI_LEAF __attribute__((noinline, target(TT_VNNI_TARGET)))

/* CPUID leaf 7 (AVX512 F, BW, VL, VNNI) and the OS's XCR0 (SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM
 * state enabled): a CPU with the instructions but an OS that does not save the registers would
 * fault on the first one. Plain cpuid/xgetbv, no libgcc state, so it also runs in the emulator. */
static int tt_cpu_detect_avx512vnni(void) {
    unsigned a, b, c, d;
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid(1, a, b, c, d);
    if (!(c & (1u << 27))) return 0; /* OSXSAVE: xgetbv is allowed */
    unsigned lo, hi;
    __asm__ __volatile__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    if ((lo & 0xE6u) != 0xE6u) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b >> 16 & 1) && (b >> 30 & 1) && (b >> 31 & 1) && (c >> 11 & 1);
}

/* tt_cpu_detect_avx512vnni, asked once per process: CPUID traps to the hypervisor in a VM (~7 us
 * each on the KVM guest here), and the fp16 head asked on every call (three of them, ~20 us of a
 * 125M model's ~1.2 ms token). The answer is the machine's, so a racing first call stores the same
 * value. */
static int tt_cpu_has_avx512vnni(void) {
    static _Atomic int known = -1;
    int v = atomic_load_explicit(&known, memory_order_relaxed);
    if (v < 0) {
        v = tt_cpu_detect_avx512vnni();
        atomic_store_explicit(&known, v, memory_order_relaxed);
    }
    return v;
}

/* The row sums of four accumulators, each holding two rows' 8 int32 lanes (row 2k in a_k's low
 * 256 bits, row 2k+1 in its high half): rows 0..7 in order, in ~10 vector ops where one scalar
 * horizontal sum per row took ~6 (the per-row sums and stores were a third of a K=1536 GEMV's
 * instructions). */
TT_VNNI_INLINE __m256i tt_vnni_rowsums8(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
    const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
    const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
    /* per 128-bit lane L: [a0, a1, a2, a3]'s partial sums; lanes 0-1 are rows 2k, lanes 2-3 rows 2k+1 */
    const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
    const __m512i v = _mm512_add_epi32(u, _mm512_shuffle_i32x4(u, u, _MM_SHUFFLE(2, 3, 0, 1)));
    /* lane 0: rows 0 2 4 6, lane 2: rows 1 3 5 7 */
    const __m512i idx = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_castsi512_si256(_mm512_permutexvar_epi32(idx, v));
}

/* tt_store over a block of raw sums acc[t * ld + r * ldr] (tokens t0 .. t0+nt-1, rows row0 ..
 * row0+nrows-1, those past n skipped; ldr > 1 gathers, for sums stored row-major): 16 rows at a
 * time, the same IEEE double operations (bit-identical). The AMX routes' epilogue too. */
TT_VNNI_INLINE void tt_vnni_store_block(const tt_job *J, const int32_t *acc, size_t ld, size_t ldr, int row0, int nrows,
                                        int t0, int nt) {
    const tt_ctx *c = J->c;
    const int nr = c->n - row0 < nrows ? c->n - row0 : nrows;
    const size_t n = (size_t)c->n;
    const __m512i vr = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32((int)ldr));
    for (int h = 0; h < nr; h += 16) {
        const int rows = nr - h < 16 ? nr - h : 16;
        const __mmask16 mk = (__mmask16)(rows == 16 ? 0xFFFF : (1u << rows) - 1);
        const __mmask8 mlo = (__mmask8)(mk & 0xFF), mhi = (__mmask8)(mk >> 8);
        /* rows past the block read scale 1 (their lanes are never stored) */
        const __m512d ws0 = _mm512_cvtps_pd(_mm256_mask_loadu_ps(_mm256_set1_ps(1.0f), mlo, c->wscale + row0 + h));
        const __m512d ws1 = _mm512_cvtps_pd(_mm256_mask_loadu_ps(_mm256_set1_ps(1.0f), mhi, c->wscale + row0 + h + 8));
        __m512 bias = _mm512_setzero_ps();
        if (c->bias) bias = _mm512_maskz_loadu_ps(mk, c->bias + row0 + h);
        for (int t = 0; t < nt; t++) {
            const int tg = t0 + t;
            const int32_t *at = acc + (size_t)t * ld + (size_t)h * ldr;
            const __m512i raw = ldr == 1 ? _mm512_maskz_loadu_epi32(mk, at)
                                         : _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mk, vr, at, 4);
            const __m512i s = _mm512_sub_epi32(raw, _mm512_set1_epi32(J->sx[tg]));
            if (J->dots) {
                _mm512_mask_storeu_epi32(J->dots + (size_t)tg * n + row0 + h, mk, s);
                continue;
            }
            const __m512d r = _mm512_set1_pd(1.0 / (double)J->xs[tg]);
            const __m512d d0 = _mm512_cvtepi32_pd(_mm512_castsi512_si256(s));
            const __m512d d1 = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(s, 1));
            const __m256 f0 = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_mul_pd(d0, ws0), r));
            const __m256 f1 = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_mul_pd(d1, ws1), r));
            __m512 v = _mm512_castsi512_ps(_mm512_inserti64x4(_mm512_castsi256_si512(_mm256_castps_si256(f0)),
                                                              _mm256_castps_si256(f1), 1));
            if (c->bias) v = _mm512_add_ps(v, bias);
            _mm512_mask_storeu_ps(J->out + (size_t)tg * n + row0 + h, mk, v);
        }
    }
}

/* one token over G groups (4 G rows; the second, if any, gstride bytes after the first, its 4 sums
 * to dots2). Quarter q's codes are masked in place (v & 3 << 2q:
 * the code times 4^q) instead of shifted down and masked: 8 instead of 14 vector ALU ops per 512
 * weights next to the 8 vpdpbusd, with one accumulator per quarter (16 for G = 2: also 16 chains
 * for vpdpbusd's latency) scaled back by exact shifts at the end. Products reach 2 * 64 * 128, so
 * a lane would overflow int32 after 2^14 blocks: K is taken in segments of at most 8192 blocks. */
TT_VNNI_INLINE void tt_vnni_gemv_g(const uint8_t *w, size_t gstride, int kb, const int8_t *x, int G, int32_t *dots,
                                   int32_t *dots2, size_t pf, int nta) {
    const __m512i mq[4] = {_mm512_set1_epi8(0x03), _mm512_set1_epi8(0x0C), _mm512_set1_epi8(0x30),
                           _mm512_set1_epi8((char)0xC0)};
    __m512i tot[2][2];
    for (int g = 0; g < G; g++) tot[g][0] = tot[g][1] = _mm512_setzero_si512();
    for (int b0 = 0; b0 < kb; b0 += 8192) {
        const int b1 = kb - b0 > 8192 ? b0 + 8192 : kb;
        __m512i acc[2][2][4];
        for (int g = 0; g < G; g++)
            for (int p = 0; p < 2; p++)
                for (int q = 0; q < 4; q++) acc[g][p][q] = _mm512_setzero_si512();
        for (int b = b0; b < b1; b++) {
            const int8_t *xb = x + (size_t)b * TT_BLOCK;
            if (pf) { /* each group's stream, pf bytes ahead: the hardware prefetcher alone held ~6.5 GB/s a core */
                for (int g = 0; g < G; g++) {
                    const char *pp = (const char *)(w + (size_t)g * gstride + (size_t)b * TT_GROUP_BYTES_PER_BLOCK + pf);
                    if (nta) { _mm_prefetch(pp, _MM_HINT_NTA); _mm_prefetch(pp + 64, _MM_HINT_NTA); }
                    else { _mm_prefetch(pp, _MM_HINT_T0); _mm_prefetch(pp + 64, _MM_HINT_T0); }
                }
            }
            __m512i xv[4];
            for (int q = 0; q < 4; q++) xv[q] = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(xb + 32 * q)));
            for (int g = 0; g < G; g++) {
                const uint8_t *wb = w + (size_t)g * gstride + (size_t)b * TT_GROUP_BYTES_PER_BLOCK;
                for (int p = 0; p < 2; p++) {
                    const __m512i v = _mm512_loadu_si512((const void *)(wb + 64 * p));
                    for (int q = 0; q < 4; q++)
                        acc[g][p][q] = _mm512_dpbusd_epi32(acc[g][p][q], _mm512_and_si512(v, mq[q]), xv[q]);
                }
            }
        }
        for (int g = 0; g < G; g++)
            for (int p = 0; p < 2; p++) {
                const __m512i s01 = _mm512_add_epi32(acc[g][p][0], _mm512_srai_epi32(acc[g][p][1], 2));
                const __m512i s23 = _mm512_add_epi32(_mm512_srai_epi32(acc[g][p][2], 4), _mm512_srai_epi32(acc[g][p][3], 6));
                tot[g][p] = _mm512_add_epi32(tot[g][p], _mm512_add_epi32(s01, s23));
            }
    }
    const __m512i z = _mm512_setzero_si512();
    const __m256i r = tt_vnni_rowsums8(tot[0][0], tot[0][1], G == 2 ? tot[1][0] : z, G == 2 ? tot[1][1] : z);
    _mm_storeu_si128((__m128i *)dots, _mm256_castsi256_si128(r));
    if (G == 2) _mm_storeu_si128((__m128i *)dots2, _mm256_extracti128_si256(r, 1));
}

/* T tokens (2 or 3: a few sequences' decode step) over G groups as tt_vnni_gemv_g streams them
 * (the second gstride bytes after the first, its sums to dots2; token t's at + t * ldd): each
 * block's codes are shifted down once for every token (4 T accumulators: the in-place masks of
 * the one-token loop would need 16 T). At 2-3 tokens the vpdpbusd work still fits under the
 * weights' stream, where the weights-as-A tiles' unpacking did not (700M, 2 sequences: the four
 * Linears 9.05 ms a step against 6.7 for one). */
TT_VNNI_INLINE void tt_vnni_gemv_tg(const uint8_t *w, size_t gstride, int kb, const int8_t *x, size_t ldx, int T, int G,
                                    int32_t *dots, int32_t *dots2, size_t ldd, size_t pf) {
    const __m512i m3 = _mm512_set1_epi8(3);
    __m512i acc[3][2][2];
    for (int t = 0; t < T; t++)
        for (int g = 0; g < G; g++) acc[t][g][0] = acc[t][g][1] = _mm512_setzero_si512();
    for (int b = 0; b < kb; b++) {
        __m512i v[2][2];
        for (int g = 0; g < G; g++) {
            const uint8_t *wb = w + (size_t)g * gstride + (size_t)b * TT_GROUP_BYTES_PER_BLOCK;
            if (pf) {
                _mm_prefetch((const char *)(wb + pf), _MM_HINT_T0);
                _mm_prefetch((const char *)(wb + pf + 64), _MM_HINT_T0);
            }
            v[g][0] = _mm512_loadu_si512((const void *)wb);
            v[g][1] = _mm512_loadu_si512((const void *)(wb + 64));
        }
        for (int q = 0; q < 4; q++) {
            __m512i u[2][2];
            for (int g = 0; g < G; g++) {
                u[g][0] = _mm512_and_si512(_mm512_srli_epi16(v[g][0], 2 * q), m3);
                u[g][1] = _mm512_and_si512(_mm512_srli_epi16(v[g][1], 2 * q), m3);
            }
            for (int t = 0; t < T; t++) {
                const int8_t *xq = x + (size_t)t * ldx + (size_t)b * TT_BLOCK + 32 * q;
                const __m512i xv = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)xq));
                for (int g = 0; g < G; g++) {
                    acc[t][g][0] = _mm512_dpbusd_epi32(acc[t][g][0], u[g][0], xv);
                    acc[t][g][1] = _mm512_dpbusd_epi32(acc[t][g][1], u[g][1], xv);
                }
            }
        }
    }
    const __m512i z = _mm512_setzero_si512();
    for (int t = 0; t < T; t++) {
        const __m256i r = tt_vnni_rowsums8(acc[t][0][0], acc[t][0][1], G == 2 ? acc[t][1][0] : z, G == 2 ? acc[t][1][1] : z);
        _mm_storeu_si128((__m128i *)(dots + (size_t)t * ldd), _mm256_castsi256_si128(r));
        if (G == 2) _mm_storeu_si128((__m128i *)(dots2 + (size_t)t * ldd), _mm256_extracti128_si256(r, 1));
    }
}

TT_VNNI_LEAF static void tt_vnni_gemv_few(const uint8_t *w, size_t gstride, int kb, const int8_t *x, size_t ldx, int T,
                                        int G, int32_t *dots, int32_t *dots2, size_t ldd, size_t pf) {
    if (T == 2) {
        if (G == 2) tt_vnni_gemv_tg(w, gstride, kb, x, ldx, 2, 2, dots, dots2, ldd, pf);
        else tt_vnni_gemv_tg(w, gstride, kb, x, ldx, 2, 1, dots, NULL, ldd, pf);
    } else {
        if (G == 2) tt_vnni_gemv_tg(w, gstride, kb, x, ldx, 3, 2, dots, dots2, ldd, pf);
        else tt_vnni_gemv_tg(w, gstride, kb, x, ldx, 3, 1, dots, NULL, ldd, pf);
    }
}

/* one group (4 rows) x T tokens (1..8): each block's codes are unpacked once for all T tokens (8:
 * a batched decode step of 8 sequences unpacks its weights once) */
TT_VNNI_INLINE void tt_vnni_tile(const uint8_t *wg, int kb, const int8_t *x, size_t ldx, int T, int32_t *dots,
                                 size_t ldd, size_t pf) {
    const __m512i m3 = _mm512_set1_epi8(3);
    __m512i acc[8][2];
    for (int t = 0; t < T; t++) acc[t][0] = acc[t][1] = _mm512_setzero_si512();
    for (int b = 0; b < kb; b++) {
        const uint8_t *wb = wg + (size_t)b * TT_GROUP_BYTES_PER_BLOCK;
        if (pf) { /* the first pass over a group reads its weights from DRAM: the stream pf bytes ahead */
            _mm_prefetch((const char *)(wb + pf), _MM_HINT_T0);
            _mm_prefetch((const char *)(wb + pf + 64), _MM_HINT_T0);
        }
        const __m512i v01 = _mm512_loadu_si512((const void *)wb);
        const __m512i v23 = _mm512_loadu_si512((const void *)(wb + 64));
        for (int q = 0; q < 4; q++) {
            const __m512i u01 = _mm512_and_si512(_mm512_srli_epi16(v01, 2 * q), m3);
            const __m512i u23 = _mm512_and_si512(_mm512_srli_epi16(v23, 2 * q), m3);
            for (int t = 0; t < T; t++) {
                const int8_t *xq = x + (size_t)t * ldx + (size_t)b * TT_BLOCK + 32 * q;
                const __m512i xv = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)xq));
                acc[t][0] = _mm512_dpbusd_epi32(acc[t][0], u01, xv);
                acc[t][1] = _mm512_dpbusd_epi32(acc[t][1], u23, xv);
            }
        }
    }
    /* two tokens' 4 rows per reduction */
    const __m512i z = _mm512_setzero_si512();
    for (int t = 0; t < T; t += 2) {
        const int two = t + 1 < T;
        const __m256i r = tt_vnni_rowsums8(acc[t][0], acc[t][1], two ? acc[t + 1][0] : z, two ? acc[t + 1][1] : z);
        _mm_storeu_si128((__m128i *)(dots + (size_t)t * ldd), _mm256_castsi256_si128(r));
        if (two) _mm_storeu_si128((__m128i *)(dots + (size_t)(t + 1) * ldd), _mm256_extracti128_si256(r, 1));
    }
}

#define TT_VNNI_TILE(T)                                                                                              \
    TT_VNNI_LEAF static void tt_vnni_tile##T(const uint8_t *w, int kb, const int8_t *x, size_t ldx, int32_t *d,       \
                                           size_t ldd, size_t pf) { tt_vnni_tile(w, kb, x, ldx, T, d, ldd, pf); }
TT_VNNI_TILE(2)
TT_VNNI_TILE(3)
TT_VNNI_TILE(4)
TT_VNNI_TILE(5)
TT_VNNI_TILE(6)
TT_VNNI_TILE(7)
TT_VNNI_TILE(8)
/* a switch, not a table of pointers: the emulator tests load this leaf code without relocations */
TT_VNNI_INLINE void tt_vnni_tile_n(int T, const uint8_t *w, int kb, const int8_t *x, size_t ldx, int32_t *d,
                                   size_t ldd, size_t pf) {
    switch (T) {
    case 2: tt_vnni_tile2(w, kb, x, ldx, d, ldd, pf); break;
    case 3: tt_vnni_tile3(w, kb, x, ldx, d, ldd, pf); break;
    case 4: tt_vnni_tile4(w, kb, x, ldx, d, ldd, pf); break;
    case 5: tt_vnni_tile5(w, kb, x, ldx, d, ldd, pf); break;
    case 6: tt_vnni_tile6(w, kb, x, ldx, d, ldd, pf); break;
    case 7: tt_vnni_tile7(w, kb, x, ldx, d, ldd, pf); break;
    default: tt_vnni_tile8(w, kb, x, ldx, d, ldd, pf); break;
    }
}

/* Raw dots sum_k q[row, k] * x[t, k] (q: the 2-bit codes 0..2, so the true dot is this minus
 * sum_k x[t, k]) of `ngroups` 4-row groups starting at w (i2s_r4, kb blocks per row) and T tokens
 * (x: T rows of kb * 128 int8, stride ldx) into dots[t * ldd + row]. A leaf function (no calls out
 * of this file, no globals): the emulator tests call it through tt_vnni_dots. */
TT_VNNI_FN static void tt_vnni_dots_impl(const uint8_t *w, int kb, int ngroups, const int8_t *x, size_t ldx, int T,
                                         int32_t *dots, size_t ldd, size_t pf) {
    const size_t gstride = (size_t)kb * TT_GROUP_BYTES_PER_BLOCK;
    /* token runs of at most 8, as even as possible (9 tokens: 5 + 4, not 8 + a lone GEMV) */
    const int runs = (T + 7) / 8;
    for (int t0 = 0, r = 0; r < runs; r++) {
        const int tn = (T - t0) / (runs - r) + ((T - t0) % (runs - r) != 0);
        const int8_t *xt = x + (size_t)t0 * ldx;
        int32_t *dt = dots + (size_t)t0 * ldd;
        const size_t p = t0 == 0 ? pf : 0; /* later runs find the weights in the cache */
        int g = 0;
        if (tn == 1) {
            for (; g + 2 <= ngroups; g += 2)
                tt_vnni_gemv_g(w + g * gstride, gstride, kb, xt, 2, dt + 4 * g, dt + 4 * g + 4, 0, 0);
            if (g < ngroups) tt_vnni_gemv_g(w + g * gstride, gstride, kb, xt, 1, dt + 4 * g, NULL, 0, 0);
        } else {
            for (; g < ngroups; g++) tt_vnni_tile_n(tn, w + g * gstride, kb, xt, ldx, dt + 4 * g, ldd, p);
        }
        t0 += tn;
    }
}

TT_VNNI_LEAF static void tt_vnni_gemv_pf(const uint8_t *w, size_t gstride, int kb, const int8_t *x, int G, int32_t *dots,
                                       int32_t *dots2, size_t pf, int nta) {
    if (G == 2) tt_vnni_gemv_g(w, gstride, kb, x, 2, dots, dots2, pf, nta);
    else tt_vnni_gemv_g(w, gstride, kb, x, 1, dots, NULL, pf, nta);
}

/* exported for the tests; the library calls the static one (no PLT hop, and none in the guest) */
TT_VNNI_FN void tt_vnni_dots(const uint8_t *w, int kb, int ngroups, const int8_t *x, size_t ldx, int T, int32_t *dots,
                             size_t ldd) {
    tt_vnni_dots_impl(w, kb, ngroups, x, ldx, T, dots, ldd, 0);
}

/* decode: the chunk in spans of up to TT_GEMV_SPAN groups, each span's first half paired with its
 * second (group g with g + h: two prefetched streams h groups apart), then the span's epilogue;
 * more tokens: groups in batches of 8 (32 rows: their weights stay in L1/L2 while a second run
 * of tokens passes over them), then the shared epilogue.
 * Why pairs far apart: adjacent groups are one group (K / 4 bytes) apart, the same 4 KB page for
 * K <= 1536, and two streams in one page read from memory like one (one hardware prefetch
 * stream a page). One core streamed the same 1.77 MB at 8.8 GB/s as 4608 x 1536 and at
 * 11.5-12.4 as 1152 x 6144; a read-and-VNNI loop with its two streams half a span apart reads
 * 12-13 GB/s at every K. */
#define TT_GEMV_SPAN 128
/* the most tokens of the few-token streaming GEMV (tt_vnni_gemv_tg) */
#define TT_VNNI_FEW_M 3
TT_VNNI_FN static void tt_task_vnni(const void *arg, int chunk) {
    const tt_job *J = (const tt_job *)arg;
    const tt_ctx *c = J->c;
    int g0, g1;
    tt_chunk_groups(J, chunk, &g0, &g1);
    const size_t gstride = (size_t)c->kb * TT_GROUP_BYTES_PER_BLOCK;
    if (J->m >= 2 && J->m <= TT_VNNI_FEW_M) { /* tt_vnni_gemv_tg: the spans of the one-token loop */
        int32_t fb[TT_VNNI_FEW_M * 4 * TT_GEMV_SPAN] __attribute__((aligned(64)));
        const size_t pf = (size_t)J->p.pf, ld = 4 * TT_GEMV_SPAN;
        for (int gb = g0; gb < g1; gb += TT_GEMV_SPAN) {
            const int ns = g1 - gb < TT_GEMV_SPAN ? g1 - gb : TT_GEMV_SPAN, h = ns / 2;
            for (int i = 0; i < h; i++)
                tt_vnni_gemv_few(c->w + (size_t)(gb + i) * gstride, (size_t)h * gstride, c->kb, J->xq, J->ldx, J->m, 2,
                                 fb + 4 * i, fb + 4 * (i + h), ld, pf);
            if (ns % 2)
                tt_vnni_gemv_few(c->w + (size_t)(gb + ns - 1) * gstride, 0, c->kb, J->xq, J->ldx, J->m, 1,
                                 fb + 4 * (ns - 1), NULL, ld, pf);
            tt_vnni_store_block(J, fb, ld, 1, 4 * gb, 4 * ns, 0, J->m);
        }
        return;
    }
    int32_t buf[4 * TT_GEMV_SPAN] __attribute__((aligned(64)));
    if (J->m == 1) {
        const size_t pf = (size_t)J->p.pf;
        for (int gb = g0; gb < g1; gb += TT_GEMV_SPAN) {
            const int ns = g1 - gb < TT_GEMV_SPAN ? g1 - gb : TT_GEMV_SPAN, h = ns / 2;
            for (int i = 0; i < h; i++)
                tt_vnni_gemv_pf(c->w + (size_t)(gb + i) * gstride, (size_t)h * gstride, c->kb, J->xq, 2,
                                buf + 4 * i, buf + 4 * (i + h), pf, J->p.nta);
            if (ns % 2)
                tt_vnni_gemv_pf(c->w + (size_t)(gb + ns - 1) * gstride, 0, c->kb, J->xq, 1, buf + 4 * (ns - 1), NULL,
                                pf, J->p.nta);
            tt_vnni_store_block(J, buf, 4 * TT_GEMV_SPAN, 1, 4 * gb, 4 * ns, 0, 1);
        }
        return;
    }
    for (int gb = g0; gb < g1; gb += 8) {
        const int ge = gb + 8 < g1 ? gb + 8 : g1;
        for (int t0 = 0; t0 < J->m; t0 += 16) {
            const int T = J->m - t0 < 16 ? J->m - t0 : 16;
            tt_vnni_dots_impl(c->w + (size_t)gb * gstride, c->kb, ge - gb, J->xq + (size_t)t0 * J->ldx, J->ldx, T, buf, 32,
                              t0 == 0 ? (size_t)J->p.pf : 0);
            tt_vnni_store_block(J, buf, 32, 1, 4 * gb, 4 * (ge - gb), t0, T);
        }
    }
}

/* The serial entries' driver (the emulator tests' entries, one per kind): the job over context c,
 * every chunk of cg groups through `task` on the calling thread. */
static void tt_run_serial(const tt_ctx *c, const int8_t *xq, size_t ldx, int m, const float *xs, const int32_t *sx,
                          float *out, int32_t *dots, int cg, tt_chunk_fn task) {
    tt_job J;
    J.c = c; J.xq = xq; J.ldx = ldx; J.m = m; J.xs = xs; J.sx = sx; J.out = out; J.dots = dots;
    J.cg = cg < 1 ? 1 : cg;
    J.p = (tt_params){0}; /* no prefetch: the emulator runs the routes, not their timing */
    for (int ch = 0; ch * J.cg < c->ngroups; ch++) task(&J, ch);
}

/* The route over a whole matrix on the calling thread, without the pool, the locks or the
 * quantiser: chunks of cg groups, each through tt_task_vnni and the shared epilogue, as tt_run
 * cuts them. Only the emulator tests call it (a leaf: no libc, no globals). sx[t] = sum_k xq[t, k];
 * out [m, n] (dots == NULL) or raw dots [m, n]. */
TT_VNNI_FN void tt_vnni_run_serial(const uint8_t *w, int n, int kb, const float *wscale, const float *bias,
                                   const int8_t *xq, size_t ldx, int m, const float *xs, const int32_t *sx,
                                   float *out, int32_t *dots, int cg) {
    tt_ctx c; /* only the fields the task and tt_store read */
    c.w = w; c.n = n; c.kb = kb; c.kp = kb * TT_BLOCK; c.k = c.kp; c.ngroups = (n + 3) / 4;
    c.wscale = (float *)wscale; c.bias = (float *)bias; c.isa = 2; c.kind = TT_KIND_TERNARY;
    tt_run_serial(&c, xq, ldx, m, xs, sx, out, dots, cg, tt_task_vnni);
}
#else
static int tt_cpu_has_avx512vnni(void) { return 0; }
#endif
