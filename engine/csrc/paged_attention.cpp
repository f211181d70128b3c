// Decode attention straight over the paged KV cache (CPU, fp32): one query token per sequence.
//
// Reads each sequence's K and V once, block by block through its block table, instead of first
// gathering them into a padded [B, T, KVH, D] copy and running SDPA over it. For grouped-query
// attention, the G query heads that share a kv head are scored against each K row together.
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

  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(G * D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / KVH, kvh = i % KVH;
      const int64_t n = lens[b];
      scores.assign(G * n, 0.f);
      const float* qb = qp + (b * H + kvh * G) * D;  // the G heads of this kv head
      // pass 1: scores[g, t] = q[g] . k[t] * scale
      for (int64_t t = 0; t < n; ++t) {
        const int64_t blk = bt[b * max_blocks + t / bs];
        const float* kt = kp + (blk * bs + t % bs) * row + kvh * D;
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qb + g * D;
          float s = 0.f;
          for (int64_t d = 0; d < D; ++d) s += qg[d] * kt[d];
          scores[g * n + t] = s * sc;
        }
      }
      // softmax per head
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * n;
        float m = -INFINITY;
        for (int64_t t = 0; t < n; ++t) m = std::max(m, sg[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < n; ++t) { sg[t] = std::exp(sg[t] - m); sum += sg[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < n; ++t) sg[t] *= inv;
      }
      // pass 2: out[g] = sum_t p[g, t] v[t]
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t blk = bt[b * max_blocks + t / bs];
        const float* vt = vp + (blk * bs + t % bs) * row + kvh * D;
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * n + t];
          float* ag = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) ag[d] += p * vt[d];
        }
      }
      for (int64_t g = 0; g < G; ++g)
        std::copy(acc.begin() + g * D, acc.begin() + (g + 1) * D, op + (b * H + kvh * G + g) * D);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache");
}
