// The op schemas: each LESS op is declared once here; each backend registers its kernels in its own file
// (csrc/cpu/*.cpp, csrc/cuda/bindings.cpp). Shapes and semantics: less_cuda/core/reference.py.
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
  // Inference form of one layer's feature maps (LayerFeatureMaps.phi / .psi): q [B,Hq,T,D], k [B,Hkv,T,D] and the
  // fp32 weights -> phi [B,Hq,T,R], psi [B,Hkv,T,R] fp32
  m.def(
      "feature_maps(Tensor q, Tensor k, Tensor phi_w1, Tensor phi_w2, Tensor psi_w1, Tensor psi_w2, "
      "Tensor psi_scale, Tensor psi_interaction, Tensor psi_interaction_scale) -> (Tensor, Tensor)");
  // The decode step of one layer for T new tokens in turn, in place on its slots (reference.decode_step per
  // token): insert each token into the first free slot, attend over the slots plus the state, accumulate H2O
  // scores, evict at most one token and fold it into H, z. k_slots, v_slots [B,Hkv,S,D] (q's dtype); psi_slots
  // [B,Hkv,S,R], scores [B,Hkv,S], H [B,Hkv,R,D], z [B,Hkv,R] fp32; pos [B,Hkv,S] int32; next_position [B] int32
  // (the position the next real token gets, advanced by the real tokens); q [B,Hq,T,D]; k, v [B,Hkv,T,D]; phi_q
  // [B,Hq,T,R], psi_k [B,Hkv,T,R] fp32, or None for both when R = 0 (sparse policy only); valid [B,T] bool (False:
  // a pad token, which takes no slot, adds no score and evicts nothing), or None when every token is real
  // -> out [B,Hq,T,D] (q's dtype). state_rows [B] int64: the state tensors are a pool of N rows (each row
  // contiguous, rows a stride apart, as vLLM lays out a request's state) and batch row b updates row state_rows[b]
  // in place; None: the state tensors' first dimension is B.
  m.def(
      "decode_step_(Tensor(a!) k_slots, Tensor(b!) v_slots, Tensor(c!) psi_slots, Tensor(d!) pos, "
      "Tensor(e!) scores, Tensor(f!) H, Tensor(g!) z, Tensor(h!) next_position, Tensor q, Tensor k, Tensor v, "
      "Tensor? phi_q, Tensor? psi_k, Tensor? valid, float scale, int policy, int budget, int recent, int sinks, "
      "Tensor? state_rows=None) -> Tensor");
}
