// Decode attention straight over the paged KV cache (CPU, fp32): one query token per sequence.
//
// Reads each sequence's K and V once, block by block through its block table, instead of first
// gathering them into a padded [B, T, KVH, D] copy and running SDPA over it. For grouped-query
// attention, each K/V row (all kv heads of one token) is read once for all query heads.
//
//   q:           [B, H, D]
//   k_cache:     [num_blocks, block_size, KVH, D]   (v_cache the same)
//   block_table: [B, max_blocks] int64
//   ctx_lens:    [B] int64
//   out:         [B, H, D]
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_table, torch::Tensor ctx_lens, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k_cache.dtype() == torch::kFloat32, "fp32 only");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous inputs");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), KVH = k_cache.size(2);
  const int64_t G = H / KVH;
  const int64_t max_blocks = block_table.size(1);
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* bt = block_table.data_ptr<int64_t>();
  const int64_t* lens = ctx_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t row = KVH * D;  // floats per cached token

  // One sequence per task; each cached K (then V) row [KVH, D] is read once, contiguously, and
  // serves all H query heads (head h uses kv head h / G).
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(H * D);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = lens[b];
      scores.assign(H * n, 0.f);
      const float* qb = qp + b * H * D;
      // pass 1: scores[h, t] = q[h] . k[t, h / G] * scale
      for (int64_t t = 0; t < n; ++t) {
        const int64_t blk = bt[b * max_blocks + t / bs];
        const float* krow = kp + (blk * bs + t % bs) * row;
        for (int64_t h = 0; h < H; ++h) {
          const float* qh = qb + h * D;
          const float* kt = krow + (h / G) * D;
          float s = 0.f;
          for (int64_t d = 0; d < D; ++d) s += qh[d] * kt[d];
          scores[h * n + t] = s * sc;
        }
      }
      // softmax per head
      for (int64_t h = 0; h < H; ++h) {
        float* sh = scores.data() + h * n;
        float m = -INFINITY;
        for (int64_t t = 0; t < n; ++t) m = std::max(m, sh[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < n; ++t) { sh[t] = std::exp(sh[t] - m); sum += sh[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < n; ++t) sh[t] *= inv;
      }
      // pass 2: out[h] = sum_t p[h, t] v[t, h / G]
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t blk = bt[b * max_blocks + t / bs];
        const float* vrow = vp + (blk * bs + t % bs) * row;
        for (int64_t h = 0; h < H; ++h) {
          const float p = scores[h * n + t];
          const float* vt = vrow + (h / G) * D;
          float* ah = acc.data() + h * D;
          for (int64_t d = 0; d < D; ++d) ah[d] += p * vt[d];
        }
      }
      std::copy(acc.begin(), acc.end(), op + b * H * D);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache");
}
