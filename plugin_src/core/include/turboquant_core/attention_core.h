// TensorRT-independent logic of the TurboQuant attention plugin.
//
// Everything the TensorRT adapter (plugin_src/tensorrt) decides at build time or checks at run
// time lives here, in plain C++17 with no TensorRT or CUDA header, so that it is compiled and
// unit-tested on any machine: the plugin's field list and its parsing/validation, the
// serialization of fields, the tensor slots, the supported type/format combinations, output
// shapes and types, the per-step shape checks and the workspace size.
//
// The enums below use the same numeric values as TensorRT's nvinfer1::PluginFieldType and
// nvinfer1::DataType; the adapter static_asserts that they agree.
#pragma once

#include "turboquant/format.h"
#include "turboquant/kernel_support.h"

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace turboquant
{
namespace core
{

// Versioned plugin identity. Bump kPluginVersion when the field list, the inputs or their meaning
// change; kFormatVersion follows docs/format.md (FORMAT_VERSION).
constexpr char const* kPluginName = "TurboQuantAttention";
constexpr char const* kPluginVersion = "1";
constexpr char const* kPluginNamespace = "turboquant";

// The format's constants come from the kernels' header (plugin_src/include/turboquant/format.h).
constexpr int32_t kFormatVersion = ::turboquant::kFormatVersion;
constexpr int32_t kMaxSinkTokens = ::turboquant::kMaxSinkTokens;
constexpr int32_t kMaxTokensPerBlock = ::turboquant::kMaxTokensPerBlock;
constexpr int32_t kAlign = ::turboquant::kArrayAlign;
constexpr int32_t kMaxKvHeads = ::turboquant::kMaxKvHeads;

// Same values as nvinfer1::PluginFieldType.
enum class FieldType : int32_t
{
    kFLOAT32 = 1,
    kINT32 = 5,
    kCHAR = 6,
    kINT64 = 10,
};

// Same values as nvinfer1::DataType (the subset the plugin names).
enum class DataType : int32_t
{
    kFLOAT = 0,
    kHALF = 1,
    kINT8 = 2,
    kINT32 = 3,
    kBOOL = 4,
    kUINT8 = 5,
    kFP8 = 6,
    kBF16 = 7,
    kINT64 = 8,
};

// kTurbo = 0 (Lloyd-Max codebook on the rotated vector), kUniform = 1 (reference only).
using ::turboquant::QuantKind;

// Input tensor slots of the plugin, in order. docs/plugin.md documents each one.
enum InputSlot : int32_t
{
    kInQkv = 0,       // [N, (Hq + 2H) * d] fp16|bf16  current tokens, post-RoPE, q heads | k heads | v heads
    kInSeqLens,       // [B] int32  KV length of each request after this step (past + new)
    kInCtxLens,       // [B] int32  new tokens of each context request in this step
    kInRequestTypes,  // [B] int32  0 = context, 1 = generation (one new token)
    kInBlockTable,    // [B, max_blocks_per_seq] int32  physical block ids
    kInKvPool,        // [num_blocks, block_stride / 4] int32  the paged pool's bytes, written in place
    kInSinkPool,      // [num_slots, H, 2, n_s, d] fp16  sink copies (any fp16 tensor when n_s == 0)
    kInSeqSlots,      // [B] int32  row of sink_pool for each request
    kInKMean,         // [H, d] fp16
    kInKSmooth,       // [H, d] fp16
    kInVMean,         // [H, d] fp16
    kInVSmooth,       // [H, d] fp16
    kInKClip,         // [H] fp16
    kInVClip,         // [H] fp16
    kInSigns,         // [d] fp16  ±1, the rotation's sign vector
    kInRecentPool,    // [num_slots, H, 2, w, d] fp16  recent-token ring (any fp16 tensor when w == 0)
    kNumInputs
};

enum OutputSlot : int32_t
{
    kOutContext = 0,  // [N, Hq * d] same type as qkv
    kNumOutputs
};

char const* inputName(int32_t slot) noexcept;

// A plugin field as TensorRT hands it over (PluginField without the TensorRT type).
struct FieldView
{
    char const* name;
    void const* data;
    FieldType type;
    int32_t length;
};

// One entry of the creator's field list.
struct FieldSpec
{
    char const* name;
    FieldType type;
    int32_t length;   // elements; -1: one per KV head (num_kv_heads)
    bool required;
    char const* meaning;
};

// The field list, in the order getFieldNames() and getFieldsToSerialize() present it.
std::vector<FieldSpec> const& fieldSpecs();

// A user mistake in fields or shapes. The message is one line and says what is allowed.
class ConfigError : public std::runtime_error
{
public:
    explicit ConfigError(std::string const& what)
        : std::runtime_error(what)
    {
    }
};

struct AttentionConfig
{
    int32_t format_version{kFormatVersion};
    int32_t layer_index{0};
    int32_t num_q_heads{0};
    int32_t num_kv_heads{0};
    int32_t head_dim{0};
    int32_t tokens_per_block{0};
    std::vector<int32_t> k_bits; // [num_kv_heads]
    std::vector<int32_t> v_bits; // [num_kv_heads]
    std::vector<int32_t> k_scale_exp; // [num_kv_heads] E of the one-byte K scales, -64..48 (docs/format.md §3.1)
    std::vector<int32_t> v_scale_exp; // [num_kv_heads]; turbo only (uniform keeps fp16 scales)
    QuantKind kind{QuantKind::kTurbo};
    int32_t group_size{0};       // uniform only; 0 = head_dim
    int32_t norm_correction{1};
    int32_t sink_tokens{0};
    int32_t recent_tokens{0};    // w: each request's last w positions also kept in fp16 (docs/format.md §5.2)
    int32_t max_seq_len{0};
    int64_t layer_offset{0};     // bytes from a pool block's start to this layer's part of it
    float softmax_scale{0.F};    // 0: 1 / sqrt(head_dim)
    int32_t num_sms{0};          // multiprocessors the split-K workspace is sized for; 0: resolved
                                 //   from the device when the engine is built (then serialized)

    float effectiveSoftmaxScale() const noexcept;
    int32_t groupSize() const noexcept; // q heads per KV head
    bool operator==(AttentionConfig const& o) const noexcept;
};

// Parses TensorRT's fields (unknown names, wrong types or lengths and missing required fields are
// ConfigErrors) and validates the result.
AttentionConfig parseFields(FieldView const* fields, int32_t nbFields);

// Checks every invariant of docs/format.md and what the kernels implement; throws ConfigError.
void validate(AttentionConfig const& cfg);

// Whether a compiled kernel exists for this combination: forwards to the kernels' single list
// (turboquant::isSupported in kernel_support.h).
bool isSupported(QuantKind kind, int32_t head_dim, int32_t k_bits, int32_t v_bits) noexcept;
std::string supportedCombinationsText();

// The kernels' description of this layer (format + block layout), for the launchers.
::turboquant::KvLayerDesc toLayerDesc(AttentionConfig const& cfg);

// Fields of a config, in fieldSpecs() order, with storage owned by this object.
class SerializedFields
{
public:
    explicit SerializedFields(AttentionConfig const& cfg);
    SerializedFields(SerializedFields const&) = delete;
    SerializedFields& operator=(SerializedFields const&) = delete;
    FieldView const* data() const noexcept { return mViews.data(); }
    int32_t size() const noexcept { return static_cast<int32_t>(mViews.size()); }

private:
    AttentionConfig mCfg; // the views point into this copy
    std::vector<int32_t> mInts;
    std::vector<FieldView> mViews;
};

// Byte offsets of one layer's block (docs/format.md §5).
struct BlockLayout
{
    std::vector<int64_t> k_codes, v_codes, k_meta, v_meta; // [num_kv_heads], from the block start
    int64_t block_bytes{0};
};
int32_t codeBytes(int32_t head_dim, int32_t bits) noexcept;
int32_t metaBytes(AttentionConfig const& cfg) noexcept;
BlockLayout blockLayout(AttentionConfig const& cfg);

// supportsFormatCombination(): type/format of slot `pos` (inputs then outputs) given the slots
// before it. `linear` says whether each tensor is in TensorRT's kLINEAR format.
bool supportsFormatCombination(
    int32_t pos, DataType const* types, bool const* linear, int32_t nbInputs, int32_t nbOutputs) noexcept;

DataType outputDataType(DataType qkvType);

// Output shape rule: [qkv.dims[0], num_q_heads * head_dim].
int64_t outputInnerDim(AttentionConfig const& cfg) noexcept;
int64_t qkvInnerDim(AttentionConfig const& cfg) noexcept;

constexpr int32_t kMaxDims = 8;
struct Shape
{
    int32_t nbDims{0};
    int64_t d[kMaxDims]{};
};

// What one enqueue needs to know, from the concrete shapes.
struct StepShape
{
    int64_t num_tokens{0};          // N
    int64_t batch{0};               // B
    int64_t max_blocks_per_seq{0};
    int64_t num_blocks{0};
    int64_t block_stride{0};        // bytes
    int64_t num_sink_slots{0};
    bool decode_only{false};        // N == B: every request adds exactly one token
};

// Checks input/output shapes against the config. With allowWildcards, -1 dims (build phase) are
// accepted wherever they appear. Throws ConfigError naming the input and what was expected.
StepShape checkShapes(AttentionConfig const& cfg, Shape const* inputs, int32_t nbInputs, Shape const* outputs,
    int32_t nbOutputs, bool allowWildcards);

// The plugin's workspace: the kernels' scratch (split-K partials of decode attention, or the
// context path's scratch, whichever is larger) after a small area for per-request metadata.
struct WorkspaceLayout
{
    size_t q_lens_offset{0}; // [max_batch] int32 new tokens per request (context path)
    size_t scratch_offset{0};
    size_t scratch_bytes{0};
    size_t total_bytes{0};
};
constexpr size_t kWorkspaceAlign = 256;
WorkspaceLayout workspaceLayout(int64_t maxBatch, size_t kernelScratchBytes);

} // namespace core
} // namespace turboquant
