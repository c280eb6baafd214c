// Prints the block layout the plugin core computes, for comparison with the Python format module
// (tests/test_plugin_core.py). Usage: core_layout_tool HEAD_DIM TOKENS_PER_BLOCK K_BITS_CSV V_BITS_CSV
// Output: one line per KV head "h k_codes v_codes k_meta v_meta", then "block_bytes N".
//        core_layout_tool --constants  prints the core's constants and field list, one per line.
//        core_layout_tool --tile HEAD_DIM BITS  prints where every code bit of a 32-slot tile lives
//        (format.h's tqTilePos / tqUnitBit / tqTileUnitOffset, which the CUDA kernels use), one line
//        "which slot channel k byte bit" per code bit k (which: 0 = K, 1 = V).
#include "turboquant_core/attention_core.h"

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>

using namespace turboquant::core;

static std::vector<int32_t> parseCsv(char const* s)
{
    std::vector<int32_t> v;
    std::stringstream ss(s);
    std::string item;
    while (std::getline(ss, item, ','))
    {
        v.push_back(std::atoi(item.c_str()));
    }
    return v;
}

static int printConstants()
{
    std::printf("plugin_name %s\n", kPluginName);
    std::printf("plugin_version %s\n", kPluginVersion);
    std::printf("plugin_namespace %s\n", kPluginNamespace);
    std::printf("format_version %d\n", kFormatVersion);
    std::printf("max_sink_tokens %d\n", kMaxSinkTokens);
    std::printf("max_tokens_per_block %d\n", kMaxTokensPerBlock);
    std::printf("align %d\n", kAlign);
    for (auto const& f : fieldSpecs())
    {
        std::printf("field %s %d %d %d\n", f.name, static_cast<int32_t>(f.type), f.length, f.required ? 1 : 0);
    }
    for (int32_t i = 0; i < kNumInputs; ++i)
    {
        std::printf("input %d %s\n", i, inputName(i));
    }
    return 0;
}

static int printTile(int32_t d, int32_t bits)
{
    if ((d != 64 && d != 128 && d != 256) || (bits != 2 && bits != 3 && bits != 4 && bits != 8))
    {
        std::fprintf(stderr, "error: --tile needs HEAD_DIM 64, 128 or 256 and BITS 2, 3, 4 or 8\n");
        return 1;
    }
    for (int32_t which = 0; which < 2; ++which)
    {
        for (int32_t tau = 0; tau < ::turboquant::kTileTokens; ++tau)
        {
            for (int32_t c = 0; c < d; ++c)
            {
                ::turboquant::TqTilePos const p = ::turboquant::tqTilePos(which != 0, tau, c, d);
                for (int32_t k = 0; k < bits; ++k)
                {
                    int32_t w = 0, bit = 0;
                    ::turboquant::tqUnitBit(bits, p.sel, p.nib, k, w, bit);
                    int32_t const byte = ::turboquant::tqTileUnitOffset(d, bits, p.lane, p.unit) + 4 * w + bit / 8;
                    std::printf("%d %d %d %d %d %d\n", which, tau, c, k, byte, bit % 8);
                }
            }
        }
    }
    return 0;
}

int main(int argc, char** argv)
{
    if (argc == 2 && std::string(argv[1]) == "--constants")
    {
        return printConstants();
    }
    if (argc == 4 && std::string(argv[1]) == "--tile")
    {
        return printTile(std::atoi(argv[2]), std::atoi(argv[3]));
    }
    if (argc != 5)
    {
        std::fprintf(stderr, "usage: %s HEAD_DIM TOKENS_PER_BLOCK K_BITS_CSV V_BITS_CSV\n", argv[0]);
        return 2;
    }
    AttentionConfig c;
    c.head_dim = std::atoi(argv[1]);
    c.tokens_per_block = std::atoi(argv[2]);
    c.k_bits = parseCsv(argv[3]);
    c.v_bits = parseCsv(argv[4]);
    c.num_kv_heads = static_cast<int32_t>(c.k_bits.size());
    c.k_scale_exp.assign(c.k_bits.size(), -10); // the layout does not depend on E
    c.v_scale_exp.assign(c.k_bits.size(), -10);
    c.num_q_heads = c.num_kv_heads;
    c.max_seq_len = 1;
    try
    {
        validate(c);
    }
    catch (ConfigError const& e)
    {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    BlockLayout const l = blockLayout(c);
    for (int32_t h = 0; h < c.num_kv_heads; ++h)
    {
        std::printf("%d %lld %lld %lld %lld\n", h, static_cast<long long>(l.k_codes[h]),
            static_cast<long long>(l.v_codes[h]), static_cast<long long>(l.k_meta[h]),
            static_cast<long long>(l.v_meta[h]));
    }
    std::printf("block_bytes %lld\n", static_cast<long long>(l.block_bytes));
    return 0;
}
