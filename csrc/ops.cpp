// The op schemas: each LESS op is declared once here; each backend registers its kernels in its own file
// (csrc/cpu/*.cpp, csrc/cuda/bindings.cpp). Shapes and semantics: less_cuda/reference.py.
#include <Python.h>
#include <torch/library.h>

// Makes `import less_cuda._C` load this library (and with it the op registrations).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(less_cuda, m) {
  // (c) q [B,Hq,D]; k,v [B,Hkv,S,D]; pos [B,Hkv,S] int32; phi_q [B,Hq,R], H [B,Hkv,R,D], z [B,Hkv,R] fp32 or None
  //     -> out [B,Hq,D] (q's dtype), probs [B,Hkv,S] fp32 (group-summed sparse softmax probabilities)
  m.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor pos, Tensor? phi_q, Tensor? H, Tensor? z, "
      "float scale) -> (Tensor, Tensor)");
  // (a) scores [B,Hkv,S] fp32 and pos [B,Hkv,S] int32 updated in place -> victim slot [B,Hkv] int64 (-1: none)
  m.def(
      "score_and_evict_(Tensor(a!) scores, Tensor(b!) pos, Tensor probs, int policy, int budget, int recent, "
      "int sinks) -> Tensor");
  // (b) psi [B,Hkv,N,R] fp32, v [B,Hkv,N,D], mask [B,Hkv,N] bool or None -> dH [B,Hkv,R,D], dz [B,Hkv,R] fp32
  m.def("state_fold(Tensor psi, Tensor v, Tensor? mask) -> (Tensor, Tensor)");
  // (b) in place: H += dH, z += dz (the decode path: no allocation, one writer per element)
  m.def("state_update_(Tensor(a!) H, Tensor(b!) z, Tensor psi, Tensor v, Tensor? mask) -> ()");
}
