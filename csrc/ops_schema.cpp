// The speckle_kernels operator library: every op's schema, registered once here. The kernels
// are registered per backend: csrc/cpu/cpu_binding.cpp (CPU, and the CPU-only utility ops) and
// csrc/cuda/cuda_binding.cpp (CUDA). Autograd and the fake (meta) kernels live in
// speckle_kernels/_ext.py.
//
//   batch_renorm_forward(x, weight?, bias?, running_mean!, running_std!, num_batches_tracked!,
//                        training, momentum, eps, r_max[4], d_max[4]) -> (y, stats)
//       stats: the (8, C) fp32 tensor of csrc/include/batch_renorm_math.h (rows kPivot..kShift);
//       r_max/d_max: RenormSchedule's (slope, start, low, high)
//   batch_renorm_backward(dy, x, weight?, stats, training) -> (dx, dweight, dbias)
//       Supported types and layouts of both: see api_common.h.
//   batch_renorm_stats(x, weight?, bias?, running_mean!, running_std!, num_batches_tracked!,
//                      training, momentum, eps, r_max[4], d_max[4]) -> stats
//       the statistics pass of batch_renorm_forward alone (same stats, same buffer update)
//   batch_renorm_act_forward(x, weight?, bias?, running_mean!, running_std!,
//                            num_batches_tracked!, training, momentum, eps, r_max[4], d_max[4],
//                            activation, negative_slope, dropout, rng) -> (y, stats)
//       the norm block: y = dropout(act(batch_renorm(x))); activation 0 identity, 1 relu,
//       2 leaky_relu (negative_slope); dropout p in [0, 1) applies only when training;
//       rng: int64 (2,) tensor (seed, offset) on x's device, read on the device (the mask stream
//       of speckle_kernels/reference.py: element j keeps when u(seed, offset + j) >= p)
//   batch_renorm_act_backward(dy, x, weight?, stats, training, activation, negative_slope,
//                             dropout, rng) -> (dx, dweight, dbias)
//       regenerates the mask and the pre-activation from x: nothing but x and stats is saved
//   add_speckle_noise(x, seed, offset, factor, sigma_low, sigma_high, sigma_add, rayleigh, clip)
//       x: float32 / float16 / bfloat16, any shape (dim 0 indexes images when x.dim() >= 2)
//   make_noisy_batch(clean_u8, ..., out_dtype) -> (noisy, clean)
//       clean_u8: uint8 (N, C, H, W); out_dtype float32 / bfloat16 / float16
//       The noise stream is the one of speckle_kernels/noise.py (see csrc/include/philox.h);
//       sigma is drawn per image when sigma_high > sigma_low. Outputs are contiguous.
//   cpu_noise_lane_widths() -> int[]          the lane paths of the CPU noise kernel in use
//   cpu_capability() -> str                   the CPU kernel variant in use (default, avx2, avx512)
//   cpu_capabilities() -> str[]               the built variants this CPU runs, least capable first
//   cpu_capability_note() -> str              why the variant in use is not the one
//                                             SPECKLE_CPU_CAPABILITY asked for ("" when it is)
//   cpu_output_cache_idle_bytes() -> int, empty_cpu_output_cache() -> int
//       the CPU output cache of csrc/cpu/output_cache.cpp
#include <torch/library.h>

TORCH_LIBRARY(speckle_kernels, m) {
  m.def(
      "batch_renorm_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!) running_mean, "
      "Tensor(b!) running_std, Tensor(c!) num_batches_tracked, bool training, float momentum, "
      "float eps, float[] r_max, float[] d_max) -> (Tensor, Tensor)");
  m.def(
      "batch_renorm_backward(Tensor dy, Tensor x, Tensor? weight, Tensor stats, bool training) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_renorm_stats(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!) running_mean, "
      "Tensor(b!) running_std, Tensor(c!) num_batches_tracked, bool training, float momentum, "
      "float eps, float[] r_max, float[] d_max) -> Tensor");
  m.def(
      "batch_renorm_act_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!) running_mean, "
      "Tensor(b!) running_std, Tensor(c!) num_batches_tracked, bool training, float momentum, "
      "float eps, float[] r_max, float[] d_max, int activation, float negative_slope, "
      "float dropout, Tensor rng) -> (Tensor, Tensor)");
  m.def(
      "batch_renorm_act_backward(Tensor dy, Tensor x, Tensor? weight, Tensor stats, bool training, "
      "int activation, float negative_slope, float dropout, Tensor rng) -> (Tensor, Tensor, Tensor)");
  m.def(
      "add_speckle_noise(Tensor x, int seed, int offset, float factor, float sigma_low, "
      "float sigma_high, float sigma_add, bool rayleigh, bool clip) -> Tensor");
  m.def(
      "make_noisy_batch(Tensor clean_u8, int seed, int offset, float factor, float sigma_low, "
      "float sigma_high, float sigma_add, bool rayleigh, bool clip, ScalarType out_dtype) "
      "-> (Tensor, Tensor)");
  m.def("cpu_noise_lane_widths() -> int[]");
  m.def("cpu_capability() -> str");
  m.def("cpu_capabilities() -> str[]");
  m.def("cpu_capability_note() -> str");
  m.def("cpu_output_cache_idle_bytes() -> int");
  m.def("empty_cpu_output_cache() -> int");
}
