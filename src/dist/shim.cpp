// The C API lorafit's `dist` module calls: a c10d process group (TCPStore rendezvous, Gloo on
// the CPU, NCCL on CUDA when compiled in) behind plain functions. No exception crosses this
// boundary: every entry point catches, stores the message for lorafit_dist_last_error and
// returns a failure code. Gloo reports its errors (a closed peer, a timeout) as plain
// std::exception from Work::wait, not c10::Error, so both are caught, then anything else.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef LORAFIT_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <ATen/ATen.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

thread_local std::string last_error;

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
};

template <typename F>
int guarded(const char* what, F&& body) {
  try {
    body();
    return 0;
  } catch (const c10::Error& e) {
    last_error = std::string(what) + ": " + e.what_without_backtrace();
  } catch (const std::exception& e) {
    last_error = std::string(what) + ": " + e.what();
  } catch (...) {
    last_error = std::string(what) + ": unknown C++ exception";
  }
  return -1;
}

// Gloo's transport device: 0 = the address `arg` (loopback runs), 1 = the network interface
// `arg` (GLOO_SOCKET_IFNAME), 2 = the address this host's name resolves to.
std::shared_ptr<::gloo::transport::Device> gloo_device(int kind, const std::string& arg) {
  switch (kind) {
    case 0: return c10d::ProcessGroupGloo::createDeviceForHostname(arg);
    case 1: return c10d::ProcessGroupGloo::createDeviceForInterface(arg);
    default: return c10d::ProcessGroupGloo::createDefaultDevice();
  }
}

void wait(const c10::intrusive_ptr<c10d::Work>& work) {
  if (!work->wait()) {
    throw std::runtime_error("the collective operation did not complete");
  }
}

}  // namespace

extern "C" {

const char* lorafit_dist_last_error() { return last_error.c_str(); }

int lorafit_dist_has_nccl() {
#ifdef LORAFIT_NCCL
  return 1;
#else
  return 0;
#endif
}

// Joins the group: rank 0 hosts the TCPStore on `port` unless `agent_store` says a launcher
// (torchrun's agent) already hosts it, then every rank connects as a client. `backend` is
// "gloo" or "nccl". Returns a handle, or null with the reason in lorafit_dist_last_error.
void* lorafit_dist_init(int rank, int world, const char* addr, int port, int agent_store,
                        const char* backend, int64_t timeout_ms, int device_kind,
                        const char* device_arg) {
  Group* group = nullptr;
  int rc = guarded("joining the process group", [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = rank == 0 && !agent_store;
    opts.numWorkers = world;
    opts.waitWorkers = !agent_store;
    opts.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(addr), opts);
    // Our keys apart from a launcher's own in a shared store.
    auto store = c10::make_intrusive<c10d::PrefixStore>("lorafit", tcp);
    std::string name(backend);
    auto g = std::make_unique<Group>();
    g->store = store;
    if (name == "gloo") {
      auto options = c10d::ProcessGroupGloo::Options::create(timeout);
      options->devices.push_back(gloo_device(device_kind, std::string(device_arg)));
      g->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
#ifdef LORAFIT_NCCL
    } else if (name == "nccl") {
      // Blocking waits make a peer that hangs past the timeout an exception from Work::wait,
      // reported like Gloo's, instead of the watchdog aborting the process (a user's own
      // setting stays).
      setenv("TORCH_NCCL_BLOCKING_WAIT", "1", 0);
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = timeout;
      g->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options);
#endif
    } else {
      throw std::runtime_error("backend '" + name + "' is not compiled into this lorafit");
    }
    group = g.release();
  });
  return rc == 0 ? group : nullptr;
}

// Sums `n` tensors (one dtype, one device) across ranks in place, as one collective: they are
// copied into one flat buffer, reduced, and copied back.
int lorafit_dist_all_reduce_sum(void* handle, at::Tensor** tensors, size_t n) {
  return guarded("all-reduce", [&] {
    if (n == 0) return;
    auto* g = static_cast<Group*>(handle);
    std::vector<at::Tensor> flat;
    flat.reserve(n);
    for (size_t i = 0; i < n; ++i) flat.push_back(tensors[i]->reshape({-1}));
    std::vector<at::Tensor> buffer{torch::cat(flat)};
    wait(g->backend->allreduce(buffer, c10d::AllreduceOptions{}));
    int64_t offset = 0;
    for (size_t i = 0; i < n; ++i) {
      auto count = tensors[i]->numel();
      tensors[i]->copy_(buffer[0].narrow(0, offset, count).view(tensors[i]->sizes()));
      offset += count;
    }
  });
}

// Replaces each of the `n` tensors by rank `root`'s.
int lorafit_dist_broadcast(void* handle, at::Tensor** tensors, size_t n, int root) {
  return guarded("broadcast", [&] {
    auto* g = static_cast<Group*>(handle);
    for (size_t i = 0; i < n; ++i) {
      std::vector<at::Tensor> one{*tensors[i]};
      c10d::BroadcastOptions opts;
      opts.rootRank = root;
      wait(g->backend->broadcast(one, opts));
    }
  });
}

// Records in the store that this rank has entered its exchange number `exchange` (one key per
// rank), so that when an exchange times out the others can tell which rank never came.
int lorafit_dist_mark(void* handle, const char* key, int64_t exchange) {
  return guarded("marking progress", [&] {
    std::string value = std::to_string(exchange);
    static_cast<Group*>(handle)->store->set(key, std::vector<uint8_t>(value.begin(), value.end()));
  });
}

// Reads the marks of ranks 0..world-1 (`key_prefix` + rank) into `exchanges` (0: none yet)
// through a new connection to the store at addr:port that gives up after `timeout_ms`: the
// group's own connection may be stuck, and the store itself may live in the rank that hangs.
int lorafit_dist_read_marks(const char* addr, int port, const char* key_prefix,
                            int world, int64_t timeout_ms, int64_t* exchanges) {
  return guarded("reading the ranks' progress", [&] {
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = false;
    opts.waitWorkers = false;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(addr), opts);
    c10d::PrefixStore store("lorafit", tcp);
    for (int rank = 0; rank < world; ++rank) {
      exchanges[rank] = store.add(std::string(key_prefix) + std::to_string(rank), 0);
    }
  });
}

int lorafit_dist_barrier(void* handle) {
  return guarded("barrier", [&] {
    wait(static_cast<Group*>(handle)->backend->barrier(c10d::BarrierOptions{}));
  });
}

void lorafit_dist_destroy(void* handle) {
  guarded("leaving the process group", [&] { delete static_cast<Group*>(handle); });
}

}  // extern "C"
