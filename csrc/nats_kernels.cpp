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
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
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
  // Diagnostics of the CPU median: (window, radix, small) problems solved so far (tests,
  // profiling), and the small path's pair limit (a test knob: set when >= 0, returns the old).
  m.def("median_path_counts() -> Tensor");
  m.def("median_small_limit(int pairs) -> int");
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

// ---------------------------------------------------------------------------------------------
// The CPU fast path of the public ops (design §8.1): cpu_<op>(...) checks the common case as
// lists_ok does, plus the op's scalar tensors, and when it holds and NATS_KERNELS_BACKEND lets
// the cpu backend run (unset, empty, "auto" or "cpu"), calls the op's CPU kernel through the
// dispatcher (typed, unboxed: no IValue lists), with the GIL released, and bumps the version
// counters of what it wrote. It returns None (the list ops returning a tensor) or False when
// the call is not that case; the Python checks and dispatch then take the call over. It never
// raises for bad input: the Python checks own every error message. Python calls it only when
// the dispatch registry is the one _load built with the extension's cpu kernels
// (_dispatch.native_cpu) and torch.compile is not tracing.

static bool env_allows_cpu() {
  const char* e = std::getenv("NATS_KERNELS_BACKEND");
  return e == nullptr || *e == '\0' || std::strcmp(e, "auto") == 0 || std::strcmp(e, "cpu") == 0;
}

static bool floating(c10::ScalarType t) {
  return t == c10::ScalarType::Half || t == c10::ScalarType::BFloat16 ||
         t == c10::ScalarType::Float || t == c10::ScalarType::Double;
}

// A Python float or int (not a bool) that is finite and within the range of the math type
// (float64 when `wide`, else float32), as _validate.finite(..., dtype=) accepts; its value in
// *out.
// Ints only up to 2**53 in magnitude (exact as doubles). Anything else declines (false) to the
// Python checks, which own the messages; never raises.
static bool plain_number(PyObject* obj, bool wide, double* out) {
  if (PyFloat_CheckExact(obj)) {
    const double v = PyFloat_AS_DOUBLE(obj);
    const double largest = wide ? std::numeric_limits<double>::max()
                                : static_cast<double>(std::numeric_limits<float>::max());
    if (!std::isfinite(v) || std::fabs(v) > largest) return false;
    *out = v;
    return true;
  }
  if (PyLong_CheckExact(obj)) {
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    constexpr long long kExact = 1LL << 53;
    if (overflow != 0 || v > kExact || v < -kExact) return false;
    *out = static_cast<double>(v);
    return true;
  }
  return false;
}

static bool wide_math(c10::ScalarType t) { return t == c10::ScalarType::Double; }

// A plain floating CPU tensor (Tensor or Parameter) that autograd has nothing to record for.
static const at::Tensor* cpu_tensor(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || !floating(t.scalar_type()) || !t.device().is_cpu() ||
      (at::GradMode::is_enabled() && t.requires_grad()))
    return nullptr;
  return &t;
}

// A 0-d one of those.
static bool cpu_scalar(PyObject* obj) {
  const at::Tensor* t = cpu_tensor(obj);
  return t != nullptr && t->dim() == 0;
}

// lists_ok on CPU tensors whose written ones can take a version bump (not inference tensors).
static bool cpu_lists_ok(PyObject* lists, Py_ssize_t written) {
  if (!lists_ok_impl(lists, written)) return false;
  PyObject* first = PySequence_Fast_ITEMS(PyTuple_GET_ITEM(lists, 0))[0];
  if (!THPVariable_Unpack(first).device().is_cpu()) return false;
  for (Py_ssize_t i = 0; i < written; ++i) {
    PyObject* seq = PyTuple_GET_ITEM(lists, i);
    PyObject** items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(seq); ++j)
      if (THPVariable_Unpack(items[j]).is_inference()) return false;
  }
  return true;
}

static std::vector<at::Tensor> unpack(PyObject* seq) {
  std::vector<at::Tensor> out;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  out.reserve(static_cast<size_t>(n));
  PyObject** items = PySequence_Fast_ITEMS(seq);
  for (Py_ssize_t j = 0; j < n; ++j) out.push_back(THPVariable_Unpack(items[j]));
  return out;
}

static void bump(const std::vector<at::Tensor>& ts) {
  for (const auto& t : ts) t.unsafeGetTensorImpl()->bump_version();
}

template <class Sig>
static c10::TypedOperatorHandle<Sig> ext_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// f() without the GIL; exceptions cross back with it held.
template <class F>
static auto without_gil(F&& f) {
  PyThreadState* state = PyEval_SaveThread();
  try {
    auto result = f();
    PyEval_RestoreThread(state);
    return result;
  } catch (...) {
    PyEval_RestoreThread(state);
    throw;
  }
}

#define NK_FAST_TRY try {
#define NK_FAST_CATCH                                        \
  }                                                          \
  catch (const std::exception& e) {                          \
    PyErr_SetString(PyExc_RuntimeError, e.what());           \
    return nullptr;                                          \
  }

static PyObject* cpu_multi_dot(PyObject*, PyObject* args) {
  PyObject *a, *b;
  if (!PyArg_ParseTuple(args, "OO", &a, &b)) return nullptr;
  NK_FAST_TRY
  PyObject* lists = PyTuple_Pack(2, a, b);
  if (lists == nullptr) return nullptr;
  const bool ok = env_allows_cpu() && cpu_lists_ok(lists, 0);
  Py_DECREF(lists);
  if (!ok) Py_RETURN_NONE;
  static const auto op = ext_op<at::Tensor(at::TensorList, at::TensorList)>(
      "nats_kernels_ext::multi_dot");
  const auto va = unpack(a), vb = unpack(b);
  return THPVariable_Wrap(without_gil([&] { return op.call(va, vb); }));
  NK_FAST_CATCH
}

static PyObject* cpu_iga_ratio(PyObject*, PyObject* args) {
  PyObject *gf, *gF, *eps_obj;
  if (!PyArg_ParseTuple(args, "OOO", &gf, &gF, &eps_obj)) return nullptr;
  NK_FAST_TRY
  double eps = 0.0;
  if (!plain_number(eps_obj, /*wide=*/true, &eps) || !(eps >= 0.0)) Py_RETURN_NONE;
  PyObject* lists = PyTuple_Pack(2, gf, gF);
  if (lists == nullptr) return nullptr;
  const bool ok = env_allows_cpu() && cpu_lists_ok(lists, 0);
  Py_DECREF(lists);
  if (!ok) Py_RETURN_NONE;
  static const auto op = ext_op<at::Tensor(at::TensorList, at::TensorList, double)>(
      "nats_kernels_ext::iga_ratio");
  const auto va = unpack(gf), vb = unpack(gF);
  return THPVariable_Wrap(without_gil([&] { return op.call(va, vb, eps); }));
  NK_FAST_CATCH
}

static PyObject* cpu_aw_combine_(PyObject*, PyObject* args) {
  PyObject *out, *g_r, *g_f, *w_r, *w_f;
  if (!PyArg_ParseTuple(args, "OOOOO", &out, &g_r, &g_f, &w_r, &w_f)) return nullptr;
  NK_FAST_TRY
  if (!env_allows_cpu() || !cpu_scalar(w_r) || !cpu_scalar(w_f)) Py_RETURN_FALSE;
  PyObject* lists = PyTuple_Pack(3, out, g_r, g_f);
  if (lists == nullptr) return nullptr;
  const bool ok = cpu_lists_ok(lists, 1);
  Py_DECREF(lists);
  if (!ok) Py_RETURN_FALSE;
  static const auto op = ext_op<void(at::TensorList, at::TensorList, at::TensorList,
                                     const at::Tensor&, const at::Tensor&)>(
      "nats_kernels_ext::aw_combine_");
  const auto vo = unpack(out), vr = unpack(g_r), vf = unpack(g_f);
  const at::Tensor &wr = THPVariable_Unpack(w_r), &wf = THPVariable_Unpack(w_f);
  without_gil([&] {
    op.call(vo, vr, vf, wr, wf);
    return 0;
  });
  bump(vo);
  Py_RETURN_TRUE;
  NK_FAST_CATCH
}

static PyObject* cpu_iga_correction_(PyObject*, PyObject* args) {
  PyObject *g, *gf, *r;
  if (!PyArg_ParseTuple(args, "OOO", &g, &gf, &r)) return nullptr;
  NK_FAST_TRY
  if (!env_allows_cpu() || !cpu_scalar(r)) Py_RETURN_FALSE;
  PyObject* lists = PyTuple_Pack(2, g, gf);
  if (lists == nullptr) return nullptr;
  const bool ok = cpu_lists_ok(lists, 1);
  Py_DECREF(lists);
  if (!ok) Py_RETURN_FALSE;
  static const auto op = ext_op<void(at::TensorList, at::TensorList, const at::Tensor&)>(
      "nats_kernels_ext::iga_correction_");
  const auto vg = unpack(g), vf = unpack(gf);
  const at::Tensor& rt = THPVariable_Unpack(r);
  without_gil([&] {
    op.call(vg, vf, rt);
    return 0;
  });
  bump(vg);
  Py_RETURN_TRUE;
  NK_FAST_CATCH
}

// cfg_step_(x, grad, weight, eta, scale): eta a Python number, weight a Python number (made a
// 0-d tensor of the math type, as the Python path's _validate.scalar makes it) or a 0-d plain
// floating CPU tensor, scale None or a (B,) one with B = x.size(0); x and grad what lists_ok
// accepts as ([x], [grad]) with x written, on CPU, x not an inference tensor. Checked here
// directly, without building the lists.
static PyObject* cpu_cfg_step_(PyObject*, PyObject* args) {
  PyObject *x, *grad, *weight, *eta_obj, *scale;
  if (!PyArg_ParseTuple(args, "OOOOO", &x, &grad, &weight, &eta_obj, &scale)) return nullptr;
  NK_FAST_TRY
  if (!env_allows_cpu()) Py_RETURN_FALSE;
  const at::Tensor* xp = cpu_tensor(x);
  const at::Tensor* gp = cpu_tensor(grad);
  if (xp == nullptr || gp == nullptr || gp->scalar_type() != xp->scalar_type() ||
      !gp->sizes().equals(xp->sizes()) || !xp->is_contiguous() || xp->is_inference() ||
      (at::GradMode::is_enabled() && xp->is_view() && xp->_base().requires_grad()))
    Py_RETURN_FALSE;
  const at::Tensor& xt = *xp;
  const bool wide = wide_math(xt.scalar_type());
  double eta = 0.0, w = 0.0;
  if (!plain_number(eta_obj, wide, &eta)) Py_RETURN_FALSE;
  const bool weight_number = plain_number(weight, wide, &w);
  if (!weight_number && !cpu_scalar(weight)) Py_RETURN_FALSE;
  std::optional<at::Tensor> st;
  if (scale != Py_None) {
    if (!THPVariable_CheckExact(scale)) Py_RETURN_FALSE;
    const at::Tensor& s = THPVariable_Unpack(scale);
    if (!s.defined() || !floating(s.scalar_type()) || !s.device().is_cpu() || s.dim() != 1 ||
        xt.dim() == 0 || s.size(0) != xt.size(0) ||
        (at::GradMode::is_enabled() && s.requires_grad()))
      Py_RETURN_FALSE;
    st = s;
  }
  static const auto op = ext_op<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     double, const std::optional<at::Tensor>&)>(
      "nats_kernels_ext::cfg_step_");
  const at::Tensor& gt = *gp;
  at::Tensor wt;
  if (weight_number) {
    wt = at::scalar_tensor(w, at::TensorOptions().dtype(wide ? at::kDouble : at::kFloat));
  } else {
    wt = THPVariable_Unpack(weight);
  }
  without_gil([&] {
    op.call(xt, gt, wt, eta, st);
    return 0;
  });
  xt.unsafeGetTensorImpl()->bump_version();
  Py_RETURN_TRUE;
  NK_FAST_CATCH
}

// cfg_accumulate(x0, grads, weights, eta, scale, out): grads a stacked (M, *x0.shape) tensor or
// a list/tuple of M tensors shaped like x0; eta a plain_number; out
// None (a new tensor like x0) or a contiguous tensor like x0 that may be written (as
// _validate.out_arg allows). Returns out, or None when not the common case.
static PyObject* cpu_cfg_accumulate(PyObject*, PyObject* args) {
  PyObject *x0o, *gradso, *wo, *eta_obj, *scaleo, *outo;
  if (!PyArg_ParseTuple(args, "OOOOOO", &x0o, &gradso, &wo, &eta_obj, &scaleo, &outo))
    return nullptr;
  NK_FAST_TRY
  if (!env_allows_cpu()) Py_RETURN_NONE;
  const at::Tensor* x0 = cpu_tensor(x0o);
  const at::Tensor* w = cpu_tensor(wo);
  if (x0 == nullptr || w == nullptr || w->dim() != 1 || w->size(0) < 1) Py_RETURN_NONE;
  double eta = 0.0;
  if (!plain_number(eta_obj, wide_math(x0->scalar_type()), &eta)) Py_RETURN_NONE;
  const int64_t M = w->size(0);
  const auto dtype = x0->scalar_type();
  const bool grad_on = at::GradMode::is_enabled();
  bool stacked = false;
  std::vector<at::Tensor> list;
  const at::Tensor* g = nullptr;
  if (THPVariable_Check(gradso)) {
    g = cpu_tensor(gradso);
    if (g == nullptr || g->scalar_type() != dtype || g->dim() != x0->dim() + 1 ||
        g->size(0) != M || !g->sizes().slice(1).equals(x0->sizes()))
      Py_RETURN_NONE;
    stacked = true;
  } else {
    if (!PyList_CheckExact(gradso) && !PyTuple_CheckExact(gradso)) Py_RETURN_NONE;
    if (PySequence_Fast_GET_SIZE(gradso) != M) Py_RETURN_NONE;
    PyObject** items = PySequence_Fast_ITEMS(gradso);
    list.reserve(static_cast<size_t>(M));
    for (int64_t m = 0; m < M; ++m) {
      const at::Tensor* gm = cpu_tensor(items[m]);
      if (gm == nullptr || gm->scalar_type() != dtype || !gm->sizes().equals(x0->sizes()))
        Py_RETURN_NONE;
      list.push_back(*gm);
    }
  }
  std::optional<at::Tensor> scale;
  if (scaleo != Py_None) {
    const at::Tensor* s = cpu_tensor(scaleo);
    if (s == nullptr || x0->dim() == 0 || s->dim() != 2 || s->size(0) != M ||
        s->size(1) != x0->size(0))
      Py_RETURN_NONE;
    scale = *s;
  }
  at::Tensor out;
  if (outo == Py_None) {
    out = at::empty_like(*x0);
  } else {
    if (!THPVariable_CheckExact(outo)) Py_RETURN_NONE;
    out = THPVariable_Unpack(outo);
    if (!out.defined() || out.scalar_type() != dtype || !out.device().is_cpu() ||
        !out.sizes().equals(x0->sizes()) || !out.is_contiguous() || out.is_inference() ||
        (grad_on && (out.requires_grad() || out.is_view())))
      Py_RETURN_NONE;
  }
  if (stacked) {
    static const auto op = ext_op<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       double, const std::optional<at::Tensor>&,
                                       const at::Tensor&)>("nats_kernels_ext::cfg_accumulate");
    without_gil([&] {
      op.call(*x0, *g, *w, eta, scale, out);
      return 0;
    });
  } else {
    static const auto op = ext_op<void(const at::Tensor&, at::TensorList, const at::Tensor&,
                                       double, const std::optional<at::Tensor>&,
                                       const at::Tensor&)>(
        "nats_kernels_ext::cfg_accumulate_list");
    without_gil([&] {
      op.call(*x0, list, *w, eta, scale, out);
      return 0;
    });
  }
  if (outo == Py_None) return THPVariable_Wrap(std::move(out));
  out.unsafeGetTensorImpl()->bump_version();
  Py_INCREF(outo);
  return outo;
  NK_FAST_CATCH
}

// aw_weights(dots, real_logits, fake_logits, normalized, alpha1, alpha2, delta, eps): normalized
// a bool, the others plain numbers (eps >= 0); dots a (3,) tensor, the logits non-empty, all plain
// floating CPU tensors. Returns (w_r, w_f, case), or None when not the common case.
static PyObject* cpu_aw_weights(PyObject*, PyObject* args) {
  PyObject *dotso, *realo, *fakeo, *normo, *a1o, *a2o, *deltao, *epso;
  if (!PyArg_ParseTuple(args, "OOOOOOOO", &dotso, &realo, &fakeo, &normo, &a1o, &a2o, &deltao,
                        &epso))
    return nullptr;
  NK_FAST_TRY
  if (!env_allows_cpu() || !PyBool_Check(normo)) Py_RETURN_NONE;
  const bool normalized = normo == Py_True;
  const at::Tensor* dots = cpu_tensor(dotso);
  const at::Tensor* real = cpu_tensor(realo);
  const at::Tensor* fake = cpu_tensor(fakeo);
  if (dots == nullptr || real == nullptr || fake == nullptr || dots->dim() != 1 ||
      dots->size(0) != 3 || real->numel() == 0 || fake->numel() == 0)
    Py_RETURN_NONE;
  const bool wide = wide_math(dots->scalar_type());
  double a1 = 0.0, a2 = 0.0, delta = 0.0, eps = 0.0;
  if (!plain_number(a1o, wide, &a1) || !plain_number(a2o, wide, &a2) ||
      !plain_number(deltao, wide, &delta) || !plain_number(epso, wide, &eps) || !(eps >= 0.0))
    Py_RETURN_NONE;
  static const auto op =
      ext_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
          const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, double, double, double,
          double)>("nats_kernels_ext::aw_weights");
  auto result = without_gil(
      [&] { return op.call(*dots, *real, *fake, normalized, a1, a2, delta, eps); });
  PyObject* wr = THPVariable_Wrap(std::move(std::get<0>(result)));
  PyObject* wf = THPVariable_Wrap(std::move(std::get<1>(result)));
  PyObject* cs = THPVariable_Wrap(std::move(std::get<2>(result)));
  if (wr == nullptr || wf == nullptr || cs == nullptr) {
    Py_XDECREF(wr);
    Py_XDECREF(wf);
    Py_XDECREF(cs);
    return nullptr;
  }
  PyObject* tuple = PyTuple_Pack(3, wr, wf, cs);
  Py_DECREF(wr);
  Py_DECREF(wf);
  Py_DECREF(cs);
  return tuple;
  NK_FAST_CATCH
}

// median_pairwise_distance(x, y, squared, batched, memory_budget): squared and batched Python
// bools, memory_budget a Python int (the caller has put the default in for None). The common
// case: x a plain float32 or float64 CPU tensor that autograd has nothing to record for, of at
// least 2 (batched: 3) dims and no zero size; y None (then N >= 2) or such a tensor of x's dtype
// and rank, with x's feature shape (and batch); 0 < memory_budget < 2^63. The features are
// flattened as the Python path's reshape does, the kernel runs through the dispatcher without
// the GIL, and an unbatched call returns element 0. Returns the result, or None when not that
// case (any other dtype, a tensor subclass, a bad shape, a number that is not a plain int...):
// the Python checks then run and own every error message.
static bool median_dtype(const at::Tensor& t) {
  return t.scalar_type() == c10::ScalarType::Float || t.scalar_type() == c10::ScalarType::Double;
}

static PyObject* cpu_median_pairwise_distance(PyObject*, PyObject* args) {
  PyObject *xo, *yo, *squaredo, *batchedo, *budgeto;
  if (!PyArg_ParseTuple(args, "OOOOO", &xo, &yo, &squaredo, &batchedo, &budgeto)) return nullptr;
  NK_FAST_TRY
  if (!env_allows_cpu()) Py_RETURN_NONE;
  if ((squaredo != Py_True && squaredo != Py_False) ||
      (batchedo != Py_True && batchedo != Py_False) || !PyLong_CheckExact(budgeto))
    Py_RETURN_NONE;
  int overflow = 0;
  const long long budget = PyLong_AsLongLongAndOverflow(budgeto, &overflow);
  if (budget == -1 && PyErr_Occurred()) return nullptr;
  if (overflow != 0 || budget <= 0) Py_RETURN_NONE;
  const bool batched = batchedo == Py_True;
  const int64_t lead = batched ? 2 : 1;
  const at::Tensor* x = cpu_tensor(xo);
  if (x == nullptr || !median_dtype(*x) || x->dim() < lead || x->numel() == 0) Py_RETURN_NONE;
  const auto xs = x->sizes();
  const int64_t batch = batched ? xs[0] : 1;
  const int64_t n = xs[lead - 1];
  int64_t d = 1;
  for (int64_t i = lead; i < x->dim(); ++i) d *= xs[i];
  std::optional<at::Tensor> yb;
  if (yo == Py_None) {
    if (n < 2) Py_RETURN_NONE;
  } else {
    const at::Tensor* y = cpu_tensor(yo);
    if (y == nullptr || y->scalar_type() != x->scalar_type() || y->dim() != x->dim() ||
        y->numel() == 0 || !y->sizes().slice(lead).equals(xs.slice(lead)) ||
        (batched && y->size(0) != batch))
      Py_RETURN_NONE;
    yb = y->reshape({batch, y->size(lead - 1), d});
  }
  const at::Tensor xb = x->reshape({batch, n, d});
  static const auto op = ext_op<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&,
                                           bool, int64_t)>(
      "nats_kernels_ext::median_pairwise_distance");
  const bool squared = squaredo == Py_True;
  at::Tensor result = without_gil([&] { return op.call(xb, yb, squared, budget); });
  return THPVariable_Wrap(batched ? std::move(result) : result.select(0, 0));
  NK_FAST_CATCH
}

static PyMethodDef nats_kernels_methods[] = {
    {"cpu_aw_weights", cpu_aw_weights, METH_VARARGS,
     "aw_weights' CPU fast path: (w_r, w_f, case), or None"},
    {"cpu_cfg_accumulate", cpu_cfg_accumulate, METH_VARARGS,
     "cfg_accumulate's CPU fast path: out, or None"},
    {"lists_ok", lists_ok, METH_VARARGS,
     "lists_ok(lists: tuple, written: int) -> bool: the common case of the list ops' checks"},
    {"cpu_multi_dot", cpu_multi_dot, METH_VARARGS, "multi_dot's CPU fast path, or None"},
    {"cpu_iga_ratio", cpu_iga_ratio, METH_VARARGS, "iga_ratio's CPU fast path, or None"},
    {"cpu_aw_combine_", cpu_aw_combine_, METH_VARARGS, "aw_combine_'s CPU fast path: ran?"},
    {"cpu_iga_correction_", cpu_iga_correction_, METH_VARARGS,
     "iga_correction_'s CPU fast path: ran?"},
    {"cpu_cfg_step_", cpu_cfg_step_, METH_VARARGS, "cfg_step_'s CPU fast path: ran?"},
    {"cpu_median_pairwise_distance", cpu_median_pairwise_distance, METH_VARARGS,
     "median_pairwise_distance's CPU fast path, or None"},
    {nullptr, nullptr, 0, nullptr}};

// Importing nats_kernels._C runs the registrations above; its functions are the checks and fast
// paths above.
static struct PyModuleDef nats_kernels_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                                 nats_kernels_methods};

// fast_path_abi: the calling convention of the cpu_<op> functions, checked by
// nats_kernels/_validate.py (FAST_PATH_ABI) so that a stale build is not used with a Python side
// that passes its arguments differently (2: the fast paths check their Python numbers
// themselves; 3: and the median has one, cpu_median_pairwise_distance).
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&nats_kernels_module);
  if (module != nullptr && PyModule_AddIntConstant(module, "fast_path_abi", 3) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
