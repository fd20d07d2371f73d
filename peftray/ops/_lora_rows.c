/* Mixed-adapter LoRA for small batches on the CPU (decode steps): out[row] += s * (x[row] A^T) B^T.
 *
 * The rows come as segments: runs of rows that use the same adapter (RowPlan sorts them once per forward).
 * A segment reads its adapter's A and B once for all of its rows, and the segments are shared out among the
 * threads. One call serves every projection listed in `table` that reads the same input x (q, k and v; gate
 * and up), each with its own stacked weights and output. B is read in its stored-transposed layout [N, r, out],
 * so every inner loop runs over contiguous memory, and A and B are each read as one sequential stream: with
 * many adapters the kernel is bound by memory bandwidth, and streams the hardware prefetcher follows are the
 * fastest way through it (prefetching ahead in software, or reading several rows of A at once, measured slower).
 * Rows are taken two at a time with two accumulators each (four independent FMA chains), which is what the
 * compute-bound case, many rows on one adapter, needs. The B products add four rows of B per pass over an output
 * row, so each output value is loaded and stored once per four rank positions, not once per position.
 *
 * Vector code uses GCC/Clang vector types as wide as the target's registers: 16 floats with AVX-512, else 8 (one
 * AVX register, two SSE ones). A 16-float type on an AVX2-only CPU is split by the compiler into poor code (the
 * kernel ran at half speed on an AVX2 EPYC, measured 2026-12-03). Threads come
 * from the OpenMP runtime torch already loaded (same soname), so torch.set_num_threads applies here too. Built
 * and loaded by peftray/ops/cpu_kernel.py.
 */
#include <stdint.h>

#define MAX_RANK 256 /* keep in step with cpu_kernel.MAX_RANK */
#define MAX_SEG 8    /* keep in step with plan.KERNEL_SEGMENT */
#define ENTRY 7      /* int64 values per projection in `table`; keep in step with cpu_kernel.ENTRY */
#ifdef __AVX512F__
#define V 16
#else
#define V 8
#endif

typedef float vf __attribute__((vector_size(V * sizeof(float)), aligned(4), may_alias));

static inline vf load(const float *p) { return *(const vf *)p; }
static inline void store(float *p, vf v) { *(vf *)p = v; }
static inline float hsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < V; i++) s += v[i];
    return s;
}

/* h[t][j] = s * (A[j] . x_t) for the m rows of a segment. */
static void a_rows(const float *const *xr, int64_t m, const float *A, int64_t r, int64_t n_in, float s,
                   float (*h)[MAX_RANK]) {
    for (int64_t j = 0; j < r; j++) {
        const float *aj = A + j * n_in;
        int64_t t = 0;
        for (; t + 2 <= m; t += 2) {
            const float *x0 = xr[t], *x1 = xr[t + 1];
            vf p0 = {0}, p1 = {0}, q0 = {0}, q1 = {0};
            int64_t k = 0;
            for (; k + 2 * V <= n_in; k += 2 * V) {
                const vf u = load(aj + k), w = load(aj + k + V);
                p0 += u * load(x0 + k);
                p1 += w * load(x0 + k + V);
                q0 += u * load(x1 + k);
                q1 += w * load(x1 + k + V);
            }
            float sp = hsum(p0 + p1), sq = hsum(q0 + q1);
            for (; k < n_in; k++) {
                sp += aj[k] * x0[k];
                sq += aj[k] * x1[k];
            }
            h[t][j] = sp * s;
            h[t + 1][j] = sq * s;
        }
        for (; t < m; t++) {
            const float *x0 = xr[t];
            vf p0 = {0}, p1 = {0};
            int64_t k = 0;
            for (; k + 2 * V <= n_in; k += 2 * V) {
                p0 += load(aj + k) * load(x0 + k);
                p1 += load(aj + k + V) * load(x0 + k + V);
            }
            float sp = hsum(p0 + p1);
            for (; k < n_in; k++) sp += aj[k] * x0[k];
            h[t][j] = sp * s;
        }
    }
}

/* o_t += sum_j h[t][j] * BT[j] for the m rows of a segment, four rows of BT per pass over each o_t. */
static void b_rows(float *const *o, int64_t m, const float *BT, int64_t r, int64_t n_out, float (*h)[MAX_RANK]) {
    int64_t j = 0;
    for (; j + 4 <= r; j += 4) {
        const float *b0 = BT + j * n_out, *b1 = b0 + n_out, *b2 = b1 + n_out, *b3 = b2 + n_out;
        for (int64_t t = 0; t < m; t++) {
            const float g0 = h[t][j], g1 = h[t][j + 1], g2 = h[t][j + 2], g3 = h[t][j + 3];
            const vf v0 = (vf){0} + g0, v1 = (vf){0} + g1, v2 = (vf){0} + g2, v3 = (vf){0} + g3;
            float *ot = o[t];
            int64_t k = 0;
            for (; k + V <= n_out; k += V)
                store(ot + k, load(ot + k) + v0 * load(b0 + k) + v1 * load(b1 + k) + v2 * load(b2 + k)
                                  + v3 * load(b3 + k));
            for (; k < n_out; k++) ot[k] += g0 * b0[k] + g1 * b1[k] + g2 * b2[k] + g3 * b3[k];
        }
    }
    for (; j < r; j++) {
        const float *bj = BT + j * n_out;
        for (int64_t t = 0; t < m; t++) {
            const float g0 = h[t][j];
            const vf v0 = (vf){0} + g0;
            float *o0 = o[t];
            int64_t k = 0;
            for (; k + V <= n_out; k += V) store(o0 + k, load(o0 + k) + v0 * load(bj + k));
            for (; k < n_out; k++) o0[k] += g0 * bj[k];
        }
    }
}

/* table: ENTRY int64 values per projection: the addresses of a [N, r, n_in], bt [N, r, n_out] and scaling [N]
 * (float32, contiguous), r, n_out, the address of out (float32 rows indexed like the rows of x), out's row
 * stride. rows / seg_start / seg_slot: the segments, as RowPlan.kernel_segments lays them out. */
void lora_group_f32(const float *x, int64_t x_stride, int64_t n_in, const int64_t *table, int64_t n_proj,
                    const int64_t *rows, const int64_t *seg_start, const int64_t *seg_slot, int64_t n_seg) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t g = 0; g < n_seg; g++) {
        const int64_t s = seg_slot[g], first = seg_start[g];
        int64_t m = seg_start[g + 1] - first;
        if (m > MAX_SEG) m = MAX_SEG; /* the plan never makes longer segments */
        const float *xr[MAX_SEG];
        for (int64_t t = 0; t < m; t++) xr[t] = x + rows[first + t] * x_stride;
        float h[MAX_SEG][MAX_RANK];
        for (int64_t p = 0; p < n_proj; p++) {
            const int64_t *e = table + p * ENTRY;
            const int64_t r = e[3], n_out = e[4], out_stride = e[6];
            const float *A = (const float *)(intptr_t)e[0] + s * r * n_in;
            const float *BT = (const float *)(intptr_t)e[1] + s * r * n_out;
            float *o[MAX_SEG];
            for (int64_t t = 0; t < m; t++) o[t] = (float *)(intptr_t)e[5] + rows[first + t] * out_stride;
            a_rows(xr, m, A, r, n_in, ((const float *)(intptr_t)e[2])[s], h);
            b_rows(o, m, BT, r, n_out, h);
        }
    }
}
