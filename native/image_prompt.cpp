#include "image_prompt.h"

#include <chrono>
#include <stdexcept>

#include "backend.h"

namespace vhr {
namespace {

[[noreturn]] void fail(const std::string & msg) { throw std::runtime_error(msg); }

}  // namespace

PromptTokens tokenize_prompt(mtmd_context * mtmd, const std::string & prompt, const std::string & prompt_template) {
    const std::string image_tag = "<image>";
    const size_t at = prompt_template.find(image_tag);
    if (at == std::string::npos || prompt_template.find(image_tag, at + 1) != std::string::npos) {
        fail("the prompt template must contain \"<image>\" exactly once");
    }
    std::string text = prompt_template.substr(0, at) + mtmd_default_marker() + prompt_template.substr(at + image_tag.size());
    const size_t pp = text.find("{prompt}");
    if (pp != std::string::npos) text.replace(pp, 8, prompt);

    std::unique_ptr<mtmd_bitmap, decltype(&mtmd_bitmap_free)> bitmap(mtmd_bitmap_init(1, 1, nullptr), mtmd_bitmap_free);
    PromptTokens tk;
    mtmd_input_text in_text = {text.c_str(), text.size(), /*add_special =*/ true, /*parse_special =*/ true};
    const mtmd_bitmap * bitmaps[] = {bitmap.get()};
    if (mtmd_tokenize(mtmd, tk.chunks.get(), &in_text, bitmaps, 1) != 0) {
        fail("libmtmd could not tokenize the prompt: " + take_last_error());
    }
    for (size_t i = 0; i < mtmd_input_chunks_size(tk.chunks.get()); ++i) {
        const mtmd_input_chunk * c = mtmd_input_chunks_get(tk.chunks.get(), i);
        const auto type = mtmd_input_chunk_get_type(c);
        if (type == MTMD_INPUT_CHUNK_TYPE_TEXT) {
            size_t n = 0;
            const llama_token * toks = mtmd_input_chunk_get_tokens_text(c, &n);
            auto & dst = tk.image_chunk ? tk.suffix : tk.prefix;
            dst.insert(dst.end(), toks, toks + n);
        } else if (type == MTMD_INPUT_CHUNK_TYPE_IMAGE && !tk.image_chunk) {
            tk.image_chunk = c;
        } else {
            fail("the prompt must produce exactly one image chunk");
        }
    }
    if (!tk.image_chunk) fail("libmtmd produced no image chunk");
    if (mtmd_decode_use_non_causal(mtmd, tk.image_chunk)) fail("this mmproj needs non-causal image attention; not LLaVA-style");
    if (tk.prefix.empty()) fail("the prompt needs at least one token before the image (BOS)");
    tk.n_image_tokens = (int64_t) mtmd_input_chunk_get_n_tokens(tk.image_chunk);
    return tk;
}

void encode_images(mtmd_context * mtmd, ClipFix & clip_fix, int n_embd, const std::vector<RgbImage> & images,
                   std::vector<float> & out, int64_t & n_tokens, double * ms) {
    const auto t0 = std::chrono::steady_clock::now();
    n_tokens = 0;
    out.clear();
    for (const RgbImage & image : images) {
        if (image.nx == 0 || image.ny == 0 || image.data == nullptr) fail("empty image");
        std::unique_ptr<mtmd_bitmap, decltype(&mtmd_bitmap_free)> bitmap(
            mtmd_bitmap_init(image.nx, image.ny, image.data), mtmd_bitmap_free);
        std::unique_ptr<mtmd_input_chunks, decltype(&mtmd_input_chunks_free)> chunks(mtmd_input_chunks_init(), mtmd_input_chunks_free);
        const std::string marker = mtmd_default_marker();
        mtmd_input_text in_text = {marker.c_str(), marker.size(), /*add_special =*/ false, /*parse_special =*/ true};
        const mtmd_bitmap * bitmaps[] = {bitmap.get()};
        if (mtmd_tokenize(mtmd, chunks.get(), &in_text, bitmaps, 1) != 0) {
            fail("libmtmd could not prepare the image: " + take_last_error());
        }
        for (size_t i = 0; i < mtmd_input_chunks_size(chunks.get()); ++i) {
            const mtmd_input_chunk * c = mtmd_input_chunks_get(chunks.get(), i);
            if (mtmd_input_chunk_get_type(c) != MTMD_INPUT_CHUNK_TYPE_IMAGE) {
                if (mtmd_input_chunk_get_n_tokens(c) == 0) continue;
                fail("libmtmd put text tokens between the image's parts; not a LLaVA-style mmproj");
            }
            const int fixed_before = clip_fix.n_fixed;
            clip_fix.error.clear();
            if (mtmd_encode_chunk(mtmd, c) != 0) fail("libmtmd failed to encode the image: " + take_last_error());
            if (!clip_fix.error.empty()) fail("class-token correction: " + clip_fix.error);
            if (clip_fix.class_token_first && clip_fix.n_fixed == fixed_before) {
                fail("class-token correction armed but the vision graph has no class-token concat "
                     "(a llama.cpp other than llama-cpp-python 0.3.36's?); run with --mmproj-as-is");
            }
            const int64_t n = (int64_t) mtmd_input_chunk_get_n_tokens(c);
            const float * rows = mtmd_get_output_embd(mtmd);
            out.insert(out.end(), rows, rows + n * n_embd);
            n_tokens += n;
        }
    }
    if (n_tokens == 0) fail("libmtmd produced no image rows");
    if (ms) *ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace vhr
