// vhr_core: the arithmetic of VHR (shared/VHR_SPEC.md sections 1-3), nothing else.
//
// Knows nothing of llama.cpp or Python: it works on plain float buffers laid out as
// llama.cpp's `kqv_out-<l>` tensor, i.e. columns of n_head * head_dim floats, head i in
// rows i*head_dim .. (i+1)*head_dim-1 of each column.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace vhr {

// Per-head scores of one layer at the position that predicts the first token (spec 2).
struct HeadScores {
    std::vector<float> d;   // D  = ||A_img - R||_2^2   (squared, as released; selection uses it)
    std::vector<float> ta;  // TA = ||R||_2^2
};

// D and TA from the last-position column of the image prompt (col_img) and the text-only
// reference R (col_txt); both hold n_head * head_dim floats.
HeadScores score_heads(const float * col_img, const float * col_txt, int n_head, int head_dim);

// The paper's Euclidean VHD for reports: sqrt(D) per head.
std::vector<float> euclidean(const std::vector<float> & d);

// Spec 2: only when the unbiased std of D exceeds 1 (the released absolute guard): heads whose
// D AND TA are both above mean + unbiased std of their layer. Empty when the guard fails.
std::vector<int> outlier_heads(const std::vector<float> & d, const std::vector<float> & ta);

// Spec 2 + 3: zero the outliers' D (when outlier_rule), then keep heads whose D is strictly
// above the median of the layer (mean of the two middle values for an even count; for a
// strict ">" this picks the same heads as torch.median's lower middle). Ascending indices.
std::vector<int> select_heads(const HeadScores & scores, bool outlier_rule = true);

// A fixed count instead of the median (an option for studies, not the paper rule): zero the
// outliers' D (when outlier_rule), then keep the `count` heads with the largest D; among equal
// D the lower index goes first. count >= n_head keeps every head. Ascending indices.
std::vector<int> top_heads(const HeadScores & scores, int count, bool outlier_rule = true);

// The random-heads control: `count` distinct heads out of n_head drawn with rng, ascending.
std::vector<int> random_heads(int count, int n_head, std::mt19937 & rng);

// Spec 3: A[l,i] <- alpha * A[l,i] for i in heads, in every one of n_cols columns.
// col_stride is the distance between columns in floats (n_head * head_dim when contiguous).
void scale_heads(float * data, int64_t n_cols, int64_t col_stride,
                 const std::vector<int> & heads, int head_dim, float alpha);

// Spec 3 "auto" (the paper rule as released): layer 1 plus the last 14 layers when n_layer >= 16;
// shallower models keep the proportion: layer 1 plus the last round(14 * n_layer / 32). Ascending.
std::vector<int> auto_layers(int n_layer);

// Spec 6: sum over the given per-layer VHD rows of the sum of their top-k values.
double t_vhd(const std::vector<std::vector<float>> & vhd_rows, int k);

}  // namespace vhr
