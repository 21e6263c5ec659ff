// The torch side of the CUDA kernels, the Python module nats_kernels._cuda: importing it runs the
// registrations of the per-op glue for the CUDA dispatch key of the kernel-level ops
// (csrc/nats_kernels.cpp): cfg_binding.cpp (design §1), lists_binding.cpp (design §4, §5) and
// median_binding.cpp (design §3), with the layout and overlap policy of binding_layout.h. The
// glue maps dtypes, allocates outputs and workspaces with torch's caching allocator and launches
// on the current stream of the tensors' device; arguments arrive validated
// (nats_kernels/ops/*.py); the kernels are csrc/cuda/*.cu. No op reads a device value on the
// host: weights, scales, w_r, w_f and r stay on the device.
#include <Python.h>

// The module itself has no functions.
static struct PyModuleDef nats_kernels_cuda_module = {
    PyModuleDef_HEAD_INIT, "_cuda", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__cuda(void) { return PyModule_Create(&nats_kernels_cuda_module); }
