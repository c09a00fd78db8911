// toolkit_host: greedy generation from a `toolkit convert` bundle with the ONNX
// Runtime C++ API, for edge hosts without Python.
//
//   toolkit_host BUNDLE_DIR --prompt-ids 1,2,3 [--max-new-tokens N] [--threads T] [--seed S]
//
// It reads BUNDLE_DIR/manifest.json only for the model file and the op library
// ("op_library": {"file": ...} or null), registers that library with
// Ort::SessionOptions::RegisterCustomOpsLibrary, and runs the exported KV-cache
// layout (README "Exported layout"): a prefill over the prompt with empty past
// tensors ([1, kv_heads, 0, head_dim]; every dynamic dimension but the batch is 0,
// so quantized cache layouts work the same way; a fixed-capacity cache's tensors
// keep their static sizes, zero-filled, with past_key_values.lengths [2] = 0), then
// decode steps that feed each
// present.* output back as past_key_values.*, grow attention_mask by one and
// continue position_ids. The next token is next_token[0] (a sampled head),
// next_token_ids[0, 0] (a FusedSoftmaxTopK head) or argmax(logits[0, -1]) — the same
// rule as toolkit.generate.next_token. Generated ids go to stdout, comma-separated;
// errors go to stderr as "error: ..." with a fix, exit code 2.
// The C++ API's global OrtApi is fetched by hand (main below), so that a runtime older
// than the headers gives a named error instead of a null API table (a segfault).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>

#include "sample_topk/sample_math.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

// An error the user can fix: printed with its hint, exit code 2.
struct HostError : std::runtime_error {
  HostError(const std::string& what, std::string fix) : std::runtime_error(what), hint(std::move(fix)) {}
  std::string hint;
};

struct Args {
  std::string bundle;
  std::vector<int64_t> prompt;
  int max_new_tokens = 16;
  int threads = 0;  // 0: ONNX Runtime's default
  int64_t seed = 0;
};

const char* const kUsage =
    "usage: toolkit_host BUNDLE_DIR --prompt-ids 1,2,3 [--max-new-tokens N] [--threads T] [--seed S]";

int64_t ParseInt(const std::string& flag, const std::string& text) {
  try {
    size_t used = 0;
    const long long v = std::stoll(text, &used);
    if (used != text.size()) throw std::invalid_argument(text);
    return v;
  } catch (const std::exception&) {
    throw HostError(flag + " expects an integer, got '" + text + "'", kUsage);
  }
}

Args ParseArgs(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw HostError(a + " needs a value", kUsage);
      return argv[++i];
    };
    if (a == "--prompt-ids") {
      std::stringstream ss(value());
      for (std::string item; std::getline(ss, item, ',');) {
        if (!item.empty()) args.prompt.push_back(ParseInt("--prompt-ids", item));
      }
    } else if (a == "--max-new-tokens") {
      args.max_new_tokens = static_cast<int>(ParseInt(a, value()));
    } else if (a == "--threads") {
      args.threads = static_cast<int>(ParseInt(a, value()));
    } else if (a == "--seed") {
      args.seed = ParseInt(a, value());
    } else if (a == "-h" || a == "--help") {
      std::cout << kUsage << "\n";
      std::exit(0);
    } else if (!a.empty() && a[0] == '-') {
      throw HostError("unknown option " + a, kUsage);
    } else if (args.bundle.empty()) {
      args.bundle = a;
    } else {
      throw HostError("unexpected argument " + a, kUsage);
    }
  }
  if (args.bundle.empty()) throw HostError("no bundle directory given", kUsage);
  if (args.prompt.empty()) throw HostError("no prompt: --prompt-ids is empty or missing", kUsage);
  if (args.max_new_tokens < 1) throw HostError("--max-new-tokens must be at least 1", kUsage);
  return args;
}

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return {};
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

bool FileExists(const std::string& path) { return std::ifstream(path).good(); }

// The string value of "key": "..." at or after `from` in a JSON text; empty if absent.
// Deliberately minimal (no escapes in the values we read: file names we wrote).
std::string JsonString(const std::string& json, const std::string& key, size_t from = 0) {
  const size_t k = json.find("\"" + key + "\"", from);
  if (k == std::string::npos) return {};
  const size_t colon = json.find(':', k);
  const size_t open = json.find('"', colon);
  const size_t close = json.find('"', open + 1);
  if (colon == std::string::npos || open == std::string::npos || close == std::string::npos) return {};
  return json.substr(open + 1, close - open - 1);
}

struct Bundle {
  std::string model;    // absolute or bundle-relative path of the ONNX file
  std::string library;  // empty: the model uses no custom operators
};

Bundle ReadBundle(const std::string& dir) {
  const std::string manifest_path = dir + "/manifest.json";
  const std::string json = ReadFile(manifest_path);
  if (json.empty()) {
    throw HostError("'" + dir + "' has no readable manifest.json: not a toolkit bundle",
                    "point at a directory written by `toolkit convert MODEL -o DIR`");
  }
  Bundle b;
  const std::string model = JsonString(json, "model");
  b.model = dir + "/" + (model.empty() ? "model.onnx" : model);
  if (!FileExists(b.model)) {
    throw HostError("the bundle's model " + b.model + " is missing",
                    "copy the whole bundle directory, or convert the model again");
  }
  const size_t lib = json.find("\"op_library\"");
  if (lib != std::string::npos) {
    const size_t value = json.find_first_not_of(" \t\r\n:", lib + std::string("\"op_library\"").size());
    if (value != std::string::npos && json.compare(value, 4, "null") != 0) {
      const std::string file = JsonString(json, "file", value);
      b.library = dir + "/" + (file.empty() ? "libtoolkit_ops.so" : file);
      if (!FileExists(b.library)) {
        throw HostError("the bundle's op library " + b.library + " is missing (the model uses custom operators)",
                        "copy the whole bundle directory including libtoolkit_ops.so, or convert the model again");
      }
    }
  }
  return b;
}

// An int64 tensor [1, n] (owned data).
Ort::Value Int64Tensor(const std::vector<int64_t>& data, std::vector<int64_t> shape) {
  Ort::AllocatorWithDefaultOptions alloc;
  Ort::Value v = Ort::Value::CreateTensor<int64_t>(alloc, shape.data(), shape.size());
  std::copy(data.begin(), data.end(), v.GetTensorMutableData<int64_t>());
  return v;
}

struct InputInfo {
  std::string name;
  ONNXTensorElementDataType type;
  std::vector<int64_t> shape;  // -1 where dynamic
};

int64_t NextToken(const std::vector<std::string>& names, std::vector<Ort::Value>& outs) {
  auto find = [&](const std::string& n) -> Ort::Value* {
    for (size_t i = 0; i < names.size(); ++i) {
      if (names[i] == n) return &outs[i];
    }
    return nullptr;
  };
  if (Ort::Value* v = find("next_token")) return v->GetTensorData<int64_t>()[0];
  if (Ort::Value* v = find("next_token_ids")) return v->GetTensorData<int64_t>()[0];
  Ort::Value* logits = find("logits");
  if (logits == nullptr) {
    throw HostError("the model has none of the outputs next_token, next_token_ids, logits",
                    "use a decoder exported by `toolkit convert`");
  }
  const auto info = logits->GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    throw HostError("logits are not float32", "convert with --sampling-head K, or a float32 model");
  }
  const std::vector<int64_t> shape = info.GetShape();  // [1, S, V]
  const int64_t vocab = shape.back();
  const float* last = logits->GetTensorData<float>() + (shape[1] - 1) * vocab;
  // First maximum, like numpy.argmax.
  return static_cast<int64_t>(std::max_element(last, last + vocab) - last);
}

std::vector<int64_t> Generate(const Args& args) {
  const Bundle bundle = ReadBundle(args.bundle);
  Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "toolkit_host");
  Ort::SessionOptions so;
  if (args.threads > 0) so.SetIntraOpNumThreads(args.threads);
  if (!bundle.library.empty()) {
    try {
      so.RegisterCustomOpsLibrary(bundle.library.c_str());
    } catch (const Ort::Exception& e) {
      throw HostError("ONNX Runtime could not register " + bundle.library + ": " + e.what(),
                      "the library needs ONNX Runtime >= 1.17 on this platform; convert on a matching host");
    }
  }
  Ort::Session session(env, bundle.model.c_str(), so);

  Ort::AllocatorWithDefaultOptions alloc;
  // The positions and vocabulary the export recorded (model metadata), checked up
  // front as `toolkit generate` does: past them a learned position table fails with a
  // Gather error after some tokens, and an id outside the vocabulary with another.
  const Ort::ModelMetadata metadata = session.GetModelMetadata();
  auto recorded = [&](const char* key) -> int64_t {
    const Ort::AllocatedStringPtr value = metadata.LookupCustomMetadataMapAllocated(key, alloc);
    if (!value) return -1;
    try {
      return std::stoll(value.get());
    } catch (const std::exception&) {
      return -1;
    }
  };
  const int64_t vocab = recorded("toolkit.vocab_size"), context = recorded("toolkit.context_length");
  for (const int64_t id : args.prompt) {
    if (id < 0 || (vocab > 0 && id >= vocab)) {
      throw HostError("prompt id " + std::to_string(id) + " is outside the model's vocabulary [0, " +
                          std::to_string(vocab) + ")",
                      "use ids the model's tokenizer produces");
    }
  }
  const int64_t positions_needed = static_cast<int64_t>(args.prompt.size()) + args.max_new_tokens - 1;
  if (context > 0 && positions_needed > context) {
    throw HostError("a " + std::to_string(args.prompt.size()) + "-token prompt and " +
                        std::to_string(args.max_new_tokens) + " new tokens need " + std::to_string(positions_needed) +
                        " positions; the model was built for " + std::to_string(context),
                    "shorten the prompt or --max-new-tokens");
  }
  std::vector<InputInfo> inputs;
  for (size_t i = 0; i < session.GetInputCount(); ++i) {
    const auto type_info = session.GetInputTypeInfo(i);
    const auto tensor = type_info.GetTensorTypeAndShapeInfo();
    inputs.push_back({session.GetInputNameAllocated(i, alloc).get(), tensor.GetElementType(), tensor.GetShape()});
  }
  std::vector<std::string> output_names;
  for (size_t i = 0; i < session.GetOutputCount(); ++i) {
    output_names.push_back(session.GetOutputNameAllocated(i, alloc).get());
  }
  std::vector<const char*> output_ptrs;
  for (const auto& n : output_names) output_ptrs.push_back(n.c_str());

  // The cache: past_key_values.* by name, empty for the prefill.
  const std::string past_prefix = "past_key_values.", present_prefix = "present.";
  std::map<std::string, Ort::Value> past;
  for (const auto& in : inputs) {
    if (in.name.rfind(past_prefix, 0) != 0) continue;
    std::vector<int64_t> shape = in.shape;
    for (size_t d = 0; d < shape.size(); ++d) {
      if (d == 0 && shape.size() > 1) shape[d] = 1;  // batch (a fixed cache's lengths [2] has none)
      else if (shape[d] < 0) shape[d] = 0;           // past length (and any other dynamic axis)
    }
    Ort::Value value = Ort::Value::CreateTensor(alloc, shape.data(), shape.size(), in.type);
    // Zeros: an empty cache, and for a fixed-capacity one its unused slots and lengths.
    const auto info = value.GetTensorTypeAndShapeInfo();
    const size_t count = info.GetElementCount();
    if (count > 0) {
      size_t width = 0;
      switch (in.type) {
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: width = 1; break;
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: width = 2; break;
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: width = 4; break;
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: width = 8; break;
        default:
          throw HostError("cache input " + in.name + " has an element type this host cannot zero-fill",
                          "use a decoder exported by `toolkit convert`");
      }
      std::fill_n(static_cast<char*>(value.GetTensorMutableRawData()), count * width, char(0));
    }
    past.emplace(in.name, std::move(value));
  }

  std::vector<int64_t> ids = args.prompt;
  const int64_t prompt_len = static_cast<int64_t>(ids.size());
  std::vector<int64_t> positions(ids.size());
  for (int64_t p = 0; p < prompt_len; ++p) positions[p] = p;
  int64_t total = prompt_len;  // attention_mask length: past + new
  std::vector<int64_t> generated;
  for (int step = 0; step < args.max_new_tokens; ++step) {
    const int64_t n = static_cast<int64_t>(ids.size());
    std::vector<Ort::Value> feeds;
    std::vector<const char*> feed_names;
    for (const auto& in : inputs) {
      if (in.name == "input_ids") {
        feeds.push_back(Int64Tensor(ids, {1, n}));
      } else if (in.name == "attention_mask") {
        feeds.push_back(Int64Tensor(std::vector<int64_t>(total, 1), {1, total}));
      } else if (in.name == "position_ids") {
        feeds.push_back(Int64Tensor(positions, {1, n}));
      } else if (in.name == "sampling_seed") {  // a sampled head: the call's seed, as toolkit.generate feeds
        feeds.push_back(Int64Tensor({toolkit::sample_topk::CallSeed(args.seed, step)}, {1}));
      } else if (past.count(in.name)) {
        feeds.push_back(std::move(past.at(in.name)));
      } else {
        throw HostError("the model has an input this host does not know: " + in.name,
                        "use a decoder exported by `toolkit convert` (input_ids, attention_mask, position_ids, "
                        "past_key_values.*)");
      }
      feed_names.push_back(in.name.c_str());
    }
    std::vector<Ort::Value> outs = session.Run(Ort::RunOptions{nullptr}, feed_names.data(), feeds.data(),
                                               feeds.size(), output_ptrs.data(), output_ptrs.size());
    const int64_t next = NextToken(output_names, outs);
    generated.push_back(next);
    size_t fed_back = 0;
    for (size_t i = 0; i < output_names.size(); ++i) {
      const std::string& name = output_names[i];
      if (name.rfind(present_prefix, 0) != 0) continue;
      const std::string input = past_prefix + name.substr(present_prefix.size());
      if (past.count(input) == 0) continue;
      past.insert_or_assign(input, std::move(outs[i]));
      ++fed_back;
    }
    if (fed_back != past.size()) {
      throw HostError("the model's present.* outputs do not match its past_key_values.* inputs",
                      "use a decoder exported by `toolkit convert` (each present.X feeds past_key_values.X)");
    }
    ids = {next};
    positions = {positions.back() + 1};
    total += 1;
  }
  return generated;
}

}  // namespace

int main(int argc, char** argv) {
  const OrtApiBase* base = OrtGetApiBase();
  const OrtApi* api = base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    std::cerr << "error: this host was compiled against ONNX Runtime headers of C API " << ORT_API_VERSION
              << ", and the ONNX Runtime it loaded (" << base->GetVersionString() << ") is older\n"
              << "  fix: build the host against the headers of the runtime it runs with "
              << "(custom_ops/cmake/OrtHeaders.cmake: ORT_INCLUDE_DIR), or run it with ONNX Runtime >= 1."
              << ORT_API_VERSION << "\n";
    return 2;
  }
  Ort::InitApi(api);
  try {
    const std::vector<int64_t> tokens = Generate(ParseArgs(argc, argv));
    for (size_t i = 0; i < tokens.size(); ++i) std::cout << (i ? "," : "") << tokens[i];
    std::cout << "\n";
    return 0;
  } catch (const HostError& e) {
    std::cerr << "error: " << e.what() << "\n  fix: " << e.hint << "\n";
  } catch (const Ort::Exception& e) {
    const std::string what = e.what();
    std::cerr << "error: ONNX Runtime: " << what << "\n  fix: "
              << (what.find("cache is full") != std::string::npos
                      ? "the bundle's fixed-capacity KV cache (--kv-capacity) cannot hold the prompt and "
                        "--max-new-tokens: shorten them, or reconvert with a larger --kv-capacity\n"
                      : "check that the bundle was converted for this ONNX Runtime version and is complete\n");
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
  }
  return 2;
}
