#include "turboquant_attention_plugin.h"

#include "attention_launch.h"
#include "plugin_logging.h"

#include <cstring>
#include <exception>
#include <new>

namespace turboquant
{
namespace trt
{

using namespace nvinfer1;

// The core mirrors TensorRT's enum values so that conversions are plain casts.
static_assert(static_cast<int32_t>(core::FieldType::kFLOAT32) == static_cast<int32_t>(PluginFieldType::kFLOAT32), "");
static_assert(static_cast<int32_t>(core::FieldType::kINT32) == static_cast<int32_t>(PluginFieldType::kINT32), "");
static_assert(static_cast<int32_t>(core::FieldType::kCHAR) == static_cast<int32_t>(PluginFieldType::kCHAR), "");
static_assert(static_cast<int32_t>(core::FieldType::kINT64) == static_cast<int32_t>(PluginFieldType::kINT64), "");
static_assert(static_cast<int32_t>(core::DataType::kFLOAT) == static_cast<int32_t>(DataType::kFLOAT), "");
static_assert(static_cast<int32_t>(core::DataType::kHALF) == static_cast<int32_t>(DataType::kHALF), "");
static_assert(static_cast<int32_t>(core::DataType::kINT8) == static_cast<int32_t>(DataType::kINT8), "");
static_assert(static_cast<int32_t>(core::DataType::kINT32) == static_cast<int32_t>(DataType::kINT32), "");
static_assert(static_cast<int32_t>(core::DataType::kBOOL) == static_cast<int32_t>(DataType::kBOOL), "");
static_assert(static_cast<int32_t>(core::DataType::kUINT8) == static_cast<int32_t>(DataType::kUINT8), "");
static_assert(static_cast<int32_t>(core::DataType::kFP8) == static_cast<int32_t>(DataType::kFP8), "");
static_assert(static_cast<int32_t>(core::DataType::kBF16) == static_cast<int32_t>(DataType::kBF16), "");
static_assert(static_cast<int32_t>(core::DataType::kINT64) == static_cast<int32_t>(DataType::kINT64), "");
static_assert(core::kMaxDims >= Dims::MAX_DIMS, "core::Shape must hold every TensorRT Dims");

namespace
{

core::DataType toCore(DataType t)
{
    return static_cast<core::DataType>(static_cast<int32_t>(t));
}

core::Shape toCore(Dims const& d)
{
    core::Shape s;
    s.nbDims = d.nbDims;
    for (int32_t i = 0; i < d.nbDims && i < core::kMaxDims; ++i)
    {
        s.d[i] = d.d[i];
    }
    return s;
}

std::string where(char const* method)
{
    return std::string(core::kPluginName) + "::" + method + ": ";
}

// Runs f; on an exception logs it with the method's name and returns onError.
template <typename R, typename F>
R guarded(char const* method, R onError, F&& f) noexcept
{
    try
    {
        return f();
    }
    catch (core::ConfigError const& e)
    {
        logError(where(method) + e.what());
    }
    catch (std::bad_alloc const&)
    {
        logError(where(method) + "out of host memory");
    }
    catch (std::exception const& e)
    {
        logError(where(method) + "internal error: " + e.what());
    }
    catch (...)
    {
        logError(where(method) + "unknown exception");
    }
    return onError;
}

} // namespace

// ---------------------------------------------------------------------------------------------
// Plugin
// ---------------------------------------------------------------------------------------------

TurboQuantAttentionPlugin::TurboQuantAttentionPlugin(core::AttentionConfig cfg)
    : mCfg(std::move(cfg))
{
    core::validate(mCfg);
    mLayer = core::toLayerDesc(mCfg);
}

int32_t TurboQuantAttentionPlugin::resolvedSms() const
{
    return mCfg.num_sms > 0 ? mCfg.num_sms : currentDeviceSms();
}

IPluginCapability* TurboQuantAttentionPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    return guarded("getCapabilityInterface", static_cast<IPluginCapability*>(nullptr), [&]() -> IPluginCapability* {
        switch (type)
        {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    });
}

IPluginV3* TurboQuantAttentionPlugin::clone() noexcept
{
    return guarded("clone", static_cast<IPluginV3*>(nullptr), [&]() -> IPluginV3* {
        std::unique_ptr<TurboQuantAttentionPlugin> p(new TurboQuantAttentionPlugin(mCfg));
        p->mStep = mStep;
        p->mStepValid = mStepValid;
        p->mActType = mActType;
        if (mStepValid && mStep.decode_only)
        {
            p->mCounters.ensure(decodeStepCounters(mCfg, mStep.batch)); // its own, for an enqueue without a shape change
        }
        return p.release();
    });
}

char const* TurboQuantAttentionPlugin::getPluginName() const noexcept
{
    return core::kPluginName;
}

char const* TurboQuantAttentionPlugin::getPluginVersion() const noexcept
{
    return core::kPluginVersion;
}

char const* TurboQuantAttentionPlugin::getPluginNamespace() const noexcept
{
    return core::kPluginNamespace;
}

int32_t TurboQuantAttentionPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    return guarded("configurePlugin", int32_t{-1}, [&]() {
        if (in == nullptr || out == nullptr)
        {
            throw core::ConfigError("null tensor descriptions");
        }
        std::vector<core::Shape> inShapes(static_cast<size_t>(nbInputs > 0 ? nbInputs : 0));
        std::vector<core::Shape> outShapes(static_cast<size_t>(nbOutputs > 0 ? nbOutputs : 0));
        for (int32_t i = 0; i < nbInputs; ++i) inShapes[i] = toCore(in[i].desc.dims);
        for (int32_t i = 0; i < nbOutputs; ++i) outShapes[i] = toCore(out[i].desc.dims);
        core::checkShapes(mCfg, inShapes.data(), nbInputs, outShapes.data(), nbOutputs, /*allowWildcards=*/true);
        mActType = core::outputDataType(toCore(in[core::kInQkv].desc.type));
        // The split-K workspace is sized for the build GPU's SM count; serializing it keeps the
        // runtime's split count (and so its scratch) within what the engine reserved.
        if (mCfg.num_sms == 0)
        {
            mCfg.num_sms = currentDeviceSms();
        }
        return int32_t{0};
    });
}

int32_t TurboQuantAttentionPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    return guarded("getOutputDataTypes", int32_t{-1}, [&]() {
        if (nbOutputs != core::kNumOutputs || nbInputs != core::kNumInputs || !outputTypes || !inputTypes)
        {
            throw core::ConfigError("expected " + std::to_string(core::kNumInputs) + " inputs and 1 output");
        }
        outputTypes[core::kOutContext]
            = static_cast<DataType>(static_cast<int32_t>(core::outputDataType(toCore(inputTypes[core::kInQkv]))));
        return int32_t{0};
    });
}

int32_t TurboQuantAttentionPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    IExprBuilder& exprBuilder) noexcept
{
    return guarded("getOutputShapes", int32_t{-1}, [&]() {
        if (nbInputs != core::kNumInputs || nbOutputs != core::kNumOutputs || !inputs || !outputs)
        {
            throw core::ConfigError("expected " + std::to_string(core::kNumInputs) + " inputs and 1 output, got "
                + std::to_string(nbInputs) + " and " + std::to_string(nbOutputs));
        }
        if (inputs[core::kInQkv].nbDims != 2)
        {
            throw core::ConfigError("input qkv must have rank 2 [num_tokens, (Hq + 2H) * d]");
        }
        // [num_tokens, num_q_heads * head_dim]
        outputs[core::kOutContext].nbDims = 2;
        outputs[core::kOutContext].d[0] = inputs[core::kInQkv].d[0];
        outputs[core::kOutContext].d[1] = exprBuilder.constant(core::outputInnerDim(mCfg));
        return int32_t{0};
    });
}

bool TurboQuantAttentionPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    return guarded("supportsFormatCombination", false, [&]() {
        int32_t const n = nbInputs + nbOutputs;
        if (!inOut || n <= 0 || pos < 0 || pos >= n)
        {
            return false;
        }
        std::vector<core::DataType> types(static_cast<size_t>(n));
        std::unique_ptr<bool[]> linear(new bool[static_cast<size_t>(n)]);
        for (int32_t i = 0; i < n; ++i)
        {
            types[i] = toCore(inOut[i].desc.type);
            linear[i] = inOut[i].desc.format == TensorFormat::kLINEAR;
        }
        return core::supportsFormatCombination(pos, types.data(), linear.get(), nbInputs, nbOutputs);
    });
}

int32_t TurboQuantAttentionPlugin::getNbOutputs() const noexcept
{
    return core::kNumOutputs;
}

size_t TurboQuantAttentionPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    return guarded("getWorkspaceSize", size_t{0}, [&]() {
        if (!inputs || nbInputs != core::kNumInputs)
        {
            throw core::ConfigError("expected " + std::to_string(core::kNumInputs) + " inputs");
        }
        // Upper bounds of the profile: the runtime step never exceeds them.
        int64_t const maxTokens = inputs[core::kInQkv].max.d[0];
        int64_t const maxBatch = inputs[core::kInSeqLens].max.d[0];
        return stepWorkspaceBytes(mCfg, maxTokens, maxBatch, resolvedSms());
    });
}

int32_t TurboQuantAttentionPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    mStepValid = false;
    return guarded("onShapeChange", int32_t{-1}, [&]() {
        if (!in || !out || nbInputs != core::kNumInputs || nbOutputs != core::kNumOutputs)
        {
            throw core::ConfigError("expected " + std::to_string(core::kNumInputs) + " inputs and 1 output");
        }
        core::Shape inShapes[core::kNumInputs];
        core::Shape outShapes[core::kNumOutputs];
        std::vector<core::DataType> types(core::kNumInputs + core::kNumOutputs);
        std::unique_ptr<bool[]> linear(new bool[core::kNumInputs + core::kNumOutputs]);
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            inShapes[i] = toCore(in[i].dims);
            types[i] = toCore(in[i].type);
            linear[i] = in[i].format == TensorFormat::kLINEAR;
        }
        outShapes[0] = toCore(out[0].dims);
        types[core::kNumInputs] = toCore(out[0].type);
        linear[core::kNumInputs] = out[0].format == TensorFormat::kLINEAR;
        for (int32_t pos = 0; pos < nbInputs + nbOutputs; ++pos)
        {
            if (!core::supportsFormatCombination(pos, types.data(), linear.get(), nbInputs, nbOutputs))
            {
                throw core::ConfigError(std::string("unsupported type or format for ")
                    + (pos < nbInputs ? std::string("input ") + core::inputName(pos) : std::string("the output")));
            }
        }
        core::StepShape const step = core::checkShapes(mCfg, inShapes, nbInputs, outShapes, nbOutputs, /*allowWildcards=*/false);
        if (step.decode_only)
        {
            mCounters.ensure(decodeStepCounters(mCfg, step.batch)); // here, not in enqueue (a graph capture)
        }
        mStep = step;
        mActType = types[core::kInQkv];
        mStepValid = true;
        return int32_t{0};
    });
}

int32_t TurboQuantAttentionPlugin::enqueue(PluginTensorDesc const* /*inputDesc*/,
    PluginTensorDesc const* /*outputDesc*/, void const* const* inputs, void* const* outputs, void* workspace,
    cudaStream_t stream) noexcept
{
    return guarded("enqueue", int32_t{-1}, [&]() {
        if (!mStepValid)
        {
            throw core::ConfigError("enqueue without a successful onShapeChange");
        }
        if (!inputs || !outputs)
        {
            throw core::ConfigError("null input or output pointer array");
        }
        StepBuffers b{};
        b.qkv = inputs[core::kInQkv];
        b.seq_lens = static_cast<int32_t const*>(inputs[core::kInSeqLens]);
        b.ctx_lens = static_cast<int32_t const*>(inputs[core::kInCtxLens]);
        b.request_types = static_cast<int32_t const*>(inputs[core::kInRequestTypes]);
        b.block_table = static_cast<int32_t const*>(inputs[core::kInBlockTable]);
        // The pool and the sink pool are written in place (docs/plugin.md, "KV pool").
        b.kv_pool = static_cast<uint8_t*>(const_cast<void*>(inputs[core::kInKvPool]));
        b.sink_pool = const_cast<void*>(inputs[core::kInSinkPool]);
        b.seq_slots = static_cast<int32_t const*>(inputs[core::kInSeqSlots]);
        b.k_mean = inputs[core::kInKMean];
        b.k_smooth = inputs[core::kInKSmooth];
        b.v_mean = inputs[core::kInVMean];
        b.v_smooth = inputs[core::kInVSmooth];
        b.k_clip = inputs[core::kInKClip];
        b.v_clip = inputs[core::kInVClip];
        b.signs = inputs[core::kInSigns];
        b.recent_pool = const_cast<void*>(inputs[core::kInRecentPool]);
        b.out = outputs[core::kOutContext];
        b.workspace = workspace;
        b.finish_counters = mCounters.get();
        if (mCfg.num_sms == 0)
        {
            mCfg.num_sms = currentDeviceSms(); // plugin created without a build phase
        }
        cudaError_t const err = launchAttentionStep(mCfg, mLayer, mStep, mActType, mCfg.num_sms, b, stream);
        if (err != cudaSuccess)
        {
            logError(where("enqueue") + "layer " + std::to_string(mCfg.layer_index) + ": kernel launch failed: "
                + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
            return int32_t{-1};
        }
        return int32_t{0};
    });
}

IPluginV3* TurboQuantAttentionPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    // No per-context resources: every execution context gets its own copy.
    return clone();
}

PluginFieldCollection const* TurboQuantAttentionPlugin::getFieldsToSerialize() noexcept
{
    return guarded("getFieldsToSerialize", static_cast<PluginFieldCollection const*>(nullptr), [&]() {
        mSerialized.reset(new core::SerializedFields(mCfg));
        mFields.clear();
        for (int32_t i = 0; i < mSerialized->size(); ++i)
        {
            core::FieldView const& f = mSerialized->data()[i];
            mFields.emplace_back(f.name, f.data, static_cast<PluginFieldType>(static_cast<int32_t>(f.type)), f.length);
        }
        mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
        mFieldCollection.fields = mFields.data();
        return static_cast<PluginFieldCollection const*>(&mFieldCollection);
    });
}

// ---------------------------------------------------------------------------------------------
// Creator
// ---------------------------------------------------------------------------------------------

TurboQuantAttentionCreator::TurboQuantAttentionCreator()
{
    for (auto const& s : core::fieldSpecs())
    {
        // Length 0 marks a per-KV-head field whose length is only known from num_kv_heads.
        mFieldNames.emplace_back(
            s.name, nullptr, static_cast<PluginFieldType>(static_cast<int32_t>(s.type)), s.length >= 0 ? s.length : 0);
    }
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

char const* TurboQuantAttentionCreator::getPluginName() const noexcept
{
    return core::kPluginName;
}

char const* TurboQuantAttentionCreator::getPluginVersion() const noexcept
{
    return core::kPluginVersion;
}

char const* TurboQuantAttentionCreator::getPluginNamespace() const noexcept
{
    return core::kPluginNamespace;
}

PluginFieldCollection const* TurboQuantAttentionCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

IPluginV3* TurboQuantAttentionCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    return guarded("createPlugin", static_cast<IPluginV3*>(nullptr), [&]() -> IPluginV3* {
        if (fc == nullptr)
        {
            throw core::ConfigError("no field collection");
        }
        std::vector<core::FieldView> views;
        views.reserve(static_cast<size_t>(fc->nbFields > 0 ? fc->nbFields : 0));
        for (int32_t i = 0; i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            views.push_back(core::FieldView{
                f.name, f.data, static_cast<core::FieldType>(static_cast<int32_t>(f.type)), f.length});
        }
        try
        {
            return new TurboQuantAttentionPlugin(core::parseFields(views.data(), static_cast<int32_t>(views.size())));
        }
        catch (core::ConfigError const& e)
        {
            throw core::ConfigError(std::string("layer '") + (name ? name : "?") + "': " + e.what());
        }
    });
}

} // namespace trt
} // namespace turboquant
