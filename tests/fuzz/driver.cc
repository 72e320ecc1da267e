// Stand-in for libFuzzer's main, for compilers without -fsanitize=fuzzer
// (g++): runs LLVMFuzzerTestOneInput on the empty input and every file given,
// then on N mutations of those files (bit flips, byte inserts and deletes,
// chunk copies and splices, interesting integers) drawn from a fixed-seed RNG,
// so a run is reproducible. There is no coverage feedback: it finds what
// random variations of real inputs find, under ASan/UBSan, on any machine.
//
//   fuzz_target [-runs=N] [-seed=S] [-max_len=L] [-max_total_time=SEC]
//               [-dict=FILE] [-artifact_prefix=DIR/] FILE_OR_DIR...
//
// The flags mean what they mean to libFuzzer, so one command line serves both
// builds. When a run crashes (sanitizer report, abort, trap), the input is
// written to <artifact_prefix>crash-<hash> before the process dies.
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

// Present only when a sanitizer runtime is linked in.
extern "C" void __sanitizer_set_death_callback(void (*callback)(void)) __attribute__((weak));

// Crash reports must stop the process: UBSan would otherwise print and go on.
extern "C" const char* __ubsan_default_options() { return "halt_on_error=1:print_stacktrace=1"; }

namespace {

using Bytes = std::vector<uint8_t>;

// The input being run and where to save it; read by the crash handlers.
const Bytes* g_current = nullptr;
std::string g_artifact_prefix = "./";

// Async-signal-safe: only open/write/close and arithmetic.
void save_current_input() {
  static volatile sig_atomic_t saved = 0;  // the death callback and a signal may both fire
  if (g_current == nullptr || saved) return;
  saved = 1;
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a names the file after its content
  for (uint8_t b : *g_current) h = (h ^ b) * 0x100000001b3ull;
  char path[4096];
  const size_t plen = std::min(g_artifact_prefix.size(), sizeof path - 32);
  std::memcpy(path, g_artifact_prefix.data(), plen);
  size_t n = plen;
  for (const char* s = "crash-"; *s; ++s) path[n++] = *s;
  for (int shift = 60; shift >= 0; shift -= 4) path[n++] = "0123456789abcdef"[(h >> shift) & 0xf];
  path[n] = '\0';
  const int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd >= 0) {
    size_t done = 0;
    while (done < g_current->size()) {
      const ssize_t w = write(fd, g_current->data() + done, g_current->size() - done);
      if (w <= 0) break;
      done += static_cast<size_t>(w);
    }
    close(fd);
  }
  const char msg[] = "\n==fuzz driver== crashing input written to ";
  (void)!write(STDERR_FILENO, msg, sizeof msg - 1);
  (void)!write(STDERR_FILENO, path, n);
  (void)!write(STDERR_FILENO, "\n", 1);
}

void on_signal(int sig) {
  save_current_input();
  signal(sig, SIG_DFL);
  raise(sig);
}

void install_crash_handlers() {
  // Sanitizers handle SEGV/BUS/FPE themselves and call the death callback;
  // aborts and traps (SIGILL) are left to the program.
  std::vector<int> signals = {SIGABRT, SIGILL};
  if (__sanitizer_set_death_callback != nullptr) {
    __sanitizer_set_death_callback(save_current_input);
  } else {
    signals.insert(signals.end(), {SIGSEGV, SIGBUS, SIGFPE});
  }
  for (int sig : signals) signal(sig, on_signal);
}

void run_one(const Bytes& input) {
  g_current = &input;
  // A heap block of exactly the input's size, so ASan catches a read one byte past it.
  std::unique_ptr<uint8_t[]> exact(new uint8_t[input.size()]);
  if (!input.empty()) std::memcpy(exact.get(), input.data(), input.size());
  LLVMFuzzerTestOneInput(exact.get(), input.size());
  g_current = nullptr;
}

class Mutator {
 public:
  Mutator(uint64_t seed, const std::vector<Bytes>& corpus, const std::vector<Bytes>& tokens, size_t max_len)
      : rng_(seed), corpus_(corpus), tokens_(tokens), max_len_(max_len) {}

  Bytes next() {
    Bytes data = corpus_.empty() ? Bytes() : corpus_[below(corpus_.size())];
    // Mostly a few mutations: inputs stay close enough to a real file to
    // get past its first checks.
    const size_t count = 1 + below(4) * below(4);
    for (size_t i = 0; i < count; ++i) mutate(data);
    if (data.size() > max_len_) data.resize(max_len_);
    return data;
  }

 private:
  size_t below(size_t n) { return n == 0 ? 0 : static_cast<size_t>(rng_() % n); }
  size_t pos(const Bytes& d) { return below(d.size()); }
  size_t chunk_len(size_t limit) { return limit == 0 ? 0 : 1 + below(std::min<size_t>(limit, 1 + below(64))); }

  void mutate(Bytes& d) {
    const size_t kind = d.empty() ? 2 : below(10);
    switch (kind) {
      case 0: d[pos(d)] ^= static_cast<uint8_t>(1u << below(8)); break;
      case 1: d[pos(d)] = static_cast<uint8_t>(rng_()); break;
      case 2: {  // insert 1-4 random bytes
        const size_t at = below(d.size() + 1), n = 1 + below(4);
        for (size_t i = 0; i < n; ++i) d.insert(d.begin() + static_cast<std::ptrdiff_t>(at), static_cast<uint8_t>(rng_()));
        break;
      }
      case 3: {  // erase a chunk
        const size_t at = pos(d), n = chunk_len(d.size() - at);
        d.erase(d.begin() + static_cast<std::ptrdiff_t>(at), d.begin() + static_cast<std::ptrdiff_t>(at + n));
        break;
      }
      case 4: {  // copy a chunk of the input over another place, or insert it
        const size_t from = pos(d), n = chunk_len(d.size() - from);
        const Bytes piece(d.begin() + static_cast<std::ptrdiff_t>(from), d.begin() + static_cast<std::ptrdiff_t>(from + n));
        place(d, piece);
        break;
      }
      case 5: {  // splice in a chunk of another seed
        if (corpus_.empty()) break;
        const Bytes& other = corpus_[below(corpus_.size())];
        if (other.empty()) break;
        const size_t from = pos(other), n = chunk_len(other.size() - from);
        place(d, Bytes(other.begin() + static_cast<std::ptrdiff_t>(from), other.begin() + static_cast<std::ptrdiff_t>(from + n)));
        break;
      }
      case 6: {  // an interesting integer, 1-8 bytes, either byte order
        static const uint64_t kInteresting[] = {
            0, 1, 2, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0x8000, 0xffff, 0x10000, 0x7fffffff, 0x80000000,
            0xffffffff, 0x100000000ull, 0x7fffffffffffffffull, 0x8000000000000000ull, ~0ull};
        uint64_t v = below(4) == 0 ? d.size() - below(3) : kInteresting[below(std::size(kInteresting))];
        if (below(4) == 0) v = ~v + 1;  // negated
        write_int(d, v);
        break;
      }
      case 7: {  // add or subtract a small amount, at 1-8 bytes little-endian
        const size_t width = size_t{1} << below(4), at = pos(d);
        uint64_t v = 0;
        for (size_t i = 0; i < width && at + i < d.size(); ++i) v |= uint64_t{d[at + i]} << (8 * i);
        v += below(2) ? 1 + below(16) : ~below(16);
        for (size_t i = 0; i < width && at + i < d.size(); ++i) d[at + i] = static_cast<uint8_t>(v >> (8 * i));
        break;
      }
      case 8: d.resize(pos(d)); break;  // truncate
      case 9:  // a dictionary token
        if (!tokens_.empty()) place(d, tokens_[below(tokens_.size())]);
        break;
    }
  }

  void place(Bytes& d, const Bytes& piece) {
    const size_t at = below(d.size() + 1);
    if (below(2)) {
      d.insert(d.begin() + static_cast<std::ptrdiff_t>(at), piece.begin(), piece.end());
    } else {
      for (size_t i = 0; i < piece.size() && at + i < d.size(); ++i) d[at + i] = piece[i];
    }
  }

  void write_int(Bytes& d, uint64_t v) {
    const size_t width = size_t{1} << below(4), at = pos(d);
    const bool big_endian = below(4) == 0;
    for (size_t i = 0; i < width && at + i < d.size(); ++i)
      d[at + i] = static_cast<uint8_t>(v >> (8 * (big_endian ? width - 1 - i : i)));
  }

  std::mt19937_64 rng_;
  const std::vector<Bytes>& corpus_;
  const std::vector<Bytes>& tokens_;
  size_t max_len_;
};

bool read_file(const std::filesystem::path& path, Bytes* out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return false;
  out->assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  return true;
}

// Reads a libFuzzer dictionary: one token a line, `name="value"` or
// `"value"`, with \\, \" and \xNN escapes; '#' starts a comment line.
bool read_dict(const std::filesystem::path& path, std::vector<Bytes>* tokens) {
  std::ifstream f(path);
  if (!f) return false;
  std::string line;
  while (std::getline(f, line)) {
    const size_t open = line.find('"');
    if (line.empty() || line[0] == '#' || open == std::string::npos) continue;
    Bytes token;
    size_t i = open + 1;
    for (; i < line.size() && line[i] != '"'; ++i) {
      if (line[i] != '\\' || i + 1 == line.size()) {
        token.push_back(static_cast<uint8_t>(line[i]));
      } else if (line[++i] == 'x' && i + 2 < line.size()) {
        token.push_back(static_cast<uint8_t>(std::stoi(line.substr(i + 1, 2), nullptr, 16)));
        i += 2;
      } else {
        token.push_back(static_cast<uint8_t>(line[i]));
      }
    }
    if (i == line.size()) return false;  // no closing quote
    tokens->push_back(std::move(token));
  }
  return true;
}

// Parses "-name=value" into *value when the flag is `name`.
bool flag(const char* arg, const char* name, uint64_t* value) {
  const size_t n = std::strlen(name);
  if (std::strncmp(arg + 1, name, n) != 0 || arg[1 + n] != '=') return false;
  char* end = nullptr;
  *value = std::strtoull(arg + 2 + n, &end, 10);
  if (*end != '\0') {
    std::fprintf(stderr, "bad value in %s\n", arg);
    std::exit(2);
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  uint64_t runs = 0, seed = 1, max_len = 1 << 16, max_total_time = 0;
  std::vector<std::filesystem::path> inputs;
  std::vector<Bytes> tokens;
  for (int i = 1; i < argc; ++i) {
    const char* arg = argv[i];
    if (arg[0] != '-') {
      inputs.emplace_back(arg);
    } else if (std::strncmp(arg, "-dict=", 6) == 0) {
      if (!read_dict(arg + 6, &tokens)) {
        std::fprintf(stderr, "cannot read dictionary %s\n", arg + 6);
        return 2;
      }
    } else if (std::strncmp(arg, "-artifact_prefix=", 17) == 0) {
      g_artifact_prefix = arg + 17;
    } else if (!flag(arg, "runs", &runs) && !flag(arg, "seed", &seed) && !flag(arg, "max_len", &max_len) &&
               !flag(arg, "max_total_time", &max_total_time)) {
      std::fprintf(stderr, "unknown flag %s\nusage: %s [-runs=N] [-seed=S] [-max_len=L] [-max_total_time=SEC] "
                   "[-dict=FILE] [-artifact_prefix=P] FILE_OR_DIR...\n", arg, argv[0]);
      return 2;
    }
  }

  std::vector<Bytes> corpus;
  for (const auto& input : inputs) {
    std::vector<std::filesystem::path> files;
    std::error_code ec;
    if (std::filesystem::is_directory(input, ec)) {
      for (const auto& entry : std::filesystem::directory_iterator(input, ec))
        if (entry.is_regular_file()) files.push_back(entry.path());
      std::sort(files.begin(), files.end());  // directory order is not reproducible
    } else {
      files.push_back(input);
    }
    for (const auto& file : files) {
      if (!read_file(file, &corpus.emplace_back())) {
        std::fprintf(stderr, "cannot read %s\n", file.c_str());
        return 2;
      }
    }
  }

  install_crash_handlers();
  const auto start = std::chrono::steady_clock::now();
  const auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };

  run_one(Bytes());
  for (const Bytes& input : corpus) run_one(input);

  Mutator mutator(seed, corpus, tokens, static_cast<size_t>(max_len));
  uint64_t done = 0;
  for (; done < runs; ++done) {
    if (max_total_time != 0 && done % 256 == 0 && elapsed() >= static_cast<double>(max_total_time)) break;
    run_one(mutator.next());
  }
  std::fprintf(stderr, "%s: replayed %zu inputs, ran %llu mutations (seed %llu) in %.1f s\n", argv[0],
               corpus.size() + 1, static_cast<unsigned long long>(done), static_cast<unsigned long long>(seed),
               elapsed());
  return 0;
}
