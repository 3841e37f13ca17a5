// SPECKLE_HD: inline for the host compiler, __host__ __device__ under nvcc.
#pragma once
#if defined(__CUDACC__)
#define SPECKLE_HD __host__ __device__ __forceinline__
#else
#define SPECKLE_HD inline
#endif
