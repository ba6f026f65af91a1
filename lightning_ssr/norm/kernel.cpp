// The fused CPU training step of SSRNorm: one pass over the input forward, two backward.
//
// What lightning_ssr/norm/base.py and function.py compute with about 40 small tensor operations
// per call (the state transform, the batch moments, the slow state update, the bounded gain and
// the projected gradient's running moments), as one autograd function over plain loops, for
// float32 input in torch's contiguous layout on the CPU. Built and loaded by
// lightning_ssr/norm/native.py; the Python path stays the reference (tests compare the two).
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int kLanes = 8;           // partial sums per loop, so the reductions vectorize
constexpr int64_t kGrain = 16384;   // elements per parallel task at least

// torch's lerp: exact at both ends.
inline float lerp(float a, float b, float w) {
  return w < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w);
}

inline float clamp(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Channels per parallel task, so that each task covers at least kGrain elements.
inline int64_t channel_grain(int64_t per_channel) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(per_channel, 1));
}

// The layer's hyperparameters, in the order native.py passes them. With `accumulate` the
// forward adds the batch's statistics, weighted by its element count, to the pending sums (mean,
// second moment, activity: 3 x C) instead of updating the state (auto_update=False, or a
// reduction across processes first; the layer's homeostatic_step applies them).
struct Params {
  double eps, tau, gain_rate, max_change, max_gain, set_point, grad_momentum;
  bool layer_mean_set_point, project_gradient, accumulate;
  explicit Params(const std::vector<double>& p)
      : eps(p.at(0)), tau(p.at(1)), gain_rate(p.at(2)), max_change(p.at(3)), max_gain(p.at(4)),
        set_point(p.at(5)), grad_momentum(p.at(6)), layer_mean_set_point(p.at(7) != 0.0),
        project_gradient(p.at(8) != 0.0), accumulate(p.at(9) != 0.0) {}
};

// y = (x - m) * w + b over one row, and sum(x - m), sum((x - m)^2) added to s1, s2.
void normalize_row(const float* x, float* y, float m, float w, float b, int64_t n, double* s1, double* s2) {
  float a1[kLanes] = {0}, a2[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float u = x[i + j] - m;
      a1[j] += u;
      a2[j] += u * u;
      y[i + j] = u * w + b;
    }
  }
  double t1 = 0.0, t2 = 0.0;
  for (; i < n; ++i) {
    const float u = x[i] - m;
    t1 += u;
    t2 += static_cast<double>(u) * u;
    y[i] = u * w + b;
  }
  for (int j = 0; j < kLanes; ++j) {
    t1 += a1[j];
    t2 += a2[j];
  }
  *s1 += t1;
  *s2 += t2;
}

// sum(g) and sum(g * (x - m)) over one row, added to s1, s2.
void gradient_row(const float* g, const float* x, float m, int64_t n, double* s1, double* s2) {
  float a1[kLanes] = {0}, a2[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      a1[j] += g[i + j];
      a2[j] += g[i + j] * (x[i + j] - m);
    }
  }
  double t1 = 0.0, t2 = 0.0;
  for (; i < n; ++i) {
    t1 += g[i];
    t2 += static_cast<double>(g[i]) * (x[i] - m);
  }
  for (int j = 0; j < kLanes; ++j) {
    t1 += a1[j];
    t2 += a2[j];
  }
  *s1 += t1;
  *s2 += t2;
}

const float* optional_data(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
}

struct SSRNormFunction : public torch::autograd::Function<SSRNormFunction> {
  // Normalizes x with the state as it is (y = (x - running_mean) * gain / sqrt(running_var + eps)
  // * weight + bias), then applies one update of the state from this batch: the running mean,
  // variance and activity by a bias-corrected average, then the bounded gain. Saves, per
  // channel, the shift, the effective weight, the scale and the moments mean(u), mean(u^2) of
  // u = x - shift for the backward.
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const std::optional<Tensor>& weight,
                        const std::optional<Tensor>& bias, Tensor running_mean, Tensor running_var,
                        Tensor running_activity, Tensor gain, Tensor num_batches_tracked, Tensor grad_stats,
                        Tensor grad_steps, Tensor pending, std::vector<double> params) {
    const Params p(params);
    const int64_t N = input.size(0), C = input.size(1), L = input.numel() / std::max<int64_t>(N * C, 1);
    Tensor y = at::empty_like(input);
    Tensor saved = at::empty({5, C}, input.options());
    float wt = 0.0f;  // the weight of this batch in the state's averages (unused when accumulating)
    if (!p.accumulate) {
      const int64_t steps = ++num_batches_tracked.data_ptr<int64_t>()[0];
      wt = static_cast<float>(std::max(1.0 / p.tau, 1.0 / static_cast<double>(std::max<int64_t>(steps, 1))));
    }
    const float* x = input.data_ptr<float>();
    float* out = y.data_ptr<float>();
    const float* w = optional_data(weight);
    const float* b = optional_data(bias);
    float* rm = running_mean.data_ptr<float>();
    float* rv = running_var.data_ptr<float>();
    float* ra = running_activity.data_ptr<float>();
    float* gn = gain.data_ptr<float>();
    float* sv = saved.data_ptr<float>();
    float* sums = p.accumulate ? pending.data_ptr<float>() : nullptr;
    const double count = static_cast<double>(N * L);
    const float eps = static_cast<float>(p.eps);
    at::parallel_for(0, C, channel_grain(N * L), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const float m = rm[c];
        const float scale = (1.0f / std::sqrt(rv[c] + eps)) * gn[c];
        const float we = w ? w[c] * scale : scale;
        const float bc = b ? b[c] : 0.0f;
        double s1 = 0.0, s2 = 0.0;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t off = (n * C + c) * L;
          normalize_row(x + off, out + off, m, we, bc, L, &s1, &s2);
        }
        const float mean_u = static_cast<float>(s1 / count), second = static_cast<float>(s2 / count);
        sv[c] = m;
        sv[C + c] = we;
        sv[2 * C + c] = scale;
        sv[3 * C + c] = mean_u;
        sv[4 * C + c] = second;
        if (sums) {  // weighted by the element count, as the Python path's weighted_sums
          const float n = static_cast<float>(count);
          sums[c] += (m + mean_u) * n;
          sums[C + c] += second * n;
          sums[2 * C + c] += scale * scale * second * n;
          continue;
        }
        rm[c] = lerp(m, m + mean_u, wt);
        rv[c] = lerp(rv[c], second, wt);
        ra[c] = lerp(ra[c], scale * scale * second, wt);
      }
    });
    if (p.gain_rate > 0.0 && !sums) {
      float sp = static_cast<float>(p.set_point);
      if (p.layer_mean_set_point) {
        double s = 0.0;
        for (int64_t c = 0; c < C; ++c) s += ra[c];
        sp = static_cast<float>(s / static_cast<double>(C));
      }
      const float lo = static_cast<float>(1.0 - p.max_change), hi = static_cast<float>(1.0 + p.max_change);
      const float glo = static_cast<float>(1.0 / p.max_gain), ghi = static_cast<float>(p.max_gain);
      const float rate = static_cast<float>(p.gain_rate);
      for (int64_t c = 0; c < C; ++c) gn[c] = clamp(gn[c] * clamp(1.0f + rate * (sp - ra[c]), lo, hi), glo, ghi);
    }
    ctx->save_for_backward({input});
    ctx->saved_data["saved"] = saved;
    ctx->saved_data["grad_stats"] = grad_stats;
    ctx->saved_data["grad_steps"] = grad_steps;
    ctx->saved_data["eps"] = p.eps;
    ctx->saved_data["grad_momentum"] = p.grad_momentum;
    ctx->saved_data["project"] = p.project_gradient;
    return y;
  }

  // dx = w_eff * (g - c - k * u): the gradient less its regression on (1, u), with k and c from
  // running averages of mean(g), mean(g u), mean(u), mean(u^2) (updated here, in place, only
  // when the input gradient is needed, as the Python path does); grad_weight = sum(g u) * scale
  // and grad_bias = sum(g).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor input = ctx->get_saved_variables()[0];
    const Tensor saved = ctx->saved_data["saved"].toTensor();
    Tensor grad_stats = ctx->saved_data["grad_stats"].toTensor();
    Tensor grad_steps = ctx->saved_data["grad_steps"].toTensor();
    const float eps = static_cast<float>(ctx->saved_data["eps"].toDouble());
    const bool project = ctx->saved_data["project"].toBool();
    const Tensor grad = grads[0].contiguous();
    const int64_t N = input.size(0), C = input.size(1), L = input.numel() / std::max<int64_t>(N * C, 1);
    const bool need_input = ctx->needs_input_grad(0), need_weight = ctx->needs_input_grad(1);
    const bool need_bias = ctx->needs_input_grad(2);
    Tensor dx = need_input ? at::empty_like(input) : Tensor();
    Tensor grad_weight = need_weight ? at::empty({C}, input.options()) : Tensor();
    Tensor grad_bias = need_bias ? at::empty({C}, input.options()) : Tensor();
    float gwt = 0.0f;
    if (need_input && project) {
      const int64_t steps = ++grad_steps.data_ptr<int64_t>()[0];
      gwt = static_cast<float>(std::max(ctx->saved_data["grad_momentum"].toDouble(), 1.0 / static_cast<double>(steps)));
    }
    const float* g = grad.data_ptr<float>();
    const float* x = input.data_ptr<float>();
    const float* sv = saved.data_ptr<float>();
    float* gs = grad_stats.data_ptr<float>();
    float* out = need_input ? dx.data_ptr<float>() : nullptr;
    float* gw = need_weight ? grad_weight.data_ptr<float>() : nullptr;
    float* gb = need_bias ? grad_bias.data_ptr<float>() : nullptr;
    const double count = static_cast<double>(N * L);
    at::parallel_for(0, C, channel_grain(N * L), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const float m = sv[c], we = sv[C + c], scale = sv[2 * C + c];
        double sg = 0.0, sgu = 0.0;
        if (gw || gb || (out && project)) {
          for (int64_t n = 0; n < N; ++n) {
            const int64_t off = (n * C + c) * L;
            gradient_row(g + off, x + off, m, L, &sg, &sgu);
          }
        }
        if (gb) gb[c] = static_cast<float>(sg);
        if (gw) gw[c] = static_cast<float>(sgu) * scale;
        if (!out) continue;
        float a = we, bx = 0.0f, d = 0.0f;
        if (project) {
          const float batch[4] = {static_cast<float>(sg / count), static_cast<float>(sgu / count), sv[3 * C + c],
                                  sv[4 * C + c]};
          for (int r = 0; r < 4; ++r) gs[r * C + c] = lerp(gs[r * C + c], batch[r], gwt);
          const float mg = gs[c], mgu = gs[C + c], mu = gs[2 * C + c], muu = gs[3 * C + c];
          const float k = (mgu - mu * mg) / (std::max(muu - mu * mu, 0.0f) + eps);
          const float shift = mg - k * mu;
          bx = -we * k;            // dx = we * g - we * k * (x - m) - we * shift
          d = we * (k * m - shift);
        }
        for (int64_t n = 0; n < N; ++n) {
          const int64_t off = (n * C + c) * L;
          const float* gp = g + off;
          const float* xp = x + off;
          float* dp = out + off;
          for (int64_t i = 0; i < L; ++i) dp[i] = a * gp[i] + bx * xp[i] + d;
        }
      }
    });
    return {dx,       grad_weight, grad_bias, Tensor(), Tensor(), Tensor(),
            Tensor(), Tensor(),    Tensor(),  Tensor(), Tensor(), Tensor()};
  }
};

Tensor train_forward(const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                     Tensor running_mean, Tensor running_var, Tensor running_activity, Tensor gain,
                     Tensor num_batches_tracked, Tensor grad_stats, Tensor grad_steps, Tensor pending,
                     std::vector<double> params) {
  return SSRNormFunction::apply(input, weight, bias, running_mean, running_var, running_activity, gain,
                                num_batches_tracked, grad_stats, grad_steps, pending, params);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SSRNorm's fused CPU training step (float32, contiguous input)";
  m.def("train_forward", &train_forward,
        "One training forward of an SSR layer: normalize with the state, update it, and record the "
        "autograd node of the projected backward.");
}
