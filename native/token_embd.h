// Token-embedding rows read straight from a text GGUF's `token_embd.weight`.
//
// llama.cpp cannot mix token ids and embeddings in one batch, so the one-pass VHR prefill
// is an embedding batch: text rows come from here (dequantized with ggml's type traits),
// image rows from libmtmd.
#pragma once

#include <cstdint>
#include <fstream>
#include <mutex>
#include <string>
#include <vector>

#include "ggml.h"

namespace vhr {

class TokenEmbeddings {
public:
    explicit TokenEmbeddings(const std::string & gguf_path);  // throws std::runtime_error

    int64_t n_embd()  const { return n_embd_; }
    int64_t n_vocab() const { return n_vocab_; }
    ggml_type type()  const { return type_; }

    // Dequantize the row of `token` into out[0 .. n_embd). Throws on an out-of-range id.
    void row(int32_t token, float * out) const;

private:
    std::string path_;
    int64_t n_embd_ = 0, n_vocab_ = 0;
    ggml_type type_ = GGML_TYPE_F32;
    size_t data_offset_ = 0, row_bytes_ = 0;
    mutable std::ifstream file_;
    mutable std::mutex mutex_;
    mutable std::vector<uint8_t> buf_;
};

}  // namespace vhr
