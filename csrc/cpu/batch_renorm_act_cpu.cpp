// The norm block on the CPU: BatchRenorm -> activation -> dropout (csrc/include/norm_block_math.h)
// in the passes of plain BatchRenorm (batch_renorm_forward.h, batch_renorm_backward.h), through
// element hooks (their contract: batch_renorm_tasks.h):
//   forward   the statistics pass, then ONE pass x -> y = keep ? act(z) * keep_scale : 0
//   backward  g = act'(z) * (keep ? dy * keep_scale : 0), z recomputed from x and the stats,
//             the mask regenerated; then the BatchRenorm backward on g (sums, finalize, dx)
// so the block costs what BatchRenorm costs plus the mask: same tasks, merge order and
// schedules, hence the same independence from thread count and schedule.
//
// The mask stream is counter-based: element e = offset + (logical row-major index) takes word
// e & 3 of Philox(counter e >> 2). Philox runs on SIMD lanes (noise_lanes.h), 16 counters = 64
// consecutive elements a call, kept as a bit string: one Philox per four elements, and the
// affine loops read 16 keep bits a step. Contiguous: a chunk is a run of consecutive e (its
// start need not be a multiple of 4: the bit string starts at e & 3). Channels-last: rows walk
// c fastest while e runs along l, so each channel keeps a 64-bit window of the next rows' bits
// (consecutive e again), refilled every ~64 rows. Eval or p = 0: no Philox at all.
#include <cstring>
#include <vector>

#include "batch_renorm_backward.h"
#include "batch_renorm_forward.h"
#include "noise_lanes.h"

namespace speckle::cpu::CPU_CAPABILITY {  // one copy per variant (csrc/variants/)
namespace {

constexpr int64_t kWindowBits = 64;
constexpr int64_t kChunkWords = kTaskElements / kWindowBits + 3;  // a chunk's bits, its start's and a word read past

// Keep bits of the elements 4*q0 .. 4*q0 + 64*words - 1: bit i of out[j] is element
// 4*q0 + 64*j + i.
using KeepBitsFn = void (*)(uint64_t seed, uint64_t q0, float p, int64_t words, uint64_t* out);

void keep_bits_portable(uint64_t seed, uint64_t q0, float p, int64_t words, uint64_t* out) {
  for (int64_t j = 0; j < words; ++j) {
    uint64_t bits = 0;
    for (int h = 0; h < 16; ++h) {
      uint32_t w[4];
      mask_words(seed, q0 + static_cast<uint64_t>(16 * j + h), w);
      for (int k = 0; k < 4; ++k) bits |= static_cast<uint64_t>(philox_uniform(w[k]) >= p) << (4 * h + k);
    }
    out[j] = bits;
  }
}

#if defined(SPECKLE_NOISE_LANES8)
// Bit j of m (j < 16) to bit 4j: a counter's four words are four consecutive elements.
inline uint64_t spread4(uint64_t m) {
  m = (m | (m << 24)) & 0x000000FF000000FFull;
  m = (m | (m << 12)) & 0x000F000F000F000Full;
  m = (m | (m << 6)) & 0x0303030303030303ull;
  return (m | (m << 3)) & 0x1111111111111111ull;
}

// V vectors of W counters from q0 on: V*W/16 words of keep bits.
template <int W, int V>
inline void keep_bits_group(uint64_t seed, uint64_t q0, float p, uint64_t* out) {
  using L = lanes::Lanes<W>;
  using U = typename L::U;
  alignas(64) uint32_t c0[V * W], c1[V * W];
  for (int l = 0; l < V * W; ++l) {
    const uint64_t q = q0 + static_cast<uint64_t>(l);
    c0[l] = static_cast<uint32_t>(q);
    c1[l] = static_cast<uint32_t>(q >> 32);
  }
  U x0[V], x1[V], x2[V], x3[V];
  for (int v = 0; v < V; ++v) {
    x0[v] = L::load(c0 + v * W);
    x1[v] = L::load(c1 + v * W);
  }
  lanes::philox_c2_zero<L, V>(seed, kMaskStream, x0, x1, x2, x3);
  const typename L::F pv = L::set1(p);
  auto keep = [&](U r) { return spread4(L::to_bits(L::greater_equal(lanes::uniform<L>(r), pv))); };
  for (int v = 0; v < V; ++v) {
    const uint64_t b = keep(x0[v]) | keep(x1[v]) << 1 | keep(x2[v]) << 2 | keep(x3[v]) << 3;
    if constexpr (W == 16) {
      out[v] = b;
    } else if (v % 2 == 0) {
      out[v / 2] = b;
    } else {
      out[v / 2] |= b << 32;
    }
  }
}

// Four words a group where there are four (kGroup vectors interleaved), then one at a time.
template <int W>
void keep_bits_lanes(uint64_t seed, uint64_t q0, float p, int64_t words, uint64_t* out) {
  constexpr int kGroup = 64 / W;  // vectors for four words
  int64_t j = 0;
  for (; j + 4 <= words; j += 4) keep_bits_group<W, kGroup>(seed, q0 + 16 * j, p, out + j);
  for (; j < words; ++j) keep_bits_group<W, 16 / W>(seed, q0 + 16 * j, p, out + j);
}
#endif

KeepBitsFn keep_bits_path() {
  switch (philox_lane_width()) {
#if defined(SPECKLE_NOISE_LANES16)
    case 16: return &keep_bits_lanes<16>;
#endif
#if defined(SPECKLE_NOISE_LANES8)
    case 8: return &keep_bits_lanes<8>;
#endif
    default: return &keep_bits_portable;
  }
}

// 16 bits of buf from bit b on (buf holds one word past the last bit read).
inline uint32_t bits16(const uint64_t* buf, int64_t b) {
  const int s = static_cast<int>(b & 63);
  uint64_t v = buf[b >> 6] >> s;
  if (s > 48) v |= buf[(b >> 6) + 1] << (64 - s);
  return static_cast<uint32_t>(v & 0xFFFF);
}

// v where bit j of bits is set (lane j), +0 elsewhere: dropped values are exact zeros.
inline fVec keep_lanes(const fVec& v, uint32_t bits) {
#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX512VL__)
  static_assert(kF == 8);
  return _mm256_maskz_mov_ps(static_cast<__mmask8>(bits), v);
#elif defined(CPU_CAPABILITY_AVX2)
  static_assert(kF == 8);
  const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), lane), lane);
  return _mm256_and_ps(v, _mm256_castsi256_ps(on));
#else
  alignas(64) float a[kF];
  v.store(a);
  for (int64_t j = 0; j < kF; ++j) a[j] = (bits >> j) & 1 ? a[j] : 0.0f;
  return fVec::loadu(a);
#endif
}

// The block's element hooks (batch_renorm_tasks.h). scale/shift: the stats rows that give z
// in the backward (null in the forward, whose hooks receive z itself).
struct BlockHooks {
  static constexpr bool kActive = true;
  const ChannelLayout& lay;
  BlockParams block;
  const float* scale;
  const float* shift;
  KeepBitsFn keep_bits = nullptr;

  // Per-thread state: the bound chunk's keep bits and z coefficients, or the channels-last
  // windows.
  struct Local {
    static constexpr bool kActive = true;
    const BlockHooks& hk;
    std::vector<uint64_t> buf;  // contiguous: bits of the chunk; channels-last: a window per channel
    std::vector<uint64_t> slots;        // contiguous, per-channel schedule: bits of each chunk
    std::vector<int64_t> slot_first;    // the chunk each slot holds (its first value)
    const uint64_t* bits = nullptr;     // contiguous: the bound chunk's bits
    int64_t bit0 = 0;                   // contiguous: the chunk's first bit in bits
    int64_t win_r0 = 0, win_r1 = 0;  // channels-last: the rows buf covers
    fVec sc{0.0f}, sh{0.0f};

    explicit Local(const BlockHooks& h)
        : hk(h), buf(h.lay.channels_last ? h.lay.C + kW : kChunkWords) {}  // + kW: row_bits reads kW

    bool drop() const { return hk.block.dropout.active; }
    bool act() const { return hk.block.activation != kIdentity; }

    // f(v) = z > 0 ? v : v * slope: act (v = z) or act' times g.
    fVec slope_where_negative(const fVec& z, const fVec& v) const {
      return fVec::blendv(v * fVec(hk.block.slope), v, z > fVec(0.0f));
    }

    // Binds the chunk of channel c whose first value has logical index `first`. slot >= 0:
    // the per-channel schedule's chunk number; the backward's two passes visit a channel's
    // chunks in the same order, so the second finds the first's bits in the slot and runs no
    // Philox (~8 ms of 50 at (32, 64, 128, 128) fp32).
    void chunk(int64_t c, int64_t first, int64_t len, int64_t slot = -1) {
      if (hk.scale != nullptr) {
        sc = fVec(hk.scale[c]);
        sh = fVec(hk.shift[c]);
      }
      if (!drop()) return;
      const DropoutParams& d = hk.block.dropout;
      const uint64_t e0 = d.offset + static_cast<uint64_t>(first);
      bit0 = static_cast<int64_t>(e0 & 3);
      uint64_t* out = buf.data();
      if (slot >= 0) {
        if (static_cast<int64_t>(slot_first.size()) <= slot) {
          slot_first.resize(slot + 1, -1);
          slots.resize((slot + 1) * kChunkWords);
        }
        out = slots.data() + slot * kChunkWords;
        bits = out;
        if (slot_first[slot] == first) return;
        slot_first[slot] = first;
      }
      bits = out;
      hk.keep_bits(d.seed, e0 >> 2, d.p, (bit0 + len + kWindowBits - 1) / kWindowBits, out);
    }

    // keep ? v * keep_scale : 0 for the kW values whose keep bits are `bits`.
    void apply_mask(uint32_t bits, fVec& v0, fVec& v1) const {
      const fVec ks(hk.block.dropout.keep_scale);
      v0 = keep_lanes(v0 * ks, bits & 0xFF);
      v1 = keep_lanes(v1 * ks, bits >> kF);
    }

    void out(int64_t i, fVec& y0, fVec& y1) const {
      if (act()) {
        y0 = slope_where_negative(y0, y0);
        y1 = slope_where_negative(y1, y1);
      }
      if (drop()) apply_mask(bits16(bits, bit0 + i), y0, y1);
    }

    void grad(int64_t i, const fVec& u0, const fVec& u1, fVec& d0, fVec& d1) const {
      if (drop()) apply_mask(bits16(bits, bit0 + i), d0, d1);
      if (act()) {
        d0 = slope_where_negative(at::vec::fmadd(u0, sc, sh), d0);
        d1 = slope_where_negative(at::vec::fmadd(u1, sc, sh), d1);
      }
    }

    // Channels-last: buf[c] bit k is row win_r0 + k of channel c; rows of one image only (e
    // runs along l). 61 rows unless every channel's first e is a multiple of 4, so that the
    // window's bits always lie in one keep_bits call.
    uint32_t row_bits(int64_t r, int64_t c, int64_t n) {
      if (r < win_r0 || r >= win_r1) {
        const DropoutParams& d = hk.block.dropout;
        const int64_t C = hk.lay.C, L = hk.lay.L, img = r / L, l = r % L;
        const bool aligned = L % 4 == 0 && (d.offset + static_cast<uint64_t>(l)) % 4 == 0;
        win_r0 = r;
        win_r1 = std::min((img + 1) * L, r + (aligned ? kWindowBits : kWindowBits - 3));
        for (int64_t cc = 0; cc < C; ++cc) {
          const uint64_t e0 = d.offset + static_cast<uint64_t>((img * C + cc) * L + l);
          hk.keep_bits(d.seed, e0 >> 2, d.p, 1, &buf[cc]);
          buf[cc] >>= e0 & 3;
        }
      }
      const int64_t k = r - win_r0;
#if defined(__AVX512F__)
      (void)n;  // bits past n select lanes that are never stored
      const __m512i bit = _mm512_set1_epi64(static_cast<long long>(uint64_t{1} << k));
      return _mm512_test_epi64_mask(_mm512_loadu_si512(buf.data() + c), bit) |
             static_cast<uint32_t>(_mm512_test_epi64_mask(_mm512_loadu_si512(buf.data() + c + 8), bit)) << 8;
#else
      uint32_t bits = 0;
      for (int64_t j = 0; j < n; ++j) bits |= static_cast<uint32_t>((buf[c + j] >> k) & 1) << j;
      return bits;
#endif
    }

    void out_cl(int64_t r, int64_t c, int64_t n, fVec& y0, fVec& y1) {
      if (act()) {
        y0 = slope_where_negative(y0, y0);
        y1 = slope_where_negative(y1, y1);
      }
      if (drop()) apply_mask(row_bits(r, c, n), y0, y1);
    }

    void grad_cl(int64_t r, int64_t c, int64_t n, const fVec& u0, const fVec& u1, fVec& d0, fVec& d1) {
      if (drop()) apply_mask(row_bits(r, c, n), d0, d1);
      if (act()) {
        fVec s0, s1, h0, h1;
        load2(hk.scale + c, s0, s1, n);
        load2(hk.shift + c, h0, h1, n);
        d0 = slope_where_negative(at::vec::fmadd(u0, s0, h0), d0);
        d1 = slope_where_negative(at::vec::fmadd(u1, s1, h1), d1);
      }
    }
  };

  BlockHooks(const ChannelLayout& l, const BlockParams& b, const float* sc, const float* sh)
      : lay(l), block(b), scale(sc), shift(sh) {
    if (block.dropout.active) keep_bits = keep_bits_path();
  }
  Local local() const { return Local(*this); }
  bool per_channel_saves_work() const { return block.dropout.active; }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> batch_renorm_act_forward(
    const ChannelLayout& lay, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, at::Tensor& running_mean, at::Tensor& running_std,
    at::Tensor& num_batches_tracked, bool training, float momentum, float eps,
    const Schedule& r_sched, const Schedule& d_sched, const BlockParams& block) {
  const BlockHooks hooks(lay, block, nullptr, nullptr);
  return renorm_forward(lay, weight, bias, running_mean, running_std, num_batches_tracked, training,
                        momentum, eps, r_sched, d_sched, /*stats_only=*/false, hooks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_renorm_act_backward(
    const at::Tensor& dy, const ChannelLayout& lay, const std::optional<at::Tensor>& weight,
    const at::Tensor& stats, bool training, const BlockParams& block) {
  const float* st = stats.const_data_ptr<float>();
  const BlockHooks hooks(lay, block, st + kScale * lay.C, st + kShift * lay.C);
  return renorm_backward(dy, lay, weight, stats, training, hooks);
}

}  // namespace speckle::cpu::CPU_CAPABILITY
