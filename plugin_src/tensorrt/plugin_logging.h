// Logging for the plugin library through TensorRT's ILoggerFinder (set by setLoggerFinder()).
#pragma once

#include <NvInferRuntime.h>

#include <string>

namespace turboquant
{
namespace trt
{

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;

// Sends msg to the logger of the engine or context that called the current plugin method; to
// stderr when TensorRT never gave the library a logger finder (for example under a bare harness).
void log(nvinfer1::ILogger::Severity severity, std::string const& msg) noexcept;

inline void logError(std::string const& msg) noexcept
{
    log(nvinfer1::ILogger::Severity::kERROR, msg);
}

} // namespace trt
} // namespace turboquant
