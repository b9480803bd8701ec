#include "token_embd.h"

#include <cstring>
#include <memory>
#include <stdexcept>

#include "gguf.h"

namespace vhr {

TokenEmbeddings::TokenEmbeddings(const std::string & gguf_path) : path_(gguf_path) {
    gguf_init_params params = {/*no_alloc =*/ true, /*ctx =*/ nullptr};
    std::unique_ptr<gguf_context, decltype(&gguf_free)> g(
        gguf_init_from_file(gguf_path.c_str(), params), gguf_free);
    if (!g) throw std::runtime_error("cannot read GGUF metadata of " + gguf_path);

    const int64_t tid = gguf_find_tensor(g.get(), "token_embd.weight");
    if (tid < 0) throw std::runtime_error(gguf_path + " has no token_embd.weight tensor");

    const int64_t * ne = gguf_get_tensor_ne(g.get(), tid);
    n_embd_  = ne[0];
    n_vocab_ = ne[1];
    type_    = gguf_get_tensor_type(g.get(), tid);
    const ggml_type_traits * tr = ggml_get_type_traits(type_);
    if (type_ != GGML_TYPE_F32 && (tr == nullptr || tr->to_float == nullptr)) {
        throw std::runtime_error(std::string("token_embd.weight has type ") + ggml_type_name(type_) +
                                 ", which cannot be dequantized");
    }
    row_bytes_   = ggml_row_size(type_, n_embd_);
    data_offset_ = gguf_get_data_offset(g.get()) + gguf_get_tensor_offset(g.get(), tid);
    buf_.resize(row_bytes_);

    file_.open(gguf_path, std::ios::binary);
    if (!file_) throw std::runtime_error("cannot open " + gguf_path);
}

void TokenEmbeddings::row(int32_t token, float * out) const {
    if (token < 0 || token >= n_vocab_) {
        throw std::runtime_error("token id " + std::to_string(token) + " outside the vocabulary");
    }
    std::lock_guard<std::mutex> lock(mutex_);
    file_.seekg((std::streamoff) (data_offset_ + (size_t) token * row_bytes_));
    file_.read(reinterpret_cast<char *>(buf_.data()), (std::streamsize) row_bytes_);
    if (!file_) {
        file_.clear();
        throw std::runtime_error("short read of token_embd.weight in " + path_ + " (truncated file?)");
    }
    if (type_ == GGML_TYPE_F32) {
        std::memcpy(out, buf_.data(), row_bytes_);
    } else {
        ggml_get_type_traits(type_)->to_float(buf_.data(), out, n_embd_);
    }
}

}  // namespace vhr
