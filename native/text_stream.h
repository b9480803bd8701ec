// text_stream: the caption's text from its tokens, and the UTF-8 safe pieces of GenParams::on_token.
#pragma once

#include <string>
#include <vector>

#include "llama.h"

namespace vhr {

// The tokens' text with special tokens removed (llama_detokenize).
std::string detokenize(const llama_vocab * vocab, const std::vector<llama_token> & tokens);

// s without leading and trailing spaces, newlines and tabs.
std::string trimmed(const std::string & s);

// Bytes at the end of s that start a UTF-8 sequence they do not complete (0 if none).
size_t incomplete_utf8_tail(const std::string & s);

// GenParams::on_token's pieces: what the tokens so far add to the caption text, holding back a
// trailing incomplete UTF-8 sequence and trailing whitespace (the final text is trimmed).
class TextStream {
public:
    explicit TextStream(const llama_vocab * vocab) : vocab_(vocab) {}
    std::string next(const std::vector<llama_token> & tokens);
    std::string rest(const std::string & text) { return take(text); }  // when generation ended
private:
    std::string take(const std::string & s);
    const llama_vocab * vocab_;
    std::string sent_;
};

}  // namespace vhr
