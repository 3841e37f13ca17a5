// Speckle-noise CUDA kernel: the Philox stream of include/philox.h (the one noise.py's Triton
// kernel draws), one Philox call per element, the image's sigma drawn once per block.
// grid (blocks along an image, images (grid-strided)); float input, or uint8 with the fused
// normalized clean output (make_noisy_batch: one read of the bytes, two writes).
#include <algorithm>
#include <type_traits>

#include "common.cuh"
#include "launchers.h"

namespace speckle::cuda {
namespace {

constexpr int kThreads = 256;

template <typename In, typename Out>
__global__ void speckle_kernel(const In* __restrict__ src, Out* __restrict__ out, Out* __restrict__ clean,
                               int64_t per_image, int64_t images, SpeckleParams prm) {
  constexpr bool kFromU8 = std::is_same<In, unsigned char>::value;
  __shared__ float factor_sigma;
  for (int64_t image = blockIdx.y; image < images; image += gridDim.y) {
    __syncthreads();  // the previous image's factor_sigma is no longer read
    if (threadIdx.x == 0) {
      const float sigma = prm.sigma_span > 0.0f
                              ? prm.sigma_low + prm.sigma_span * image_uniform(prm.seed, prm.offset, image, per_image)
                              : prm.sigma_low;
      factor_sigma = prm.factor * sigma;
    }
    __syncthreads();
    for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < per_image;
         k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t j = image * per_image + k;
      float n1, n2;
      standard_noise(prm.seed, prm.offset + static_cast<uint64_t>(j), prm.rayleigh, n1, n2);
      const float v = kFromU8 ? to_float(src[j]) / 255.0f : to_float(src[j]);
      const float y = speckle_apply(v, factor_sigma, n1, n2, prm.sigma_add, prm.clip);
      if (kFromU8) {
        out[j] = from_float<Out>(2.0f * y - 1.0f);
        clean[j] = from_float<Out>(2.0f * v - 1.0f);
      } else {
        out[j] = from_float<Out>(y);
      }
    }
  }
}

template <typename In, typename Out>
void launch(const void* src, void* out, void* clean, int64_t numel, int64_t per_image, const SpeckleParams& prm,
            cudaStream_t stream) {
  const int64_t images = numel / per_image;
  const dim3 grid(std::min<unsigned>(ceil_div(per_image, kThreads), 4096u),
                  static_cast<unsigned>(std::min<int64_t>(images, 65535)));
  speckle_kernel<In, Out><<<grid, kThreads, 0, stream>>>(static_cast<const In*>(src), static_cast<Out*>(out),
                                                         static_cast<Out*>(clean), per_image, images, prm);
}

template <typename Out>
void launch_for_out(DType in_dtype, const void* src, void* out, void* clean, int64_t numel, int64_t per_image,
                    const SpeckleParams& prm, cudaStream_t stream) {
  if (in_dtype == DType::kUInt8) {
    launch<unsigned char, Out>(src, out, clean, numel, per_image, prm, stream);
  } else {
    launch<Out, Out>(src, out, nullptr, numel, per_image, prm, stream);
  }
}

}  // namespace

void speckle_noise(DType in_dtype, DType out_dtype, const void* src, void* out, void* clean, int64_t numel,
                   int64_t per_image, const SpeckleParams& prm, cudaStream_t stream) {
  if (numel == 0 || per_image == 0) return;
  switch (out_dtype) {
    case DType::kFloat32: launch_for_out<float>(in_dtype, src, out, clean, numel, per_image, prm, stream); break;
    case DType::kFloat16: launch_for_out<__half>(in_dtype, src, out, clean, numel, per_image, prm, stream); break;
    case DType::kBFloat16:
      launch_for_out<__nv_bfloat16>(in_dtype, src, out, clean, numel, per_image, prm, stream);
      break;
    default: break;  // rejected by the binding's checks
  }
}

}  // namespace speckle::cuda
