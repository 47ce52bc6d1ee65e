// One decoding position of attention as one CPU kernel (agent/lm/fused_attention.py): rotary on the
// new query and key, the new key and value written into the cache, and attention of each row over
// its own cache slot up to its position (read where it lies: no gather, no padded span).
// Plain C++ on raw pointers and strides, built once with the system compiler and called by ctypes.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <vector>

namespace {

inline float load(const float* p) { return *p; }
inline float load(const uint16_t* p) {  // bfloat16: the high half of a float32
  uint32_t u = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void store(float* p, float f) { *p = f; }
inline void store(uint16_t* p, float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    *p = static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN stays NaN
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  *p = static_cast<uint16_t>(u >> 16);
}
// a value as the activation dtype holds it (what the unfused path reads back from its buffers)
inline float round_to(const float*, float f) { return f; }
inline float round_to(const uint16_t*, float f) {
  uint16_t h;
  store(&h, f);
  return load(&h);
}

// rotate-half rotary: x * cos + roll(x, d/2) * sin, with rotate_half's sign folded into sin
template <typename T>
void rotate(const T* x, const T* cos, const T* sin, int64_t d, float* out) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) {
    const int64_t j = i < half ? i + half : i - half;
    out[i] = load(x + i) * load(cos + i) + load(x + j) * load(sin + i);
  }
}

template <typename T>
int run(const T* q, const T* k, const T* v, const T* cos, const T* sin, T* kc, T* vc, const int64_t* slots,
         const int64_t* pos, T* out, const int64_t* n, float scale) {
  // n: B, H, Hkv, d, number of positions (1 or B), number of slots (0: row b is slot b),
  //    the caches' slots and positions (a row outside them is refused: returns 1, nothing written)
  // then the strides: q (b, h), k (b, h), v (b, h), cos (b), sin (b), cache (slot, head, position), out (b, h)
  const int64_t* st = n + 8;
  const int64_t B = n[0], H = n[1], Hkv = n[2], d = n[3], npos = n[4], nslots = n[5];
  const int64_t G = H / Hkv;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t p = pos[npos == 1 ? 0 : b], s = nslots == 0 ? b : slots[b];
    if (p < 0 || p >= n[7] || s < 0 || s >= n[6]) return 1;
  }
  std::vector<float> x(d), acc(d), scores;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t p = pos[npos == 1 ? 0 : b];
    const int64_t s = nslots == 0 ? b : slots[b];
    const T* c = cos + b * st[6];
    const T* sn = sin + b * st[7];
    scores.resize(p + 1);
    for (int64_t hk = 0; hk < Hkv; ++hk) {
      T* kslot = kc + s * st[8] + hk * st[9];
      T* vslot = vc + s * st[8] + hk * st[9];
      rotate(k + b * st[2] + hk * st[3], c, sn, d, x.data());
      const T* vnew = v + b * st[4] + hk * st[5];
      for (int64_t i = 0; i < d; ++i) {
        store(kslot + p * st[10] + i, x[i]);
        store(vslot + p * st[10] + i, load(vnew + i));
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g;
        rotate(q + b * st[0] + h * st[1], c, sn, d, x.data());
        for (int64_t i = 0; i < d; ++i) x[i] = round_to(q, x[i]);
        float top = -INFINITY;
        for (int64_t j = 0; j <= p; ++j) {
          const T* key = kslot + j * st[10];
          float dot = 0.f;
          for (int64_t i = 0; i < d; ++i) dot += x[i] * load(key + i);
          scores[j] = dot * scale;
          top = scores[j] > top ? scores[j] : top;
        }
        float total = 0.f;
        for (int64_t j = 0; j <= p; ++j) total += (scores[j] = std::exp(scores[j] - top));
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j <= p; ++j) {
          const T* value = vslot + j * st[10];
          const float w = scores[j] / total;
          for (int64_t i = 0; i < d; ++i) acc[i] += w * load(value + i);
        }
        T* o = out + b * st[11] + h * st[12];
        for (int64_t i = 0; i < d; ++i) store(o + i, acc[i]);
      }
    }
  }
  return 0;
}

}  // namespace

extern "C" {
int rope_attend_f32(const float* q, const float* k, const float* v, const float* cos, const float* sin, float* kc,
                     float* vc, const int64_t* slots, const int64_t* pos, float* out, const int64_t* n,
                     float scale) {
  return run(q, k, v, cos, sin, kc, vc, slots, pos, out, n, scale);
}
int rope_attend_bf16(const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint16_t* cos,
                      const uint16_t* sin, uint16_t* kc, uint16_t* vc, const int64_t* slots, const int64_t* pos,
                      uint16_t* out, const int64_t* n, float scale) {
  return run(q, k, v, cos, sin, kc, vc, slots, pos, out, n, scale);
}
}
