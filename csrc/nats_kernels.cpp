// Kernel-level op schemas of the compiled backends, and the one C++ dispatch point.
//
// The public ops live in Python (torch.ops.nats_kernels.*): they validate their inputs once and
// pick a backend. When that backend is "cpu" or "cuda" they call the schema below, and PyTorch's
// dispatcher routes it by device to the kernel registered with TORCH_LIBRARY_IMPL in
// csrc/cpu/<op>_cpu.cpp or in the CUDA extension. Kernels therefore receive validated arguments:
//   * all tensors on one device, floating dtypes, shapes as documented in nats_kernels/ops;
//   * median_pairwise_distance gets x as (B, N, d) and y as (B, M, d) or None.
// Python asks the dispatcher which ops have a kernel for a device
// (torch._C._dispatch_has_kernel_for_dispatch_key), so an op without a kernel here falls back to
// the reference implementation instead of failing.

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(nats_kernels_ext, m) {
  m.def("cfg_accumulate(Tensor x0, Tensor grads, Tensor weights, float eta, Tensor? scale, "
        "Tensor(a!) out) -> ()");
  m.def("cfg_accumulate_list(Tensor x0, Tensor[] grads, Tensor weights, float eta, "
        "Tensor? scale, Tensor(a!) out) -> ()");
  m.def("cfg_step_(Tensor(a!) x, Tensor grad, Tensor weight, float eta, Tensor? scale) -> ()");
  m.def("median_pairwise_distance(Tensor x, Tensor? y, bool squared, int memory_budget) "
        "-> Tensor");
  // Diagnostics of the CPU median: (window, radix) problems solved so far (tests, profiling).
  m.def("median_path_counts() -> Tensor");
  m.def("multi_dot(Tensor[] a, Tensor[] b) -> Tensor");
  m.def("aw_weights(Tensor dots, Tensor real_logits, Tensor fake_logits, bool normalized, "
        "float alpha1, float alpha2, float delta, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("aw_combine_(Tensor(a!)[] out, Tensor[] g_r, Tensor[] g_f, Tensor w_r, Tensor w_f) "
        "-> ()");
  m.def("iga_ratio(Tensor[] gf, Tensor[] gF, float eps) -> Tensor");
  m.def("iga_correction_(Tensor(a!)[] g, Tensor[] gf, Tensor r) -> ()");
}

// Importing nats_kernels._C runs the registrations above; the module itself has no functions.
static struct PyModuleDef nats_kernels_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                                 nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&nats_kernels_module); }
