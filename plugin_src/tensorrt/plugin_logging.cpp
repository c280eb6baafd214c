#include "plugin_logging.h"

#include <atomic>
#include <cstdio>

namespace turboquant
{
namespace trt
{
namespace
{
std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};
}

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept
{
    gLoggerFinder.store(finder);
}

void log(nvinfer1::ILogger::Severity severity, std::string const& msg) noexcept
{
    try
    {
        std::string const line = std::string("[turboquant] ") + msg;
        nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
        nvinfer1::ILogger* logger = finder ? finder->findLogger() : nullptr;
        if (logger)
        {
            logger->log(severity, line.c_str());
        }
        else if (severity <= nvinfer1::ILogger::Severity::kWARNING)
        {
            std::fprintf(stderr, "%s\n", line.c_str());
        }
    }
    catch (...)
    {
        // Logging must never throw out of a plugin method.
    }
}

} // namespace trt
} // namespace turboquant
