// Runs a llama2.c checkpoint (karpathy/llama2.c: stories15M/42M/110M.bin and the like)
// through fovea: the prompt is prefilled with one causal attention call per layer, then
// tokens are generated one at a time against the KV cache. Prints the tokens (as text with
// a llama2.c tokenizer.bin, else as ids) and the prefill and decode tokens per second.
//
//   llama2c MODEL.bin [-n STEPS] [-i "PROMPT TOKEN IDS"] [-z TOKENIZER.bin] [-t TEMPERATURE]
//           [-s SEED] [--attention softmax|hip|dma|routing|agent|linear]
//           [--kv f32|bf16|fp16|q8_0|int8|e4m3|e5m2] [--paged] [--threads N] [--quiet]
//   llama2c --make-random OUT.bin      writes a random checkpoint shaped like stories15M
//                                      (dim 288, 6 layers, 6 heads, vocab 32000, context 256)
//
// The prompt is token ids separated by spaces (default: BOS, token 1). Temperature 0 (the
// default) is greedy. The model itself is examples/llama2c.hpp.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "llama2c.hpp"

namespace {

/// llama2.c's tokenizer.bin: int32 max token length, then per token a float score, an
/// int32 length and the bytes.
std::vector<std::string> read_tokenizer(const std::string& path, int vocab) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(path + ": cannot open the tokenizer");
  std::int32_t max_len = 0;
  f.read(reinterpret_cast<char*>(&max_len), 4);
  std::vector<std::string> pieces(vocab);
  for (int i = 0; i < vocab; ++i) {
    float score = 0;
    std::int32_t len = 0;
    f.read(reinterpret_cast<char*>(&score), 4);
    f.read(reinterpret_cast<char*>(&len), 4);
    if (!f || len < 0 || len > 1 << 16) throw std::runtime_error(path + ": malformed at token " + std::to_string(i));
    pieces[i].resize(len);
    f.read(pieces[i].data(), len);
  }
  return pieces;
}

/// The text of `token` after `previous` (llama2.c's decode: no leading space after BOS,
/// raw bytes written as <0xXX>).
std::string piece(const std::vector<std::string>& pieces, int previous, int token) {
  std::string p = pieces[token];
  if (previous == 1 && !p.empty() && p[0] == ' ') p.erase(0, 1);
  unsigned byte = 0;
  if (std::sscanf(p.c_str(), "<0x%02X>", &byte) == 1) p = std::string(1, char(byte));
  return p;
}

int sample(const Eigen::RowVectorXf& logits, float temperature, std::mt19937_64& gen) {
  if (temperature <= 0) return llama2c::argmax(logits);
  const Eigen::RowVectorXf z = logits / temperature;
  const Eigen::RowVectorXf p = (z.array() - z.maxCoeff()).exp();
  std::uniform_real_distribution<float> u(0.f, p.sum());
  float r = u(gen);
  for (Eigen::Index i = 0; i < p.size(); ++i)
    if ((r -= p(i)) <= 0) return int(i);
  return int(p.size() - 1);
}

template <class S>
int run(const llama2c::checkpoint& ck, const llama2c::run_options& o, std::vector<int> prompt,
        int steps, float temperature, std::uint64_t seed, const std::vector<std::string>& pieces,
        bool quiet) {
  llama2c::model<S> m(ck, o);
  steps = std::min(steps, ck.c.seq_len - int(prompt.size()));
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  const llama2c::matrix logits = m.prefill(prompt);
  const double prefill_s = std::chrono::duration<double>(clock::now() - t0).count();
  std::mt19937_64 gen(seed);
  std::vector<int> out;
  int token = sample(logits.row(logits.rows() - 1), temperature, gen);
  const auto t1 = clock::now();
  for (int s = 0; s < steps; ++s) {
    out.push_back(token);
    if (s + 1 < steps) token = sample(m.decode(token), temperature, gen);
  }
  const double decode_s = std::chrono::duration<double>(clock::now() - t1).count();
  if (!quiet) {
    int previous = prompt.back();
    for (int t : out) {
      if (pieces.empty())
        std::printf("%d ", t);
      else
        std::printf("%s", piece(pieces, previous, t).c_str());
      previous = t;
    }
    std::printf("\n");
  }
  const int decoded = std::max(0, steps - 1);
  const double share = 100 * m.attention_seconds() / std::max(prefill_s + decode_s, 1e-9);
  std::printf("attention %s, kv %s%s, %d thread(s): prefill %zu tokens %.1f tok/s, decode %d "
              "tokens %.1f tok/s, attention %.0f%% of the time%s\n",
              llama2c::to_string(o.attention), llama2c::to_string(llama2c::kv_type_of<S>()),
              o.paged ? " paged" : "", o.threads, prompt.size(), double(prompt.size()) / prefill_s,
              decoded, decoded / std::max(decode_s, 1e-9), share,
              o.attention == llama2c::family::softmax
                  ? ""
                  : " (an approximation: the model was trained with softmax attention)");
  return 0;
}

int usage() {
  std::fprintf(stderr,
               "usage: llama2c MODEL.bin [-n STEPS] [-i \"PROMPT TOKEN IDS\"] [-z TOKENIZER.bin] "
               "[-t TEMPERATURE] [-s SEED]\n"
               "       [--attention softmax|hip|dma|routing|agent|linear] [--kv f32|bf16|fp16|q8_0|int8|e4m3|e5m2] "
               "[--paged] [--threads N] [--quiet]\n"
               "       llama2c --make-random OUT.bin\n");
  return 2;
}

}  // namespace

/// A checkpoint with random weights in the format, shaped like llama2.c's stories15M.
void write_random(const std::string& path) {
  const std::int32_t header[7] = {288, 768, 6, 6, 6, 32000, 256};
  const int d = 288, hid = 768, L = 6, vocab = 32000, seq = 256, hs = 48;
  const std::size_t floats = std::size_t(vocab) * d + L * (2 * d + 4 * d * d + 3 * hid * d) + d +
                             std::size_t(seq) * hs;
  std::vector<float> w(floats);
  std::mt19937 gen(1);
  std::normal_distribution<float> normal(0.f, 0.05f);
  for (float& x : w) x = normal(gen);
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) throw std::runtime_error(path + ": cannot write");
  std::fwrite(header, sizeof(header), 1, f);
  std::fwrite(w.data(), 4, w.size(), f);
  std::fclose(f);
}

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  if (std::strcmp(argv[1], "--make-random") == 0) {
    if (argc != 3) return usage();
    try {
      write_random(argv[2]);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "llama2c: %s\n", e.what());
      return 1;
    }
    return 0;
  }
  std::string model_path = argv[1], tokenizer, prompt_text = "1";
  int steps = 256;
  float temperature = 0.f;
  std::uint64_t seed = 42;
  bool quiet = false;
  llama2c::run_options o;
  llama2c::kv_type kv = llama2c::kv_type::f32;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(a + ": needs a value");
      return argv[++i];
    };
    try {
      if (a == "-n") steps = std::stoi(value());
      else if (a == "-i") prompt_text = value();
      else if (a == "-z") tokenizer = value();
      else if (a == "-t") temperature = std::stof(value());
      else if (a == "-s") seed = std::stoull(value());
      else if (a == "--threads") o.threads = std::stoi(value());
      else if (a == "--paged") o.paged = true;
      else if (a == "--quiet") quiet = true;
      else if (a == "--attention") {
        const std::string f = value();
        const char* names[] = {"softmax", "hip", "dma", "routing", "agent", "linear"};
        int at = -1;
        for (int k = 0; k < 6; ++k)
          if (f == names[k]) at = k;
        if (at < 0) throw std::runtime_error("--attention: unknown family '" + f + "'");
        o.attention = llama2c::family(at);
      } else if (a == "--kv") {
        const std::string t = value();
        bool known = false;
        for (int i = 0; i <= int(llama2c::kv_type::e5m2); ++i)
          if (t == llama2c::to_string(llama2c::kv_type(i))) kv = llama2c::kv_type(i), known = true;
        if (!known)
          throw std::runtime_error("--kv: '" + t +
                                   "' is not a cache type (f32, bf16, fp16, q8_0, int8, e4m3, e5m2)");
      } else {
        std::fprintf(stderr, "unknown argument '%s'\n", a.c_str());
        return usage();
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "llama2c: %s\n", e.what());
      return 2;
    }
  }
  try {
    const llama2c::checkpoint ck = llama2c::checkpoint::load(model_path);
    std::vector<int> prompt;
    std::istringstream in(prompt_text);
    for (int t; in >> t;) prompt.push_back(t);
    if (prompt.empty()) throw std::runtime_error("-i: the prompt holds no token id");
    if (int(prompt.size()) >= ck.c.seq_len)
      throw std::runtime_error("-i: the prompt fills the model's context");
    const auto pieces = tokenizer.empty() ? std::vector<std::string>{}
                                          : read_tokenizer(tokenizer, ck.c.vocab_size);
    std::printf("%s: dim %d, %d layers, %d heads (%d kv), head size %d, vocab %d, context %d; %s\n",
                model_path.c_str(), ck.c.dim, ck.c.n_layers, ck.c.n_heads, ck.c.n_kv_heads,
                ck.c.head_size(), ck.c.vocab_size, ck.c.seq_len, fovea::build_info().c_str());
    switch (kv) {
      case llama2c::kv_type::f32:
        return run<float>(ck, o, prompt, steps, temperature, seed, pieces, quiet);
      case llama2c::kv_type::bf16:
        return run<fovea::bfloat16>(ck, o, prompt, steps, temperature, seed, pieces, quiet);
      case llama2c::kv_type::fp16:
        return run<fovea::half>(ck, o, prompt, steps, temperature, seed, pieces, quiet);
      case llama2c::kv_type::q8_0:
        return run<fovea::block_q8_0>(ck, o, prompt, steps, temperature, seed, pieces, quiet);
      case llama2c::kv_type::int8:
        return run<std::int8_t>(ck, o, prompt, steps, temperature, seed, pieces, quiet);
      case llama2c::kv_type::e4m3:
        return run<fovea::e4m3>(ck, o, prompt, steps, temperature, seed, pieces, quiet);
      case llama2c::kv_type::e5m2:
        return run<fovea::e5m2>(ck, o, prompt, steps, temperature, seed, pieces, quiet);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "llama2c: %s\n", e.what());
    return 1;
  }
  return 0;
}
