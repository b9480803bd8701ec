#include "head_hook.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "ggml-backend.h"
#include "vhr_core.h"

namespace vhr {

bool HeadHook::wants(int layer) const {
    if (layer < 0 || layer >= n_layer) return false;
    const bool trace = tracing && traced[layer];
    if (phase == Phase::reference) return scored[layer];
    if (phase == Phase::prefill) return scored[layer] || trace;
    if (phase == Phase::decode) return (!heads[layer].empty() && !folded) || trace;
    return false;
}

void HeadHook::process(ggml_tensor * t, int layer) {
    const int64_t n_rows = t->ne[0], n_cols = t->ne[1];
    if (t->type != GGML_TYPE_F32 || n_rows % n_head != 0 || t->ne[2] != 1 || t->ne[3] != 1 ||
        t->nb[0] != sizeof(float) || t->nb[1] != (size_t) n_rows * sizeof(float)) {
        throw std::runtime_error(std::string("unexpected layout of ") + t->name + " (need a contiguous F32 [n_embd, n_tokens])");
    }
    const int head_dim = (int) (n_rows / n_head);
    const bool host = t->buffer == nullptr || ggml_backend_buffer_is_host(t->buffer);
    float * data;
    if (host) {
        data = static_cast<float *>(t->data);
    } else {
        scratch_.resize((size_t) ggml_nelements(t));
        ggml_backend_tensor_get(t, scratch_.data(), 0, ggml_nbytes(t));
        data = scratch_.data();
    }
    if (phase == Phase::reference) {  // spec 1: record the text-only prompt's last column, scale nothing
        if (col_txt < 0 || col_txt >= n_cols || record == nullptr) throw std::runtime_error("reference pass without its column");
        (*record)[layer].assign(data + col_txt * n_rows, data + (col_txt + 1) * n_rows);
        return;
    }
    const bool trace = tracing && traced[layer];
    const bool select = phase == Phase::prefill && scored[layer];
    if ((trace || select) && (col_img < 0 || col_img >= n_cols ||
                              ((trace || !reference) && (col_txt < 0 || col_txt >= n_cols)))) {
        throw std::runtime_error("batch was split; raise n_ubatch");
    }
    if (trace) {
        const HeadScores s = score_heads(data + col_img * n_rows, data + col_txt * n_rows, n_head, head_dim);
        const std::vector<float> v = euclidean(s.d);
        std::copy(v.begin(), v.end(), step_vhd.begin() + (size_t) layer * n_head);
    }
    if (select) {
        const float * txt = data + col_txt * n_rows;
        if (reference) {
            const std::vector<float> & ref = (*reference)[(size_t) layer];
            if ((int64_t) ref.size() != n_rows) throw std::runtime_error("the text-only reference lacks layer " + std::to_string(layer));
            txt = ref.data();
        }
        const HeadScores s = score_heads(data + col_img * n_rows, txt, n_head, head_dim);
        std::copy(s.d.begin(), s.d.end(), d.begin() + (size_t) layer * n_head);
        std::copy(s.ta.begin(), s.ta.end(), ta.begin() + (size_t) layer * n_head);
        auto f = forced.find(layer);
        if (f != forced.end()) {
            heads[layer] = f->second;
        } else {
            heads[layer] = head_count > 0 ? top_heads(s, head_count, outlier_rule) : select_heads(s, outlier_rule);
            if (random_mode) heads[layer] = random_heads((int) heads[layer].size(), n_head, rng);
        }
    }
    if (heads[layer].empty() || (phase == Phase::decode && folded)) return;  // nothing to write back
    const int64_t cols = n_scaled_cols < 0 ? n_cols : std::min(n_cols, n_scaled_cols);
    scale_heads(data, cols, n_rows, heads[layer], head_dim, alpha);
    if (!host) ggml_backend_tensor_set(t, data, 0, ggml_nbytes(t));
}

int kqv_out_layer(const char * name) {
    static const char prefix[] = "kqv_out-";
    if (std::strncmp(name, prefix, sizeof(prefix) - 1) != 0) return -1;
    const char * p = name + sizeof(prefix) - 1;
    if (*p == '\0') return -1;
    int layer = 0;
    for (; *p; ++p) {
        if (*p < '0' || *p > '9') return -1;
        layer = layer * 10 + (*p - '0');
    }
    return layer;
}

bool HeadHook::eval_callback(ggml_tensor * t, bool ask, void * user_data) {
    auto * s = static_cast<HeadHook *>(user_data);
    if (ask && s->phase == Phase::prefill && t->op == GGML_OP_MUL_MAT && t->src[1]) {  // W_o x kqv_out-<l>
        const int l = kqv_out_layer(t->src[1]->name);
        if (l >= 0 && l < (int) s->w_o.size()) s->w_o[l] = t->src[0];
    }
    const int layer = kqv_out_layer(t->name);
    const bool wanted = s->error.empty() && s->wants(layer);
    if (ask) return wanted;
    if (!wanted) return true;
    try {
        s->process(t, layer);
    } catch (const std::exception & e) {
        s->error = e.what();
        return false;  // stops the graph; caption() reports the error
    }
    return true;
}

}  // namespace vhr
