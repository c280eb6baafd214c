// Unit tests of the TensorRT-independent plugin core. No framework: each TEST registers a function;
// main() runs them all and exits non-zero if any check failed.
#include "turboquant_core/attention_core.h"
#include "turboquant/kernel_support.h"
#include "turboquant/scale8.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

using namespace turboquant::core;

namespace
{
int gFailures = 0;
int gChecks = 0;
std::vector<std::pair<char const*, std::function<void()>>>& registry()
{
    static std::vector<std::pair<char const*, std::function<void()>>> r;
    return r;
}
struct Reg
{
    Reg(char const* n, std::function<void()> f) { registry().emplace_back(n, std::move(f)); }
};
} // namespace

#define TEST(name)                                                                                                     \
    static void name();                                                                                                \
    static Reg reg_##name(#name, name);                                                                                \
    static void name()

#define CHECK(cond)                                                                                                    \
    do                                                                                                                 \
    {                                                                                                                  \
        ++gChecks;                                                                                                     \
        if (!(cond))                                                                                                   \
        {                                                                                                              \
            ++gFailures;                                                                                               \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);                              \
        }                                                                                                              \
    } while (0)

#define CHECK_EQ(a, b)                                                                                                 \
    do                                                                                                                 \
    {                                                                                                                  \
        ++gChecks;                                                                                                     \
        auto const va = (a);                                                                                           \
        auto const vb = (b);                                                                                           \
        if (!(va == vb))                                                                                               \
        {                                                                                                              \
            ++gFailures;                                                                                               \
            std::fprintf(stderr, "%s:%d: CHECK_EQ failed: %s == %s (%lld vs %lld)\n", __FILE__, __LINE__, #a, #b,     \
                static_cast<long long>(va), static_cast<long long>(vb));                                               \
        }                                                                                                              \
    } while (0)

// Expects a ConfigError whose message contains `needle`.
#define CHECK_THROWS(expr, needle)                                                                                     \
    do                                                                                                                 \
    {                                                                                                                  \
        ++gChecks;                                                                                                     \
        bool thrown = false;                                                                                           \
        try                                                                                                            \
        {                                                                                                              \
            (void) (expr);                                                                                             \
        }                                                                                                              \
        catch (ConfigError const& e)                                                                                   \
        {                                                                                                              \
            thrown = true;                                                                                             \
            if (std::string(e.what()).find(needle) == std::string::npos)                                               \
            {                                                                                                          \
                ++gFailures;                                                                                           \
                std::fprintf(stderr, "%s:%d: message '%s' lacks '%s'\n", __FILE__, __LINE__, e.what(), needle);        \
            }                                                                                                          \
        }                                                                                                              \
        if (!thrown)                                                                                                   \
        {                                                                                                              \
            ++gFailures;                                                                                               \
            std::fprintf(stderr, "%s:%d: expected ConfigError from %s\n", __FILE__, __LINE__, #expr);                  \
        }                                                                                                              \
    } while (0)

namespace
{

AttentionConfig baseConfig()
{
    AttentionConfig c;
    c.layer_index = 3;
    c.num_q_heads = 32;
    c.num_kv_heads = 8;
    c.head_dim = 128;
    c.tokens_per_block = 32;
    c.k_bits.assign(8, 3);
    c.v_bits.assign(8, 2);
    c.k_bits[1] = 4;
    c.v_bits[7] = 8;
    c.k_scale_exp.assign(8, -10);
    c.v_scale_exp.assign(8, -9);
    c.k_scale_exp[6] = -64;
    c.v_scale_exp[2] = 48;
    c.sink_tokens = 4;
    c.max_seq_len = 32768;
    c.layer_offset = 4096;
    return c;
}

AttentionConfig randomConfig(std::mt19937& rng)
{
    int32_t const dims[] = {64, 128};
    int32_t const bits[] = {2, 3, 4, 8};
    int32_t const groups[] = {1, 2, 3, 4, 8, 16};
    AttentionConfig c;
    c.layer_index = static_cast<int32_t>(rng() % 80);
    c.num_kv_heads = 1 + static_cast<int32_t>(rng() % 12);
    c.num_q_heads = c.num_kv_heads * groups[rng() % 6];
    c.head_dim = dims[rng() % 2];
    c.tokens_per_block = 32 << (rng() % 3);
    for (int32_t h = 0; h < c.num_kv_heads; ++h)
    {
        c.k_bits.push_back(bits[rng() % 4]);
        c.v_bits.push_back(bits[rng() % 4]);
        c.k_scale_exp.push_back(-64 + static_cast<int32_t>(rng() % 113));
        c.v_scale_exp.push_back(-64 + static_cast<int32_t>(rng() % 113));
    }
    c.norm_correction = static_cast<int32_t>(rng() % 2);
    c.sink_tokens = static_cast<int32_t>(rng() % 17);
    c.recent_tokens = static_cast<int32_t>(rng() % 65);
    c.max_seq_len = 1 + static_cast<int32_t>(rng() % 200000);
    c.layer_offset = 16 * static_cast<int64_t>(rng() % 100000);
    c.softmax_scale = (rng() % 2) ? 0.F : 0.01F * static_cast<float>(1 + rng() % 100);
    c.num_sms = (rng() % 2) ? 0 : 1 + static_cast<int32_t>(rng() % 200);
    return c;
}

AttentionConfig roundTrip(AttentionConfig const& c)
{
    SerializedFields f(c);
    return parseFields(f.data(), f.size());
}

// A copy of serialized fields that a test may edit.
struct EditableFields
{
    explicit EditableFields(AttentionConfig const& c)
        : src(c)
    {
        fields.assign(src.data(), src.data() + src.size());
    }
    FieldView* find(char const* name)
    {
        for (auto& f : fields)
        {
            if (std::strcmp(f.name, name) == 0) return &f;
        }
        return nullptr;
    }
    void erase(char const* name)
    {
        for (size_t i = 0; i < fields.size(); ++i)
        {
            if (std::strcmp(fields[i].name, name) == 0)
            {
                fields.erase(fields.begin() + static_cast<long>(i));
                return;
            }
        }
    }
    AttentionConfig parse() const { return parseFields(fields.data(), static_cast<int32_t>(fields.size())); }
    SerializedFields src;
    std::vector<FieldView> fields;
};

struct Shapes
{
    Shape in[kNumInputs];
    Shape out[kNumOutputs];
};

Shape mk(std::initializer_list<int64_t> dims)
{
    Shape s;
    s.nbDims = static_cast<int32_t>(dims.size());
    int32_t i = 0;
    for (int64_t v : dims) s.d[i++] = v;
    return s;
}

Shapes validShapes(AttentionConfig const& c, int64_t N, int64_t B, int64_t maxBlocks, int64_t numBlocks)
{
    int64_t const H = c.num_kv_heads, d = c.head_dim;
    int64_t const stride = c.layer_offset + blockLayout(c).block_bytes + 32; // room for other layers
    Shapes s;
    s.in[kInQkv] = mk({N, (c.num_q_heads + 2 * H) * d});
    s.in[kInSeqLens] = mk({B});
    s.in[kInCtxLens] = mk({B});
    s.in[kInRequestTypes] = mk({B});
    s.in[kInBlockTable] = mk({B, maxBlocks});
    s.in[kInKvPool] = mk({numBlocks, stride / 4});
    s.in[kInSinkPool] = mk({B + 2, H, 2, c.sink_tokens, d});
    s.in[kInSeqSlots] = mk({B});
    for (int32_t slot : {kInKMean, kInKSmooth, kInVMean, kInVSmooth}) s.in[slot] = mk({H, d});
    s.in[kInKClip] = mk({H});
    s.in[kInVClip] = mk({H});
    s.in[kInSigns] = mk({d});
    s.in[kInRecentPool] = mk({B + 2, H, 2, std::max(c.recent_tokens, 1), d});
    s.out[kOutContext] = mk({N, c.num_q_heads * d});
    return s;
}

StepShape check(AttentionConfig const& c, Shapes const& s, bool wild = false)
{
    return checkShapes(c, s.in, kNumInputs, s.out, kNumOutputs, wild);
}

} // namespace

TEST(field_list_matches_serialization)
{
    AttentionConfig const c = baseConfig();
    SerializedFields f(c);
    auto const& specs = fieldSpecs();
    CHECK_EQ(static_cast<size_t>(f.size()), specs.size());
    for (size_t i = 0; i < specs.size() && i < static_cast<size_t>(f.size()); ++i)
    {
        CHECK(std::strcmp(f.data()[i].name, specs[i].name) == 0);
        CHECK(f.data()[i].type == specs[i].type);
        int32_t const want = specs[i].length >= 0 ? specs[i].length : c.num_kv_heads;
        CHECK_EQ(f.data()[i].length, want);
        for (size_t j = 0; j < i; ++j) CHECK(std::strcmp(specs[i].name, specs[j].name) != 0);
    }
}

TEST(round_trip_random_configs)
{
    std::mt19937 rng(1234);
    for (int i = 0; i < 500; ++i)
    {
        AttentionConfig const c = randomConfig(rng);
        validate(c);
        AttentionConfig const back = roundTrip(c);
        CHECK(back == c);
        // Serializing the parsed copy gives identical bytes again.
        SerializedFields a(c), b(back);
        for (int32_t k = 0; k < a.size(); ++k)
        {
            size_t const elem = a.data()[k].type == FieldType::kINT64 ? 8 : 4;
            CHECK(std::memcmp(a.data()[k].data, b.data()[k].data, elem * a.data()[k].length) == 0);
        }
    }
}

TEST(optional_fields_take_defaults)
{
    AttentionConfig c = baseConfig();
    c.sink_tokens = 0;
    c.layer_offset = 0;
    EditableFields e(c);
    for (char const* n :
        {"kind", "group_size", "norm_correction", "sink_tokens", "recent_tokens", "layer_offset", "softmax_scale",
            "num_sms"})
        e.erase(n);
    AttentionConfig const p = e.parse();
    CHECK(p.kind == QuantKind::kTurbo);
    CHECK_EQ(p.norm_correction, 1);
    CHECK_EQ(p.sink_tokens, 0);
    CHECK_EQ(p.recent_tokens, 0);
    CHECK_EQ(p.layer_offset, 0);
    CHECK_EQ(p.num_sms, 0);
    CHECK(p.effectiveSoftmaxScale() > 0.0883F && p.effectiveSoftmaxScale() < 0.0884F); // 1/sqrt(128)
}

TEST(parse_errors_name_the_field)
{
    AttentionConfig const c = baseConfig();
    {
        EditableFields e(c);
        e.erase("head_dim");
        CHECK_THROWS(e.parse(), "'head_dim' is required");
    }
    {
        EditableFields e(c);
        e.erase("max_seq_len");
        CHECK_THROWS(e.parse(), "'max_seq_len' is required");
    }
    {
        EditableFields e(c);
        e.find("head_dim")->type = FieldType::kFLOAT32;
        CHECK_THROWS(e.parse(), "'head_dim' must be int32");
    }
    {
        EditableFields e(c);
        e.find("k_bits")->length = 7;
        CHECK_THROWS(e.parse(), "'k_bits' must have 8 element(s), got 7");
    }
    {
        EditableFields e(c);
        e.find("v_scale_exp")->length = 9;
        CHECK_THROWS(e.parse(), "'v_scale_exp' must have 8 element(s), got 9");
    }
    {
        AttentionConfig d = c;
        d.v_scale_exp.pop_back();
        CHECK_THROWS(validate(d), "k_scale_exp and v_scale_exp need one entry per KV head (8), got 8 and 7");
    }
    {
        // the exponents are optional fields: absent, every head gets the format's default E = -10
        EditableFields e(c);
        e.erase("k_scale_exp");
        e.erase("v_scale_exp");
        AttentionConfig const p = e.parse();
        CHECK(p.k_scale_exp == std::vector<int32_t>(8, -10));
        CHECK(p.v_scale_exp == std::vector<int32_t>(8, -10));
    }
    {
        EditableFields e(c);
        e.find("layer_offset")->type = FieldType::kINT32;
        CHECK_THROWS(e.parse(), "'layer_offset' must be int64");
    }
    {
        EditableFields e(c);
        e.fields.push_back(FieldView{"rope_theta", e.fields[0].data, FieldType::kFLOAT32, 1});
        CHECK_THROWS(e.parse(), "unknown plugin field 'rope_theta'");
    }
    {
        EditableFields e(c);
        e.fields.push_back(e.fields[2]);
        CHECK_THROWS(e.parse(), "given twice");
    }
    {
        EditableFields e(c);
        e.erase("num_kv_heads");
        CHECK_THROWS(e.parse(), "num_kv_heads is missing");
    }
    {
        EditableFields e(c);
        int32_t const kind = 7;
        e.find("kind")->data = &kind;
        CHECK_THROWS(e.parse(), "'kind' must be 0 (turbo) or 1 (uniform)");
    }
    CHECK_THROWS(parseFields(nullptr, 3), "null field list");
}

TEST(validation_rejects_each_invalid_value)
{
    auto expect = [](std::function<void(AttentionConfig&)> edit, char const* needle) {
        AttentionConfig c = baseConfig();
        edit(c);
        CHECK_THROWS(validate(c), needle);
        SerializedFields f(c);
        CHECK_THROWS(parseFields(f.data(), f.size()), needle);
    };
    expect([](AttentionConfig& c) { c.head_dim = 96; }, "head_dim=96");
    expect([](AttentionConfig& c) { c.tokens_per_block = 24; }, "tokens_per_block=24 must be 32, 64 or 128");
    expect([](AttentionConfig& c) { c.tokens_per_block = 16; }, "tokens_per_block=16 must be 32, 64 or 128");
    expect([](AttentionConfig& c) { c.tokens_per_block = 256; }, "tokens_per_block=256");
    expect([](AttentionConfig& c) { c.tokens_per_block = 0; }, "tokens_per_block=0");
    expect([](AttentionConfig& c) { c.k_bits[5] = 5; }, "k_bits[5]=5");
    expect([](AttentionConfig& c) { c.v_bits[0] = 1; }, "v_bits[0]=1");
    expect([](AttentionConfig& c) { c.num_q_heads = 30; }, "multiple of num_kv_heads=8");
    expect([](AttentionConfig& c) { c.sink_tokens = 17; }, "sink_tokens=17");
    expect([](AttentionConfig& c) { c.recent_tokens = 65; }, "recent_tokens=65");
    expect([](AttentionConfig& c) { c.recent_tokens = -1; }, "recent_tokens=-1");
    expect([](AttentionConfig& c) { c.max_seq_len = 0; }, "max_seq_len=0");
    expect([](AttentionConfig& c) { c.layer_offset = 8; }, "layer_offset=8");
    expect([](AttentionConfig& c) { c.format_version = 1; }, "format_version=1");
    expect([](AttentionConfig& c) { c.format_version = 2; }, "format_version=2");
    expect([](AttentionConfig& c) { c.format_version = 3; }, "format_version=3");
    expect([](AttentionConfig& c) { c.format_version = 5; }, "format_version=5");
    expect([](AttentionConfig& c) { c.k_scale_exp[2] = 49; }, "k_scale_exp[2]=49");
    expect([](AttentionConfig& c) { c.v_scale_exp[5] = -65; }, "v_scale_exp[5]=-65");

    expect([](AttentionConfig& c) { c.group_size = 32; }, "group_size=32 with kind turbo");
    expect([](AttentionConfig& c) { c.norm_correction = 2; }, "norm_correction=2");
    expect([](AttentionConfig& c) { c.softmax_scale = -1.F; }, "softmax_scale");
    expect([](AttentionConfig& c) { c.num_sms = -3; }, "num_sms=-3");
    expect([](AttentionConfig& c) { c.kind = QuantKind::kUniform; c.group_size = 32; }, "reference only");
    expect([](AttentionConfig& c) { c.kind = QuantKind::kUniform; c.group_size = 12; }, "group_size=12");
}

TEST(supported_combinations)
{
    for (int32_t d : {64, 128})
        for (int32_t kb : {2, 3, 4, 8})
            for (int32_t vb : {2, 3, 4, 8})
            {
                CHECK(isSupported(QuantKind::kTurbo, d, kb, vb));
                CHECK(!isSupported(QuantKind::kUniform, d, kb, vb));
            }
    CHECK(!isSupported(QuantKind::kTurbo, 96, 3, 3));
    CHECK(!isSupported(QuantKind::kTurbo, 128, 5, 3));
    CHECK(!isSupported(QuantKind::kTurbo, 128, 3, 16));
    // The format allows head_dim 256; no kernel is compiled for it.
    AttentionConfig c = baseConfig();
    c.head_dim = 256;
    CHECK_THROWS(validate(c), "no kernel for kind turbo with head_dim 256");
    // GQA: at most kMaxGroupSize query heads per KV head in the kernels.
    c = baseConfig();
    c.num_q_heads = c.num_kv_heads * 32;
    CHECK_THROWS(validate(c), "at most 16 query heads per KV head");
    c = baseConfig();
    c.num_kv_heads = 129;
    c.num_q_heads = 129;
    c.k_bits.assign(129, 4);
    c.v_bits.assign(129, 4);
    c.k_scale_exp.assign(129, -10);
    c.v_scale_exp.assign(129, -10);
    CHECK_THROWS(validate(c), "num_kv_heads=129");
}

TEST(layer_desc_matches_core_layout)
{
    std::mt19937 rng(99);
    for (int i = 0; i < 300; ++i)
    {
        AttentionConfig const c = randomConfig(rng);
        ::turboquant::KvLayerDesc const d = toLayerDesc(c);
        BlockLayout const l = blockLayout(c);
        CHECK_EQ(d.block_bytes, l.block_bytes);
        CHECK_EQ(d.head_dim, c.head_dim);
        CHECK_EQ(d.sink_tokens, c.sink_tokens);
        CHECK_EQ(d.recent_tokens, c.recent_tokens);
        CHECK_EQ(d.norm_correction, c.norm_correction);
        CHECK_EQ(d.rotation, 1);
        for (int32_t h = 0; h < c.num_kv_heads; ++h)
        {
            CHECK_EQ(d.k_bits[h], c.k_bits[h]);
            CHECK_EQ(d.v_bits[h], c.v_bits[h]);
            CHECK_EQ(d.k_codes_off[h], l.k_codes[h]);
            CHECK_EQ(d.v_codes_off[h], l.v_codes[h]);
            CHECK_EQ(d.k_meta_off[h], l.k_meta[h]);
            CHECK_EQ(d.v_meta_off[h], l.v_meta[h]);
        }
    }
}

TEST(workspace_layout)
{
    WorkspaceLayout w = workspaceLayout(1, 0);
    CHECK_EQ(w.q_lens_offset, 0u);
    CHECK_EQ(w.scratch_offset, kWorkspaceAlign);
    CHECK_EQ(w.total_bytes, kWorkspaceAlign);
    w = workspaceLayout(65, 1000);
    CHECK_EQ(w.scratch_offset, 512u); // 65 int32 = 260 bytes, padded to 256-byte multiples
    CHECK_EQ(w.scratch_bytes, 1000u);
    CHECK_EQ(w.total_bytes, 512u + 1024u);
    CHECK(w.scratch_offset >= 65 * sizeof(int32_t));
    CHECK_EQ(w.scratch_offset % kWorkspaceAlign, 0u);
    CHECK_THROWS(workspaceLayout(0, 10), "maximum batch");
    CHECK_THROWS(workspaceLayout(-1, 10), "maximum batch");
}

TEST(scale8_encode_is_the_nearest_grid_step)
{
    // docs/format.md §3.1 on the host: enc(s, E) is the grid step nearest to s in log2 (ties up),
    // clamped to steps 1..255; dec(enc(dec(k))) = dec(k); 0, NaN and +inf; float64 log2 as referee.
    std::mt19937 rng(7);
    using ::turboquant::tqScale8Decode;
    using ::turboquant::tqScale8Encode;
    float const* F = ::turboquant::kScale8Frac;
    float const* M = ::turboquant::kScale8Mid;
    for (int32_t e : {-64, -12, -10, 0, 17, 48})
    {
        for (uint32_t k = 1; k < 256; ++k)
        {
            float const v = tqScale8Decode(k, e, F);
            CHECK_EQ(static_cast<int>(tqScale8Encode(v, e, M)), static_cast<int>(k));
            CHECK_EQ(static_cast<int>(::turboquant::tqScale8EncodeFixed(v, e)), static_cast<int>(k));
            CHECK(std::fabs(std::log2(static_cast<double>(v)) - (e + (k - 1) / 16.0)) < 1e-6);
        }
        CHECK_EQ(static_cast<int>(tqScale8Encode(0.F, e, M)), 0);
        CHECK_EQ(static_cast<int>(tqScale8Encode(std::nanf(""), e, M)), 0);
        CHECK_EQ(static_cast<int>(tqScale8Encode(INFINITY, e, M)), 255);
        CHECK_EQ(static_cast<int>(::turboquant::tqScale8EncodeFixed(0.F, e)), 0);
        CHECK_EQ(static_cast<int>(::turboquant::tqScale8EncodeFixed(std::nanf(""), e)), 0);
        CHECK_EQ(static_cast<int>(::turboquant::tqScale8EncodeFixed(INFINITY, e)), 255);
        CHECK_EQ(tqScale8Decode(0, e, F), 0.F);
        std::uniform_real_distribution<double> u(e - 3.0, e + 19.0);
        for (int i = 0; i < 2000; ++i)
        {
            float const s = static_cast<float>(std::exp2(u(rng)));
            double const q = (std::log2(static_cast<double>(s)) - e) * 16.0;
            int const want = 1 + std::min(254, std::max(0, static_cast<int>(std::floor(q + 0.5))));
            int const got = tqScale8Encode(s, e, M);
            // the kernels' encoder (thresholds as constants) equals the table one everywhere
            CHECK_EQ(static_cast<int>(::turboquant::tqScale8EncodeFixed(s, e)), got);
            // float64 log2 and the fp32 midpoints may disagree within 1e-6 of a midpoint
            if (std::fabs(q - std::floor(q) - 0.5) > 1e-6)
            {
                CHECK_EQ(got, want);
            }
        }
    }
}

TEST(decode_writer_shares_cover_the_tiles)
{
    // The fused write's partition of the writing CTA's tiles (decode_kernel.cuh): every tile once, in
    // order; warp W - 1 holds the last one (the new position); the writers take the lag fewer than
    // every other warp; no warp takes more than ceil(2 lag / (W - 2)) tiles over ceil(n / W) (the
    // launcher's kMaxSplitKeys check counts on it).
    using ::turboquant::tqDecodeWriterFirstTile;
    for (int32_t W : {4, 16})
    {
        for (int32_t lag = 0; lag <= 7; ++lag)
        {
            for (int32_t n = 1; n <= 3000; ++n)
            {
                CHECK_EQ(tqDecodeWriterFirstTile(0, n, W, lag), 0);
                CHECK_EQ(tqDecodeWriterFirstTile(W, n, W, lag), n);
                int32_t const eff = n < W ? 0 : std::min(lag, n / W - 1); // the lag after clamping
                std::vector<int32_t> c(W);
                for (int32_t i = 0; i < W; ++i)
                {
                    c[i] = tqDecodeWriterFirstTile(i + 1, n, W, lag) - tqDecodeWriterFirstTile(i, n, W, lag);
                    CHECK(c[i] >= 0);
                    CHECK(c[i] <= (n + W - 1) / W + (2 * eff + W - 3) / (W - 2));
                }
                CHECK(c[W - 1] >= 1);
                if (n >= W)
                {
                    int32_t const fewest = *std::min_element(c.begin(), c.end() - 2);
                    CHECK(c[W - 2] <= fewest - eff && c[W - 1] <= fewest - eff);
                }
                else
                {
                    CHECK_EQ(c[W - n], 1); // the last n warps take one tile each
                    CHECK_EQ(c[0], W == n ? 1 : 0);
                }
            }
        }
    }
    // B=8, L=32K on the H200: 512 tiles in CTAs of 16 with a lag of 2
    int32_t const b8[] = {0, 33, 66, 99, 132, 164, 196, 228, 260, 292, 324, 356, 388, 420, 452, 482, 512};
    for (int32_t i = 0; i <= 16; ++i)
    {
        CHECK_EQ(tqDecodeWriterFirstTile(i, 512, 16, 2), b8[i]);
    }
}

TEST(block_layout_matches_format_doc)
{
    // docs/format.md §5 by hand: d=128, T=32, H=2, K 3 bits / V 2 bits, turbo (1-byte meta).
    AttentionConfig c = baseConfig();
    c.num_q_heads = 4;
    c.num_kv_heads = 2;
    c.k_bits = {3, 4};
    c.v_bits = {2, 8};
    BlockLayout l = blockLayout(c);
    CHECK_EQ(l.k_codes[0], 0);
    CHECK_EQ(l.v_codes[0], 32 * 48);
    CHECK_EQ(l.k_meta[0], 32 * 48 + 32 * 32);
    CHECK_EQ(l.v_meta[0], 32 * 48 + 32 * 32 + 32);
    int64_t const s0 = 32 * 48 + 32 * 32 + 64;
    CHECK_EQ(l.k_codes[1], s0);
    CHECK_EQ(l.v_codes[1], s0 + 32 * 64);
    CHECK_EQ(l.block_bytes, s0 + 32 * 64 + 32 * 128 + 64);
    // d=64, T=64: 2-bit codes 16 bytes a token, 3-bit 24, no padding needed (T >= 32).
    c.head_dim = 64;
    c.tokens_per_block = 64;
    c.k_bits = {2, 2};
    c.v_bits = {3, 2};
    l = blockLayout(c);
    CHECK_EQ(l.v_codes[0], 64 * 16);
    CHECK_EQ(l.k_meta[0], 64 * 16 + 64 * 24);
    CHECK_EQ(l.block_bytes, (64 * 16 + 64 * 24 + 64 + 64) + (64 * 16 + 64 * 16 + 64 + 64));
    for (int64_t off : l.v_meta) CHECK_EQ(off % 16, 0);
}

TEST(format_combinations)
{
    DataType types[kNumInputs + kNumOutputs];
    bool linear[kNumInputs + kNumOutputs];
    auto reset = [&](DataType act) {
        for (int32_t i = 0; i < kNumInputs + kNumOutputs; ++i) linear[i] = true;
        types[kInQkv] = act;
        for (int32_t s : {kInSeqLens, kInCtxLens, kInRequestTypes, kInBlockTable, kInKvPool, kInSeqSlots})
            types[s] = DataType::kINT32;
        for (int32_t s : {kInSinkPool, kInKMean, kInKSmooth, kInVMean, kInVSmooth, kInKClip, kInVClip, kInSigns,
                 kInRecentPool})
            types[s] = DataType::kHALF;
        types[kNumInputs + kOutContext] = act;
    };
    for (DataType act : {DataType::kHALF, DataType::kBF16})
    {
        reset(act);
        for (int32_t pos = 0; pos < kNumInputs + kNumOutputs; ++pos)
            CHECK(supportsFormatCombination(pos, types, linear, kNumInputs, kNumOutputs));
    }
    reset(DataType::kHALF);
    types[kNumInputs] = DataType::kBF16;
    CHECK(!supportsFormatCombination(kNumInputs, types, linear, kNumInputs, kNumOutputs));
    reset(DataType::kFLOAT);
    CHECK(!supportsFormatCombination(kInQkv, types, linear, kNumInputs, kNumOutputs));
    reset(DataType::kHALF);
    types[kInKvPool] = DataType::kINT8;
    CHECK(!supportsFormatCombination(kInKvPool, types, linear, kNumInputs, kNumOutputs));
    reset(DataType::kHALF);
    types[kInKMean] = DataType::kFLOAT;
    CHECK(!supportsFormatCombination(kInKMean, types, linear, kNumInputs, kNumOutputs));
    reset(DataType::kHALF);
    linear[kInBlockTable] = false;
    CHECK(!supportsFormatCombination(kInBlockTable, types, linear, kNumInputs, kNumOutputs));
    reset(DataType::kHALF);
    CHECK(!supportsFormatCombination(0, types, linear, kNumInputs - 1, kNumOutputs));
    CHECK(!supportsFormatCombination(kNumInputs + 1, types, linear, kNumInputs, kNumOutputs));
    CHECK(outputDataType(DataType::kHALF) == DataType::kHALF);
    CHECK(outputDataType(DataType::kBF16) == DataType::kBF16);
    CHECK_THROWS(outputDataType(DataType::kFLOAT), "fp16 or bf16");
}

TEST(shapes_valid_and_step_kind)
{
    AttentionConfig const c = baseConfig();
    StepShape s = check(c, validShapes(c, 37, 5, 9, 100));
    CHECK_EQ(s.num_tokens, 37);
    CHECK_EQ(s.batch, 5);
    CHECK_EQ(s.max_blocks_per_seq, 9);
    CHECK_EQ(s.num_blocks, 100);
    CHECK_EQ(s.block_stride, c.layer_offset + blockLayout(c).block_bytes + 32);
    CHECK_EQ(s.num_sink_slots, 7);
    CHECK(!s.decode_only);
    s = check(c, validShapes(c, 5, 5, 9, 100));
    CHECK(s.decode_only);
    CHECK_EQ(outputInnerDim(c), 32 * 128);
    CHECK_EQ(qkvInnerDim(c), 48 * 128);
}

TEST(shapes_build_phase_wildcards)
{
    AttentionConfig const c = baseConfig();
    Shapes sh = validShapes(c, -1, -1, -1, -1);
    sh.in[kInKvPool].d[1] = -1;
    sh.in[kInSinkPool].d[0] = -1;
    StepShape const s = check(c, sh, true);
    CHECK_EQ(s.num_tokens, -1);
    CHECK(!s.decode_only);
    CHECK_THROWS(check(c, sh, false), "has shape");
    sh.in[kInQkv].d[1] = 100; // a known wrong dim is still wrong at build time
    CHECK_THROWS(check(c, sh, true), "input qkv");
}

TEST(shapes_errors_name_the_input)
{
    AttentionConfig const c = baseConfig();
    auto expect = [&](std::function<void(Shapes&)> edit, char const* needle) {
        Shapes s = validShapes(c, 12, 3, 4, 50);
        edit(s);
        CHECK_THROWS(check(c, s), needle);
    };
    expect([](Shapes& s) { s.in[kInQkv].d[1] += 128; }, "input qkv");
    expect([](Shapes& s) { s.in[kInQkv] = mk({12, 48, 128}); }, "input qkv");
    expect([](Shapes& s) { s.in[kInCtxLens].d[0] = 4; }, "input ctx_lens");
    expect([](Shapes& s) { s.in[kInRequestTypes] = mk({3, 1}); }, "input request_types");
    expect([](Shapes& s) { s.in[kInSeqSlots].d[0] = 2; }, "input seq_slots");
    expect([](Shapes& s) { s.in[kInBlockTable].d[0] = 2; }, "input block_table");
    expect([](Shapes& s) { s.in[kInKvPool].d[1] = 4; }, "input kv_pool");
    expect([](Shapes& s) { s.in[kInKvPool].d[1] += 2; }, "multiple of 16");
    expect([](Shapes& s) { s.in[kInSinkPool].d[3] = 3; }, "input sink_pool");
    expect([](Shapes& s) { s.in[kInKSmooth] = mk({8, 64}); }, "input k_smooth");
    expect([](Shapes& s) { s.in[kInVClip] = mk({7}); }, "input v_clip");
    expect([](Shapes& s) { s.in[kInSigns] = mk({64}); }, "input signs");
    expect([](Shapes& s) { s.out[kOutContext].d[1] = 8; }, "output has shape");
    expect([](Shapes& s) { s.in[kInQkv].d[0] = 2; s.out[0].d[0] = 2; }, "every request adds at least one token");
    Shapes s = validShapes(c, 12, 3, 4, 50);
    CHECK_THROWS(checkShapes(c, s.in, kNumInputs - 1, s.out, 1, false), "takes 16 inputs");
    // Without sinks the sink pool may be any tensor; without a window the recent pool too.
    AttentionConfig c0 = c;
    c0.sink_tokens = 0;
    s = validShapes(c0, 12, 3, 4, 50);
    s.in[kInSinkPool] = mk({1});
    s.in[kInRecentPool] = mk({1});
    CHECK_EQ(check(c0, s).num_sink_slots, 0);
    // With a window the recent pool is [num_slots, H, 2, w, d].
    AttentionConfig cw = c;
    cw.recent_tokens = 16;
    s = validShapes(cw, 12, 3, 4, 50);
    check(cw, s);
    s.in[kInRecentPool].d[3] = 8;
    CHECK_THROWS(check(cw, s), "input recent_pool");
    s.in[kInRecentPool] = mk({5, 8, 2, 16});
    CHECK_THROWS(check(cw, s), "input recent_pool");
}

int main()
{
    for (auto& t : registry())
    {
        int const before = gFailures;
        try
        {
            t.second();
        }
        catch (std::exception const& e)
        {
            ++gFailures;
            std::fprintf(stderr, "%s: unexpected exception: %s\n", t.first, e.what());
        }
        std::printf("%s %s\n", gFailures == before ? "PASS" : "FAIL", t.first);
    }
    std::printf("%d checks, %d failures\n", gChecks, gFailures);
    return gFailures == 0 ? 0 : 1;
}
