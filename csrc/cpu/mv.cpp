// Compressed-domain video: FFmpeg motion-vector records -> displacement grid -> MV tensor and motion-compensated
// frame, for loader workers (spec spiking_video.md 3.3 and section 4 item 4). The maths is the NumPy reference in
// lrkern/data/compressed.py (displacement_grid, _rasterize_grid, _compensate_grid); every value is computed with the
// reference's operations, in the reference's dtypes and order, so the outputs are bit-identical to it:
//
// - paint: d = (-motion_x / scale, -motion_y / scale) in fp32 (a true division, scale 0 -> 1), onto the 4x4-pixel
//   cells of each block with a past reference (source < 0), first cell floor((dst - size / 2) / 4) with Python's
//   floor division, cells outside the frame dropped, records painted in order (the later one wins);
// - pool: NumPy's d.reshape(h, 4, w, 4, 2).mean(axis=(1, 3)) sums each 16x16 cell's 16 fp32 values one by one in
//   row-major order starting from +0 (so an all -0 cell gives +0), then divides by 16 and by MV_UNIT = 8; the mask
//   is the count of valid cells / 16 (exact in fp32);
// - compensate: the source coordinate sx = clip(x + (-d_x), 0, W - 1) is fp32, its floor x0 an integer, but NumPy
//   promotes fx = sx - x0 (fp32 - int64) to fp64, so the bilinear blend runs in fp64 on the fp32-converted samples
//   and is rounded once to fp32. setup.py builds with -ffp-contract=off, so no FMA merges two of its operations.
//
// The only loop with real work is the compensation (H x W x C fp64 blends); it runs over rows with at::parallel_for,
// which is serial in DataLoader workers (torch sets one thread there) and for small frames.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <set>
#include <sstream>
#include <string>

#include "ops.h"

namespace lrkern::cpu {
namespace {

constexpr int64_t kSub = 4;     // painting grid (px): every MPEG-4 Part 2 / H.264 block size is a multiple of it
constexpr int64_t kCell = 16;   // MV tensor cell (px)
constexpr float kMvUnit = 8.0f;

// Record table columns (lrkern.data.compressed.MV_FIELDS order).
enum Col : int64_t { kSource = 0, kW, kH, kDstX, kDstY, kMotionX, kMotionY, kMotionScale, kNumCols };

inline int64_t floor_div(int64_t a, int64_t b) {  // Python's // for b > 0
  int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

std::string py_list(const std::set<int64_t>& s) {
  std::ostringstream os;
  os << "[";
  bool first = true;
  for (int64_t v : s) {
    os << (first ? "" : ", ") << v;
    first = false;
  }
  os << "]";
  return os.str();
}

void check_cpu_contig(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), op, ": ", name, " must be a contiguous CPU tensor");
}

// One pixel, exactly as the reference: the fp32 source coordinates clipped to the frame, their floors, the fp64
// fractions (fp32 - int64 promotes to fp64 in NumPy) and the fp64 blend of the fp32-converted samples, rounded once.
template <int NC, typename T>
inline void blend_pixel(float* o, int64_t x, float mx, int64_t W, int64_t C_, float xmax, const T* r0, const T* r1,
                        double fy, double gy) {
  const int64_t C = NC > 0 ? NC : C_;
  const float sx = std::min(std::max(static_cast<float>(x) + mx, 0.0f), xmax);  // np.clip: maximum, then minimum
  const int64_t x0 = static_cast<int64_t>(std::floor(sx));
  const int64_t x1 = std::min<int64_t>(x0 + 1, W - 1);
  const double fx = static_cast<double>(sx) - static_cast<double>(x0), gx = 1.0 - fx;
  for (int64_t k = 0; k < C; ++k) {
    const double top = static_cast<double>(r0[x0 * C + k]) * gx + static_cast<double>(r0[x1 * C + k]) * fx;
    const double bot = static_cast<double>(r1[x0 * C + k]) * gx + static_cast<double>(r1[x1 * C + k]) * fx;
    o[k] = static_cast<float>(top * gy + bot * fy);
  }
}

// A span of n values whose horizontal sources are a[j], b[j] = the next pixel (same fractions for all): the same
// operations as blend_pixel, contiguous, so the loop vectorises.
template <typename T>
inline void blend_span(const T* __restrict a, const T* __restrict b, const T* __restrict c, const T* __restrict e,
                       float* __restrict o, int64_t n, double fx, double gx, double fy, double gy) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const double top = static_cast<double>(a[j]) * gx + static_cast<double>(b[j]) * fx;
    const double bot = static_cast<double>(c[j]) * gx + static_cast<double>(e[j]) * fx;
    o[j] = static_cast<float>(top * gy + bot * fy);
  }
}

// Pixel rows [y_begin, y_end). Each row is cut into runs of cells with the same vector; the vertical source of a run
// is one (y0, y1, fy). Horizontally, where x + (-d_x) is exact in fp32 (d_x a multiple of 2^-8, as every power-of-two
// motion_scale up to 256 gives, and W, |d_x| < 2^15) and needs no clamping, x0 = x + floor(-d_x) and fx is the same
// for every pixel of the run: that interior is one contiguous span; the pixels at the frame edges (clamped) and runs
// with another vector go pixel by pixel. Both paths compute the identical fp64 expression.
// NC > 0: the channel count at compile time (1 = luma, 3 = RGB); 0: C at run time.
template <int NC, typename T>
void compensate_rows(const T* prev, const float* d, float* out, int64_t H, int64_t W, int64_t C_, int64_t y_begin,
                     int64_t y_end) {
  const int64_t C = NC > 0 ? NC : C_;
  const int64_t gw = W / kSub;
  const float xmax = static_cast<float>(W - 1), ymax = static_cast<float>(H - 1);
  const bool small = W < (int64_t{1} << 15);
  for (int64_t y = y_begin; y < y_end; ++y) {
    const float* drow = d + (y / kSub) * gw * 2;
    const float yf = static_cast<float>(y);
    float* orow = out + y * W * C;
    for (int64_t c = 0; c < gw;) {
      int64_t ce = c + 1;
      while (ce < gw && drow[ce * 2] == drow[c * 2] && drow[ce * 2 + 1] == drow[c * 2 + 1]) ++ce;
      const float mx = -drow[c * 2], my = -drow[c * 2 + 1];
      const float sy = std::min(std::max(yf + my, 0.0f), ymax);
      const int64_t y0 = static_cast<int64_t>(std::floor(sy));
      const int64_t y1 = std::min<int64_t>(y0 + 1, H - 1);
      const double fy = static_cast<double>(sy) - static_cast<double>(y0), gy = 1.0 - fy;
      const T* r0 = prev + y0 * W * C;
      const T* r1 = prev + y1 * W * C;
      const int64_t xa = c * kSub, xb = ce * kSub;
      int64_t xs = xb, xe = xb;  // the contiguous interior [xs, xe), empty unless exact
      const float m256 = mx * 256.0f;
      if (small && std::fabs(mx) < 32768.0f && m256 == std::nearbyint(m256)) {
        const double flx = std::floor(static_cast<double>(mx));
        xs = std::max<int64_t>(xa, static_cast<int64_t>(std::ceil(-static_cast<double>(mx))));  // x + mx >= 0
        xe = std::min<int64_t>(xb, W - 1 - static_cast<int64_t>(flx));                           // x0 + 1 <= W - 1
        if (xs < xe) {
          const int64_t off = (xs + static_cast<int64_t>(flx)) * C;
          const double fx = static_cast<double>(mx) - flx;
          blend_span(r0 + off, r0 + off + C, r1 + off, r1 + off + C, orow + xs * C, (xe - xs) * C, fx, 1.0 - fx, fy,
                     gy);
        } else {
          xs = xe = xb;
        }
      }
      for (int64_t x = xa; x < xs; ++x) blend_pixel<NC>(orow + x * C, x, mx, W, C, xmax, r0, r1, fy, gy);
      for (int64_t x = xe; x < xb; ++x) blend_pixel<NC>(orow + x * C, x, mx, W, C, xmax, r0, r1, fy, gy);
      c = ce;
    }
  }
}

template <typename T>
void compensate(const T* prev, const float* d, float* out, int64_t H, int64_t W, int64_t C) {
  // about 64k output values per task: a 224x224 RGB frame splits into 3 tasks, a 96x96 luma frame stays serial
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, W * C));
  at::parallel_for(0, H, grain, [&](int64_t b, int64_t e) {
    if (C == 1) {
      compensate_rows<1>(prev, d, out, H, W, C, b, e);
    } else if (C == 3) {
      compensate_rows<3>(prev, d, out, H, W, C, b, e);
    } else {
      compensate_rows<0>(prev, d, out, H, W, C, b, e);
    }
  });
}

}  // namespace

void mv_displacement_out(const at::Tensor& records, at::Tensor& d, at::Tensor& valid) {
  constexpr const char* op = "mv_displacement_out";
  check_cpu_contig(records, op, "records");
  check_cpu_contig(d, op, "d");
  check_cpu_contig(valid, op, "valid");
  TORCH_CHECK(records.scalar_type() == at::kInt && records.dim() == 2 && records.size(1) == kNumCols, op,
              ": records must be int32 [N, 8] (source, w, h, dst_x, dst_y, motion_x, motion_y, motion_scale)");
  TORCH_CHECK(d.scalar_type() == at::kFloat && d.dim() == 3 && d.size(2) == 2, op, ": d must be float32 [H/4, W/4, 2]");
  TORCH_CHECK(valid.scalar_type() == at::kBool && valid.dim() == 2 && valid.size(0) == d.size(0) &&
                  valid.size(1) == d.size(1),
              op, ": valid must be bool [H/4, W/4]");
  const int64_t gh = d.size(0), gw = d.size(1), n = records.size(0);
  const int32_t* r = records.data_ptr<int32_t>();

  // Validate first, with the NumPy reference's message (the sets of all past-reference block sizes).
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* ri = r + i * kNumCols;
    if (ri[kSource] >= 0) continue;
    if (ri[kW] <= 0 || ri[kH] <= 0 || ri[kW] % kSub || ri[kH] % kSub) bad = true;
  }
  if (bad) {
    std::set<int64_t> ws, hs;
    for (int64_t i = 0; i < n; ++i) {
      const int32_t* ri = r + i * kNumCols;
      if (ri[kSource] < 0) {
        ws.insert(ri[kW]);
        hs.insert(ri[kH]);
      }
    }
    TORCH_CHECK_VALUE(false, "motion-vector block sizes ", py_list(ws), "x", py_list(hs), " are not multiples of ",
                      kSub, " px; only MPEG-4 Part 2 and H.264 streams are supported");
  }

  float* dp = d.data_ptr<float>();
  bool* vp = valid.data_ptr<bool>();
  std::fill(dp, dp + gh * gw * 2, 0.0f);
  std::fill(vp, vp + gh * gw, false);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* ri = r + i * kNumCols;
    if (ri[kSource] >= 0) continue;
    const int64_t bw = ri[kW], bh = ri[kH];
    float scale = static_cast<float>(ri[kMotionScale]);
    if (scale == 0.0f) scale = 1.0f;
    const float dx = -static_cast<float>(ri[kMotionX]) / scale;
    const float dy = -static_cast<float>(ri[kMotionY]) / scale;
    const int64_t cx0 = floor_div(static_cast<int64_t>(ri[kDstX]) - bw / 2, kSub);
    const int64_t cy0 = floor_div(static_cast<int64_t>(ri[kDstY]) - bh / 2, kSub);
    const int64_t xa = std::max<int64_t>(cx0, 0), xb = std::min<int64_t>(cx0 + bw / kSub, gw);
    const int64_t ya = std::max<int64_t>(cy0, 0), yb = std::min<int64_t>(cy0 + bh / kSub, gh);
    for (int64_t cy = ya; cy < yb; ++cy) {
      for (int64_t cx = xa; cx < xb; ++cx) {
        dp[(cy * gw + cx) * 2] = dx;
        dp[(cy * gw + cx) * 2 + 1] = dy;
        vp[cy * gw + cx] = true;
      }
    }
  }
}

void mv_pool_out(const at::Tensor& d, const at::Tensor& valid, at::Tensor& out) {
  constexpr const char* op = "mv_pool_out";
  check_cpu_contig(d, op, "d");
  check_cpu_contig(valid, op, "valid");
  check_cpu_contig(out, op, "out");
  TORCH_CHECK(d.scalar_type() == at::kFloat && d.dim() == 3 && d.size(2) == 2, op, ": d must be float32 [H/4, W/4, 2]");
  constexpr int64_t f = kCell / kSub;
  const int64_t gh = d.size(0), gw = d.size(1), h = gh / f, w = gw / f;
  TORCH_CHECK(gh % f == 0 && gw % f == 0, op, ": the grid size must be a multiple of ", f);
  TORCH_CHECK(valid.scalar_type() == at::kBool && valid.dim() == 2 && valid.size(0) == gh && valid.size(1) == gw, op,
              ": valid must be bool [H/4, W/4]");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 3 && (out.size(0) == 2 || out.size(0) == 3) &&
                  out.size(1) == h && out.size(2) == w,
              op, ": out must be float32 [2 | 3, H/16, W/16]");
  const bool mask = out.size(0) == 3;
  const float* dp = d.data_ptr<float>();
  const bool* vp = valid.data_ptr<bool>();
  float* op_ = out.data_ptr<float>();
  for (int64_t i = 0; i < h; ++i) {
    for (int64_t j = 0; j < w; ++j) {
      float sx = 0.0f, sy = 0.0f;
      int cnt = 0;
      for (int64_t a = 0; a < f; ++a) {
        const int64_t row = (i * f + a) * gw + j * f;
        for (int64_t b = 0; b < f; ++b) {
          sx += dp[(row + b) * 2];
          sy += dp[(row + b) * 2 + 1];
          cnt += vp[row + b] ? 1 : 0;
        }
      }
      constexpr float nf = static_cast<float>(f * f);
      op_[i * w + j] = sx / nf / kMvUnit;
      op_[(h + i) * w + j] = sy / nf / kMvUnit;
      if (mask) op_[(2 * h + i) * w + j] = static_cast<float>(cnt) / nf;
    }
  }
}

void motion_compensate_out(const at::Tensor& prev, const at::Tensor& d, at::Tensor& out) {
  constexpr const char* op = "motion_compensate_out";
  check_cpu_contig(prev, op, "prev");
  check_cpu_contig(d, op, "d");
  check_cpu_contig(out, op, "out");
  TORCH_CHECK(prev.dim() == 3, op, ": prev must be [H, W, C]");
  TORCH_CHECK(prev.scalar_type() == at::kByte || prev.scalar_type() == at::kFloat, op,
              ": prev must be uint8 or float32 (convert other dtypes to float32 first)");
  const int64_t H = prev.size(0), W = prev.size(1), C = prev.size(2);
  TORCH_CHECK(H % kSub == 0 && W % kSub == 0 && H > 0 && W > 0, op, ": H and W must be positive multiples of ", kSub);
  TORCH_CHECK(d.scalar_type() == at::kFloat && d.dim() == 3 && d.size(0) == H / kSub && d.size(1) == W / kSub &&
                  d.size(2) == 2,
              op, ": d must be float32 [H/4, W/4, 2]");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.sizes() == prev.sizes(), op,
              ": out must be float32 of prev's shape");
  const float* dp = d.data_ptr<float>();
  float* o = out.data_ptr<float>();
  if (prev.scalar_type() == at::kByte) {
    compensate(prev.data_ptr<uint8_t>(), dp, o, H, W, C);
  } else {
    compensate(prev.data_ptr<float>(), dp, o, H, W, C);
  }
}

}  // namespace lrkern::cpu
