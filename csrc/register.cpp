// Schemas of every CUDA op in maskedssl._C, in one place. Each op's kernels live in their own .cu file
// and register their CUDA implementations with TORCH_LIBRARY_IMPL(maskedssl, CUDA, m). Fake (meta)
// implementations, autograd and argument validation live in Python (maskedssl/ops/), so these schemas
// are the low-level kernel entry points, named <op>_cuda, and not the public ops.
#include <torch/library.h>

TORCH_LIBRARY(maskedssl, m) {
  // --- token gather / scatter (csrc/token_gather.cu) ---
  m.def("gather_tokens_cuda(Tensor x, Tensor ids_keep, Tensor? pos) -> Tensor");
  m.def("scatter_tokens_cuda(Tensor x_vis, Tensor ids_restore, Tensor mask_token, Tensor? pos) -> Tensor");
  m.def("gather_tokens_backward_cuda(Tensor grad, Tensor ids_keep, int length, bool need_pos, "
        "bool deterministic) -> (Tensor, Tensor)");
  m.def("scatter_tokens_backward_cuda(Tensor grad, Tensor ids_restore, int num_visible, bool need_pos, "
        "bool deterministic) -> (Tensor, Tensor, Tensor)");
  // --- end token gather / scatter ---

  // --- ncut bi-partition (csrc/ncut.cu) ---
  // the second output: int32 (B,) products each sample's eigensolver took when count_products, else (0,)
  m.def("ncut_fiedler_cuda(Tensor feats, float? tau, float eps, bool count_products=False) "
        "-> (Tensor, Tensor)");
  // sign, split, seed and scores from each sample's vector v: (fiedler, foreground, score)
  m.def("ncut_partition_cuda(Tensor feats, Tensor v, float seed_tie, float split_tie) "
        "-> (Tensor, Tensor, Tensor)");
  // the same from the (B, N, N) float32 Gram matrix F F^T, the features read only for samples it flags
  m.def("ncut_partition_gram_cuda(Tensor feats, Tensor gram, Tensor v, float seed_tie, float split_tie) "
        "-> (Tensor, Tensor, Tensor)");
  // the (B, N, N) float32 Gram matrix F F^T the solver works on
  m.def("ncut_gram_cuda(Tensor feats) -> Tensor");
  // solver (on the given Gram matrix, or a new one) and partition step in one call: (fiedler, foreground, score)
  m.def("ncut_bipartition_cuda(Tensor feats, Tensor? gram, float? tau, float eps, float seed_tie, "
        "float split_tie) -> (Tensor, Tensor, Tensor)");
  // --- end ncut bi-partition ---

  // --- mix + patchify (csrc/mix_patchify.cu) ---
  m.def("mix_patchify_cuda(Tensor imgs, int patch_size, Tensor? partner, Tensor? lam, Tensor? ids_keep, "
        "Tensor? ids_masked, bool norm_pix, Tensor? mean, Tensor? std, ScalarType out_dtype) "
        "-> (Tensor, Tensor, Tensor)");
  // --- end mix + patchify ---
}
