#include "text_stream.h"

#include <algorithm>

namespace vhr {

static const char * const kSpace = " \n\t";

std::string detokenize(const llama_vocab * vocab, const std::vector<llama_token> & tokens) {
    std::string out(tokens.size() * 16 + 16, '\0');
    int32_t n = llama_detokenize(vocab, tokens.data(), (int32_t) tokens.size(), &out[0], (int32_t) out.size(),
                                 /*remove_special =*/ true, /*unparse_special =*/ false);
    if (n < 0) {
        out.resize((size_t) -n);
        n = llama_detokenize(vocab, tokens.data(), (int32_t) tokens.size(), &out[0], (int32_t) out.size(), true, false);
    }
    out.resize((size_t) std::max(n, 0));
    return out;
}

std::string trimmed(const std::string & s) {
    const size_t first = s.find_first_not_of(kSpace);
    return first == std::string::npos ? "" : s.substr(first, s.find_last_not_of(kSpace) - first + 1);
}

size_t incomplete_utf8_tail(const std::string & s) {
    const size_t n = s.size();
    for (size_t k = 1; k <= std::min<size_t>(3, n); ++k) {
        const unsigned char c = (unsigned char) s[n - k];
        if ((c & 0xC0) == 0x80) continue;  // a continuation byte: look further back
        const size_t need = (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 1;
        return need > k ? k : 0;
    }
    return 0;
}

std::string TextStream::next(const std::vector<llama_token> & tokens) {
    std::string s = detokenize(vocab_, tokens);
    s.erase(0, std::min(s.size(), s.find_first_not_of(kSpace)));
    s.resize(s.size() - incomplete_utf8_tail(s));
    const size_t last = s.find_last_not_of(kSpace);
    s.resize(last == std::string::npos ? 0 : last + 1);
    return take(s);
}

std::string TextStream::take(const std::string & s) {
    // detokenizing one more token only appends for SPM/BPE vocabularies; if it ever rewrote
    // the past, wait until the text catches up again
    if (s.size() <= sent_.size() || s.compare(0, sent_.size(), sent_) != 0) return "";
    std::string piece = s.substr(sent_.size());
    sent_ = s;
    return piece;
}

}  // namespace vhr
