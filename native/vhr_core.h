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

// Per-head scores of one layer at the position that predicts the first token.
struct HeadScores {
    std::vector<float> vhd;  // ||A_img - A_txt||_2                (spec 1)
    std::vector<float> ta;   // ||A_txt||_2^2                       (spec 1)
};

// VHD and TA from the last-position column of the image prompt (col_img) and of the
// text-only prompt (col_txt); both hold n_head * head_dim floats.
HeadScores score_heads(const float * col_img, const float * col_txt, int n_head, int head_dim);

// Spec 2: heads whose VHD AND TA are both above mean + population std of their layer.
std::vector<int> outlier_heads(const std::vector<float> & vhd, const std::vector<float> & ta);

// Spec 2 + 3: zero the outliers' VHD (when outlier_rule), then keep heads whose VHD is
// strictly above the median of the layer (numpy's median: mean of the two middle values
// for an even count). Returns ascending head indices.
std::vector<int> select_heads(const HeadScores & scores, bool outlier_rule = true);

// The random-heads control: `count` distinct heads out of n_head drawn with rng, ascending.
std::vector<int> random_heads(int count, int n_head, std::mt19937 & rng);

// Spec 3: A[l,i] <- alpha * A[l,i] for i in heads, in every one of n_cols columns.
// col_stride is the distance between columns in floats (n_head * head_dim when contiguous).
void scale_heads(float * data, int64_t n_cols, int64_t col_stride,
                 const std::vector<int> & heads, int head_dim, float alpha);

// Spec 3 "auto": layer 1 plus the last round(14 * n_layer / 32) layers, ascending.
std::vector<int> auto_layers(int n_layer);

// Spec 6: sum over the given per-layer VHD rows of the sum of their top-k values.
double t_vhd(const std::vector<std::vector<float>> & vhd_rows, int k);

}  // namespace vhr
