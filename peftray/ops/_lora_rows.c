/* Mixed-adapter LoRA for small batches on the CPU (decode steps): out[row] += s * (x[row] A^T) B^T.
 *
 * The rows come as segments: runs of rows that use the same adapter (RowPlan sorts them once per forward).
 * A segment reads its adapter's A and B once for all of its rows, and the segments are shared out among the
 * threads. B is read in its stored-transposed layout [N, r, out], so every inner loop runs over contiguous
 * memory. Threads come from the OpenMP runtime torch already loaded (same soname), so torch.set_num_threads
 * applies here too. Built and loaded by peftray/ops/cpu_kernel.py.
 */
#include <stdint.h>

#define MAX_RANK 256 /* keep in step with cpu_kernel.MAX_RANK */
#define MAX_SEG 8    /* keep in step with plan.KERNEL_SEGMENT */

void lora_segments_f32(const float *x, int64_t x_stride, const float *a, const float *bt, const float *scaling,
                       const int64_t *rows, const int64_t *seg_start, const int64_t *seg_slot, int64_t n_seg,
                       int64_t r, int64_t n_in, int64_t n_out, float *out, int64_t out_stride) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t g = 0; g < n_seg; g++) {
        const int64_t s = seg_slot[g], first = seg_start[g];
        int64_t m = seg_start[g + 1] - first;
        if (m > MAX_SEG) m = MAX_SEG; /* the plan never makes longer segments */
        const float *A = a + s * r * n_in;
        const float *BT = bt + s * r * n_out;
        const float sc = scaling[s];
        float h[MAX_SEG][MAX_RANK];
        for (int64_t j = 0; j < r; j++) {
            const float *aj = A + j * n_in;
            for (int64_t t = 0; t < m; t++) {
                const float *xr = x + rows[first + t] * x_stride;
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int64_t k = 0; k < n_in; k++) acc += aj[k] * xr[k];
                h[t][j] = acc * sc;
            }
        }
        for (int64_t j = 0; j < r; j++) {
            const float *bj = BT + j * n_out;
            for (int64_t t = 0; t < m; t++) {
                const float hj = h[t][j];
                float *o = out + rows[first + t] * out_stride;
#pragma omp simd
                for (int64_t k = 0; k < n_out; k++) o[k] += hj * bj[k];
            }
        }
    }
}
