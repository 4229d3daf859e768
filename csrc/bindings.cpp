// Torch glue of the LAWA CUDA kernels (Kaddour 2022, arXiv:2209.14981): checks the
// tensors of a bucket (device, dtype, layout, shape), builds its device-side pointer
// table and launches the kernels of lawa_kernels.cu on PyTorch's current stream.

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include "lawa.h"

namespace {

LawaDtype lawa_dtype(at::ScalarType dtype, const std::string& what) {
  switch (dtype) {
    case at::kFloat:
      return kLawaFloat32;
    case at::kBFloat16:
      return kLawaBFloat16;
    case at::kHalf:
      return kLawaFloat16;
    default:
      TORCH_CHECK(false, what, " has dtype ", dtype,
                  "; the CUDA backend accepts float32, bfloat16 and float16");
  }
}

// A buffer of the bucket: a contiguous CUDA tensor on the parameters' device.
void check_buffer(const at::Tensor& t, const std::string& name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but the parameters are on ",
              device);
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous, got sizes ", t.sizes(), " and strides ",
              t.strides());
}

void check_buffer(const at::Tensor& t, const std::string& name, const at::Device& device,
                  at::ScalarType dtype) {
  check_buffer(t, name, device);
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
}

void check_flat(const at::Tensor& t, const std::string& name, int64_t D) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == D, name, " must have shape (", D, ",), got ", t.sizes());
}

void check_pushes(const at::Tensor& pushes, const at::Device& device) {
  check_buffer(pushes, "pushes", device, at::kLong);
  TORCH_CHECK(pushes.numel() == 1, "pushes must hold one element, got shape ", pushes.sizes());
}

void check_ring(const at::Tensor& ring, const at::Device& device, int64_t D) {
  check_buffer(ring, "ring", device);
  lawa_dtype(ring.scalar_type(), "ring");
  TORCH_CHECK(ring.dim() == 2 && ring.size(0) >= 1 && ring.size(1) == D,
              "ring must have shape (k, ", D, ") with k >= 1, got ", ring.sizes());
}

// The launch over a table made by make_table; also checks the table itself.
LawaLaunch launch_of(const at::Tensor& table, int64_t num_tiles) {
  TORCH_CHECK(table.is_cuda() && table.scalar_type() == at::kLong && table.dim() == 2 &&
                  table.size(1) == 4 && table.is_contiguous(),
              "table must be a contiguous CUDA int64 tensor of shape (P, 4) from make_table, got ",
              table.scalar_type(), " ", table.sizes(), " on ", table.device());
  TORCH_CHECK(num_tiles >= 0, "num_tiles must be >= 0, got ", num_tiles);
  const int device = table.device().index();
  LawaLaunch launch;
  launch.segments = reinterpret_cast<const LawaSegment*>(table.data_ptr<int64_t>());
  launch.num_segments = static_cast<int>(table.size(0));
  launch.num_tiles = num_tiles;
  launch.device = device;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&launch.sm_count, cudaDevAttrMultiProcessorCount, device));
  launch.stream = c10::cuda::getCurrentCUDAStream(device).stream();
  return launch;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "lawa_optim CUDA kernel ", what, " failed: ",
              cudaGetErrorString(err));
}

// Pointer table of a bucket: one (data_ptr, offset, numel, first tile) row per
// parameter, on the parameters' device; returns it with the number of tiles.
std::tuple<at::Tensor, int64_t> make_table(const std::vector<at::Tensor>& params,
                                           const std::vector<int64_t>& offsets, int64_t D) {
  TORCH_CHECK(!params.empty(), "params must not be empty");
  TORCH_CHECK(params.size() < (1u << 31), "params holds ", params.size(),
              " tensors; at most 2^31 - 1 are accepted");
  TORCH_CHECK(offsets.size() == params.size(), "offsets has ", offsets.size(),
              " entries but params has ", params.size());
  const at::Device device = params[0].device();
  const at::ScalarType dtype = params[0].scalar_type();
  auto rows = at::empty({static_cast<int64_t>(params.size()), 4}, at::kLong);
  auto row = rows.accessor<int64_t, 2>();
  int64_t tiles = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const std::string name = "params[" + std::to_string(i) + "]";
    TORCH_CHECK(p.is_cuda(), name, " must be a CUDA tensor, got one on ", p.device());
    TORCH_CHECK(p.device() == device, name, " is on ", p.device(), " but params[0] is on ", device);
    TORCH_CHECK(p.scalar_type() == dtype, name, " has dtype ", p.scalar_type(),
                " but params[0] has ", dtype);
    lawa_dtype(p.scalar_type(), name);
    TORCH_CHECK(p.is_non_overlapping_and_dense(), name, " (sizes ", p.sizes(), ", strides ",
                p.strides(), ") must cover a dense block of memory");
    TORCH_CHECK(offsets[i] >= 0 && offsets[i] + p.numel() <= D, "offsets[", i, "] = ", offsets[i],
                " puts ", name, " (", p.numel(), " elements) outside the flat buffers of ", D,
                " elements");
    row[i][0] = reinterpret_cast<int64_t>(p.data_ptr());
    row[i][1] = offsets[i];
    row[i][2] = p.numel();
    row[i][3] = tiles;
    tiles += (p.numel() + kLawaTile - 1) / kLawaTile;
  }
  return {rows.to(device), tiles};
}

void push(const at::Tensor& table, int64_t num_tiles, at::ScalarType param_dtype,
          const at::Tensor& ring, const at::Tensor& total, const at::Tensor& pushes,
          int64_t refresh_every) {
  const c10::cuda::CUDAGuard guard(table.device());
  const LawaLaunch launch = launch_of(table, num_tiles);
  check_buffer(total, "total", table.device(), at::kFloat);
  const int64_t D = total.numel();
  check_flat(total, "total", D);
  check_ring(ring, table.device(), D);
  check_pushes(pushes, table.device());
  TORCH_CHECK(refresh_every >= 1, "refresh_every must be >= 1, got ", refresh_every);
  check_launch(lawa_push(launch, lawa_dtype(param_dtype, "the parameters"),
                         lawa_dtype(ring.scalar_type(), "ring"), ring.data_ptr(),
                         total.data_ptr<float>(), pushes.data_ptr<int64_t>(), D, ring.size(0),
                         refresh_every),
               "push");
}

void ema_update(const at::Tensor& table, int64_t num_tiles, at::ScalarType param_dtype,
                const at::Tensor& total, const at::Tensor& pushes, double decay) {
  const c10::cuda::CUDAGuard guard(table.device());
  const LawaLaunch launch = launch_of(table, num_tiles);
  check_buffer(total, "total", table.device(), at::kFloat);
  check_flat(total, "total", total.numel());
  check_pushes(pushes, table.device());
  TORCH_CHECK(decay >= 0.0 && decay < 1.0, "decay must be in [0, 1), got ", decay);
  // 1 - decay in double, then rounded to float, as torch rounds alpha = 1.0 - decay.
  check_launch(lawa_ema_update(launch, lawa_dtype(param_dtype, "the parameters"),
                               total.data_ptr<float>(), pushes.data_ptr<int64_t>(),
                               static_cast<float>(decay), static_cast<float>(1.0 - decay)),
               "ema_update");
}

void phema_update(const at::Tensor& table, int64_t num_tiles, at::ScalarType param_dtype,
                  const at::Tensor& emas, const at::Tensor& alphas) {
  const c10::cuda::CUDAGuard guard(table.device());
  const LawaLaunch launch = launch_of(table, num_tiles);
  check_buffer(emas, "emas", table.device(), at::kFloat);
  check_buffer(alphas, "alphas", table.device(), at::kFloat);
  TORCH_CHECK(emas.dim() == 2 && emas.size(0) >= 1, "emas must have shape (E, D) with E >= 1, got ",
              emas.sizes());
  TORCH_CHECK(alphas.dim() == 1 && alphas.size(0) == emas.size(0), "alphas must have shape (",
              emas.size(0), ",), one per row of emas, got ", alphas.sizes());
  check_launch(lawa_phema_update(launch, lawa_dtype(param_dtype, "the parameters"),
                                 emas.data_ptr<float>(), alphas.data_ptr<float>(), emas.size(1),
                                 emas.size(0)),
               "phema_update");
}

void swap_in(const at::Tensor& table, int64_t num_tiles, const std::string& mode,
             const at::Tensor& backup, const at::Tensor& total, const c10::optional<at::Tensor>& ring,
             const at::Tensor& pushes, c10::optional<int64_t> last) {
  const c10::cuda::CUDAGuard guard(table.device());
  const LawaLaunch launch = launch_of(table, num_tiles);
  TORCH_CHECK(mode == "uniform" || mode == "ema", "mode must be 'uniform' or 'ema', got '", mode, "'");
  check_buffer(total, "total", table.device(), at::kFloat);
  const int64_t D = total.numel();
  check_flat(total, "total", D);
  check_buffer(backup, "backup", table.device());
  check_flat(backup, "backup", D);
  check_pushes(pushes, table.device());
  LawaAverage average = kLawaEma;
  int64_t k = 1;
  LawaDtype history = kLawaFloat32;
  const void* ring_ptr = nullptr;
  if (mode == "uniform") {
    TORCH_CHECK(ring.has_value(), "ring is required in mode 'uniform'");
    check_ring(*ring, table.device(), D);
    k = ring->size(0);
    history = lawa_dtype(ring->scalar_type(), "ring");
    ring_ptr = ring->data_ptr();
    average = kLawaMean;
    if (last.has_value()) {
      TORCH_CHECK(*last >= 1 && *last <= k, "last must be in [1, k = ", k, "], got ", *last);
      average = kLawaLast;
    }
  } else {
    TORCH_CHECK(!last.has_value(), "last must be None in mode 'ema', got ", *last);
  }
  check_launch(lawa_swap_in(launch, lawa_dtype(backup.scalar_type(), "backup"), history, average,
                            backup.data_ptr(), total.data_ptr<float>(), ring_ptr,
                            pushes.data_ptr<int64_t>(), D, k, last.value_or(0)),
               "swap_in");
}

void swap_weighted(const at::Tensor& table, int64_t num_tiles, const at::Tensor& backup,
                   const at::Tensor& ring, const at::Tensor& weights, const at::Tensor& pushes) {
  const c10::cuda::CUDAGuard guard(table.device());
  const LawaLaunch launch = launch_of(table, num_tiles);
  const int64_t D = backup.numel();
  check_buffer(backup, "backup", table.device());
  check_flat(backup, "backup", D);
  check_ring(ring, table.device(), D);
  check_pushes(pushes, table.device());
  check_buffer(weights, "weights", table.device(), at::kFloat);
  const int64_t k = ring.size(0);
  TORCH_CHECK(weights.dim() == 1 && weights.numel() >= 1 && weights.numel() <= k,
              "weights must have shape (count,) with 1 <= count <= k = ", k, ", got ", weights.sizes());
  check_launch(lawa_swap_weighted(launch, lawa_dtype(backup.scalar_type(), "backup"),
                                  lawa_dtype(ring.scalar_type(), "ring"), backup.data_ptr(),
                                  ring.data_ptr(), weights.data_ptr<float>(),
                                  pushes.data_ptr<int64_t>(), D, k, weights.numel()),
               "swap_weighted");
}

void swap_back(const at::Tensor& table, int64_t num_tiles, const at::Tensor& backup) {
  const c10::cuda::CUDAGuard guard(table.device());
  const LawaLaunch launch = launch_of(table, num_tiles);
  check_buffer(backup, "backup", table.device());
  check_flat(backup, "backup", backup.numel());
  check_launch(lawa_swap_back(launch, lawa_dtype(backup.scalar_type(), "backup"), backup.data_ptr()),
               "swap_back");
}

void recompute(const at::Tensor& table, int64_t num_tiles, const at::Tensor& ring,
               const at::Tensor& total, const at::Tensor& pushes) {
  const c10::cuda::CUDAGuard guard(table.device());
  const LawaLaunch launch = launch_of(table, num_tiles);
  check_buffer(total, "total", table.device(), at::kFloat);
  const int64_t D = total.numel();
  check_flat(total, "total", D);
  check_ring(ring, table.device(), D);
  check_pushes(pushes, table.device());
  check_launch(lawa_recompute(launch, lawa_dtype(ring.scalar_type(), "ring"), ring.data_ptr(),
                              total.data_ptr<float>(), pushes.data_ptr<int64_t>(), D, ring.size(0)),
               "recompute");
}

// The 8-bit history's buffers: codes (k - 1, D) int8, scales (k - 1, nb) float32, anchor
// (D,) float32; block_bases one int64 per table row; returns k.
int64_t check_int8(const at::Tensor& table, const at::Tensor& ring, const at::Tensor& scales,
                   const at::Tensor& anchor, const at::Tensor& block_bases, const at::Tensor& pushes) {
  const at::Device device = table.device();
  check_buffer(anchor, "anchor", device, at::kFloat);
  check_flat(anchor, "anchor", anchor.numel());
  check_buffer(ring, "ring", device, at::kChar);
  check_buffer(scales, "scales", device, at::kFloat);
  check_buffer(block_bases, "block_bases", device, at::kLong);
  check_pushes(pushes, device);
  TORCH_CHECK(ring.dim() == 2 && ring.size(1) == anchor.numel(), "ring must have shape (k - 1, ",
              anchor.numel(), "), got ", ring.sizes());
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == ring.size(0), "scales must have shape (",
              ring.size(0), ", blocks), got ", scales.sizes());
  TORCH_CHECK(block_bases.dim() == 1 && block_bases.size(0) == table.size(0), "block_bases must have ",
              table.size(0), " entries, one per table row, got ", block_bases.sizes());
  return ring.size(0) + 1;
}

void push_int8(const at::Tensor& table, int64_t num_tiles, at::ScalarType param_dtype,
               const at::Tensor& block_bases, const at::Tensor& ring, const at::Tensor& scales,
               const at::Tensor& anchor, const at::Tensor& pushes) {
  const c10::cuda::CUDAGuard guard(table.device());
  const LawaLaunch launch = launch_of(table, num_tiles);
  const int64_t k = check_int8(table, ring, scales, anchor, block_bases, pushes);
  check_launch(lawa_push_int8(launch, lawa_dtype(param_dtype, "the parameters"),
                              block_bases.data_ptr<int64_t>(), ring.data_ptr<int8_t>(),
                              scales.data_ptr<float>(), anchor.data_ptr<float>(),
                              pushes.data_ptr<int64_t>(), anchor.numel(), scales.size(1), k),
               "push_int8");
}

void swap_int8(const at::Tensor& table, int64_t num_tiles, const at::Tensor& block_bases,
               const at::Tensor& ring, const at::Tensor& scales, const at::Tensor& anchor,
               const at::Tensor& backup, const at::Tensor& coef, const at::Tensor& pushes) {
  const c10::cuda::CUDAGuard guard(table.device());
  const LawaLaunch launch = launch_of(table, num_tiles);
  const int64_t k = check_int8(table, ring, scales, anchor, block_bases, pushes);
  check_buffer(backup, "backup", table.device());
  check_flat(backup, "backup", anchor.numel());
  check_buffer(coef, "coefficients", table.device(), at::kFloat);
  TORCH_CHECK(coef.dim() == 1 && coef.numel() >= 1 && coef.numel() <= k,
              "coefficients must have shape (m,) with 1 <= m <= k = ", k, ", got ", coef.sizes());
  check_launch(lawa_swap_int8(launch, lawa_dtype(backup.scalar_type(), "backup"),
                              block_bases.data_ptr<int64_t>(), ring.data_ptr<int8_t>(),
                              scales.data_ptr<float>(), anchor.data_ptr<float>(), backup.data_ptr(),
                              coef.data_ptr<float>(), pushes.data_ptr<int64_t>(), anchor.numel(),
                              scales.size(1), k, coef.numel()),
               "swap_int8");
}

void exchange(const at::Tensor& table, int64_t num_tiles, at::ScalarType param_dtype, const at::Tensor& total,
              bool back) {
  const c10::cuda::CUDAGuard guard(table.device());
  const LawaLaunch launch = launch_of(table, num_tiles);
  check_buffer(total, "total", table.device(), at::kFloat);
  check_flat(total, "total", total.numel());
  const LawaDtype dtype = lawa_dtype(param_dtype, "the parameters");
  TORCH_CHECK(dtype != kLawaFloat16, "the in-place swap takes float32 or bfloat16 parameters, got float16");
  check_launch(lawa_exchange(launch, dtype, total.data_ptr<float>(), back), "exchange");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused CUDA kernels of the LAWA history (Kaddour 2022, arXiv:2209.14981)";
  m.def("make_table", &make_table, "Device pointer table of a bucket and its number of tiles",
        py::arg("params"), py::arg("offsets"), py::arg("D"));
  m.def("push", &push, "Snapshot into the ring and update or refresh the running mean",
        py::arg("table"), py::arg("num_tiles"), py::arg("param_dtype"), py::arg("ring"),
        py::arg("total"), py::arg("pushes"), py::arg("refresh_every"));
  m.def("ema_update", &ema_update, "Fold the weights into the exponential average",
        py::arg("table"), py::arg("num_tiles"), py::arg("param_dtype"), py::arg("total"),
        py::arg("pushes"), py::arg("decay"));
  m.def("phema_update", &phema_update, "Fold the weights into every power-function EMA",
        py::arg("table"), py::arg("num_tiles"), py::arg("param_dtype"), py::arg("emas"),
        py::arg("alphas"));
  m.def("swap_in", &swap_in, "Back up the weights and write the average into them",
        py::arg("table"), py::arg("num_tiles"), py::arg("mode"), py::arg("backup"), py::arg("total"),
        py::arg("ring"), py::arg("pushes"), py::arg("last"));
  m.def("swap_weighted", &swap_weighted,
        "Back up the weights and write the weighted sum of the newest snapshots into them",
        py::arg("table"), py::arg("num_tiles"), py::arg("backup"), py::arg("ring"),
        py::arg("weights"), py::arg("pushes"));
  m.def("swap_back", &swap_back, "Restore the weights from the backup", py::arg("table"),
        py::arg("num_tiles"), py::arg("backup"));
  m.def("push_int8", &push_int8, "Snapshot into the 8-bit history: the next delta and the anchor",
        py::arg("table"), py::arg("num_tiles"), py::arg("param_dtype"), py::arg("block_bases"),
        py::arg("ring"), py::arg("scales"), py::arg("anchor"), py::arg("pushes"));
  m.def("swap_int8", &swap_int8,
        "Back up the weights and write the 8-bit history's weighted sum into them",
        py::arg("table"), py::arg("num_tiles"), py::arg("block_bases"), py::arg("ring"),
        py::arg("scales"), py::arg("anchor"), py::arg("backup"), py::arg("coef"), py::arg("pushes"));
  m.def("recompute", &recompute, "Recompute the running mean from the ring", py::arg("table"),
        py::arg("num_tiles"), py::arg("ring"), py::arg("total"), py::arg("pushes"));
  m.def("exchange", &exchange, "Swap the full average in place with the running mean, or back",
        py::arg("table"), py::arg("num_tiles"), py::arg("param_dtype"), py::arg("total"), py::arg("back"));
}
