// The library's only exported symbols: TensorRT finds the creators through getCreators() and hands
// over its logger finder through setLoggerFinder() (both looked up with dlsym when the library is
// loaded as a plugin library: trtexec --dynamicPlugins, IPluginRegistry::loadLibrary, or
// version-compatible engines).
#include "plugin_logging.h"
#include "turboquant_attention_plugin.h"

#include <NvInferRuntime.h>

#include <exception>
#include <string>

#define TURBOQUANT_EXPORT __attribute__((visibility("default")))

extern "C" TURBOQUANT_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    turboquant::trt::setLoggerFinder(finder);
}

extern "C" TURBOQUANT_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    nbCreators = 0;
    try
    {
        static turboquant::trt::TurboQuantAttentionCreator attentionCreator;
        static nvinfer1::IPluginCreatorInterface* const creators[] = {&attentionCreator};
        nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
        return creators;
    }
    catch (std::exception const& e)
    {
        turboquant::trt::logError(std::string("getCreators: ") + e.what());
    }
    catch (...)
    {
        turboquant::trt::logError("getCreators: unknown exception");
    }
    return nullptr;
}
