#include "weight_fold.h"

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <memory>
#include <stdexcept>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "gguf.h"

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>
#define VHR_HAVE_MMAP 1
#endif

namespace vhr {

namespace {

constexpr float kF16Max = 65504.0f;

// x * 2^k for an fp16 bit pattern, exactly: move the exponent when the result stays normal,
// else go through float (subnormals, zero). false if the result would overflow.
inline bool scale_half(ggml_fp16_t & h, int k) {
    const int e = (h >> 10) & 0x1f;
    if (e == 0x1f) return false;  // inf / nan
    if (e != 0 && e + k >= 1 && e + k <= 30) {
        h = (ggml_fp16_t) ((int) h + k * 1024);  // the sign bit is untouched: the exponent stays in 1..30
        return true;
    }
    const float v = std::ldexp(ggml_fp16_to_fp32(h), k);
    if (std::fabs(v) > kF16Max) return false;
    h = ggml_fp32_to_fp16(v);
    return true;
}

bool is_block_type(ggml_type t) { return t == GGML_TYPE_Q8_0 || t == GGML_TYPE_Q4_0; }

// Rows of W_o copied to host memory: n rows of ne0 values of `type`, nb1 bytes apart.
struct HostRows {
    ggml_type type;
    int64_t ne0;
    size_t nb1;
    char * data;
    int64_t n;
};

// Every fp16 value (F16 weights) or fp16 block scale (Q8_0 / Q4_0: the first 2 bytes of a block)
// in head h's columns of one row.
template <typename F>
void for_each_half(ggml_type type, char * row, int h, int head_dim, F && f) {
    if (is_block_type(type)) {
        const int64_t bs = ggml_blck_size(type);
        const size_t ts = ggml_type_size(type);
        for (int64_t b = h * head_dim / bs; b < (h + 1) * head_dim / bs; ++b) f(reinterpret_cast<ggml_fp16_t *>(row + b * ts));
    } else {
        auto * x = reinterpret_cast<ggml_fp16_t *>(row);
        for (int64_t i = (int64_t) h * head_dim; i < (int64_t) (h + 1) * head_dim; ++i) f(x + i);
    }
}

// Scale the heads' columns of rows by alpha (1 / alpha with inverse). With check_only nothing is
// written: the answer says whether every value could be scaled without overflowing fp16.
bool scale_rows(const HostRows & rows, const std::vector<int> & heads, int n_head, float alpha, bool inverse,
                bool check_only) {
    const int head_dim = (int) (rows.ne0 / n_head);
    if (rows.type == GGML_TYPE_F32) {
        if (check_only) return true;
        const float f = inverse ? 1.0f / alpha : alpha;
        for (int64_t r = 0; r < rows.n; ++r) {
            auto * x = reinterpret_cast<float *>(rows.data + r * rows.nb1);
            for (int h : heads) {
                for (int64_t i = (int64_t) h * head_dim; i < (int64_t) (h + 1) * head_dim; ++i) x[i] *= f;
            }
        }
        return true;
    }
    int k = 0;
    std::frexp(alpha, &k);
    k -= 1;  // alpha = 2^k
    if (inverse) k = -k;
    bool ok = true;
    for (int64_t r = 0; r < rows.n && ok; ++r) {
        for (int h : heads) {
            for_each_half(rows.type, rows.data + r * rows.nb1, h, head_dim, [&](ggml_fp16_t * v) {
                if (check_only) {
                    ggml_fp16_t t = *v;
                    ok = ok && scale_half(t, k);
                } else {
                    scale_half(*v, k);
                }
            });
        }
    }
    return ok;
}

// llama.cpp's buffer for weights mmap-ed from the GGUF (read-only until make_private).
bool file_mapped(const ggml_tensor * w) {
    return std::string(ggml_backend_buft_name(ggml_backend_buffer_get_type(w->buffer))) == "CPU_Mapped";
}

}  // namespace

bool alpha_foldable(float alpha) {
    int e = 0;
    return std::isfinite(alpha) && alpha > 1.0f && std::frexp(alpha, &e) == 0.5f;
}

std::string fold_blocker(const ggml_tensor * w, int n_head) {
    if (!w) return "W_o was not seen in the graph";
    if (w->type != GGML_TYPE_F32 && w->type != GGML_TYPE_F16 && !is_block_type(w->type)) {
        return std::string("W_o is ") + ggml_type_name(w->type) + " (folds: F32, F16, Q8_0, Q4_0)";
    }
    if (n_head <= 0 || w->ne[0] % n_head != 0 || w->ne[2] != 1 || w->ne[3] != 1 || !ggml_is_contiguous(w)) {
        return "W_o has an unexpected shape";
    }
    const int64_t head_dim = w->ne[0] / n_head;
    if (head_dim % ggml_blck_size(w->type) != 0) return "head_dim is not a multiple of the quantization block";
    if (!w->buffer) return "W_o has no buffer";
    ggml_backend_buffer_type_t bt = ggml_backend_buffer_get_type(w->buffer);
    const std::string buft = ggml_backend_buft_name(bt);
    if (buft == "CPU_Mapped" || buft == "CPU") return "";  // the GGUF's own layout, in host memory
    // A GPU keeps F16 / Q8_0 / Q4_0 rows as the GGUF has them; get/set move them whole. Not: rows
    // split over several GPUs (set/get only whole tensors there), SYCL (reorders Q4_0 blocks in
    // place), and every other CPU buffer (repacked layouts).
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(bt);
    const auto type = dev ? ggml_backend_dev_type(dev) : GGML_BACKEND_DEVICE_TYPE_CPU;
    if (type != GGML_BACKEND_DEVICE_TYPE_GPU && type != GGML_BACKEND_DEVICE_TYPE_IGPU) {
        return "W_o is in a " + buft + " buffer (a repacked CPU layout)";
    }
    if (buft.find("Split") != std::string::npos) return "W_o is split over several devices (" + buft + ")";
    if (buft.rfind("SYCL", 0) == 0) return "W_o is in a " + buft + " buffer (SYCL may reorder quantized blocks)";
    return "";
}

bool scale_weight_heads(ggml_tensor * w, const std::vector<int> & heads, int n_head, float alpha, bool inverse,
                        size_t chunk_bytes) {
    // Scaling up is checked first: nothing is written if any fp16 value would overflow.
    const size_t nb1 = w->nb[1];
    if (chunk_bytes == 0 && ggml_backend_buffer_is_host(w->buffer)) {
        const HostRows all{w->type, w->ne[0], nb1, static_cast<char *>(w->data), w->ne[1]};
        if (!inverse && !scale_rows(all, heads, n_head, alpha, inverse, /*check_only =*/ true)) return false;
        return scale_rows(all, heads, n_head, alpha, inverse, /*check_only =*/ false);
    }
    // Device memory: chunks of whole rows read, scaled in host memory and written back.
    const int64_t chunk = std::max<int64_t>(1, (int64_t) ((chunk_bytes ? chunk_bytes : kFoldChunkBytes) / nb1));
    std::vector<char> buf((size_t) std::min<int64_t>(chunk, w->ne[1]) * nb1);
    for (const bool check_only : {true, false}) {
        if (check_only && inverse) continue;
        for (int64_t r0 = 0; r0 < w->ne[1]; r0 += chunk) {
            const int64_t n = std::min<int64_t>(chunk, w->ne[1] - r0);
            ggml_backend_tensor_get(w, buf.data(), (size_t) r0 * nb1, (size_t) n * nb1);
            if (!scale_rows({w->type, w->ne[0], nb1, buf.data(), n}, heads, n_head, alpha, inverse, check_only)) {
                return false;
            }
            if (!check_only) ggml_backend_tensor_set(w, buf.data(), (size_t) r0 * nb1, (size_t) n * nb1);
        }
    }
    return true;
}

bool scale_weight_bytes(std::vector<uint8_t> & bytes, ggml_type type, int64_t ne0, int64_t ne1,
                        const std::vector<int> & heads, int n_head, float alpha, bool inverse, size_t chunk_bytes) {
    ggml_init_params ip = {/*mem_size =*/ ggml_tensor_overhead(), /*mem_buffer =*/ nullptr, /*no_alloc =*/ true};
    std::unique_ptr<ggml_context, decltype(&ggml_free)> ctx(ggml_init(ip), ggml_free);
    ggml_tensor * w = ggml_new_tensor_2d(ctx.get(), type, ne0, ne1);
    if (bytes.size() != ggml_nbytes(w)) throw std::invalid_argument("scale_weight_bytes: wrong number of bytes");
    std::unique_ptr<ggml_backend_buffer, decltype(&ggml_backend_buffer_free)> buf(
        ggml_backend_alloc_ctx_tensors_from_buft(ctx.get(), ggml_backend_cpu_buffer_type()), ggml_backend_buffer_free);
    ggml_backend_tensor_set(w, bytes.data(), 0, bytes.size());
    const bool ok = scale_weight_heads(w, heads, n_head, alpha, inverse, chunk_bytes);
    ggml_backend_tensor_get(w, bytes.data(), 0, bytes.size());
    return ok;
}

std::string make_private(const ggml_tensor * w, const std::string & gguf_path) {
#ifndef VHR_HAVE_MMAP
    (void) w;
    (void) gguf_path;
    return "remapping weights is not supported on this platform";
#else
    gguf_init_params gp = {/*no_alloc =*/ true, /*ctx =*/ nullptr};
    std::unique_ptr<gguf_context, decltype(&gguf_free)> g(gguf_init_from_file(gguf_path.c_str(), gp), gguf_free);
    if (!g) return "cannot read " + gguf_path;
    const int64_t id = gguf_find_tensor(g.get(), w->name);
    if (id < 0) return std::string(w->name) + " is not in " + gguf_path;
    const size_t file_off = gguf_get_data_offset(g.get()) + gguf_get_tensor_offset(g.get(), id);

    const size_t page = (size_t) sysconf(_SC_PAGESIZE);
    const uintptr_t addr = reinterpret_cast<uintptr_t>(w->data);
    const uintptr_t lo = addr & ~(uintptr_t) (page - 1);
    const uintptr_t hi = (addr + ggml_nbytes(w) + page - 1) & ~(uintptr_t) (page - 1);
    const size_t delta = addr - lo, len = hi - lo;
    if (file_off < delta || (file_off - delta) % page != 0) return "W_o is not mapped page-aligned from the file";
    const off_t off_lo = (off_t) (file_off - delta);

    const int fd = open(gguf_path.c_str(), O_RDONLY);
    if (fd < 0) return "cannot open " + gguf_path;
    std::string why;
    std::vector<char> file_bytes(len);
    if (pread(fd, file_bytes.data(), len, off_lo) != (ssize_t) len) {
        why = "W_o's pages reach past the end of the file";
    } else if (std::memcmp(file_bytes.data(), reinterpret_cast<const void *>(lo), len) != 0) {
        why = "W_o's pages in memory differ from the file";  // not a plain mapping of it: leave them alone
    } else if (mmap(reinterpret_cast<void *>(lo), len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, off_lo) ==
               MAP_FAILED) {
        why = std::string("mmap failed: ") + std::strerror(errno);
    }
    close(fd);
    return why;
#endif
}

std::string HeadFold::apply(const std::vector<ggml_tensor *> & w_o, const std::vector<std::vector<int>> & heads,
                            int n_head, float alpha, const std::string & gguf_path,
                            std::set<const ggml_tensor *> & made_private) {
    undo();
    if (!alpha_foldable(alpha)) return "alpha is not a power of two above 1";
    for (size_t l = 0; l < heads.size(); ++l) {
        if (heads[l].empty()) continue;
        ggml_tensor * w = l < w_o.size() ? w_o[l] : nullptr;
        std::string why = fold_blocker(w, n_head);
        if (why.empty() && file_mapped(w) && !made_private.count(w)) {
            why = make_private(w, gguf_path);
            if (why.empty()) made_private.insert(w);
        }
        if (!why.empty()) return "layer " + std::to_string(l) + ": " + why;
    }
    n_head_ = n_head;
    alpha_ = alpha;
    for (size_t l = 0; l < heads.size(); ++l) {
        if (heads[l].empty()) continue;
        if (!scale_weight_heads(w_o[l], heads[l], n_head, alpha, /*inverse =*/ false)) {
            undo();
            return "layer " + std::to_string(l) + ": a folded weight would overflow fp16";
        }
        done_.emplace_back(w_o[l], heads[l]);
    }
    return "";
}

void HeadFold::undo() {
    for (auto & d : done_) scale_weight_heads(d.first, d.second, n_head_, alpha_, /*inverse =*/ true);
    done_.clear();
}

}  // namespace vhr
