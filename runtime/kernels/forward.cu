// f32 kernels of the Mixtral forward pass (runtime/src/cuda/backend.rs): every operation of the
// Backend trait except the matrix product (cuBLAS SGEMM). Exact f32 arithmetic, accurate libm
// (no fast-math), so results follow the CPU reference (runtime/src/cpu.rs) to rounding.

// WARP, NEG_INF, warp_max, warp_sum and attention_rows come from rows.cuh, which
// runtime/src/cuda/kernels.rs puts in front of this file.

// out[i, :] = src[rows[i], :] (embedding lookup and gather_rows). One block per output row.
extern "C" __global__ void gather_rows_f32(const float* __restrict__ src,
                                           const unsigned* __restrict__ rows,
                                           float* __restrict__ out, int n, int cols) {
    int i = blockIdx.x;
    if (i >= n) return;
    const float* s = src + (size_t)rows[i] * cols;
    float* o = out + (size_t)i * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = s[c];
}

// out = a + b over n values.
extern "C" __global__ void add_f32(const float* __restrict__ a, const float* __restrict__ b,
                                   float* __restrict__ out, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = a[i] + b[i];
}

// out = silu(g) * u, written as in cpu.rs so that the exponential's argument is never positive.
extern "C" __global__ void silu_mul_f32(const float* __restrict__ g, const float* __restrict__ u,
                                        float* __restrict__ out, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float x = g[i];
        float e = expf(-fabsf(x));
        float num = x >= 0.f ? x : x * e;
        out[i] = num / (1.f + e) * u[i];
    }
}

// RMSNorm of each row: w * (x * rsqrt(mean(x^2) + eps)), the sum of squares in f64 as cpu.rs.
// One block (blockDim a multiple of 32, at most 1024) per row.
extern "C" __global__ void rms_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                        float* __restrict__ out, int cols, float eps) {
    __shared__ double part[32];
    const float* r = x + (size_t)blockIdx.x * cols;
    float* o = out + (size_t)blockIdx.x * cols;
    double ss = 0.0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) ss += (double)r[c] * (double)r[c];
    float inv = 1.f / sqrtf((float)(block_sum_f64(ss, part) / cols) + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = w[c] * (r[c] * inv);
}

// Rotary embedding, HF rotate_half convention: for each head, with half = head_dim / 2,
// o1 = x1 cos - x2 sin, o2 = x2 cos + x1 sin, angle = pos * inv_freq[j] in f32.
// One block per row; threads over (head, j) pairs.
extern "C" __global__ void rope_f32(const float* __restrict__ x, const unsigned* __restrict__ pos,
                                    const float* __restrict__ inv_freq, float* __restrict__ out,
                                    int cols, int head_dim) {
    int half = head_dim / 2;
    int pairs = cols / 2;
    const float* r = x + (size_t)blockIdx.x * cols;
    float* o = out + (size_t)blockIdx.x * cols;
    float p = (float)pos[blockIdx.x];
    for (int t = threadIdx.x; t < pairs; t += blockDim.x) {
        int h = t / half, j = t % half;
        float s, c;
        sincosf(p * inv_freq[j], &s, &c);
        int base = h * head_dim;
        float x1 = r[base + j], x2 = r[base + half + j];
        o[base + j] = x1 * c - x2 * s;
        o[base + half + j] = x2 * c + x1 * s;
    }
}

// out[rows[i], :] += weights[i] * src[i, :] when the rows are distinct: one block per i.
extern "C" __global__ void scatter_add_rows_f32(float* __restrict__ out,
                                                const float* __restrict__ src,
                                                const unsigned* __restrict__ rows,
                                                const float* __restrict__ weights, int n,
                                                int cols) {
    int i = blockIdx.x;
    if (i >= n) return;
    float wgt = weights[i];
    float* o = out + (size_t)rows[i] * cols;
    const float* s = src + (size_t)i * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] += s[c] * wgt;
}

// The same with repeated rows: each thread owns a column and adds the sources in order.
extern "C" __global__ void scatter_add_rows_seq_f32(float* __restrict__ out,
                                                    const float* __restrict__ src,
                                                    const unsigned* __restrict__ rows,
                                                    const float* __restrict__ weights, int n,
                                                    int cols) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    for (int i = 0; i < n; ++i) out[(size_t)rows[i] * cols + c] += src[(size_t)i * cols + c] * weights[i];
}

// -log_softmax(logits[i])[targets[i]] per row (block_logsumexp in rows.cuh). One block (256 threads)
// per row.
extern "C" __global__ void nll_f32(const float* __restrict__ logits,
                                   const unsigned* __restrict__ targets, float* __restrict__ out,
                                   int vocab) {
    const float* r = logits + (size_t)blockIdx.x * vocab;
    float lse = block_logsumexp(r, vocab);
    if (threadIdx.x == 0) out[blockIdx.x] = lse - r[targets[blockIdx.x]];
}

// Causal grouped-query attention (attention_rows in rows.cuh): one block per ATT_WARPS consecutive
// query rows and head (blockIdx.y).
extern "C" __global__ void __launch_bounds__(ATT_WARPS * WARP)
attention_f32(const float* __restrict__ q, const float* __restrict__ k,
              const float* __restrict__ v, float* __restrict__ out, int T, int n_heads,
              int n_kv_heads, int d, int window, float scale) {
    extern __shared__ float smem[];
    float* Ks = smem;
    float* Vs = Ks + ATT_TILE * (d + 1);
    float* Qs = Vs + ATT_TILE * d;
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP;
    int h = blockIdx.y;
    int g = h / (n_heads / n_kv_heads);
    int qw = n_heads * d, kw = n_kv_heads * d;
    int q0 = blockIdx.x * ATT_WARPS;
    int qi = q0 + wid;
    bool active = qi < T;
    int q_last = min(q0 + ATT_WARPS, T) - 1;

    if (active)
        for (int e = lane; e < d; e += WARP) Qs[wid * d + e] = q[(size_t)qi * qw + h * d + e];

    float acc[ATT_MAX_E], l;
    attention_rows(k + g * d, v + g * d, kw, d, window, scale, q0, q_last, qi, active, Ks, Vs, Qs, acc, l);
    if (active) {
        float inv = 1.f / l;
#pragma unroll
        for (int i = 0; i < ATT_MAX_E; ++i) {
            int e = lane + i * WARP;
            if (e < d) out[(size_t)qi * qw + h * d + e] = acc[i] * inv;
        }
    }
}
