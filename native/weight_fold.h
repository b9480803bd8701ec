// weight_fold: VHR's decode-time head scaling moved into W_o (VHR_SPEC 5), where that is exact.
//
// Multiplying head h's slice of kqv_out by alpha before W_o gives the same product as multiplying
// W_o's columns of head h by alpha. For alpha a power of two (> 1) the folded weights are exact:
// F32 / F16 values, or the fp16 scale of each 32-wide Q8_0 / Q4_0 block (head_dim a multiple of
// 32). Decoding then needs no callback on those layers, so llama.cpp computes each token's graph
// in one piece instead of splitting it (and, on a GPU, syncing) at every scaled layer.
//
// W_o in host memory (mmap-ed, or loaded with --no-mmap) is scaled where it lies; on a GPU (CUDA,
// Vulkan buffers keep the GGUF's rows) it goes through ggml_backend_tensor_get/set in chunks. K-quants (256-wide super-blocks), repacked CPU layouts, rows split over
// several GPUs and SYCL buffers are not folded: the callback scales them as before.
//
// llama.cpp maps the GGUF read-only and shared; before its first fold a mapped W_o's pages are
// remapped private (copy-on-write) from the same file, after checking that memory and file hold
// the same bytes there. Unfolding divides by alpha, which restores every bit.
#pragma once

#include <set>
#include <string>
#include <utility>
#include <vector>

#include "ggml.h"

namespace vhr {

// alpha is a power of two greater than 1.
bool alpha_foldable(float alpha);

// Why w (a W_o of n_head heads) cannot be folded, or "" if it can.
std::string fold_blocker(const ggml_tensor * w, int n_head);

// Multiply (or, with inverse, divide) the columns of `heads` in every row of w by alpha. Returns
// false, changing nothing, if a value would overflow. W_o in host memory is scaled where it lies;
// elsewhere (a GPU) chunk_bytes of whole rows at a time go through host memory with
// ggml_backend_tensor_get/set (kFoldChunkBytes when 0; > 0 forces this path, for tests).
constexpr size_t kFoldChunkBytes = 4u << 20;
bool scale_weight_heads(ggml_tensor * w, const std::vector<int> & heads, int n_head, float alpha, bool inverse,
                        size_t chunk_bytes = 0);

// scale_weight_heads on `bytes` (ne1 rows of a W_o of width ne0 and type `type`) placed in a ggml
// CPU buffer and read back: exactly what a fold does to a tensor (chunk_bytes as there), for tests.
bool scale_weight_bytes(std::vector<uint8_t> & bytes, ggml_type type, int64_t ne0, int64_t ne1,
                        const std::vector<int> & heads, int n_head, float alpha, bool inverse, size_t chunk_bytes);

// Make w's bytes writable without touching the file: remap its pages MAP_PRIVATE from the GGUF
// (once per tensor: HeadFold::apply remembers which are done). Returns "" on success, else why not.
std::string make_private(const ggml_tensor * w, const std::string & gguf_path);

// One caption's selected heads folded into W_o; unfolded exactly when destroyed (or undo()).
class HeadFold {
public:
    HeadFold() = default;
    HeadFold(const HeadFold &) = delete;
    HeadFold & operator=(const HeadFold &) = delete;
    ~HeadFold() { undo(); }

    // Fold heads[l] into w_o[l] for every layer with heads. "" on success; else why, with
    // nothing folded. `made_private` remembers the W_o already remapped by make_private.
    std::string apply(const std::vector<ggml_tensor *> & w_o, const std::vector<std::vector<int>> & heads, int n_head,
                      float alpha, const std::string & gguf_path, std::set<const ggml_tensor *> & made_private);
    void undo();

private:
    std::vector<std::pair<ggml_tensor *, std::vector<int>>> done_;
    int n_head_ = 0;
    float alpha_ = 1.0f;
};

}  // namespace vhr
