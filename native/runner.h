// runner: drives llama.cpp + libmtmd to caption one image with VHR (VHR_SPEC.md 4-5).
//
//   text-only prompt (prefix + instruction) --> reference pass: record R[l] at its last
//       position for every VHR layer, scale nothing; cached per (prompt tokens, layer set)
//   image --libmtmd--> image rows ─┐
//   prompt tokens --token_embd---> text rows ─┴─> the embedding batch of a plain caption:
//       [prefix][image][instruction]
//   eval callback on kqv_out-<l>: score D/TA of the last position against R[l], select heads,
//   scale them in place in every column, continue -> decode with the same heads scaled for
//   every new token.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

struct llama_model;
struct llama_context;
struct mtmd_context;

namespace vhr {

class TokenEmbeddings;

struct RunnerParams {
    std::string model_path;
    std::string mmproj_path;
    int  n_threads    = 0;     // decoding (one token per step); <= 0: all hardware threads
    int  n_threads_batch = 0;  // prefill and image encoding; <= 0: as n_threads
    int  n_gpu_layers = 0;     // llama.cpp -ngl; -1 = all
    int  n_ctx        = 2048;  // positions shared by both sequences during the prefill
    int  flash_attn   = -1;    // -1 auto, 0 off, 1 on
    bool use_mmap     = true;  // llama.cpp --no-mmap: false loads the weights into memory
    bool verbose      = false; // let llama.cpp / libmtmd log to stderr
    int  reference_cache_size = 16;  // text-only references kept (least recently used goes first)
    // Correct llama.cpp's LLaVA vision graph, which appends the class token after the patches
    // (clip_fix.h): for mmprojs with a class embedding, decided by the caller (vhr_edge.mmproj).
    bool clip_class_token_first = false;
};

struct VhrParams {
    bool  enabled      = true;   // false: no callback at all (the baseline)
    float alpha        = 2.0f;
    std::vector<int> layers;     // empty: auto_layers(n_layer)
    bool  outlier_rule = true;
    // "vhd": heads above the median VHD; "random": as many heads per layer as "vhd" would
    // pick, drawn at random (the control).
    std::string head_mode = "vhd";
    // > 0: reinforce the head_count heads of largest D per layer (after the outlier rule)
    // instead of those above the median; "random" then draws head_count heads. 0: the paper rule.
    int head_count = 0;
    uint32_t random_seed  = 0;
    // Where the text-only head outputs come from (VHR_SPEC 1, 4):
    // "released": a separate, never-scaled pass over the text-only prompt, cached (the default);
    // "joint": the text-only prompt as sequence 1 of the image prefill, scaled like the image
    // prompt (this project's earlier variant; kept for ablations only).
    std::string reference = "released";
    // Layers listed here use these heads instead of being scored (tests, profiles).
    std::map<int, std::vector<int>> forced_heads;
    // Decode with the selected heads folded into W_o where that is exact (weight_fold.h);
    // false: scale them in the callback at every step (results are identical).
    bool fold_weights = true;
};

struct GenParams {
    int      n_predict   = 512;
    float    temp        = 0.0f;  // <= 0: greedy
    int      top_k       = 40;
    float    top_p       = 0.95f;
    uint32_t seed        = 0;
    bool     ignore_eos  = false;
    bool     keep_logits = false; // return the logits that chose the first token
    // Analysis (VHR_SPEC 6): keep the text-only continuation and score every layer's heads at
    // every step -> Result::trace. Doubles the decode work; not for production captions.
    bool     trace       = false;
    // Teacher forcing: generate exactly these tokens (e.g. to trace a given caption).
    std::vector<int32_t> forced_tokens;
    // Streaming: called in the decode loop once per generated token, in order, with its id and
    // the text it adds to Result::text. Pieces are UTF-8 safe (an incomplete multi-byte sequence
    // and trailing whitespace are held back until what follows completes them), so the pieces
    // joined equal Result::text; a last call with token -1 delivers whatever is still held back
    // when generation ends (its return value is ignored). Return false to stop generating:
    // stop_reason "cancelled"; the session stays usable (W_o unfolded as on any other exit).
    std::function<bool(int32_t token, const std::string & piece)> on_token;
};

struct Timings {
    double image_encode_ms = 0, prefill_ms = 0, decode_ms = 0;
    double reference_ms = 0;   // the text-only reference pass (0 when it came from the cache)
    double total_ms = 0;       // also counts tokenizing and (first call only) creating the context
    int    n_prompt_rows = 0;  // rows in the image prefill batch (with the joint variant or tracing: both sequences)
    int    n_image_tokens = 0;
    int    n_decoded = 0;      // tokens generated after the first one
    double tokens_per_s = 0;   // n_decoded / decode time
};

struct Result {
    std::string text;
    std::vector<int32_t> tokens;
    std::string stop_reason;             // "eos", "length", "context", "cancelled" (on_token said stop)
    int n_layer = 0, n_head = 0;
    std::vector<int> layers;             // the VHR layer set (empty when disabled)
    std::map<int, std::vector<int>> selected_heads;
    std::vector<float> vhd, ta;          // n_layer * n_head, row-major; zero rows unscored. vhd = sqrt(D)
    std::string reference;               // "released" or "joint" ("" without VHR)
    bool reference_cached = false;       // the text-only reference came from the cache
    std::vector<float> first_logits;     // when GenParams::keep_logits
    std::vector<float> trace;            // when GenParams::trace: n_tokens * n_layer * n_head VHD
    // How decoding scaled the heads: "weights" (folded into W_o), "callback", or "" (no VHR);
    // with "callback", fold_note says why the weights were not folded.
    std::string decode_scaling, fold_note;
    Timings timings;
};

struct ModelInfo {
    std::string arch, desc;
    int n_layer = 0, n_head = 0, n_head_kv = 0, n_embd = 0, head_dim = 0, n_vocab = 0;
    int n_ctx_train = 0, n_ctx = 0;
    int n_threads = 0, n_threads_batch = 0;  // as resolved (decode; prefill and image encoder)
    uint64_t n_params = 0, size_bytes = 0;
};

// What the prefill is made of: the prompt tokens around the image and libmtmd's image rows
// (for reference implementations that rebuild the same input elsewhere).
struct ImageEmbedding {
    std::vector<int32_t> prefix, suffix;
    int n_tokens = 0, n_embd = 0;
    std::vector<float> rows;  // n_tokens * n_embd
};

struct RgbImage {
    const uint8_t * data;  // ny rows of nx RGB pixels
    uint32_t nx, ny;
};

class Runner {
public:
    explicit Runner(const RunnerParams & params);  // throws std::runtime_error
    ~Runner();
    Runner(const Runner &) = delete;
    Runner & operator=(const Runner &) = delete;

    // prompt_template holds "<image>" once and "{prompt}" at most once.
    Result caption(const RgbImage & image, const std::string & prompt,
                   const std::string & prompt_template, const GenParams & gen,
                   const VhrParams & vhr);

    // The same with image rows encoded before (encode(), or assembled by the caller, e.g. the
    // LLaVA-1.6 tiles with their newline rows); image_encode_ms is reported in the timings.
    Result caption_rows(const float * rows, int64_t n_rows, double image_encode_ms,
                        const std::string & prompt, const std::string & prompt_template,
                        const GenParams & gen, const VhrParams & vhr);

    ImageEmbedding embed_image(const RgbImage & image, const std::string & prompt,
                               const std::string & prompt_template);

    // libmtmd's rows for the images, one after another (n_tokens rows of n_embd). An image of the
    // mmproj's own size is used as it is; others get libmtmd's preprocessing (for an anyres mmproj:
    // its tiles, then the overview).
    std::vector<float> encode(const std::vector<RgbImage> & images, int64_t & n_tokens, double * ms = nullptr);

    // Class-token corrections applied so far (one per encoded image or tile when armed).
    int clip_fixes() const;

    ModelInfo info() const;

    // A string from the text GGUF's metadata ("" when the key is absent).
    std::string metadata(const std::string & key) const;

    // Text-only references in the cache; clear_reference_cache() empties it.
    size_t reference_cache_entries() const;
    void clear_reference_cache();

    // The model's tokenizer: text -> ids (no BOS), and each id's text piece.
    std::vector<int32_t> tokenize(const std::string & text) const;
    std::vector<std::string> pieces(const std::vector<int32_t> & tokens) const;

    static const char * default_template();

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace vhr
