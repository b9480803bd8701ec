// image_prompt: the libmtmd side of a caption. The prompt is split by libmtmd's tokenizer around
// its one image, and images become the projector's rows through libmtmd's vision encoder (with
// clip_fix's class-token correction checked). The runner puts both into llama.cpp's batches.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "clip_fix.h"
#include "llama.h"
#include "mtmd.h"
#include "runner.h"

namespace vhr {

// A prompt as libmtmd tokenizes it: [text chunk] [image chunk] [text chunk].
struct PromptTokens {
    std::unique_ptr<mtmd_input_chunks, decltype(&mtmd_input_chunks_free)> chunks{mtmd_input_chunks_init(), mtmd_input_chunks_free};
    std::vector<llama_token> prefix, suffix;    // text before / after the image
    const mtmd_input_chunk * image_chunk = nullptr;
    int64_t n_image_tokens = 0;
};

// The prompt template ("<image>" once, "{prompt}" at most once) filled in and tokenized. The
// image is a placeholder (no pixels): only the text tokens are wanted here; the rows come from
// encode_images, or from the caller. Throws std::runtime_error with a one-line reason.
PromptTokens tokenize_prompt(mtmd_context * mtmd, const std::string & prompt, const std::string & prompt_template);

// Run the vision encoder + projector on each image as libmtmd prepares it (its own resize/pad;
// an image of the mmproj's size is used as it is), all image chunks in order: one per LLaVA-1.5
// image, the tiles then the overview for an anyres (LLaVA-1.6) mmproj. n_tokens rows of n_embd
// go to `out`; ms (if given) gets the encoding time.
void encode_images(mtmd_context * mtmd, ClipFix & clip_fix, int n_embd, const std::vector<RgbImage> & images,
                   std::vector<float> & out, int64_t & n_tokens, double * ms);

}  // namespace vhr
