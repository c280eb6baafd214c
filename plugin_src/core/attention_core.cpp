// TensorRT-independent logic of the TurboQuant attention plugin (see attention_core.h).
#include "turboquant_core/attention_core.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

namespace turboquant
{
namespace core
{
namespace
{

// What the format allows (docs/format.md §1); the kernels implement a subset (isSupported).
constexpr int32_t kFormatHeadDims[] = {64, 128, 256};
constexpr int32_t kFormatBits[] = {2, 3, 4, 8};

int64_t alignUp(int64_t n, int64_t a)
{
    return (n + a - 1) / a * a;
}

template <typename T, size_t N>
bool contains(T const (&arr)[N], T v)
{
    return std::find(arr, arr + N, v) != arr + N;
}

char const* fieldTypeName(FieldType t)
{
    switch (t)
    {
    case FieldType::kFLOAT32: return "float32";
    case FieldType::kINT32: return "int32";
    case FieldType::kCHAR: return "char";
    case FieldType::kINT64: return "int64";
    }
    return "unknown";
}

char const* dataTypeName(DataType t)
{
    switch (t)
    {
    case DataType::kFLOAT: return "fp32";
    case DataType::kHALF: return "fp16";
    case DataType::kINT8: return "int8";
    case DataType::kINT32: return "int32";
    case DataType::kBOOL: return "bool";
    case DataType::kUINT8: return "uint8";
    case DataType::kFP8: return "fp8";
    case DataType::kBF16: return "bf16";
    case DataType::kINT64: return "int64";
    }
    return "unknown";
}

std::string shapeText(Shape const& s)
{
    std::ostringstream os;
    os << '[';
    for (int32_t i = 0; i < s.nbDims; ++i)
    {
        os << (i ? ", " : "") << s.d[i];
    }
    os << ']';
    return os.str();
}

} // namespace

char const* inputName(int32_t slot) noexcept
{
    static char const* const kNames[kNumInputs] = {"qkv", "seq_lens", "ctx_lens", "request_types", "block_table",
        "kv_pool", "sink_pool", "seq_slots", "k_mean", "k_smooth", "v_mean", "v_smooth", "k_clip", "v_clip", "signs",
        "recent_pool"};
    return (slot >= 0 && slot < kNumInputs) ? kNames[slot] : "?";
}

std::vector<FieldSpec> const& fieldSpecs()
{
    static std::vector<FieldSpec> const kSpecs = {
        {"format_version", FieldType::kINT32, 1, true, "docs/format.md version the plugin was built for"},
        {"layer_index", FieldType::kINT32, 1, true, "layer of the model (for messages and sign seeds)"},
        {"num_q_heads", FieldType::kINT32, 1, true, "query heads Hq"},
        {"num_kv_heads", FieldType::kINT32, 1, true, "KV heads H; Hq is a multiple of H"},
        {"head_dim", FieldType::kINT32, 1, true, "d: 64, 128 or 256"},
        {"tokens_per_block", FieldType::kINT32, 1, true, "T: tokens per pool block, 32, 64 or 128"},
        {"k_bits", FieldType::kINT32, -1, true, "bits per K code, one per KV head: 2, 3, 4 or 8"},
        {"v_bits", FieldType::kINT32, -1, true, "bits per V code, one per KV head: 2, 3, 4 or 8"},
        {"k_scale_exp", FieldType::kINT32, -1, false, "turbo: exponent E of the one-byte K scales, one per KV head, -64..48 (default -10 each; the scale table's k_scale_exp)"},
        {"v_scale_exp", FieldType::kINT32, -1, false, "turbo: exponent E of the one-byte V scales, one per KV head, -64..48 (default -10 each)"},
        {"kind", FieldType::kINT32, 1, false, "0 = turbo (default), 1 = uniform (reference only)"},
        {"group_size", FieldType::kINT32, 1, false, "uniform only: channels per scale/zero group (0 = d)"},
        {"norm_correction", FieldType::kINT32, 1, false, "1 (default): dequantized vector keeps its norm"},
        {"sink_tokens", FieldType::kINT32, 1, false, "n_s: first positions kept in fp16, 0..16 (default 0)"},
        {"recent_tokens", FieldType::kINT32, 1, false, "w: each request's last positions also kept in fp16 (input recent_pool), 0..64 (default 0)"},
        {"max_seq_len", FieldType::kINT32, 1, true, "longest KV length a request may reach"},
        {"layer_offset", FieldType::kINT64, 1, false, "bytes from a pool block's start to this layer (default 0)"},
        {"softmax_scale", FieldType::kFLOAT32, 1, false, "logit scale; 0 (default) = 1/sqrt(d)"},
        {"num_sms", FieldType::kINT32, 1, false, "SMs the split-K workspace is sized for; 0 (default) = the build GPU's"},
    };
    return kSpecs;
}

float AttentionConfig::effectiveSoftmaxScale() const noexcept
{
    return softmax_scale > 0.F ? softmax_scale : 1.F / std::sqrt(static_cast<float>(head_dim));
}

int32_t AttentionConfig::groupSize() const noexcept
{
    return num_kv_heads > 0 ? num_q_heads / num_kv_heads : 0;
}

bool AttentionConfig::operator==(AttentionConfig const& o) const noexcept
{
    return format_version == o.format_version && layer_index == o.layer_index && num_q_heads == o.num_q_heads
        && num_kv_heads == o.num_kv_heads && head_dim == o.head_dim && tokens_per_block == o.tokens_per_block
        && k_bits == o.k_bits && v_bits == o.v_bits && k_scale_exp == o.k_scale_exp && v_scale_exp == o.v_scale_exp
        && kind == o.kind && group_size == o.group_size
        && norm_correction == o.norm_correction && sink_tokens == o.sink_tokens && recent_tokens == o.recent_tokens
        && max_seq_len == o.max_seq_len
        && layer_offset == o.layer_offset && softmax_scale == o.softmax_scale && num_sms == o.num_sms;
}

AttentionConfig parseFields(FieldView const* fields, int32_t nbFields)
{
    if (nbFields < 0 || (nbFields > 0 && fields == nullptr))
    {
        throw ConfigError("plugin fields: null field list");
    }
    auto const& specs = fieldSpecs();
    std::vector<bool> seen(specs.size(), false);
    AttentionConfig cfg;
    // num_kv_heads first: the per-head fields' length depends on it.
    int32_t kvHeads = -1;
    for (int32_t i = 0; i < nbFields; ++i)
    {
        if (fields[i].name && std::strcmp(fields[i].name, "num_kv_heads") == 0 && fields[i].type == FieldType::kINT32
            && fields[i].length == 1 && fields[i].data)
        {
            kvHeads = *static_cast<int32_t const*>(fields[i].data);
        }
    }
    for (int32_t i = 0; i < nbFields; ++i)
    {
        FieldView const& f = fields[i];
        if (f.name == nullptr)
        {
            throw ConfigError("plugin fields: field " + std::to_string(i) + " has no name");
        }
        auto it = std::find_if(
            specs.begin(), specs.end(), [&](FieldSpec const& s) { return std::strcmp(s.name, f.name) == 0; });
        if (it == specs.end())
        {
            std::string names;
            for (auto const& s : specs)
            {
                names += (names.empty() ? "" : ", ") + std::string(s.name);
            }
            throw ConfigError(std::string("unknown plugin field '") + f.name + "'; known fields: " + names);
        }
        size_t const idx = static_cast<size_t>(it - specs.begin());
        if (seen[idx])
        {
            throw ConfigError(std::string("plugin field '") + f.name + "' given twice");
        }
        seen[idx] = true;
        if (f.type != it->type)
        {
            throw ConfigError(std::string("plugin field '") + f.name + "' must be " + fieldTypeName(it->type)
                + ", got " + fieldTypeName(f.type) + " (type code " + std::to_string(static_cast<int32_t>(f.type))
                + ")");
        }
        int32_t const want = it->length >= 0 ? it->length : kvHeads;
        if (it->length < 0 && kvHeads <= 0)
        {
            throw ConfigError(std::string("plugin field '") + f.name
                + "' has one entry per KV head, but num_kv_heads is missing or not positive");
        }
        if (f.length != want)
        {
            throw ConfigError(std::string("plugin field '") + f.name + "' must have " + std::to_string(want)
                + " element(s), got " + std::to_string(f.length));
        }
        if (f.data == nullptr)
        {
            throw ConfigError(std::string("plugin field '") + f.name + "' has no data");
        }
        std::string const name = f.name;
        auto i32 = [&]() { return *static_cast<int32_t const*>(f.data); };
        if (name == "format_version") cfg.format_version = i32();
        else if (name == "layer_index") cfg.layer_index = i32();
        else if (name == "num_q_heads") cfg.num_q_heads = i32();
        else if (name == "num_kv_heads") cfg.num_kv_heads = i32();
        else if (name == "head_dim") cfg.head_dim = i32();
        else if (name == "tokens_per_block") cfg.tokens_per_block = i32();
        else if (name == "k_bits" || name == "v_bits")
        {
            auto const* p = static_cast<int32_t const*>(f.data);
            (name == "k_bits" ? cfg.k_bits : cfg.v_bits).assign(p, p + f.length);
        }
        else if (name == "k_scale_exp" || name == "v_scale_exp")
        {
            auto const* p = static_cast<int32_t const*>(f.data);
            (name == "k_scale_exp" ? cfg.k_scale_exp : cfg.v_scale_exp).assign(p, p + f.length);
        }
        else if (name == "kind")
        {
            int32_t const k = i32();
            if (k != 0 && k != 1)
            {
                throw ConfigError("plugin field 'kind' must be 0 (turbo) or 1 (uniform), got " + std::to_string(k));
            }
            cfg.kind = static_cast<QuantKind>(k);
        }
        else if (name == "group_size") cfg.group_size = i32();
        else if (name == "norm_correction") cfg.norm_correction = i32();
        else if (name == "sink_tokens") cfg.sink_tokens = i32();
        else if (name == "recent_tokens") cfg.recent_tokens = i32();
        else if (name == "max_seq_len") cfg.max_seq_len = i32();
        else if (name == "layer_offset") cfg.layer_offset = *static_cast<int64_t const*>(f.data);
        else if (name == "softmax_scale") cfg.softmax_scale = *static_cast<float const*>(f.data);
        else if (name == "num_sms") cfg.num_sms = i32();
    }
    for (size_t i = 0; i < specs.size(); ++i)
    {
        if (specs[i].required && !seen[i])
        {
            throw ConfigError(std::string("plugin field '") + specs[i].name + "' is required (" + specs[i].meaning + ")");
        }
    }
    for (auto* e : {&cfg.k_scale_exp, &cfg.v_scale_exp})
    {
        if (e->empty() && cfg.num_kv_heads > 0)
        {
            e->assign(static_cast<size_t>(cfg.num_kv_heads), ::turboquant::kDefaultScaleExp);
        }
    }
    validate(cfg);
    return cfg;
}

bool isSupported(QuantKind kind, int32_t head_dim, int32_t k_bits, int32_t v_bits) noexcept
{
    return ::turboquant::isSupported(kind, /*rotation=*/true, head_dim, k_bits, v_bits);
}

std::string supportedCombinationsText()
{
    std::string dims, bits;
    for (int32_t d : ::turboquant::kKernelHeadDims) dims += (dims.empty() ? "" : "/") + std::to_string(d);
    for (int32_t b : ::turboquant::kKernelBits) bits += (bits.empty() ? "" : "/") + std::to_string(b);
    return "kind turbo with head_dim " + dims + ", K/V bits " + bits + " per KV head, at most "
        + std::to_string(::turboquant::kMaxGroupSize) + " query heads per KV head";
}

::turboquant::KvLayerDesc toLayerDesc(AttentionConfig const& cfg)
{
    ::turboquant::KvLayerDesc desc{};
    desc.head_dim = cfg.head_dim;
    desc.num_kv_heads = cfg.num_kv_heads;
    desc.tokens_per_block = cfg.tokens_per_block;
    desc.sink_tokens = cfg.sink_tokens;
    desc.recent_tokens = cfg.recent_tokens;
    desc.kind = cfg.kind;
    desc.rotation = 1;
    desc.norm_correction = cfg.norm_correction;
    for (int32_t h = 0; h < cfg.num_kv_heads && h < kMaxKvHeads; ++h)
    {
        desc.k_bits[h] = static_cast<uint8_t>(cfg.k_bits.at(h));
        desc.v_bits[h] = static_cast<uint8_t>(cfg.v_bits.at(h));
        desc.k_scale_exp[h] = static_cast<int8_t>(cfg.k_scale_exp.at(h));
        desc.v_scale_exp[h] = static_cast<int8_t>(cfg.v_scale_exp.at(h));
    }
    if (!::turboquant::tqComputeBlockLayout(desc))
    {
        throw ConfigError("the kernels cannot lay out this layer's block (kind, heads or tokens_per_block)");
    }
    return desc;
}

void validate(AttentionConfig const& c)
{
    auto fail = [](std::string const& m) { throw ConfigError(m); };
    if (c.format_version != kFormatVersion)
    {
        fail("format_version=" + std::to_string(c.format_version) + " is not supported; this plugin reads format "
            + std::to_string(kFormatVersion));
    }
    if (c.layer_index < 0) fail("layer_index=" + std::to_string(c.layer_index) + " must be >= 0");
    if (c.num_kv_heads <= 0 || c.num_kv_heads > kMaxKvHeads)
    {
        fail("num_kv_heads=" + std::to_string(c.num_kv_heads) + " must be between 1 and " + std::to_string(kMaxKvHeads));
    }
    if (c.num_q_heads <= 0 || c.num_q_heads % c.num_kv_heads != 0)
    {
        fail("num_q_heads=" + std::to_string(c.num_q_heads) + " must be a positive multiple of num_kv_heads="
            + std::to_string(c.num_kv_heads));
    }
    if (!contains(kFormatHeadDims, c.head_dim))
    {
        fail("head_dim=" + std::to_string(c.head_dim) + " is not supported; the format allows 64, 128, 256; the "
            + "kernels support " + supportedCombinationsText());
    }
    int32_t const t = c.tokens_per_block;
    if (!::turboquant::tqTokensPerBlockValid(t))
    {
        fail("tokens_per_block=" + std::to_string(t) + " must be 32, 64 or 128 (format version "
            + std::to_string(kFormatVersion) + " stores codes in tiles of 32 token slots)");
    }
    if (static_cast<int32_t>(c.k_bits.size()) != c.num_kv_heads || static_cast<int32_t>(c.v_bits.size()) != c.num_kv_heads)
    {
        fail("k_bits and v_bits need one entry per KV head (" + std::to_string(c.num_kv_heads) + "), got "
            + std::to_string(c.k_bits.size()) + " and " + std::to_string(c.v_bits.size()));
    }
    for (int32_t h = 0; h < c.num_kv_heads; ++h)
    {
        for (int32_t which = 0; which < 2; ++which)
        {
            int32_t const b = which ? c.v_bits[h] : c.k_bits[h];
            if (!contains(kFormatBits, b))
            {
                fail(std::string(which ? "v_bits[" : "k_bits[") + std::to_string(h) + "]=" + std::to_string(b)
                    + " is not supported; allowed bit widths: 2, 3, 4, 8");
            }
        }
    }
    if (static_cast<int32_t>(c.k_scale_exp.size()) != c.num_kv_heads
        || static_cast<int32_t>(c.v_scale_exp.size()) != c.num_kv_heads)
    {
        fail("k_scale_exp and v_scale_exp need one entry per KV head (" + std::to_string(c.num_kv_heads) + "), got "
            + std::to_string(c.k_scale_exp.size()) + " and " + std::to_string(c.v_scale_exp.size()));
    }
    for (int32_t h = 0; h < c.num_kv_heads; ++h)
    {
        for (int32_t which = 0; which < 2; ++which)
        {
            int32_t const e = which ? c.v_scale_exp[h] : c.k_scale_exp[h];
            if (e < ::turboquant::kScaleExpMin || e > ::turboquant::kScaleExpMax)
            {
                fail(std::string(which ? "v_scale_exp[" : "k_scale_exp[") + std::to_string(h) + "]=" + std::to_string(e)
                    + " is out of range; allowed: -64 to 48 (docs/format.md §3.1)");
            }
        }
    }
    if (c.kind == QuantKind::kUniform)
    {
        int32_t const g = c.group_size ? c.group_size : c.head_dim;
        if (g <= 0 || g % 8 || c.head_dim % g)
        {
            fail("group_size=" + std::to_string(c.group_size) + " must be a multiple of 8 that divides head_dim="
                + std::to_string(c.head_dim));
        }
    }
    else if (c.group_size != 0 && c.group_size != c.head_dim)
    {
        fail("group_size=" + std::to_string(c.group_size)
            + " with kind turbo: turbo keeps one scale per vector; use group_size=0");
    }
    if (c.norm_correction != 0 && c.norm_correction != 1)
    {
        fail("norm_correction=" + std::to_string(c.norm_correction) + " must be 0 or 1");
    }
    if (c.sink_tokens < 0 || c.sink_tokens > kMaxSinkTokens)
    {
        fail("sink_tokens=" + std::to_string(c.sink_tokens) + " must be between 0 and " + std::to_string(kMaxSinkTokens));
    }
    if (c.recent_tokens < 0 || c.recent_tokens > ::turboquant::kMaxRecentTokens)
    {
        fail("recent_tokens=" + std::to_string(c.recent_tokens) + " must be between 0 and "
            + std::to_string(::turboquant::kMaxRecentTokens));
    }
    if (c.max_seq_len <= 0)
    {
        fail("max_seq_len=" + std::to_string(c.max_seq_len) + " must be positive");
    }
    if (c.layer_offset < 0 || c.layer_offset % kAlign != 0)
    {
        fail("layer_offset=" + std::to_string(c.layer_offset) + " must be a non-negative multiple of 16 bytes");
    }
    if (c.num_sms < 0 || c.num_sms > 4096)
    {
        fail("num_sms=" + std::to_string(c.num_sms) + " must be between 0 (the device's) and 4096");
    }
    if (!(c.softmax_scale >= 0.F) || !std::isfinite(c.softmax_scale))
    {
        fail("softmax_scale must be finite and >= 0 (0 = 1/sqrt(head_dim))");
    }
    for (int32_t h = 0; h < c.num_kv_heads; ++h)
    {
        if (!isSupported(c.kind, c.head_dim, c.k_bits[h], c.v_bits[h]))
        {
            fail(std::string("no kernel for kind ") + (c.kind == QuantKind::kTurbo ? "turbo" : "uniform")
                + " with head_dim " + std::to_string(c.head_dim) + " (KV head " + std::to_string(h)
                + "); supported: " + supportedCombinationsText() + "; uniform exists in the Python reference only");
        }
    }
    // The kernels' own whole-layer check (GQA ratio and ranges) has the last word.
    if (char const* reason = ::turboquant::tqCheckLayer(toLayerDesc(c), c.num_q_heads))
    {
        fail(std::string("layer not supported by the kernels: ") + reason);
    }
}

SerializedFields::SerializedFields(AttentionConfig const& cfg)
    : mCfg(cfg)
{
    auto const& specs = fieldSpecs();
    mInts.reserve(32);
    mViews.reserve(specs.size());
    for (auto const& s : specs)
    {
        std::string const name = s.name;
        void const* data = nullptr;
        int32_t length = 1;
        if (name == "format_version") data = &mCfg.format_version;
        else if (name == "layer_index") data = &mCfg.layer_index;
        else if (name == "num_q_heads") data = &mCfg.num_q_heads;
        else if (name == "num_kv_heads") data = &mCfg.num_kv_heads;
        else if (name == "head_dim") data = &mCfg.head_dim;
        else if (name == "tokens_per_block") data = &mCfg.tokens_per_block;
        else if (name == "k_bits") { data = mCfg.k_bits.data(); length = static_cast<int32_t>(mCfg.k_bits.size()); }
        else if (name == "v_bits") { data = mCfg.v_bits.data(); length = static_cast<int32_t>(mCfg.v_bits.size()); }
        else if (name == "k_scale_exp") { data = mCfg.k_scale_exp.data(); length = static_cast<int32_t>(mCfg.k_scale_exp.size()); }
        else if (name == "v_scale_exp") { data = mCfg.v_scale_exp.data(); length = static_cast<int32_t>(mCfg.v_scale_exp.size()); }
        else if (name == "kind")
        {
            mInts.push_back(static_cast<int32_t>(mCfg.kind)); // reserved above: no reallocation moves it
            data = &mInts.back();
        }
        else if (name == "group_size") data = &mCfg.group_size;
        else if (name == "norm_correction") data = &mCfg.norm_correction;
        else if (name == "sink_tokens") data = &mCfg.sink_tokens;
        else if (name == "recent_tokens") data = &mCfg.recent_tokens;
        else if (name == "max_seq_len") data = &mCfg.max_seq_len;
        else if (name == "layer_offset") data = &mCfg.layer_offset;
        else if (name == "softmax_scale") data = &mCfg.softmax_scale;
        else if (name == "num_sms") data = &mCfg.num_sms;
        else throw std::logic_error("SerializedFields: field '" + name + "' has no member");
        mViews.push_back(FieldView{s.name, data, s.type, length});
    }
}

int32_t codeBytes(int32_t head_dim, int32_t bits) noexcept
{
    return head_dim * bits / 8;
}

int32_t metaBytes(AttentionConfig const& cfg) noexcept
{
    if (cfg.kind == QuantKind::kTurbo)
    {
        return ::turboquant::kTurboMetaBytes;
    }
    int32_t const g = cfg.group_size ? cfg.group_size : cfg.head_dim;
    return 4 * (cfg.head_dim / g);
}

BlockLayout blockLayout(AttentionConfig const& cfg)
{
    BlockLayout l;
    int64_t const t = cfg.tokens_per_block;
    int64_t const mb = metaBytes(cfg);
    int64_t off = 0;
    for (int32_t h = 0; h < cfg.num_kv_heads; ++h)
    {
        l.k_codes.push_back(off);
        off += alignUp(t * codeBytes(cfg.head_dim, cfg.k_bits.at(h)), kAlign);
        l.v_codes.push_back(off);
        off += alignUp(t * codeBytes(cfg.head_dim, cfg.v_bits.at(h)), kAlign);
        l.k_meta.push_back(off);
        off += alignUp(t * mb, kAlign);
        l.v_meta.push_back(off);
        off += alignUp(t * mb, kAlign);
    }
    l.block_bytes = off;
    return l;
}

bool supportsFormatCombination(
    int32_t pos, DataType const* types, bool const* linear, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNumInputs || nbOutputs != kNumOutputs || pos < 0 || pos >= nbInputs + nbOutputs || !types
        || !linear)
    {
        return false;
    }
    if (!linear[pos])
    {
        return false;
    }
    DataType const t = types[pos];
    switch (pos)
    {
    case kInQkv: return t == DataType::kHALF || t == DataType::kBF16;
    case kInSeqLens:
    case kInCtxLens:
    case kInRequestTypes:
    case kInBlockTable:
    case kInKvPool:
    case kInSeqSlots: return t == DataType::kINT32;
    case kInSinkPool:
    case kInKMean:
    case kInKSmooth:
    case kInVMean:
    case kInVSmooth:
    case kInKClip:
    case kInVClip:
    case kInSigns:
    case kInRecentPool: return t == DataType::kHALF;
    default: break;
    }
    // The output has the type of qkv (slot 0 is decided before any later slot).
    return pos == kNumInputs + kOutContext && t == types[kInQkv];
}

DataType outputDataType(DataType qkvType)
{
    if (qkvType != DataType::kHALF && qkvType != DataType::kBF16)
    {
        throw ConfigError(std::string("input qkv must be fp16 or bf16, got ") + dataTypeName(qkvType));
    }
    return qkvType;
}

int64_t outputInnerDim(AttentionConfig const& cfg) noexcept
{
    return static_cast<int64_t>(cfg.num_q_heads) * cfg.head_dim;
}

int64_t qkvInnerDim(AttentionConfig const& cfg) noexcept
{
    return static_cast<int64_t>(cfg.num_q_heads + 2 * cfg.num_kv_heads) * cfg.head_dim;
}

StepShape checkShapes(AttentionConfig const& cfg, Shape const* in, int32_t nbInputs, Shape const* out,
    int32_t nbOutputs, bool allowWildcards)
{
    if (nbInputs != kNumInputs)
    {
        throw ConfigError("the plugin takes " + std::to_string(kNumInputs) + " inputs, got " + std::to_string(nbInputs));
    }
    if (nbOutputs != kNumOutputs)
    {
        throw ConfigError("the plugin has " + std::to_string(kNumOutputs) + " output, got " + std::to_string(nbOutputs));
    }
    int64_t const H = cfg.num_kv_heads;
    int64_t const d = cfg.head_dim;
    auto bad = [&](int32_t slot, std::string const& want) {
        throw ConfigError(std::string("input ") + inputName(slot) + " has shape " + shapeText(in[slot]) + "; expected "
            + want);
    };
    // dim matches when equal, or when unknown (-1) in the build phase.
    auto same = [&](int64_t got, int64_t want) { return got == want || (allowWildcards && (got < 0 || want < 0)); };
    auto rank = [&](int32_t slot, int32_t r, std::string const& want) {
        if (in[slot].nbDims != r) bad(slot, want);
        for (int32_t i = 0; i < r; ++i)
        {
            if (in[slot].d[i] < 0 && !allowWildcards) bad(slot, want);
        }
    };
    std::string const qkvWant = "[num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim = " + std::to_string(qkvInnerDim(cfg)) + "]";
    rank(kInQkv, 2, qkvWant);
    if (!same(in[kInQkv].d[1], qkvInnerDim(cfg))) bad(kInQkv, qkvWant);
    StepShape s;
    s.num_tokens = in[kInQkv].d[0];
    if (!allowWildcards && s.num_tokens < 1) bad(kInQkv, qkvWant + " with num_tokens >= 1");

    rank(kInSeqLens, 1, "[batch]");
    s.batch = in[kInSeqLens].d[0];
    if (!allowWildcards && s.batch < 1) bad(kInSeqLens, "[batch] with batch >= 1");
    for (int32_t slot : {kInCtxLens, kInRequestTypes, kInSeqSlots})
    {
        rank(slot, 1, "[batch]");
        if (!same(in[slot].d[0], s.batch)) bad(slot, "[batch] like seq_lens");
    }
    rank(kInBlockTable, 2, "[batch, max_blocks_per_seq]");
    if (!same(in[kInBlockTable].d[0], s.batch)) bad(kInBlockTable, "[batch, max_blocks_per_seq] like seq_lens");
    s.max_blocks_per_seq = in[kInBlockTable].d[1];
    if (!allowWildcards && s.max_blocks_per_seq < 1) bad(kInBlockTable, "[batch, max_blocks_per_seq >= 1]");

    int64_t const blockBytes = blockLayout(cfg).block_bytes;
    std::string const poolWant = "[num_blocks, block_stride / 4] int32 with block_stride a multiple of 16 and >= layer_offset + block_bytes = "
        + std::to_string(cfg.layer_offset + blockBytes);
    rank(kInKvPool, 2, poolWant);
    s.num_blocks = in[kInKvPool].d[0];
    s.block_stride = in[kInKvPool].d[1] < 0 ? -1 : in[kInKvPool].d[1] * 4;
    if (s.block_stride >= 0 && (s.block_stride % kAlign != 0 || s.block_stride < cfg.layer_offset + blockBytes))
    {
        bad(kInKvPool, poolWant);
    }
    if (!allowWildcards && s.num_blocks < 1) bad(kInKvPool, poolWant + " and num_blocks >= 1");

    if (cfg.sink_tokens > 0)
    {
        std::string const want = "[num_slots, " + std::to_string(H) + ", 2, " + std::to_string(cfg.sink_tokens) + ", "
            + std::to_string(d) + "]";
        rank(kInSinkPool, 5, want);
        if (!same(in[kInSinkPool].d[1], H) || !same(in[kInSinkPool].d[2], 2)
            || !same(in[kInSinkPool].d[3], cfg.sink_tokens) || !same(in[kInSinkPool].d[4], d))
        {
            bad(kInSinkPool, want);
        }
        s.num_sink_slots = in[kInSinkPool].d[0];
        if (!allowWildcards && s.num_sink_slots < 1) bad(kInSinkPool, want + " with num_slots >= 1");
    }
    if (cfg.recent_tokens > 0)
    {
        std::string const want = "[num_slots, " + std::to_string(H) + ", 2, " + std::to_string(cfg.recent_tokens)
            + ", " + std::to_string(d) + "]";
        rank(kInRecentPool, 5, want);
        if (!same(in[kInRecentPool].d[1], H) || !same(in[kInRecentPool].d[2], 2)
            || !same(in[kInRecentPool].d[3], cfg.recent_tokens) || !same(in[kInRecentPool].d[4], d))
        {
            bad(kInRecentPool, want);
        }
        if (!allowWildcards && in[kInRecentPool].d[0] < 1) bad(kInRecentPool, want + " with num_slots >= 1");
    }
    std::string const hd = "[" + std::to_string(H) + ", " + std::to_string(d) + "]";
    for (int32_t slot : {kInKMean, kInKSmooth, kInVMean, kInVSmooth})
    {
        rank(slot, 2, hd);
        if (!same(in[slot].d[0], H) || !same(in[slot].d[1], d)) bad(slot, hd);
    }
    for (int32_t slot : {kInKClip, kInVClip})
    {
        rank(slot, 1, "[" + std::to_string(H) + "]");
        if (!same(in[slot].d[0], H)) bad(slot, "[" + std::to_string(H) + "]");
    }
    rank(kInSigns, 1, "[" + std::to_string(d) + "]");
    if (!same(in[kInSigns].d[0], d)) bad(kInSigns, "[" + std::to_string(d) + "]");

    if (!allowWildcards && s.num_tokens < s.batch)
    {
        throw ConfigError("qkv has " + std::to_string(s.num_tokens) + " token rows for a batch of "
            + std::to_string(s.batch) + " requests; every request adds at least one token");
    }
    Shape const& o = out[kOutContext];
    if (o.nbDims != 2 || !same(o.d[0], s.num_tokens) || !same(o.d[1], outputInnerDim(cfg)))
    {
        throw ConfigError("output has shape " + shapeText(o) + "; expected [num_tokens, num_q_heads * head_dim = "
            + std::to_string(outputInnerDim(cfg)) + "]");
    }
    s.decode_only = s.num_tokens >= 0 && s.num_tokens == s.batch;
    return s;
}

WorkspaceLayout workspaceLayout(int64_t maxBatch, size_t kernelScratchBytes)
{
    if (maxBatch < 1)
    {
        throw ConfigError("the profile's maximum batch (seq_lens dimension 0) must be >= 1, got "
            + std::to_string(maxBatch));
    }
    WorkspaceLayout w;
    w.q_lens_offset = 0;
    w.scratch_offset = static_cast<size_t>(alignUp(maxBatch * static_cast<int64_t>(sizeof(int32_t)), kWorkspaceAlign));
    w.scratch_bytes = kernelScratchBytes;
    w.total_bytes = w.scratch_offset + static_cast<size_t>(alignUp(static_cast<int64_t>(kernelScratchBytes), kWorkspaceAlign));
    return w;
}

} // namespace core
} // namespace turboquant
