// The Python module vlmkernels._C: `import vlmkernels._C` loads the shared library, whose
// static initialisers run every family's TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL
// registrations (csrc/<family>/bindings.cpp). The module itself holds the build facts:
// `cuda_archs`, the -gencode targets joined by "__" as setup.py passes them, and
// `cuda_runtime_version`.
#include <Python.h>
#include <cuda_runtime_api.h>

#ifndef VLMKERNELS_CUDA_ARCHS
#define VLMKERNELS_CUDA_ARCHS unknown
#endif
#define VLMK_STR2(x) #x
#define VLMK_STR(x) VLMK_STR2(x)

// `import vlmkernels._C` runs the registrations above; the module holds the build facts
// (`cuda_archs`: the -gencode targets joined by "__", as setup.py passes them).
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "vlmkernels CUDA C++ kernels", -1,
                            nullptr, nullptr, nullptr, nullptr, nullptr};
  PyObject* module = PyModule_Create(&def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddStringConstant(module, "cuda_archs", VLMK_STR(VLMKERNELS_CUDA_ARCHS)) < 0 ||
      PyModule_AddIntConstant(module, "cuda_runtime_version", CUDART_VERSION) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
