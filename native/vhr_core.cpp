#include "vhr_core.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>

namespace vhr {

HeadScores score_heads(const float * col_img, const float * col_txt, int n_head, int head_dim) {
    HeadScores s;
    s.d.resize(n_head);
    s.ta.resize(n_head);
    for (int h = 0; h < n_head; ++h) {
        const float * a = col_img + (int64_t) h * head_dim;
        const float * b = col_txt + (int64_t) h * head_dim;
        double d2 = 0.0, t2 = 0.0;
        for (int j = 0; j < head_dim; ++j) {
            const double d = (double) a[j] - (double) b[j];
            d2 += d * d;
            t2 += (double) b[j] * (double) b[j];
        }
        s.d[h]  = (float) d2;
        s.ta[h] = (float) t2;
    }
    return s;
}

std::vector<float> euclidean(const std::vector<float> & d) {
    std::vector<float> out(d.size());
    for (size_t i = 0; i < d.size(); ++i) out[i] = std::sqrt(std::max(d[i], 0.0f));
    return out;
}

namespace {

struct MeanStd { double mean, std; };

MeanStd mean_std(const std::vector<float> & v) {
    if (v.empty()) return {0.0, 0.0};
    double mean = 0.0;
    for (float x : v) mean += x;
    mean /= (double) v.size();
    if (v.size() < 2) return {mean, 0.0};
    double var = 0.0;
    for (float x : v) var += ((double) x - mean) * ((double) x - mean);
    return {mean, std::sqrt(var / (double) (v.size() - 1))};  // unbiased (n - 1), as torch.std
}

double median(std::vector<float> v) {
    const size_t n = v.size();
    std::sort(v.begin(), v.end());
    return n % 2 ? (double) v[n / 2] : 0.5 * ((double) v[n / 2 - 1] + (double) v[n / 2]);
}

}  // namespace

std::vector<int> outlier_heads(const std::vector<float> & d, const std::vector<float> & ta) {
    const MeanStd v = mean_std(d);
    std::vector<int> out;
    if (!(v.std > 1.0)) return out;  // the released guard: an absolute std > 1
    const MeanStd t = mean_std(ta);
    for (size_t h = 0; h < d.size(); ++h) {
        if ((double) d[h] > v.mean + v.std && (double) ta[h] > t.mean + t.std) {
            out.push_back((int) h);
        }
    }
    return out;
}

std::vector<int> select_heads(const HeadScores & scores, bool outlier_rule) {
    std::vector<float> d = scores.d;
    if (d.empty()) return {};
    if (outlier_rule) {
        for (int h : outlier_heads(scores.d, scores.ta)) d[h] = 0.0f;
    }
    const double med = median(d);
    std::vector<int> heads;
    for (size_t h = 0; h < d.size(); ++h) {
        if ((double) d[h] > med) heads.push_back((int) h);
    }
    return heads;
}

std::vector<int> top_heads(const HeadScores & scores, int count, bool outlier_rule) {
    std::vector<float> d = scores.d;
    if (outlier_rule) {
        for (int h : outlier_heads(scores.d, scores.ta)) d[h] = 0.0f;
    }
    std::vector<int> order(d.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&d](int a, int b) { return d[a] > d[b]; });
    order.resize(std::min(order.size(), (size_t) std::max(count, 0)));
    std::sort(order.begin(), order.end());
    return order;
}

std::vector<int> random_heads(int count, int n_head, std::mt19937 & rng) {
    std::vector<int> all(n_head);
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    all.resize(std::max(0, std::min(count, n_head)));
    std::sort(all.begin(), all.end());
    return all;
}

void scale_heads(float * data, int64_t n_cols, int64_t col_stride,
                 const std::vector<int> & heads, int head_dim, float alpha) {
    for (int64_t c = 0; c < n_cols; ++c) {
        float * col = data + c * col_stride;
        for (int h : heads) {
            float * p = col + (int64_t) h * head_dim;
            for (int j = 0; j < head_dim; ++j) p[j] *= alpha;
        }
    }
}

std::vector<int> auto_layers(int n_layer) {
    const int n_last = n_layer >= 16 ? 14 : (int) std::lround(14.0 * n_layer / 32.0);
    std::set<int> layers;
    if (n_layer > 1) layers.insert(1);
    for (int l = std::max(0, n_layer - n_last); l < n_layer; ++l) layers.insert(l);
    return {layers.begin(), layers.end()};
}

double t_vhd(const std::vector<std::vector<float>> & vhd_rows, int k) {
    double total = 0.0;
    for (std::vector<float> row : vhd_rows) {
        const size_t kk = std::min<size_t>((size_t) std::max(k, 0), row.size());
        std::partial_sort(row.begin(), row.begin() + kk, row.end(), std::greater<float>());
        for (size_t i = 0; i < kk; ++i) total += row[i];
    }
    return total;
}

}  // namespace vhr
