#include "backend.h"

#include <algorithm>
#include <cstdio>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>

#include "ggml.h"
#include "gguf.h"
#include "llama.h"
#include "mtmd.h"

namespace vhr {

// ---- logging: llama.cpp and libmtmd are quiet unless verbose; their last error is kept
// so that a failed load can say why in one line.
static std::mutex g_log_mutex;
static std::string g_last_error;
static bool g_verbose = false;

static void log_callback(ggml_log_level level, const char * text, void *) {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    if (level == GGML_LOG_LEVEL_ERROR) {
        g_last_error = text;
    } else if (level == GGML_LOG_LEVEL_CONT && !g_last_error.empty()) {
        g_last_error += text;
    }
    if (g_verbose) fputs(text, stderr);
}

std::string take_last_error() {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    std::string e = g_last_error;
    g_last_error.clear();
    while (!e.empty() && (e.back() == '\n' || e.back() == ' ')) e.pop_back();
    std::replace(e.begin(), e.end(), '\n', ' ');
    return e;
}

void init_backend_once(bool verbose) {
    static std::once_flag once;
    {
        std::lock_guard<std::mutex> lock(g_log_mutex);
        g_verbose = g_verbose || verbose;
    }
    std::call_once(once, [] {
        llama_log_set(log_callback, nullptr);
        mtmd_log_set(log_callback, nullptr);
        llama_backend_init();
    });
}

// ---- mmproj checks: is it a LLaVA-style vision projector at all?
void check_mmproj(const std::string & path) {
    gguf_init_params params = {/*no_alloc =*/ true, /*ctx =*/ nullptr};
    std::unique_ptr<gguf_context, decltype(&gguf_free)> g(
        gguf_init_from_file(path.c_str(), params), gguf_free);
    if (!g) throw std::runtime_error("cannot read mmproj " + path + ": not a GGUF file, or truncated");
    auto get_str = [&](const char * key) -> std::string {
        const int64_t k = gguf_find_key(g.get(), key);
        return (k >= 0 && gguf_get_kv_type(g.get(), k) == GGUF_TYPE_STRING) ? gguf_get_val_str(g.get(), k) : "";
    };
    const std::string arch = get_str("general.architecture");
    if (arch != "clip") throw std::runtime_error("mmproj " + path + " has architecture '" + arch + "', expected 'clip'");
    std::string proj = get_str("clip.vision.projector_type");
    if (proj.empty()) proj = get_str("clip.projector_type");
    static const std::set<std::string> llava_like = {"mlp", "mlp_norm", "ldp", "ldpv2"};
    if (!llava_like.count(proj)) {
        throw std::runtime_error("mmproj " + path + " has projector '" + proj +
             "', not a LLaVA-style projector (expected mlp, mlp_norm, ldp or ldpv2)");
    }
}

}  // namespace vhr
