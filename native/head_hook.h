// head_hook: VHR inside llama.cpp's graph (VHR_SPEC sections 1, 4-5).
//
// An eval callback on `kqv_out-<l>` (per-head attention output before W_o, [n_embd, n_tokens]).
// Reference pass (spec 1): the text-only prompt runs alone; the last column of every layer of
// the set is recorded, nothing is scaled.
// Prefill (spec 4): for each layer of the set, score the image prompt's last column against
// the reference, select heads, scale them in every column of the image prompt, and let the
// graph continue, so higher layers are scored after lower ones were reinforced.
// Decode (spec 5): scale the same heads in the new token's column.
#pragma once

#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "ggml.h"

namespace vhr {

// R[l]: the text-only prompt's kqv_out-<l> column at its last position (n_head * head_dim
// floats; empty for layers outside the set).
using Reference = std::vector<std::vector<float>>;

struct HeadHook {
    enum class Phase { idle, reference, prefill, decode };
    Phase phase = Phase::idle;
    int n_layer = 0, n_head = 0;
    float alpha = 1.0f;
    bool outlier_rule = true;
    bool random_mode = false;                 // the control: random heads, VHR's counts
    int head_count = 0;                       // > 0: the top head_count heads by D, not the median rule
    std::mt19937 rng;
    std::vector<char> scored;                 // layers in the set
    std::map<int, std::vector<int>> forced;   // layers whose heads are given
    std::vector<std::vector<int>> heads;      // selected heads per layer
    // Columns in the batch: col_img = the image prompt's last position; col_txt = the text-only
    // prompt's last position when it is in the batch (reference pass, joint variant, tracing).
    int64_t col_img = -1, col_txt = -1;
    // Prefill: what the image prompt is scored against. Set: the cached reference (as released).
    // Null: the batch's own col_txt (the "joint" variant, both prompts in one batch).
    const Reference * reference = nullptr;
    Reference * record = nullptr;             // reference pass: where R goes
    int64_t n_scaled_cols = -1;               // scale columns [0, n) only; -1: every column
    std::vector<float> d, ta;                 // n_layer * n_head, filled during the prefill (D squared)
    // T-VHD analysis (VHR_SPEC 6): layers scored at EVERY step from columns col_img / col_txt
    // (seq 0 / seq 1 of the step's batch); step_vhd holds the current step's Euclidean VHD.
    std::vector<char> traced;
    bool tracing = false;
    std::vector<float> step_vhd;              // n_layer * n_head
    std::string error;                        // set when the callback had to stop the graph
    // W_o of each layer (the matrix that multiplies kqv_out-<l>), as seen in the graph; and
    // whether the selected heads are folded into them for this decode (weight_fold.h), in
    // which case decoding leaves those layers alone.
    std::vector<ggml_tensor *> w_o;
    bool folded = false;

    bool wants(int layer) const;
    void process(ggml_tensor * t, int layer);

    // ggml_backend_sched_eval_callback; user_data is the HeadHook.
    static bool eval_callback(ggml_tensor * t, bool ask, void * user_data);

private:
    std::vector<float> scratch_;  // device tensors are copied here and back
};

// "kqv_out-12" -> 12; anything else -> -1.
int kqv_out_layer(const char * name);

}  // namespace vhr
