/*
 * fp16-weight x fp32-activation GEMV / small GEMM: the LM head of packed models.
 *
 * Included at the end of tritlm_cpu.c (it uses the thread pool). Why: packed models store the
 * output matrix in fp16; converting it to fp32 for a BLAS GEMV doubles the bytes read per token
 * (vocab x dim x 4: 197 MB at the 700M shape, as much as all its ternary layers). Reading the fp16
 * weights directly and widening them in registers (F16C `vcvtph2ps`) halves that, with the same
 * result up to float32 summation order: the weights are exactly the stored ones.
 *
 * out[t, r] = sum_k float(w[r, k]) * x[t, k]; rows are split into chunks that the pool's threads
 * claim; up to 4 tokens (AVX2) or 8 (AVX-512, two rows at a time) share each load of a weight row.
 *
 * Also here: float <-> half conversions, which the decode step's fp16 KV cache (tritlm_decode.c,
 * included after this file) uses.
 */

#define TT_F16_ROWS_PER_CHUNK 256 /* at most: a small head (a byte vocabulary) is cut finer, so every thread reads */

#if TT_X86
#define TT_F16C_FN __attribute__((target("avx2,fma,f16c")))
#define TT_F16C_INLINE static inline __attribute__((always_inline, target("avx2,fma,f16c")))
#endif

static int tt_cpu_has_f16c(void) {
#if TT_X86
    __builtin_cpu_init();
    return tt_cpu_has_avx2() && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

/* IEEE half -> float, every case (subnormals, inf, nan) */
static inline float tt_half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400u));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* float -> IEEE half, round to nearest even (what torch's Tensor.half() and F16C's vcvtps2ph with
 * imm 0 give); a NaN becomes the quiet NaN 0x7e00 with the sign. The multiplications by powers of
 * two let the FPU do the rounding: the scheme of FP16 (Maratyszcza) that torch's c10::Half uses. */
static inline uint16_t tt_float_to_half(float f) {
    uint32_t w;
    memcpy(&w, &f, sizeof w);
    const uint32_t shl1 = w + w, sign = w & 0x80000000u;
    if (shl1 > 0xff000000u) return (uint16_t)((sign >> 16) | 0x7e00u);
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f; /* overflows to inf where the half would */
    uint32_t bias = shl1 & 0xff000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    const uint32_t b = (bias >> 1) + 0x07800000u;
    float fb;
    memcpy(&fb, &b, sizeof fb);
    base = fb + base;
    uint32_t bits;
    memcpy(&bits, &base, sizeof bits);
    return (uint16_t)((sign >> 16) | (((bits >> 13) & 0x7c00u) + (bits & 0x0fffu)));
}

/* n floats -> halves; isa 1: F16C where the CPU has it */
#if TT_X86
TT_F16C_FN static void tt_to_half_f16c(const float *x, uint16_t *h, long n) {
    long i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < n; i++) h[i] = tt_float_to_half(x[i]);
}
#endif

static void tt_to_half(const float *x, uint16_t *h, long n, int isa) {
#if TT_X86
    if (isa) { tt_to_half_f16c(x, h, n); return; }
#endif
    (void)isa;
    for (long i = 0; i < n; i++) h[i] = tt_float_to_half(x[i]);
}

/* test entry points: the conversions of the decode step's fp16 KV cache (isa 0: portable) */
int tt_f32_to_f16(const float *x, uint16_t *h, long n, int isa) {
    if (!x || !h || n < 0) return -1;
    tt_to_half(x, h, n, isa && tt_cpu_has_f16c());
    return 0;
}

int tt_f16_to_f32(const uint16_t *h, float *x, long n) {
    if (!x || !h || n < 0) return -1;
    for (long i = 0; i < n; i++) x[i] = tt_half_to_float(h[i]);
    return 0;
}

typedef struct {
    const uint16_t *w;
    int n, k;
    const float *x;
    long ldx;
    int m;
    float *out; /* [m, n] */
    int rows;   /* per chunk */
    int isa;
} tt_f16_job;

static void tt_f16_rows_portable(const tt_f16_job *J, int r0, int r1) {
    for (int r = r0; r < r1; r++) {
        const uint16_t *w = J->w + (size_t)r * J->k;
        for (int t = 0; t < J->m; t++) {
            const float *x = J->x + (size_t)t * J->ldx;
            float s = 0.0f;
            for (int i = 0; i < J->k; i++) s += tt_half_to_float(w[i]) * x[i];
            J->out[(size_t)t * J->n + r] = s;
        }
    }
}

#if TT_X86
TT_F16C_FN static inline float tt_hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* row r for tokens [t0, t0 + T), T <= 4; two accumulators per token hide FMA latency */
TT_F16C_FN static void tt_f16_row_avx2(const tt_f16_job *J, int r, int t0, int T) {
    const int k = J->k, k16 = k & ~15;
    const float *x0 = J->x + (size_t)t0 * J->ldx;
    {
        const uint16_t *w = J->w + (size_t)r * k;
        __m256 a[4][2];
        for (int t = 0; t < 4; t++) a[t][0] = a[t][1] = _mm256_setzero_ps();
        for (int i = 0; i < k16; i += 16) {
            _mm_prefetch((const char *)(w + i) + 1024, _MM_HINT_NTA);
            const __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i)));
            const __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i + 8)));
            for (int t = 0; t < T; t++) {
                const float *x = x0 + (size_t)t * J->ldx + i;
                a[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x), a[t][0]);
                a[t][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 8), a[t][1]);
            }
        }
        for (int t = 0; t < T; t++) {
            float s = tt_hsum_ps(_mm256_add_ps(a[t][0], a[t][1]));
            const float *x = x0 + (size_t)t * J->ldx;
            for (int i = k16; i < k; i++) s += tt_half_to_float(w[i]) * x[i];
            J->out[(size_t)(t0 + t) * J->n + r] = s;
        }
    }
}
#endif

#if TT_X86
#define TT_F16_AVX512_FN __attribute__((target("avx512f,avx2,fma,f16c")))
/* software prefetch distance of the AVX-512 rows, bytes (0: 5.4 ms, 1024: 4.0-4.3, 2048: 4.0 for the
 * 700M head at one token) */
#define TT_F16_PF 1024

/* rows r and r2 for tokens [t0, t0 + T), T <= 8: 32 weights widened per step, every token of the
 * pass sharing each load (at 8 tokens the AVX2 route read each row twice, in quads); the two rows
 * are two streams apart in memory (separate 4 KB pages; see tt_task_vnni on streams sharing a
 * page), one accumulator per row and token. r2 == r: one row (computed twice, the same sums). */
TT_F16_AVX512_FN static void tt_f16_row2_avx512(const tt_f16_job *J, int r, int r2, int t0, int T) {
    const int k = J->k, k32 = k & ~31;
    const float *x0 = J->x + (size_t)t0 * J->ldx;
    const uint16_t *w = J->w + (size_t)r * k, *v = J->w + (size_t)r2 * k;
    __m512 a[8], b[8];
    for (int t = 0; t < 8; t++) a[t] = b[t] = _mm512_setzero_ps();
    for (int i = 0; i < k32; i += 32) {
        _mm_prefetch((const char *)(w + i) + TT_F16_PF, _MM_HINT_T0);
        _mm_prefetch((const char *)(v + i) + TT_F16_PF, _MM_HINT_T0);
        const __m512 w0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(w + i)));
        const __m512 w1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(w + i + 16)));
        const __m512 v0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(v + i)));
        const __m512 v1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(v + i + 16)));
        for (int t = 0; t < T; t++) {
            const float *x = x0 + (size_t)t * J->ldx + i;
            const __m512 xa = _mm512_loadu_ps(x), xb = _mm512_loadu_ps(x + 16);
            a[t] = _mm512_fmadd_ps(w1, xb, _mm512_fmadd_ps(w0, xa, a[t]));
            b[t] = _mm512_fmadd_ps(v1, xb, _mm512_fmadd_ps(v0, xa, b[t]));
        }
    }
    for (int t = 0; t < T; t++) {
        float s = _mm512_reduce_add_ps(a[t]), s2 = _mm512_reduce_add_ps(b[t]);
        const float *x = x0 + (size_t)t * J->ldx;
        for (int i = k32; i < k; i++) {
            s += tt_half_to_float(w[i]) * x[i];
            s2 += tt_half_to_float(v[i]) * x[i];
        }
        J->out[(size_t)(t0 + t) * J->n + r] = s;
        J->out[(size_t)(t0 + t) * J->n + r2] = s2;
    }
}
#endif

static void tt_f16_task(const void *arg, int chunk) {
    const tt_f16_job *J = (const tt_f16_job *)arg;
    const int r0 = chunk * J->rows;
    const int r1 = r0 + J->rows < J->n ? r0 + J->rows : J->n;
#if TT_X86
    if (J->isa == 2) {
        /* a chunk's rows in pairs from its two halves: one stream a row, the streams in separate
         * pages (700M head, 32000 x 1536, weights from memory, 2 threads: one row at a time read
         * 19 GB/s, the pairs 23-25; with the AVX2 rows 15) */
        const int h = (r1 - r0 + 1) / 2;
        for (int r = r0; r < r0 + h; r++)
            for (int t0 = 0; t0 < J->m; t0 += 8) {
                const int T = J->m - t0 < 8 ? J->m - t0 : 8;
                tt_f16_row2_avx512(J, r, r + h < r1 ? r + h : r, t0, T);
            }
        return;
    }
    if (J->isa) {
        /* token quads inside the row loop: a row (2k bytes) is still in L1 for the next quad */
        for (int r = r0; r < r1; r++)
            for (int t0 = 0; t0 < J->m; t0 += 4) tt_f16_row_avx2(J, r, t0, J->m - t0 < 4 ? J->m - t0 : 4);
        return;
    }
#endif
    tt_f16_rows_portable(J, r0, r1);
}

int tt_has_f16c(void) { return tt_cpu_has_f16c(); }

/* w: fp16 [n, k] row-major; x: float32 [m, ldx]; out: float32 [m, n]. isa: 1 = AVX2+F16C when the
 * CPU has it, 0 = portable. Returns 0, or -1 on bad arguments. */
int tt_f16_matmul(const uint16_t *w, int n, int k, const float *x, int m, long ldx, float *out, int nth, int isa) {
    if (!w || !x || !out || n <= 0 || k <= 0 || m < 0 || ldx < k) return -1;
    if (m == 0) return 0;
    tt_f16_job J = {.w = w, .n = n, .k = k, .x = x, .ldx = ldx, .m = m, .out = out,
                    .isa = !isa || !tt_cpu_has_f16c() ? 0 : (isa >= 2 && tt_cpu_has_avx512vnni() ? 2 : 1)};
    pthread_mutex_lock(&P.call_lock);
    tt_init_once();
    if (nth <= 0) nth = P.nthreads;
    /* two chunks a thread, 16 to 256 rows each: a 259-row head had been one 256-row chunk and a
     * 3-row one, so one thread read it all */
    const int per = (n + 2 * nth - 1) / (2 * nth);
    J.rows = per < 16 ? 16 : (per > TT_F16_ROWS_PER_CHUNK ? TT_F16_ROWS_PER_CHUNK : per);
    tt_parallel(tt_f16_task, &J, (n + J.rows - 1) / J.rows, nth);
    pthread_mutex_unlock(&P.call_lock);
    return 0;
}
