// The Python module of the kernels (musicgen/accel/kernels/__init__.py wraps it). Functions that run long
// release the GIL, so that other Python threads run meanwhile.
#include "kernels.h"

namespace {

int host_isa() { return musicgen::host_isa(); }
int isa() { return musicgen::isa(); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("host_isa", &host_isa, "the best instruction-set level this CPU and OS allow: 0 AVX2 .. 3 AMX");
  m.def("isa", &isa, "the level the kernels take now: host_isa(), capped by set_isa_limit");
  m.def("set_isa_limit", &musicgen::set_isa_limit, "cap the level of every kernel, process-wide");
  m.def("int8_gemv", &int8_gemv, "weight-only int8 matrix times few float32 rows");
  m.def("int4_gemv", &int4_gemv, "4-bit grouped weights times int8-quantised activations");
  m.def("dense_gemv", &dense_gemv, "float32 / bfloat16 / float16 weights times few float32 rows");
  m.def("int4_dequant", &int4_dequant, "4-bit grouped weights to float32 or bfloat16");
  m.def("int4_quantize", &int4_quantize, "float32 (N, K) -> 4-bit packed weights and float16 group scales");
  m.def("int8_quantize", &int8_quantize, "float32 (N, K) -> int8 weights and per-row float32 scales");
  m.def("lstm_layer", &lstm_layer, "one float32 LSTM layer over precomputed input projections",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  bind_fused_decoder(m);
}
