// Registration of the multi-scale deformable attention ops with the PyTorch dispatcher.
//
// The schemas live here; the Python side (focus_detr/layers/ms_deform_attn_op.py) adds the fake
// (meta) implementations, the autograd formula and a PyTorch fallback for other devices.
#include <Python.h>
#include <torch/library.h>

#include "ms_deform_attn.h"

namespace focus_detr {

namespace {

void check_floating(const at::Tensor& tensor, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(
      tensor.scalar_type() == dtype,
      "ms_deform_attn: ",
      name,
      " must have the dtype of value (",
      dtype,
      "), got ",
      tensor.scalar_type());
}

void check_device(const at::Tensor& tensor, const char* name, const at::Device& device) {
  TORCH_CHECK(
      tensor.device() == device,
      "ms_deform_attn: ",
      name,
      " is on ",
      tensor.device(),
      " but value is on ",
      device);
}

}  // namespace

MsdaSizes check_ms_deform_attn_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (B, Nv, H, D), got ", value.sizes());
  TORCH_CHECK(
      sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
      "ms_deform_attn: sampling_locations must be (B, Nq, H, L, P, 2), got ",
      sampling_locations.sizes());
  TORCH_CHECK(
      attention_weights.dim() == 5,
      "ms_deform_attn: attention_weights must be (B, Nq, H, L, P), got ",
      attention_weights.sizes());
  MsdaSizes sizes{
      value.size(0),
      value.size(1),
      value.size(2),
      value.size(3),
      sampling_locations.size(1),
      sampling_locations.size(3),
      sampling_locations.size(4)};
  const std::vector<int64_t> expected_locations{
      sizes.batch, sizes.num_queries, sizes.num_heads, sizes.num_levels, sizes.num_points, 2};
  TORCH_CHECK(
      sampling_locations.sizes() == at::IntArrayRef(expected_locations),
      "ms_deform_attn: sampling_locations ",
      sampling_locations.sizes(),
      " does not match value ",
      value.sizes(),
      " (batch and heads must agree)");
  TORCH_CHECK(
      attention_weights.sizes() == at::IntArrayRef(expected_locations).slice(0, 5),
      "ms_deform_attn: attention_weights ",
      attention_weights.sizes(),
      " does not match sampling_locations ",
      sampling_locations.sizes());
  TORCH_CHECK(
      spatial_shapes.dim() == 2 && spatial_shapes.size(0) == sizes.num_levels &&
          spatial_shapes.size(1) == 2,
      "ms_deform_attn: spatial_shapes must be (L, 2) with L = ",
      sizes.num_levels,
      ", got ",
      spatial_shapes.sizes());
  TORCH_CHECK(
      level_start_index.dim() == 1 && level_start_index.size(0) == sizes.num_levels,
      "ms_deform_attn: level_start_index must be (L,) with L = ",
      sizes.num_levels,
      ", got ",
      level_start_index.sizes());
  TORCH_CHECK(
      spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
      "ms_deform_attn: spatial_shapes and level_start_index must be int64, got ",
      spatial_shapes.scalar_type(),
      " and ",
      level_start_index.scalar_type());
  const auto dtype = value.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kDouble,
      "ms_deform_attn: value must be float32 or float64 (cast half precision to float32 "
      "first), got ",
      dtype);
  check_floating(sampling_locations, "sampling_locations", dtype);
  check_floating(attention_weights, "attention_weights", dtype);
  const auto device = value.device();
  check_device(spatial_shapes, "spatial_shapes", device);
  check_device(level_start_index, "level_start_index", device);
  check_device(sampling_locations, "sampling_locations", device);
  check_device(attention_weights, "attention_weights", device);
  if (grad_output.defined()) {
    const std::vector<int64_t> expected_output{
        sizes.batch, sizes.num_queries, sizes.num_heads * sizes.head_dim};
    TORCH_CHECK(
        grad_output.sizes() == at::IntArrayRef(expected_output),
        "ms_deform_attn_backward: grad_output must be ",
        at::IntArrayRef(expected_output),
        ", got ",
        grad_output.sizes());
    check_floating(grad_output, "grad_output", dtype);
    check_device(grad_output, "grad_output", device);
  }
  return sizes;
}

}  // namespace focus_detr

TORCH_LIBRARY(focus_detr, m) {
  // Tells PyTorch where the fake (meta) implementations are registered.
  m.set_python_module("focus_detr.layers.ms_deform_attn_op");
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(focus_detr, CPU, m) {
  m.impl("ms_deform_attn", &focus_detr::ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &focus_detr::ms_deform_attn_backward_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(focus_detr, CUDA, m) {
  m.impl("ms_deform_attn", &focus_detr::ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &focus_detr::ms_deform_attn_backward_cuda);
}
#endif

// Importing focus_detr._C runs the registrations above; the module itself is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "Multi-scale deformable attention kernels, registered as torch.ops.focus_detr.*",
      -1,
      nullptr};
  return PyModule_Create(&module_def);
}
