#include "clip_fix.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <stdexcept>

#include "ggml-backend.h"

namespace vhr {

bool ClipFix::is_class_concat(const ggml_tensor * t) {
    if (t->op != GGML_OP_CONCAT || !t->src[0] || !t->src[1]) return false;
    const ggml_tensor * cls = t->src[1];
    // clip.cpp names the weight after its GGUF tensor (TN_CLASS_EMBD)
    if (std::strcmp(cls->name, "v.class_embd") != 0) return false;
    const int32_t dim = t->op_params[0];  // ggml_concat stores its dim first
    return dim == 1 && t->ne[1] == t->src[0]->ne[1] + 1 && ggml_nelements(cls) == t->ne[0];
}

bool ClipFix::eval_callback(ggml_tensor * t, bool ask, void * user_data) {
    auto * self = static_cast<ClipFix *>(user_data);
    if (!self->class_token_first || !is_class_concat(t)) return ask ? false : true;
    if (ask) return true;
    try {
        const int64_t n_embd = t->ne[0], n_pos = t->ne[1];
        if (t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t)) {
            throw std::runtime_error("the class-token concat is not a contiguous F32 tensor");
        }
        const bool host = t->buffer == nullptr || ggml_backend_buffer_is_host(t->buffer);
        const int64_t n_slices = t->ne[2] * t->ne[3];  // one image per graph for LLaVA; handled anyway
        float * data;
        if (host) {
            data = static_cast<float *>(t->data);
        } else {
            self->scratch_.resize((size_t) ggml_nelements(t));
            ggml_backend_tensor_get(t, self->scratch_.data(), 0, ggml_nbytes(t));
            data = self->scratch_.data();
        }
        for (int64_t s = 0; s < n_slices; ++s) {  // [p0 .. pN-1, CLS] -> [CLS, p0 .. pN-1]
            float * first = data + s * n_pos * n_embd;
            std::rotate(first, first + (n_pos - 1) * n_embd, first + n_pos * n_embd);
        }
        if (!host) ggml_backend_tensor_set(t, data, 0, ggml_nbytes(t));
        self->n_fixed++;
        return true;
    } catch (const std::exception & e) {
        self->error = e.what();
        return false;  // stops the graph; the encode reports it
    }
}

}  // namespace vhr
