// GPU harness for the TurboQuant TensorRT plugin library, with no TensorRT runtime.
//
// It does what TensorRT does with a plugin library, through the same public interfaces:
//   1. dlopen()s the library, looks up setLoggerFinder and getCreators with dlsym, hands over a
//      logger finder, finds the TurboQuantAttention creator by name, version and namespace;
//   2. creates the plugin from the case's fields in the build phase, takes getFieldsToSerialize(),
//      creates a second plugin from those fields in the runtime phase (as deserialization does)
//      and checks that it serializes to the same fields (the round trip);
//   3. checks that invalid fields are refused with a logged error, not a crash;
//   4. attachToContext(), then for each step: onShapeChange() and enqueue() on device buffers.
//
// Usage: plugin_harness LIBRARY CASE_DIR OUT_DIR
// CASE_DIR/case.txt (written by tests/test_plugin_harness_gpu.py) lists fields, static tensors
// (uploaded once, kept across steps: the KV, sink and recent pools are written in place) and steps
// (per-step tensors). Tensors are raw little-endian files. OUT_DIR receives out_<step>.bin per
// step and kv_pool.bin / sink_pool.bin / recent_pool.bin after the last step. Exit status 0 only if every check
// passed; each failure prints a line starting with "FAIL".
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

int gFailures = 0;
constexpr int kInputs = 16; // the plugin's input slots (docs/plugin.md §2)

void fail(std::string const& msg)
{
    ++gFailures;
    std::printf("FAIL %s\n", msg.c_str());
    std::fflush(stdout);
}

#define CUDA_OK(call)                                                                                                  \
    do                                                                                                                 \
    {                                                                                                                  \
        cudaError_t e_ = (call);                                                                                       \
        if (e_ != cudaSuccess)                                                                                         \
        {                                                                                                              \
            std::printf("FAIL %s: %s\n", #call, cudaGetErrorString(e_));                                               \
            std::exit(2);                                                                                              \
        }                                                                                                              \
    } while (0)

class HarnessLogger : public ILogger
{
public:
    void log(Severity severity, char const* msg) noexcept override
    {
        std::printf("[trt-log %d] %s\n", static_cast<int>(severity), msg);
        if (severity <= Severity::kERROR)
        {
            errors.push_back(msg);
        }
    }
    std::vector<std::string> errors;
};

class HarnessLoggerFinder : public ILoggerFinder
{
public:
    explicit HarnessLoggerFinder(ILogger* l)
        : mLogger(l)
    {
    }
    ILogger* findLogger() override { return mLogger; }
    ~HarnessLoggerFinder() override = default;

private:
    ILogger* mLogger;
};

class HarnessResourceContext : public IPluginResourceContext
{
public:
    IGpuAllocator* getGpuAllocator() const noexcept override { return nullptr; }
    IErrorRecorder* getErrorRecorder() const noexcept override { return nullptr; }
    ~HarnessResourceContext() noexcept override = default;
};

struct HostField
{
    std::string name;
    PluginFieldType type;
    std::vector<uint8_t> bytes;
    int32_t length;
};

struct TensorSpec
{
    std::string name;
    DataType type;
    Dims dims;
    std::string file;
};

struct Step
{
    int64_t tokens{0};
    int64_t batch{0};
    std::vector<TensorSpec> tensors;
};

size_t elemSize(DataType t)
{
    switch (t)
    {
    case DataType::kHALF:
    case DataType::kBF16: return 2;
    case DataType::kINT32:
    case DataType::kFLOAT: return 4;
    case DataType::kINT64: return 8;
    default: return 1;
    }
}

DataType parseType(std::string const& s)
{
    if (s == "fp16") return DataType::kHALF;
    if (s == "bf16") return DataType::kBF16;
    if (s == "int32") return DataType::kINT32;
    if (s == "fp32") return DataType::kFLOAT;
    throw std::runtime_error("unknown dtype " + s);
}

int64_t volume(Dims const& d)
{
    int64_t v = 1;
    for (int32_t i = 0; i < d.nbDims; ++i) v *= d.d[i];
    return v;
}

std::vector<uint8_t> readFile(std::string const& path)
{
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error("cannot read " + path);
    return std::vector<uint8_t>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void writeFile(std::string const& path, void const* data, size_t n)
{
    std::string const tmp = path + ".tmp";
    {
        std::ofstream f(tmp, std::ios::binary);
        f.write(static_cast<char const*>(data), static_cast<std::streamsize>(n));
        if (!f) throw std::runtime_error("cannot write " + tmp);
    }
    std::rename(tmp.c_str(), path.c_str());
}

TensorSpec readTensor(std::istringstream& ls)
{
    TensorSpec t;
    std::string dtype;
    ls >> t.name >> dtype >> t.dims.nbDims;
    t.type = parseType(dtype);
    for (int32_t i = 0; i < t.dims.nbDims; ++i) ls >> t.dims.d[i];
    ls >> t.file;
    return t;
}

PluginFieldCollection collection(std::vector<HostField> const& fields, std::vector<PluginField>& storage)
{
    storage.clear();
    for (auto const& f : fields) storage.emplace_back(f.name.c_str(), f.bytes.data(), f.type, f.length);
    PluginFieldCollection fc;
    fc.nbFields = static_cast<int32_t>(storage.size());
    fc.fields = storage.data();
    return fc;
}

size_t fieldElem(PluginFieldType t)
{
    return t == PluginFieldType::kINT64 ? 8 : (t == PluginFieldType::kCHAR || t == PluginFieldType::kINT8) ? 1 : 4;
}

// Deep copy of a plugin's serialized fields (the plugin owns the originals).
std::vector<HostField> copyFields(PluginFieldCollection const* fc)
{
    std::vector<HostField> out;
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        HostField h{f.name, f.type, {}, f.length};
        auto const* p = static_cast<uint8_t const*>(f.data);
        h.bytes.assign(p, p + fieldElem(f.type) * static_cast<size_t>(f.length));
        out.push_back(std::move(h));
    }
    return out;
}

bool sameFields(std::vector<HostField> const& a, std::vector<HostField> const& b)
{
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i)
    {
        if (a[i].name != b[i].name || a[i].type != b[i].type || a[i].length != b[i].length || a[i].bytes != b[i].bytes)
            return false;
    }
    return true;
}

template <typename T>
T* capability(IPluginV3* p, PluginCapabilityType t)
{
    return p ? static_cast<T*>(p->getCapabilityInterface(t)) : nullptr;
}

} // namespace

int main(int argc, char** argv)
{
    if (argc != 4)
    {
        std::fprintf(stderr, "usage: %s LIBRARY CASE_DIR OUT_DIR\n", argv[0]);
        return 2;
    }
    std::string const lib = argv[1], caseDir = argv[2], outDir = argv[3];
    try
    {
        // ---- the case -------------------------------------------------------------------
        std::vector<HostField> fields;
        std::vector<TensorSpec> statics;
        std::vector<Step> steps;
        std::string pluginName, pluginVersion, pluginNamespace;
        {
            std::ifstream cf(caseDir + "/case.txt");
            if (!cf) throw std::runtime_error("cannot read " + caseDir + "/case.txt");
            std::string line;
            while (std::getline(cf, line))
            {
                std::istringstream ls(line);
                std::string kw;
                ls >> kw;
                if (kw == "plugin") ls >> pluginName >> pluginVersion >> pluginNamespace;
                else if (kw == "field")
                {
                    HostField f;
                    std::string type;
                    ls >> f.name >> type >> f.length;
                    for (int32_t i = 0; i < f.length; ++i)
                    {
                        if (type == "int32")
                        {
                            int32_t v;
                            ls >> v;
                            f.type = PluginFieldType::kINT32;
                            f.bytes.insert(f.bytes.end(), reinterpret_cast<uint8_t*>(&v), reinterpret_cast<uint8_t*>(&v) + 4);
                        }
                        else if (type == "int64")
                        {
                            long long v;
                            ls >> v;
                            int64_t w = v;
                            f.type = PluginFieldType::kINT64;
                            f.bytes.insert(f.bytes.end(), reinterpret_cast<uint8_t*>(&w), reinterpret_cast<uint8_t*>(&w) + 8);
                        }
                        else if (type == "float32")
                        {
                            float v;
                            ls >> v;
                            f.type = PluginFieldType::kFLOAT32;
                            f.bytes.insert(f.bytes.end(), reinterpret_cast<uint8_t*>(&v), reinterpret_cast<uint8_t*>(&v) + 4);
                        }
                        else throw std::runtime_error("unknown field type " + type);
                    }
                    fields.push_back(std::move(f));
                }
                else if (kw == "static") statics.push_back(readTensor(ls));
                else if (kw == "step")
                {
                    Step s;
                    ls >> s.tokens >> s.batch;
                    steps.push_back(s);
                }
                else if (kw == "tensor") steps.back().tensors.push_back(readTensor(ls));
            }
        }

        // ---- load the library as TensorRT does ----------------------------------------------
        void* handle = dlopen(lib.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!handle)
        {
            fail(std::string("dlopen: ") + dlerror());
            return 1;
        }
        using SetLoggerFinderFn = void (*)(ILoggerFinder*);
        using GetCreatorsFn = IPluginCreatorInterface* const* (*) (int32_t&);
        auto setLoggerFinder = reinterpret_cast<SetLoggerFinderFn>(dlsym(handle, "setLoggerFinder"));
        auto getCreators = reinterpret_cast<GetCreatorsFn>(dlsym(handle, "getCreators"));
        if (!setLoggerFinder || !getCreators)
        {
            fail("library does not export setLoggerFinder and getCreators");
            return 1;
        }
        HarnessLogger logger;
        HarnessLoggerFinder finder(&logger);
        setLoggerFinder(&finder);
        int32_t nbCreators = 0;
        IPluginCreatorInterface* const* creators = getCreators(nbCreators);
        IPluginCreatorV3One* creator = nullptr;
        for (int32_t i = 0; i < nbCreators; ++i)
        {
            if (std::string(creators[i]->getInterfaceInfo().kind) != "PLUGIN CREATOR_V3ONE") continue;
            auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
            if (pluginName == c->getPluginName() && pluginVersion == c->getPluginVersion()
                && pluginNamespace == c->getPluginNamespace())
                creator = c;
        }
        if (!creator)
        {
            fail("no creator " + pluginNamespace + "::" + pluginName + " version " + pluginVersion);
            return 1;
        }
        std::printf("creator %s::%s v%s, %d creator(s)\n", creator->getPluginNamespace(), creator->getPluginName(),
            creator->getPluginVersion(), nbCreators);

        // Every field the case passes is in the creator's field list.
        PluginFieldCollection const* names = creator->getFieldNames();
        for (auto const& f : fields)
        {
            bool found = false;
            for (int32_t i = 0; i < names->nbFields; ++i)
                found |= (f.name == names->fields[i].name && f.type == names->fields[i].type);
            if (!found) fail("field " + f.name + " missing from getFieldNames()");
        }

        // ---- build phase: create, serialize ------------------------------------------------
        std::vector<PluginField> storage;
        PluginFieldCollection fc = collection(fields, storage);
        std::unique_ptr<IPluginV3> built(creator->createPlugin("harness_layer", &fc, TensorRTPhase::kBUILD));
        if (!built)
        {
            fail("createPlugin(kBUILD) returned null");
            return 1;
        }
        auto* core = capability<IPluginV3OneCore>(built.get(), PluginCapabilityType::kCORE);
        auto* build = capability<IPluginV3OneBuild>(built.get(), PluginCapabilityType::kBUILD);
        auto* rtBuilt = capability<IPluginV3OneRuntime>(built.get(), PluginCapabilityType::kRUNTIME);
        if (!core || !build || !rtBuilt)
        {
            fail("missing capability interface");
            return 1;
        }
        if (pluginName != core->getPluginName()) fail("plugin name differs from creator");
        std::vector<HostField> const serialized = copyFields(rtBuilt->getFieldsToSerialize());
        // The serialized fields are the creator's field list, in its order.
        if (static_cast<int32_t>(serialized.size()) != names->nbFields) fail("serialized field count != getFieldNames()");
        for (size_t i = 0; i < serialized.size() && static_cast<int32_t>(i) < names->nbFields; ++i)
            if (serialized[i].name != names->fields[i].name) fail("serialized field order differs at " + serialized[i].name);
        // Every field given has the value given.
        for (auto const& f : fields)
        {
            bool ok = false;
            for (auto const& s : serialized) ok |= (s.name == f.name && s.bytes == f.bytes);
            if (!ok) fail("serialized value of " + f.name + " differs from the value given");
        }
        DataType outType{};
        DataType inTypes[kInputs];
        for (auto& t : inTypes) t = DataType::kINT32;
        inTypes[0] = DataType::kHALF;
        if (build->getNbOutputs() != 1) fail("getNbOutputs != 1");
        if (build->getOutputDataTypes(&outType, 1, inTypes, kInputs) != 0 || outType != DataType::kHALF)
            fail("getOutputDataTypes(fp16 qkv) is not fp16");

        // ---- runtime phase: recreate from the serialized fields (deserialization) --------------
        std::vector<PluginField> storage2;
        PluginFieldCollection fc2 = collection(serialized, storage2);
        std::unique_ptr<IPluginV3> runtimePlugin(creator->createPlugin("harness_layer", &fc2, TensorRTPhase::kRUNTIME));
        if (!runtimePlugin)
        {
            fail("createPlugin(kRUNTIME) from serialized fields returned null");
            return 1;
        }
        auto* rt0 = capability<IPluginV3OneRuntime>(runtimePlugin.get(), PluginCapabilityType::kRUNTIME);
        if (!sameFields(copyFields(rt0->getFieldsToSerialize()), serialized))
            fail("round trip plugin -> fields -> plugin -> fields changed the fields");
        else
            std::printf("field round trip: %zu fields identical\n", serialized.size());
        std::unique_ptr<IPluginV3> cloned(runtimePlugin->clone());
        if (!cloned || !sameFields(copyFields(capability<IPluginV3OneRuntime>(cloned.get(), PluginCapabilityType::kRUNTIME)
                                                   ->getFieldsToSerialize()),
                           serialized))
            fail("clone() changed the fields");

        // Invalid fields: refused with an error through the logger, no crash.
        {
            std::vector<HostField> bad = serialized;
            for (auto& f : bad)
                if (f.name == "head_dim")
                {
                    int32_t const v = 96;
                    std::memcpy(f.bytes.data(), &v, 4);
                }
            std::vector<PluginField> st;
            PluginFieldCollection bfc = collection(bad, st);
            size_t const before = logger.errors.size();
            std::unique_ptr<IPluginV3> p(creator->createPlugin("bad_layer", &bfc, TensorRTPhase::kRUNTIME));
            if (p) fail("createPlugin accepted head_dim=96");
            if (logger.errors.size() == before || logger.errors.back().find("head_dim=96") == std::string::npos)
                fail("no logged error naming head_dim=96");
        }

        // ---- attach to a context and run the steps --------------------------------------------
        HarnessResourceContext resources;
        std::unique_ptr<IPluginV3> attached(rt0->attachToContext(&resources));
        if (!attached)
        {
            fail("attachToContext returned null");
            return 1;
        }
        auto* rt = capability<IPluginV3OneRuntime>(attached.get(), PluginCapabilityType::kRUNTIME);
        auto* bld = capability<IPluginV3OneBuild>(attached.get(), PluginCapabilityType::kBUILD);

        static char const* const kSlots[kInputs] = {"qkv", "seq_lens", "ctx_lens", "request_types", "block_table",
            "kv_pool", "sink_pool", "seq_slots", "k_mean", "k_smooth", "v_mean", "v_smooth", "k_clip", "v_clip", "signs",
            "recent_pool"};
        auto slotOf = [&](std::string const& n) {
            for (int i = 0; i < kInputs; ++i)
                if (n == kSlots[i]) return i;
            throw std::runtime_error("unknown tensor " + n);
        };
        std::map<int, std::pair<TensorSpec, void*>> staticDev;
        for (auto const& t : statics)
        {
            auto host = readFile(caseDir + "/" + t.file);
            if (host.size() != static_cast<size_t>(volume(t.dims)) * elemSize(t.type))
                throw std::runtime_error("size of " + t.file + " does not match its shape");
            void* d = nullptr;
            CUDA_OK(cudaMalloc(&d, host.size()));
            CUDA_OK(cudaMemcpy(d, host.data(), host.size(), cudaMemcpyHostToDevice));
            staticDev[slotOf(t.name)] = {t, d};
        }
        // Workspace for the largest step, asked through getWorkspaceSize with max dims.
        DynamicPluginTensorDesc dyn[kInputs], dynOut[1];
        std::memset(dyn, 0, sizeof(dyn));
        std::memset(dynOut, 0, sizeof(dynOut));
        int64_t maxTokens = 0, maxBatch = 0;
        for (auto const& s : steps)
        {
            maxTokens = std::max(maxTokens, s.tokens);
            maxBatch = std::max(maxBatch, s.batch);
        }
        dyn[0].max.nbDims = 2;
        dyn[0].max.d[0] = maxTokens;
        dyn[1].max.nbDims = 1;
        dyn[1].max.d[0] = maxBatch;
        size_t const wsBytes = bld->getWorkspaceSize(dyn, kInputs, dynOut, 1);
        void* workspace = nullptr;
        if (wsBytes) CUDA_OK(cudaMalloc(&workspace, wsBytes));
        std::printf("workspace %zu bytes for <= %lld tokens, <= %lld requests\n", wsBytes,
            static_cast<long long>(maxTokens), static_cast<long long>(maxBatch));

        cudaStream_t stream;
        CUDA_OK(cudaStreamCreate(&stream));
        for (size_t si = 0; si < steps.size(); ++si)
        {
            Step const& s = steps[si];
            PluginTensorDesc in[kInputs], out[1];
            void const* inPtrs[kInputs] = {};
            std::vector<void*> stepAllocs;
            for (auto const& kv : staticDev)
            {
                in[kv.first] = PluginTensorDesc{kv.second.first.dims, kv.second.first.type, TensorFormat::kLINEAR, -1.F};
                inPtrs[kv.first] = kv.second.second;
            }
            for (auto const& t : s.tensors)
            {
                auto host = readFile(caseDir + "/" + t.file);
                if (host.size() != static_cast<size_t>(volume(t.dims)) * elemSize(t.type))
                    throw std::runtime_error("size of " + t.file + " does not match its shape");
                void* d = nullptr;
                CUDA_OK(cudaMalloc(&d, host.size()));
                CUDA_OK(cudaMemcpy(d, host.data(), host.size(), cudaMemcpyHostToDevice));
                stepAllocs.push_back(d);
                int const slot = slotOf(t.name);
                in[slot] = PluginTensorDesc{t.dims, t.type, TensorFormat::kLINEAR, -1.F};
                inPtrs[slot] = d;
            }
            for (int i = 0; i < kInputs; ++i)
                if (!inPtrs[i]) throw std::runtime_error(std::string("step lacks tensor ") + kSlots[i]);
            int32_t hq = 0, hd = 0;
            for (auto const& f : serialized)
            {
                if (f.name == "num_q_heads") std::memcpy(&hq, f.bytes.data(), 4);
                if (f.name == "head_dim") std::memcpy(&hd, f.bytes.data(), 4);
            }
            Dims od;
            od.nbDims = 2;
            od.d[0] = s.tokens;
            od.d[1] = static_cast<int64_t>(hq) * hd;
            out[0] = PluginTensorDesc{od, in[0].type, TensorFormat::kLINEAR, -1.F};
            size_t const outBytes = static_cast<size_t>(volume(od)) * elemSize(in[0].type);
            void* dOut = nullptr;
            CUDA_OK(cudaMalloc(&dOut, outBytes));
            CUDA_OK(cudaMemset(dOut, 0xFF, outBytes)); // poison: fp16/bf16 NaN everywhere
            if (wsBytes) CUDA_OK(cudaMemset(workspace, 0xFF, wsBytes));
            if (rt->onShapeChange(in, kInputs, out, 1) != 0)
            {
                fail("onShapeChange failed at step " + std::to_string(si));
                return 1;
            }
            void* outPtrs[1] = {dOut};
            if (rt->enqueue(in, out, inPtrs, outPtrs, workspace, stream) != 0)
            {
                fail("enqueue failed at step " + std::to_string(si));
                return 1;
            }
            CUDA_OK(cudaStreamSynchronize(stream));
            CUDA_OK(cudaGetLastError());
            std::vector<uint8_t> host(outBytes);
            CUDA_OK(cudaMemcpy(host.data(), dOut, outBytes, cudaMemcpyDeviceToHost));
            writeFile(outDir + "/out_" + std::to_string(si) + ".bin", host.data(), host.size());
            std::printf("step %zu: %lld tokens, %lld requests: enqueue ok\n", si, static_cast<long long>(s.tokens),
                static_cast<long long>(s.batch));
            CUDA_OK(cudaFree(dOut));
            for (void* p : stepAllocs) CUDA_OK(cudaFree(p));
        }
        // A shape the plugin must refuse at run time: qkv with a wrong width.
        {
            PluginTensorDesc in[kInputs], out[1];
            Step const& s = steps.back();
            for (auto const& kv : staticDev)
                in[kv.first] = PluginTensorDesc{kv.second.first.dims, kv.second.first.type, TensorFormat::kLINEAR, -1.F};
            for (auto const& t : s.tensors) in[slotOf(t.name)] = PluginTensorDesc{t.dims, t.type, TensorFormat::kLINEAR, -1.F};
            in[0].dims.d[1] += 8;
            out[0] = in[0];
            size_t const before = logger.errors.size();
            if (rt->onShapeChange(in, kInputs, out, 1) == 0) fail("onShapeChange accepted a wrong qkv width");
            if (logger.errors.size() == before || logger.errors.back().find("input qkv") == std::string::npos)
                fail("no logged error naming input qkv");
        }
        for (char const* name : {"kv_pool", "sink_pool", "recent_pool"})
        {
            auto const& e = staticDev.at(slotOf(name));
            size_t const n = static_cast<size_t>(volume(e.first.dims)) * elemSize(e.first.type);
            std::vector<uint8_t> host(n);
            CUDA_OK(cudaMemcpy(host.data(), e.second, n, cudaMemcpyDeviceToHost));
            writeFile(outDir + "/" + name + ".bin", host.data(), n);
        }
        for (auto& kv : staticDev) CUDA_OK(cudaFree(kv.second.second));
        if (workspace) CUDA_OK(cudaFree(workspace));
        CUDA_OK(cudaStreamDestroy(stream));
        attached.reset();
        cloned.reset();
        runtimePlugin.reset();
        built.reset();
        // The library stays loaded: TensorRT never unloads a plugin library while plugins live.
    }
    catch (std::exception const& e)
    {
        fail(std::string("harness error: ") + e.what());
        return 1;
    }
    std::printf("%s (%d failure(s))\n", gFailures ? "HARNESS FAILED" : "HARNESS OK", gFailures);
    return gFailures ? 1 : 0;
}
