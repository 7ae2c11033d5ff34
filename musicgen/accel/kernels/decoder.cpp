// All decoder layers of one decoding step (one new position per row) in a single call, with int4, int8, float32,
// bfloat16 or float16 weights, at every instruction-set level. Driven from Python, a step pays the dispatch of
// some 30 small PyTorch operations per layer besides its products and attention; here the layer loop, the norms,
// both attentions (attention.cpp) and the activation run in C++ on preallocated buffers, and the products call
// the kernels directly. What it computes is the eager path of musicgen/lm.py for T = 1:
//
//   x += out(attend(q, cache_k[:pos+1], cache_v[:pos+1]))   q, k, v = qkv(norm1(x)); k, v written at pos
//   x += cross_out(attend(cross_q(norm_cross(x)), text_k, text_v, text_bias))      (text models only)
//   x += fc2(act(fc1(norm2(x))))
//
// The activations stay float32 throughout. exp and erf are vectorised polynomial approximations (relative error
// about 1e-7, float32 rounding).
#include "attention.h"
#include "kernels.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <mutex>
#include <string>
#include <vector>

namespace {

// exact GELU 0.5 x (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7)
inline __m256 gelu8(__m256 x) {
  const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f));
  const __m256 sign = _mm256_and_ps(z, _mm256_set1_ps(-0.0f));
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), z);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(a, _mm256_set1_ps(0.3275911f), one));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  p = _mm256_mul_ps(p, t);
  const __m256 erf_a = _mm256_fnmadd_ps(p, musicgen::exp8(_mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), a), a)),
                                        _mm256_set1_ps(1.0f));
  const __m256 erf_z = _mm256_or_ps(erf_a, sign);
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.0f), erf_z));
}

struct Linear {
  enum Kind { INT4, INT8, DENSE } kind = INT4;
  // int4: packed uint8 and float16 group scales; int8: int8 and float32 scales; dense: float32, bfloat16 or
  // float16, no scales. Bias: float32, or undefined.
  torch::Tensor w, s, b;
  int64_t N = 0, K = 0;

  void operator()(const float* x, int64_t M, float* y, musicgen::Int4Scratch& scratch) const {
    const float* bias = b.defined() ? b.data_ptr<float>() : nullptr;
    if (kind == INT4)
      musicgen::int4_gemv_raw(x, M, K, w.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>()),
                              bias, N, y, scratch);
    else if (kind == INT8)
      musicgen::int8_gemv_raw(x, M, K, w.data_ptr<int8_t>(), s.data_ptr<float>(), bias, N, y);
    else
      musicgen::dense_gemv_raw(x, M, K, w.data_ptr(), *musicgen::dense_type(w.scalar_type()), bias, N, y);
  }
};

struct Layer {
  torch::Tensor norm1_w, norm1_b, norm_cross_w, norm_cross_b, norm2_w, norm2_b;   // float32 (D,)
  Linear qkv, out, cross_q, cross_out, fc1, fc2;
  bool cross = false;
};

Linear make_linear(const std::string& kind, torch::Tensor w, c10::optional<torch::Tensor> s,
                   c10::optional<torch::Tensor> b, int64_t in_features) {
  Linear l;
  TORCH_CHECK(kind == "int4" || kind == "int8" || kind == "dense",
              "fused decoder: linear kind must be int4, int8 or dense");
  l.kind = kind == "int4" ? Linear::INT4 : kind == "int8" ? Linear::INT8 : Linear::DENSE;
  l.N = w.size(0);
  l.K = in_features;
  TORCH_CHECK(l.kind == Linear::DENSE || s.has_value(), "fused decoder: quantised weights need their scales");
  if (l.kind == Linear::INT4) {
    TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.is_contiguous() && w.size(1) * 2 == in_features &&
                in_features % 64 == 0, "fused decoder: int4 weights (N, K / 2) uint8 with K % 64 == 0");
    TORCH_CHECK(s->scalar_type() == torch::kFloat16 && s->is_contiguous() && s->numel() == l.N * (in_features / 32),
                "fused decoder: int4 scales (N, K / 32) float16");
  } else if (l.kind == Linear::INT8) {
    TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.is_contiguous() && w.size(1) == in_features,
                "fused decoder: int8 weights (N, K)");
    TORCH_CHECK(s->scalar_type() == torch::kFloat32 && s->is_contiguous() && s->numel() == l.N,
                "fused decoder: int8 scales (N,) float32");
  } else {
    TORCH_CHECK(musicgen::dense_type(w.scalar_type()).has_value() && w.is_contiguous() && w.size(1) == in_features,
                "fused decoder: dense weights (N, K) float32, bfloat16 or float16, contiguous");
  }
  if (s.has_value()) l.s = *s;
  l.w = w;
  if (b.has_value()) {
    l.b = b->to(torch::kFloat32).contiguous();
    TORCH_CHECK(l.b.numel() == l.N, "fused decoder: bias must be (N,)");
  }
  return l;
}

class FusedDecoder {
 public:
  FusedDecoder(int64_t dim, int64_t heads, int64_t ffn, double eps, std::string activation)
      : D_(dim), H_(heads), hd_(dim / heads), F_(ffn), eps_(static_cast<float>(eps)), gelu_(activation == "gelu") {
    TORCH_CHECK(dim % heads == 0 && hd_ <= 256, "fused decoder: heads must divide dim, head_dim <= 256");
    TORCH_CHECK(dim % 8 == 0 && ffn % 8 == 0, "fused decoder: dim and ffn_dim must be multiples of 8");
    TORCH_CHECK(activation == "gelu" || activation == "relu", "fused decoder: activation must be gelu or relu");
  }

  // norms: [norm1_w, norm1_b, norm2_w, norm2_b(, norm_cross_w, norm_cross_b)];
  // linears: qkv, out, fc1, fc2(, cross_q, cross_out) as (kind, weight, scales or None (dense), bias or None)
  void add_layer(std::vector<torch::Tensor> norms, std::vector<std::string> kinds, std::vector<torch::Tensor> weights,
                 std::vector<c10::optional<torch::Tensor>> scales, std::vector<c10::optional<torch::Tensor>> biases) {
    const bool cross = norms.size() == 6;
    TORCH_CHECK((norms.size() == 4 || cross) && kinds.size() == norms.size() && weights.size() == kinds.size() &&
                scales.size() == kinds.size() && biases.size() == kinds.size(),
                "fused decoder: 4 norm tensors and 4 linears per layer, 6 and 6 with cross-attention");
    for (auto& t : norms) {
      TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.numel() == D_, "fused decoder: float32 (dim,) norms");
      t = t.contiguous();
    }
    const int64_t in[6] = {D_, D_, D_, F_, D_, D_};
    const int64_t outs[6] = {3 * D_, D_, F_, D_, D_, D_};
    std::vector<Linear> lin;
    for (size_t i = 0; i < kinds.size(); ++i) {
      lin.push_back(make_linear(kinds[i], weights[i], scales[i], biases[i], in[i]));
      TORCH_CHECK(lin.back().N == outs[i], "fused decoder: linear ", i, " has ", lin.back().N, " outputs, expected ",
                  outs[i]);
    }
    Layer l;
    l.norm1_w = norms[0], l.norm1_b = norms[1], l.norm2_w = norms[2], l.norm2_b = norms[3];
    l.qkv = lin[0], l.out = lin[1], l.fc1 = lin[2], l.fc2 = lin[3];
    if (cross) {
      l.cross = true;
      l.norm_cross_w = norms[4], l.norm_cross_b = norms[5];
      l.cross_q = lin[4], l.cross_out = lin[5];
    }
    layers_.push_back(std::move(l));
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x (R, D) float32, row r at position positions[r] (one entry: every row) -> (R, D) after every layer.
  // Writes each row's keys/values at its position into the caches (each (>= R, H, max_len, hd)), and row r
  // attends to its positions 0..positions[r]; cross_k/v per layer (>= R, H, S, hd) and bias (R, S) additive,
  // for text models. Rows past R in the caches are left alone (the service's slots).
  torch::Tensor step(torch::Tensor x, std::vector<int64_t> positions, std::vector<torch::Tensor> cache_k,
                     std::vector<torch::Tensor> cache_v, std::vector<torch::Tensor> cross_k,
                     std::vector<torch::Tensor> cross_v, c10::optional<torch::Tensor> cross_bias) {
    const int64_t L = num_layers();
    TORCH_CHECK(x.dim() == 2 && x.size(1) == D_ && x.scalar_type() == torch::kFloat32,
                "fused decoder: x (R, D) float32");
    TORCH_CHECK(static_cast<int64_t>(cache_k.size()) == L && static_cast<int64_t>(cache_v.size()) == L,
                "fused decoder: one cache per layer");
    const bool text = L > 0 && layers_[0].cross;
    TORCH_CHECK(!text || (static_cast<int64_t>(cross_k.size()) == L && static_cast<int64_t>(cross_v.size()) == L),
                "fused decoder: text keys/values for every layer");
    const int64_t R = x.size(0);
    TORCH_CHECK(positions.size() == 1 || static_cast<int64_t>(positions.size()) == R,
                "fused decoder: one position, or one per row");
    std::vector<int64_t> pos(R, positions[0]), seen(R);
    for (int64_t r = 0; r < R; ++r) {
      if (positions.size() > 1) pos[r] = positions[r];
      TORCH_CHECK(pos[r] >= 0, "fused decoder: negative position");
      seen[r] = pos[r] + 1;
    }
    const int64_t last = *std::max_element(pos.begin(), pos.end());
    std::lock_guard<std::mutex> lock(busy_);   // the buffers below are shared: one step at a time per decoder
    torch::Tensor y = x.contiguous().clone();
    torch::Tensor bias;
    if (text && cross_bias.has_value()) {
      bias = cross_bias->to(torch::kFloat32).reshape({R, -1}).contiguous();
    }
    h_.resize(R * std::max(D_, F_));
    big_.resize(R * std::max(3 * D_, F_));
    att_.resize(R * D_);
    float* xp = y.data_ptr<float>();
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd_));
    for (int64_t i = 0; i < L; ++i) {
      const Layer& l = layers_[i];
      // self-attention over positions 0..pos
      musicgen::KV self = musicgen::view_kv(cache_k[i], cache_v[i], hd_);
      TORCH_CHECK(cache_k[i].size(0) >= R && cache_k[i].size(1) == H_ && last < self.length,
                  "fused decoder: caches (R, H, max_len, hd) with every position < max_len");
      norm(xp, R, l.norm1_w, l.norm1_b, h_.data());
      l.qkv(h_.data(), R, big_.data(), scratch_);
      musicgen::write_kv(self, big_.data() + D_, big_.data() + 2 * D_, 3 * D_, pos, R, H_, hd_);
      musicgen::attend_rows(self, seen, big_.data(), 3 * D_, nullptr, scale, R, H_, hd_, att_.data());
      l.out(att_.data(), R, h_.data(), scratch_);
      add(xp, h_.data(), R * D_);
      if (l.cross) {   // cross-attention to the text
        musicgen::KV txt = musicgen::view_kv(cross_k[i], cross_v[i], hd_);
        TORCH_CHECK(cross_k[i].size(0) >= R && cross_k[i].size(1) == H_,
                    "fused decoder: text keys/values (R, H, S, hd)");
        TORCH_CHECK(!bias.defined() || bias.size(1) == txt.length, "fused decoder: text bias (R, S)");
        norm(xp, R, l.norm_cross_w, l.norm_cross_b, h_.data());
        l.cross_q(h_.data(), R, big_.data(), scratch_);
        musicgen::attend_rows(txt, std::vector<int64_t>(R, txt.length), big_.data(), D_,
                              bias.defined() ? bias.data_ptr<float>() : nullptr, scale, R, H_, hd_, att_.data());
        l.cross_out(att_.data(), R, h_.data(), scratch_);
        add(xp, h_.data(), R * D_);
      }
      norm(xp, R, l.norm2_w, l.norm2_b, h_.data());   // feed-forward
      l.fc1(h_.data(), R, big_.data(), scratch_);
      activate(big_.data(), R * F_);
      l.fc2(big_.data(), R, h_.data(), scratch_);
      add(xp, h_.data(), R * D_);
    }
    return y;
  }

 private:
  void norm(const float* x, int64_t R, const torch::Tensor& w, const torch::Tensor& b, float* out) const {
    const float* wp = w.data_ptr<float>();
    const float* bp = b.data_ptr<float>();
    for (int64_t r = 0; r < R; ++r) {
      const float* xr = x + r * D_;
      float* o = out + r * D_;
      __m256 s = _mm256_setzero_ps();
      for (int64_t d = 0; d < D_; d += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(xr + d));
      const float mean = musicgen::hsum(s) / D_;
      const __m256 m = _mm256_set1_ps(mean);
      __m256 v = _mm256_setzero_ps();
      for (int64_t d = 0; d < D_; d += 8) {
        const __m256 c = _mm256_sub_ps(_mm256_loadu_ps(xr + d), m);
        v = _mm256_fmadd_ps(c, c, v);
      }
      const __m256 inv = _mm256_set1_ps(1.0f / std::sqrt(musicgen::hsum(v) / D_ + eps_));
      for (int64_t d = 0; d < D_; d += 8) {
        const __m256 c = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + d), m), inv);
        _mm256_storeu_ps(o + d, _mm256_fmadd_ps(c, _mm256_loadu_ps(wp + d), _mm256_loadu_ps(bp + d)));
      }
    }
  }

  static void add(float* x, const float* y, int64_t n) {
    for (int64_t i = 0; i < n; i += 8)
      _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  }

  void activate(float* x, int64_t n) const {
    if (gelu_) {
      for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(x + i, gelu8(_mm256_loadu_ps(x + i)));
    } else {
      for (int64_t i = 0; i < n; i += 8)
        _mm256_storeu_ps(x + i, _mm256_max_ps(_mm256_loadu_ps(x + i), _mm256_setzero_ps()));
    }
  }

  int64_t D_, H_, hd_, F_;
  float eps_;
  bool gelu_;
  std::vector<Layer> layers_;
  std::mutex busy_;
  std::vector<float> h_, big_, att_;
  musicgen::Int4Scratch scratch_;
};

}  // namespace

void bind_fused_decoder(pybind11::module_& m) {
  pybind11::class_<FusedDecoder>(m, "FusedDecoder")
      .def(pybind11::init<int64_t, int64_t, int64_t, double, std::string>())
      .def("add_layer", &FusedDecoder::add_layer)
      // other Python threads run during a step
      .def("step", &FusedDecoder::step, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def_property_readonly("num_layers", &FusedDecoder::num_layers);
}
