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
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

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

// lists_ok(lists, written) -> bool: the common case of the public list ops' input checks, in one
// C++ pass (design §8.1). True when `lists` (a tuple) holds lists or tuples of one length n >= 1
// of plain tensors (torch.Tensor or Parameter, no other subclass) with one floating dtype, one
// CPU or CUDA device and equal shapes position by position, and nothing needs the custom op or
// a closer look: with grad mode on, no tensor requires grad and no tensor of the first `written`
// lists is a view of one that does; the written tensors are contiguous and their byte ranges
// pairwise disjoint. False means "not this common case", never "invalid": the Python checks then
// run and say what, if anything, is wrong. Metadata only; no value is read.
static bool lists_ok_impl(PyObject* lists, Py_ssize_t written) {
  if (!PyTuple_CheckExact(lists)) return false;
  const Py_ssize_t k = PyTuple_GET_SIZE(lists);
  if (k == 0 || written < 0 || written > k) return false;
  Py_ssize_t n = -1;
  for (Py_ssize_t i = 0; i < k; ++i) {
    PyObject* seq = PyTuple_GET_ITEM(lists, i);
    if (!PyList_CheckExact(seq) && !PyTuple_CheckExact(seq)) return false;
    const Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
    if (len == 0 || (n >= 0 && len != n)) return false;
    n = len;
  }
  const bool grad_on = at::GradMode::is_enabled();
  PyObject** first = PySequence_Fast_ITEMS(PyTuple_GET_ITEM(lists, 0));
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  c10::Device device(c10::DeviceType::CPU);
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  if (written > 0) ranges.reserve(static_cast<size_t>(n * written));
  for (Py_ssize_t i = 0; i < k; ++i) {
    PyObject** items = PySequence_Fast_ITEMS(PyTuple_GET_ITEM(lists, i));
    for (Py_ssize_t j = 0; j < n; ++j) {
      if (!THPVariable_CheckExact(items[j]) || !THPVariable_CheckExact(first[j])) return false;
      const at::Tensor& t = THPVariable_Unpack(items[j]);
      if (!t.defined()) return false;
      if (i == 0 && j == 0) {
        dtype = t.scalar_type();
        device = t.device();
        if (dtype != c10::ScalarType::Half && dtype != c10::ScalarType::BFloat16 &&
            dtype != c10::ScalarType::Float && dtype != c10::ScalarType::Double)
          return false;
        if (!device.is_cpu() && !device.is_cuda()) return false;
      } else if (t.scalar_type() != dtype || t.device() != device) {
        return false;
      }
      if (i > 0 && !t.sizes().equals(THPVariable_Unpack(first[j]).sizes())) return false;
      if (grad_on && t.requires_grad()) return false;
      if (i < written) {
        if (grad_on && t.is_view() && t._base().requires_grad()) return false;
        if (!t.is_contiguous()) return false;
        if (t.numel() > 0) {
          const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
          ranges.emplace_back(start, start + static_cast<uintptr_t>(t.nbytes()));
        }
      }
    }
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t r = 1; r < ranges.size(); ++r)
    if (ranges[r].first < ranges[r - 1].second) return false;
  return true;
}

static PyObject* lists_ok(PyObject*, PyObject* args) {
  PyObject* lists = nullptr;
  Py_ssize_t written = 0;
  if (!PyArg_ParseTuple(args, "On", &lists, &written)) return nullptr;
  try {
    if (lists_ok_impl(lists, written)) Py_RETURN_TRUE;
  } catch (const std::exception&) {  // e.g. a tensor without storage: not the common case
  }
  Py_RETURN_FALSE;
}

static PyMethodDef nats_kernels_methods[] = {
    {"lists_ok", lists_ok, METH_VARARGS,
     "lists_ok(lists: tuple, written: int) -> bool: the common case of the list ops' checks"},
    {nullptr, nullptr, 0, nullptr}};

// Importing nats_kernels._C runs the registrations above; lists_ok is its one function.
static struct PyModuleDef nats_kernels_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                                 nats_kernels_methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&nats_kernels_module); }
