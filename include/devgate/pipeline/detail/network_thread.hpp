#pragma once

namespace devgate::detail {

/// True on a thread while it runs a network transport's intake (the gateway marks it): a push
/// there must never wait, since every session of the thread would wait with it.
inline thread_local bool on_network_thread = false;

/// Marks the calling thread as a network thread for the scope's life (nests).
class network_thread_scope {
 public:
  /// Marks the thread.
  network_thread_scope() noexcept : was_(on_network_thread) { on_network_thread = true; }
  /// Restores the mark it found.
  ~network_thread_scope() { on_network_thread = was_; }
  network_thread_scope(const network_thread_scope&) = delete;
  network_thread_scope& operator=(const network_thread_scope&) = delete;

 private:
  bool was_;
};

}  // namespace devgate::detail
