// Python bindings of the fused CPU ops (implementations in fused_ops.h, which the paged
// attention extension's decode step includes too).
#include "fused_ops.h"

using namespace splitserve;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_add_rms_norm_", &fused_add_rms_norm_, "residual += x; x = rms_norm(residual)");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up over a packed [T, 2I] tensor");
  m.def("rotary_", &rotary_, "rotate-half RoPE in place on the leading heads of each row");
  m.def("argmax_dim0", &argmax_dim0, "first index of the max of each column of [V, n]");
}
