#include "runner.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <list>
#include <mutex>
#include <random>
#include <set>
#include <stdexcept>
#include <thread>

#include "ggml-backend.h"
#include "gguf.h"
#include "llama.h"
#include "mtmd.h"
#include "backend.h"
#include "clip_fix.h"
#include "head_hook.h"
#include "image_prompt.h"
#include "text_stream.h"
#include "token_embd.h"
#include "vhr_core.h"
#include "weight_fold.h"

namespace vhr {
namespace {

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

[[noreturn]] void fail(const std::string & msg) { throw std::runtime_error(msg); }

struct Sampler {
    llama_sampler * chain;
    explicit Sampler(const GenParams & g) {
        chain = llama_sampler_chain_init(llama_sampler_chain_default_params());
        if (g.temp <= 0.0f) {
            llama_sampler_chain_add(chain, llama_sampler_init_greedy());
        } else {
            if (g.top_k > 0) llama_sampler_chain_add(chain, llama_sampler_init_top_k(g.top_k));
            if (g.top_p < 1.0f) llama_sampler_chain_add(chain, llama_sampler_init_top_p(g.top_p, 1));
            llama_sampler_chain_add(chain, llama_sampler_init_temp(g.temp));
            llama_sampler_chain_add(chain, llama_sampler_init_dist(g.seed));
        }
    }
    ~Sampler() { llama_sampler_free(chain); }
    llama_token sample(llama_context * ctx, int32_t idx) { return llama_sampler_sample(chain, ctx, idx); }
};

struct Batch {
    llama_batch b;
    Batch(int32_t n, int32_t n_embd, int32_t n_seq) : b(llama_batch_init(n, n_embd, n_seq)) {}
    ~Batch() { llama_batch_free(b); }
};


}  // namespace

// ---------------------------------------------------------------------------------------

struct Runner::Impl {
    RunnerParams p;
    llama_model * model = nullptr;
    const llama_vocab * vocab = nullptr;
    mtmd_context * mtmd = nullptr;
    std::unique_ptr<TokenEmbeddings> embd;
    int n_layer = 0, n_head = 0, n_embd = 0;
    llama_context * ctx_vhr = nullptr;    // created with the eval callback
    llama_context * ctx_plain = nullptr;  // created without any callback (--no-vhr)
    struct Ctx { int ubatch = 0, n_seq = 0; };
    Ctx shape_vhr, shape_plain;  // what each context was created for
    struct CachedReference {
        std::vector<llama_token> tokens;  // the text-only prompt
        std::vector<int> layers;          // the layers recorded
        Reference ref;
    };
    std::list<CachedReference> ref_cache;  // most recently used first
    HeadHook hook;
    ClipFix clip_fix;  // the vision graph's eval callback (RunnerParams::clip_class_token_first)
    std::mutex busy;
    std::set<const ggml_tensor *> private_w_o;  // W_o tensors already remapped copy-on-write

    ~Impl() {
        if (ctx_vhr) llama_free(ctx_vhr);
        if (ctx_plain) llama_free(ctx_plain);
        if (mtmd) mtmd_free(mtmd);
        if (model) llama_model_free(model);
    }

    int n_threads() const {
        return p.n_threads > 0 ? p.n_threads : (int) std::max(1u, std::thread::hardware_concurrency());
    }
    int n_threads_batch() const { return p.n_threads_batch > 0 ? p.n_threads_batch : n_threads(); }

    // The context with (VHR, tracing) or without the eval callback, big enough for `rows` rows in
    // one micro-batch and `n_seq` sequences; created once and reused, grown when needed.
    llama_context * context_for(bool with_callback, int rows, int n_seq) {
        llama_context *& ctx = with_callback ? ctx_vhr : ctx_plain;
        Ctx & c = with_callback ? shape_vhr : shape_plain;
        if (ctx && c.ubatch >= rows && c.n_seq >= n_seq) return ctx;
        if (ctx) llama_free(ctx);
        ctx = nullptr;
        c.ubatch = std::min(p.n_ctx, (std::max(rows, c.ubatch) + 63) / 64 * 64);
        c.n_seq = std::max(n_seq, c.n_seq);
        llama_context_params cp = llama_context_default_params();
        cp.n_ctx = (uint32_t) p.n_ctx;
        cp.n_batch = cp.n_ubatch = (uint32_t) c.ubatch;
        cp.n_seq_max = (uint32_t) c.n_seq;
        cp.kv_unified = c.n_seq > 1;  // both sequences share the n_ctx cells
        cp.type_k = cp.type_v = GGML_TYPE_F16;
        cp.n_threads = n_threads();
        cp.n_threads_batch = n_threads_batch();
        cp.flash_attn_type = p.flash_attn < 0 ? LLAMA_FLASH_ATTN_TYPE_AUTO
                           : p.flash_attn ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
        cp.no_perf = true;
        cp.cb_eval = with_callback ? HeadHook::eval_callback : nullptr;
        cp.cb_eval_user_data = with_callback ? &hook : nullptr;
        ctx = llama_init_from_model(model, cp);
        if (!ctx) fail("cannot create a llama.cpp context (n_ctx " + std::to_string(p.n_ctx) + "): " + take_last_error());
        return ctx;
    }

    // One row of an embedding batch: a token's row of token_embd, or an image row.
    void add_row(llama_batch & b, llama_token tok, const float * image_row, llama_pos pos, bool seq0, bool seq1) {
        const int32_t i = b.n_tokens++;
        float * dst = b.embd + (int64_t) i * n_embd;
        if (image_row) std::memcpy(dst, image_row, sizeof(float) * n_embd);
        else embd->row(tok, dst);
        b.pos[i] = pos;
        b.n_seq_id[i] = 0;
        if (seq0) b.seq_id[i][b.n_seq_id[i]++] = 0;
        if (seq1) b.seq_id[i][b.n_seq_id[i]++] = 1;
        b.logits[i] = 0;
    }

    // VHR_SPEC 1: R[l] for the layers armed in the hook, from the text-only prompt (prefix +
    // instruction, contiguous positions) run alone with nothing scaled; cached, most recent first.
    const Reference & text_reference(const std::vector<llama_token> & prefix, const std::vector<llama_token> & suffix,
                                     Result & r) {
        std::vector<llama_token> text(prefix);
        text.insert(text.end(), suffix.begin(), suffix.end());
        std::vector<int> layers;
        for (int l = 0; l < n_layer; ++l) if (hook.scored[l]) layers.push_back(l);
        for (auto it = ref_cache.begin(); it != ref_cache.end(); ++it) {
            if (it->tokens == text && it->layers == layers) {
                ref_cache.splice(ref_cache.begin(), ref_cache, it);
                r.reference_cached = true;
                return ref_cache.front().ref;
            }
        }
        CachedReference e{text, layers, Reference((size_t) n_layer)};
        const int32_t n = (int32_t) text.size();
        if (n > p.n_ctx) fail("the text-only prompt needs " + std::to_string(n) + " positions; raise -c/--ctx-size");
        llama_context * ctx = context_for(true, n, 1);  // created once, reused (not timed)
        const auto t0 = Clock::now();
        llama_memory_clear(llama_get_memory(ctx), true);
        Batch batch(n, n_embd, 1);
        batch.b.n_tokens = 0;
        for (int32_t i = 0; i < n; ++i) add_row(batch.b, text[i], nullptr, (llama_pos) i, true, false);
        batch.b.logits[n - 1] = 1;
        hook.col_txt = n - 1;
        hook.record = &e.ref;
        hook.phase = HeadHook::Phase::reference;
        const int32_t rc = llama_decode(ctx, batch.b);
        hook.phase = HeadHook::Phase::idle;
        hook.record = nullptr;
        hook.col_txt = -1;
        llama_memory_clear(llama_get_memory(ctx), true);
        if (rc != 0) fail("llama_decode failed on the text-only reference (code " + std::to_string(rc) + ") " + take_last_error());
        if (!hook.error.empty()) fail("VHR callback: " + hook.error);
        for (int l : layers) {
            if (e.ref[(size_t) l].empty()) fail("the text-only reference pass did not reach layer " + std::to_string(l));
        }
        ref_cache.push_front(std::move(e));
        while (ref_cache.size() > (size_t) std::max(1, p.reference_cache_size)) ref_cache.pop_back();
        r.timings.reference_ms = ms_since(t0);
        return ref_cache.front().ref;
    }

    void arm_hook(const VhrParams & v, bool trace) {
        hook.phase = HeadHook::Phase::idle;
        hook.n_layer = n_layer;
        if ((int) hook.w_o.size() != n_layer) hook.w_o.assign(n_layer, nullptr);  // kept across captions
        hook.folded = false;
        hook.n_head = n_head;
        hook.alpha = v.enabled ? v.alpha : 1.0f;
        hook.outlier_rule = v.outlier_rule;
        hook.random_mode = v.head_mode == "random";
        hook.head_count = v.head_count;
        hook.rng.seed(v.random_seed);
        hook.forced = v.forced_heads;
        hook.scored.assign(n_layer, 0);
        if (v.enabled) {
            for (int l : v.layers) hook.scored[l] = 1;
            for (const auto & kv : v.forced_heads) hook.scored[kv.first] = 1;
        }
        hook.tracing = trace;
        hook.traced.assign(n_layer, trace ? 1 : 0);
        hook.step_vhd.assign((size_t) n_layer * n_head, 0.0f);
        hook.heads.assign(n_layer, {});
        hook.d.assign((size_t) n_layer * n_head, 0.0f);
        hook.ta.assign((size_t) n_layer * n_head, 0.0f);
        hook.reference = nullptr;
        hook.record = nullptr;
        hook.n_scaled_cols = -1;
        hook.col_img = hook.col_txt = -1;
        hook.error.clear();
    }

    void validate(VhrParams & v, const GenParams & g) const {
        if (g.n_predict < 1) fail("n_predict must be at least 1");
        for (int32_t t : g.forced_tokens) {
            if (t < 0 || t >= llama_vocab_n_tokens(vocab)) fail("forced token " + std::to_string(t) + " is outside the vocabulary");
        }
        if (!v.enabled) return;
        if (!(v.alpha > 0.0f) || !std::isfinite(v.alpha)) fail("alpha must be a finite number > 0");
        if (v.head_mode != "vhd" && v.head_mode != "random") fail("head_mode must be 'vhd' or 'random'");
        if (v.reference != "released" && v.reference != "joint") fail("reference must be 'released' or 'joint'");
        if (v.head_count < 0 || v.head_count > n_head) {
            fail("head_count must be 0 (the median rule) or 1.." + std::to_string(n_head));
        }
        if (v.layers.empty()) v.layers = auto_layers(n_layer);
        for (int l : v.layers) {
            if (l < 0 || l >= n_layer) {
                fail("layer " + std::to_string(l) + " is outside the model (layers 0.." + std::to_string(n_layer - 1) + ")");
            }
        }
        std::sort(v.layers.begin(), v.layers.end());
        v.layers.erase(std::unique(v.layers.begin(), v.layers.end()), v.layers.end());
        for (const auto & kv : v.forced_heads) {
            if (kv.first < 0 || kv.first >= n_layer) fail("forced layer " + std::to_string(kv.first) + " is outside the model");
            for (int h : kv.second) {
                if (h < 0 || h >= n_head) fail("forced head " + std::to_string(h) + " is outside 0.." + std::to_string(n_head - 1));
            }
        }
    }
};

Runner::Runner(const RunnerParams & params) : impl_(new Impl) {
    Impl & m = *impl_;
    m.p = params;
    if (m.p.n_ctx < 64) fail("n_ctx must be at least 64");
    init_backend_once(params.verbose);

    check_mmproj(params.mmproj_path);

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = params.n_gpu_layers;
    if (!params.use_mmap) mp.load_mode = LLAMA_LOAD_MODE_NONE;  // read into memory, not mapped
    m.model = llama_model_load_from_file(params.model_path.c_str(), mp);
    if (!m.model) fail("cannot load text model " + params.model_path + ": " + take_last_error());

    char arch[64] = {0};
    llama_model_meta_val_str(m.model, "general.architecture", arch, sizeof(arch));
    if (std::string(arch) != "llama") {
        fail("text model " + params.model_path + " has architecture '" + arch +
             "'; vhr-edge runs LLaVA-style models with a llama decoder");
    }
    m.vocab = llama_model_get_vocab(m.model);
    m.n_layer = llama_model_n_layer(m.model);
    m.n_head = llama_model_n_head(m.model);
    m.n_embd = llama_model_n_embd_inp(m.model);

    m.embd.reset(new TokenEmbeddings(params.model_path));
    if (m.embd->n_embd() != m.n_embd || m.embd->n_vocab() != llama_vocab_n_tokens(m.vocab)) {
        fail("token_embd.weight of " + params.model_path + " does not match the model's width or vocabulary");
    }

    mtmd_context_params cp = mtmd_context_params_default();
    cp.use_gpu = params.n_gpu_layers != 0;
    cp.n_threads = m.n_threads_batch();
    cp.print_timings = false;
    cp.warmup = false;
    m.clip_fix.class_token_first = params.clip_class_token_first;
    if (params.clip_class_token_first) {
        cp.cb_eval = ClipFix::eval_callback;
        cp.cb_eval_user_data = &m.clip_fix;
    }
    m.mtmd = mtmd_init_from_file(params.mmproj_path.c_str(), m.model, cp);
    if (!m.mtmd) fail("cannot load mmproj " + params.mmproj_path + ": " + take_last_error());
    if (!mtmd_support_vision(m.mtmd)) fail("mmproj " + params.mmproj_path + " has no vision encoder");
    if (mtmd_decode_use_mrope(m.mtmd)) fail("mmproj " + params.mmproj_path + " needs M-RoPE; not a LLaVA-style model");
}

Runner::~Runner() = default;

const char * Runner::default_template() {
    return "USER: <image>\n{prompt} ASSISTANT:";  // LLaVA-1.5 as released: no system line
}

ImageEmbedding Runner::embed_image(const RgbImage & image, const std::string & prompt,
                                   const std::string & prompt_template) {
    Impl & m = *impl_;
    std::lock_guard<std::mutex> lock(m.busy);
    const PromptTokens tk = tokenize_prompt(m.mtmd, prompt, prompt_template);
    ImageEmbedding e;
    int64_t n = 0;
    encode_images(m.mtmd, m.clip_fix, m.n_embd, {image}, e.rows, n, nullptr);
    e.prefix.assign(tk.prefix.begin(), tk.prefix.end());
    e.suffix.assign(tk.suffix.begin(), tk.suffix.end());
    e.n_tokens = (int) n;
    e.n_embd = m.n_embd;
    return e;
}

std::vector<float> Runner::encode(const std::vector<RgbImage> & images, int64_t & n_tokens, double * ms) {
    Impl & m = *impl_;
    std::lock_guard<std::mutex> lock(m.busy);
    std::vector<float> rows;
    encode_images(m.mtmd, m.clip_fix, m.n_embd, images, rows, n_tokens, ms);
    return rows;
}

int Runner::clip_fixes() const { return impl_->clip_fix.n_fixed; }

std::vector<int32_t> Runner::tokenize(const std::string & text) const {
    const llama_vocab * vocab = impl_->vocab;
    std::vector<llama_token> out(text.size() + 8);
    int32_t n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(), false, false);
    if (n < 0) {
        out.resize((size_t) -n);
        n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(), false, false);
    }
    out.resize((size_t) std::max(n, 0));
    return {out.begin(), out.end()};
}

std::vector<std::string> Runner::pieces(const std::vector<int32_t> & tokens) const {
    std::vector<std::string> out;
    char buf[256];
    for (int32_t t : tokens) {
        if (t < 0 || t >= llama_vocab_n_tokens(impl_->vocab)) fail("token id " + std::to_string(t) + " outside the vocabulary");
        const int32_t n = llama_token_to_piece(impl_->vocab, t, buf, sizeof(buf), 0, false);
        out.emplace_back(buf, (size_t) std::max(n, 0));
    }
    return out;
}

std::string Runner::metadata(const std::string & key) const {
    const int32_t n = llama_model_meta_val_str(impl_->model, key.c_str(), nullptr, 0);
    if (n < 0) return "";
    std::string out((size_t) n + 1, '\0');
    llama_model_meta_val_str(impl_->model, key.c_str(), &out[0], out.size());
    out.resize((size_t) n);
    return out;
}

size_t Runner::reference_cache_entries() const {
    std::lock_guard<std::mutex> lock(impl_->busy);
    return impl_->ref_cache.size();
}

void Runner::clear_reference_cache() {
    std::lock_guard<std::mutex> lock(impl_->busy);
    impl_->ref_cache.clear();
}

ModelInfo Runner::info() const {
    const Impl & m = *impl_;
    ModelInfo i;
    char buf[256] = {0};
    llama_model_meta_val_str(m.model, "general.architecture", buf, sizeof(buf));
    i.arch = buf;
    llama_model_desc(m.model, buf, sizeof(buf));
    i.desc = buf;
    i.n_layer = m.n_layer;
    i.n_head = m.n_head;
    i.n_head_kv = llama_model_n_head_kv(m.model);
    i.n_embd = llama_model_n_embd(m.model);
    i.head_dim = i.n_embd / std::max(1, i.n_head);
    i.n_vocab = llama_vocab_n_tokens(m.vocab);
    i.n_ctx_train = llama_model_n_ctx_train(m.model);
    i.n_ctx = m.p.n_ctx;
    i.n_threads = m.n_threads();
    i.n_threads_batch = m.n_threads_batch();
    i.n_params = llama_model_n_params(m.model);
    i.size_bytes = llama_model_size(m.model);
    return i;
}

Result Runner::caption(const RgbImage & image, const std::string & prompt,
                       const std::string & prompt_template, const GenParams & gen,
                       const VhrParams & vhr) {
    const auto t_start = Clock::now();
    double ms = 0;
    int64_t n = 0;
    const std::vector<float> rows = encode({image}, n, &ms);
    Result r = caption_rows(rows.data(), n, ms, prompt, prompt_template, gen, vhr);
    r.timings.total_ms = ms_since(t_start);
    return r;
}

Result Runner::caption_rows(const float * img, int64_t n_image_rows, double image_encode_ms,
                            const std::string & prompt, const std::string & prompt_template,
                            const GenParams & gen, const VhrParams & vhr_in) {
    Impl & m = *impl_;
    std::lock_guard<std::mutex> lock(m.busy);
    const auto t_start = Clock::now();
    VhrParams vhr = vhr_in;
    m.validate(vhr, gen);
    if (img == nullptr || n_image_rows < 1) fail("no image rows");

    const PromptTokens tk = tokenize_prompt(m.mtmd, prompt, prompt_template);
    const std::vector<llama_token> & prefix = tk.prefix;
    const std::vector<llama_token> & suffix = tk.suffix;

    // ---- image rows (encoded before, by encode() or the caller)
    Result r;
    r.timings.image_encode_ms = image_encode_ms;
    const int64_t P = (int64_t) prefix.size(), S = (int64_t) suffix.size(), I = n_image_rows;
    r.timings.n_image_tokens = (int) I;

    // ---- VHR armed; the text-only reference (spec 1) is its own unscaled pass, cached per prompt
    // and layer set (text_reference, after the context below exists)
    const bool released = vhr.enabled && vhr.reference == "released";
    const bool hooked = vhr.enabled || gen.trace;  // the callback runs
    if (hooked) m.arm_hook(vhr, gen.trace);

    // ---- the image prefill: seq 0 = image prompt, exactly the rows of a plain caption. The
    // text-only prompt joins as seq 1 (prefix + instruction, positions contiguous) only for the
    // joint variant or when tracing (T-VHD follows its continuation). Its rows never carry VHR
    // scaling unless the variant is joint; only then may the prefix rows be shared by both
    // sequences (causal attention makes that exact).
    const bool two = gen.trace || (vhr.enabled && !released);
    const bool shared = two && !released;
    const int64_t seq0_len = P + I + S;
    const int64_t n_rows = seq0_len + (two ? (shared ? S : P + S) : 0);
    if (n_rows > m.p.n_ctx) {
        fail("the prompt needs " + std::to_string(n_rows) + " positions (" + std::to_string(I) +
             " image tokens) but the context holds " + std::to_string(m.p.n_ctx) + "; raise -c/--ctx-size");
    }
    // created once, reused (not timed); sized for the image prefill before the (shorter)
    // reference pass uses it, so a first caption does not create it twice
    llama_context * ctx = m.context_for(hooked, (int) n_rows, two ? 2 : 1);
    const Reference * ref = released ? &m.text_reference(prefix, suffix, r) : nullptr;
    llama_memory_clear(llama_get_memory(ctx), true);
    auto t0 = Clock::now();

    Batch batch((int32_t) n_rows, m.n_embd, 2);
    llama_batch & b = batch.b;
    b.n_tokens = 0;
    for (int64_t i = 0; i < P; ++i) m.add_row(b, prefix[i], nullptr, (llama_pos) i, true, shared);
    for (int64_t i = 0; i < I; ++i) m.add_row(b, 0, img + i * m.n_embd, (llama_pos) (P + i), true, false);
    for (int64_t i = 0; i < S; ++i) m.add_row(b, suffix[i], nullptr, (llama_pos) (P + I + i), true, false);
    if (two && !shared) {
        for (int64_t i = 0; i < P; ++i) m.add_row(b, prefix[i], nullptr, (llama_pos) i, false, true);
    }
    if (two) {
        for (int64_t i = 0; i < S; ++i) m.add_row(b, suffix[i], nullptr, (llama_pos) (P + i), false, true);
    }
    const int64_t col_img = seq0_len - 1;
    const int64_t col_txt = !two ? -1 : (shared && S == 0) ? P - 1 : n_rows - 1;
    b.logits[col_img] = 1;
    if (two) b.logits[col_txt] = 1;

    if (hooked) {
        m.hook.col_img = col_img;
        m.hook.col_txt = col_txt;
        m.hook.reference = ref;
        m.hook.n_scaled_cols = released ? seq0_len : -1;  // the text-only rows stay unscaled
        m.hook.phase = HeadHook::Phase::prefill;
    }
    const int32_t rc = llama_decode(ctx, b);
    if (rc != 0) fail("llama_decode failed on the prefill (code " + std::to_string(rc) + ") " + take_last_error());
    if (hooked && !m.hook.error.empty()) fail("VHR callback: " + m.hook.error);
    r.timings.n_prompt_rows = (int) n_rows;

    // ---- first token, then drop the text-only sequence (kept when tracing: T-VHD needs it)
    Sampler sampler(gen);
    if (gen.keep_logits) {
        const float * lg = llama_get_logits_ith(ctx, (int32_t) col_img);
        r.first_logits.assign(lg, lg + llama_vocab_n_tokens(m.vocab));
    }
    const size_t n_forced = gen.forced_tokens.size();
    auto next_token = [&](int32_t idx) -> llama_token {
        const size_t i = r.tokens.size();
        return i < n_forced ? gen.forced_tokens[i] : sampler.sample(ctx, idx);
    };
    std::vector<std::vector<float>> trace;
    if (gen.trace) trace.push_back(m.hook.step_vhd);
    llama_token tok = next_token((int32_t) col_img);
    if (two && !gen.trace) llama_memory_seq_rm(llama_get_memory(ctx), 1, -1, -1);
    if (hooked) {
        m.hook.phase = HeadHook::Phase::decode;
        m.hook.n_scaled_cols = released ? 1 : -1;  // tracing: column 1 is the text-only continuation
    }
    HeadFold fold;  // unfolds W_o when the caption ends, however it ends
    if (vhr.enabled) {
        r.decode_scaling = "callback";
        if (gen.trace) r.fold_note = "tracing reads every layer at every step";
        else if (!vhr.fold_weights) r.fold_note = "folding turned off";
        else if ((r.fold_note = fold.apply(m.hook.w_o, m.hook.heads, m.n_head, m.hook.alpha, m.p.model_path,
                                           m.private_w_o)).empty()) {
            m.hook.folded = true;  // decoding leaves the folded layers alone
            r.decode_scaling = "weights";
        }
    }
    r.timings.prefill_ms = ms_since(t0);

    // ---- decode seq 0 token by token (and the text-only continuation when tracing); the
    // hook scales the selected heads of every new token
    t0 = Clock::now();
    Batch step(2, 0, 1);
    llama_pos pos = (llama_pos) seq0_len, pos_txt = (llama_pos) (P + S);
    int64_t cells = gen.trace ? n_rows : seq0_len;  // KV cells in use
    const int per_step = gen.trace ? 2 : 1;
    const int n_max = n_forced ? (int) std::min<size_t>(n_forced, (size_t) gen.n_predict) : gen.n_predict;
    r.stop_reason = "length";
    TextStream stream(m.vocab);
    while (true) {
        if (!n_forced && !gen.ignore_eos && llama_vocab_is_eog(m.vocab, tok)) { r.stop_reason = "eos"; break; }
        r.tokens.push_back(tok);
        if (gen.on_token && !gen.on_token(tok, stream.next(r.tokens))) { r.stop_reason = "cancelled"; break; }
        if ((int) r.tokens.size() >= n_max) break;
        if (cells + per_step > m.p.n_ctx) { r.stop_reason = "context"; break; }
        cells += per_step;
        llama_batch & sb = step.b;
        sb.n_tokens = per_step;
        for (int i = 0; i < sb.n_tokens; ++i) {
            sb.token[i] = tok;
            sb.pos[i] = i == 0 ? pos : pos_txt;
            sb.n_seq_id[i] = 1;
            sb.seq_id[i][0] = i;
            sb.logits[i] = i == 0;
        }
        ++pos;
        ++pos_txt;
        if (gen.trace) {
            m.hook.col_img = 0;
            m.hook.col_txt = 1;
            std::fill(m.hook.step_vhd.begin(), m.hook.step_vhd.end(), 0.0f);
        }
        const int32_t rc2 = llama_decode(ctx, sb);
        if (rc2 != 0) fail("llama_decode failed while decoding (code " + std::to_string(rc2) + ")");
        if (hooked && !m.hook.error.empty()) fail("VHR callback: " + m.hook.error);
        if (gen.trace) trace.push_back(m.hook.step_vhd);
        tok = next_token(0);
        r.timings.n_decoded++;
    }
    r.timings.decode_ms = ms_since(t0);
    r.timings.tokens_per_s = r.timings.decode_ms > 0 ? 1000.0 * r.timings.n_decoded / r.timings.decode_ms : 0.0;
    if (hooked) {
        m.hook.phase = HeadHook::Phase::idle;
        m.hook.reference = nullptr;
    }
    trace.resize(std::min(trace.size(), r.tokens.size()));  // row t: the position that chose token t
    for (const auto & row : trace) r.trace.insert(r.trace.end(), row.begin(), row.end());

    // ---- text
    r.text = trimmed(detokenize(m.vocab, r.tokens));
    if (gen.on_token) {
        const std::string held = stream.rest(r.text);
        if (!held.empty()) gen.on_token(-1, held);
    }

    r.n_layer = m.n_layer;
    r.n_head = m.n_head;
    if (vhr.enabled) {
        r.layers = vhr.layers;
        for (const auto & kv : vhr.forced_heads) {
            if (!std::count(r.layers.begin(), r.layers.end(), kv.first)) r.layers.push_back(kv.first);
        }
        std::sort(r.layers.begin(), r.layers.end());
        for (int l : r.layers) r.selected_heads[l] = m.hook.heads[l];
        r.vhd = euclidean(m.hook.d);
        r.ta = m.hook.ta;
        r.reference = vhr.reference;
    } else {
        r.vhd.assign((size_t) m.n_layer * m.n_head, 0.0f);
        r.ta = r.vhd;
    }
    r.timings.total_ms = ms_since(t_start) + image_encode_ms;
    return r;
}

}  // namespace vhr
