// weight_fold: VHR's decode-time head scaling moved into W_o (VHR_SPEC 5), where that is exact.
//
// Multiplying head h's slice of kqv_out by alpha before W_o gives the same product as multiplying
// W_o's columns of head h by alpha. For alpha a power of two (> 1) the folded weights are exact:
// F32 / F16 values, or the fp16 scale of each 32-wide Q8_0 / Q4_0 block (head_dim a multiple of
// 32). Decoding then needs no callback on those layers, so llama.cpp computes each token's graph
// in one piece instead of splitting it at every scaled layer. K-quants (256-wide super-blocks),
// repacked CPU layouts and device buffers are not folded: the callback scales them as before.
//
// llama.cpp maps the GGUF read-only and shared; before its first fold a W_o tensor's pages are
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

// Multiply (or, with inverse, divide) the columns of `heads` in every row of w by alpha.
// Returns false, changing nothing, if a value would overflow.
bool scale_weight_heads(ggml_tensor * w, const std::vector<int> & heads, int n_head, float alpha, bool inverse);

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
