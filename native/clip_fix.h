// clip_fix: corrects llama.cpp's LLaVA vision graph while it runs (no fork, no file written).
//
// At the llama.cpp that llama-cpp-python 0.3.36 vendors, tools/mtmd/models/llava.cpp builds
//     inp = ggml_concat(ctx0, inp, model.class_embedding, 1)     // [patch 0 .. patch N-1, CLS]
// while clip.cpp fills "positions" with 0..N and "patches" (the rows kept for the projector) with
// 1..N, the CLS-first layout of CLIP (ggml-org/llama.cpp #25814). So every patch gets its
// neighbour's position embedding, patch 0 is dropped and the CLS output reaches the LLM.
// An eval callback on the vision graph observes that concat node and rotates its columns to
// [CLS, patch 0 .. patch N-1] before the position embeddings are added; from there on the graph
// is CLIP's: positions and kept rows are then right as they are.
#pragma once

#include <string>
#include <vector>

#include "ggml.h"

namespace vhr {

struct ClipFix {
    bool class_token_first = false;  // the correction is armed
    int n_fixed = 0;                 // concat nodes corrected since the counter was reset
    std::string error;               // set when the callback had to stop the graph

    // ggml_backend_sched_eval_callback for mtmd_context_params::cb_eval; user_data is the ClipFix.
    static bool eval_callback(ggml_tensor * t, bool ask, void * user_data);

    // The concat of the patch embeddings [n_embd, N] and the class embedding [n_embd] along dim 1.
    static bool is_class_concat(const ggml_tensor * t);

private:
    std::vector<float> scratch_;
};

}  // namespace vhr
