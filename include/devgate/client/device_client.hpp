#pragma once

#include <asio.hpp>
#include <nlohmann/json.hpp>

#include <array>        // read buffer, masking keys
#include <atomic>       // figures read from other threads
#include <cstddef>      // std::byte, std::size_t
#include <cstdint>      // sequence numbers
#include <cstring>      // std::memcpy
#include <deque>        // write queue
#include <functional>   // callbacks
#include <map>          // unanswered sends, by id
#include <memory>       // socket, reader
#include <mutex>        // last image hash
#include <optional>     // message ids
#include <random>       // masking keys, handshake key
#include <span>         // frames
#include <string>       // ids, texts
#include <string_view>  // texts
#include <utility>      // std::move
#include <vector>       // frames, firmware image

#include "devgate/core/bytes.hpp"
#include "devgate/detail/crypto.hpp"
#include "devgate/device/protocol.hpp"
#include "devgate/websocket/frame.hpp"
#include "devgate/websocket/handshake.hpp"
#include "devgate/websocket/reader.hpp"

namespace devgate::client {

/// Where and who a device client connects as.
struct device_client_options {
  std::string host = "127.0.0.1";  ///< Server IP address (numeric: names are not resolved).
  std::uint16_t port = 0;          ///< Server port.
  std::string device_id;           ///< The device id (path /ws/<device_id>).
  std::string firmware_version;    ///< Reported in hello; replaced when an update verifies.
  /// Largest message accepted from the server (firmware chunks are small; 1009 past it).
  std::size_t max_message_size = 4u << 20;
  /// Acknowledge each `deliver` after its callback ran (off: call `ack` yourself).
  bool auto_ack = true;
  /// Sends with an id kept until the server answers `sent`, and sent again (same id, in id
  /// order) after each welcome. Past it the oldest is let go (counted). Keep it below the
  /// server's dispatch window (`store::dispatch_window::span`, 1024) for exactly-once.
  std::size_t max_unacknowledged = 1000;
  /// Attributes reported in hello (`hello.attributes`; campaigns target them).
  std::vector<std::pair<std::string, std::string>> attributes;
};

/// Faults a test can give one simulated device (`device_client::set_faults`), to script a
/// fleet for rollout campaigns.
struct device_faults {
  /// Report a failed verification: the image's SHA-256 does not match (one byte corrupted).
  bool fail_verification = false;
  /// Stop acknowledging firmware chunks once this many bytes arrived (a device stalled mid
  /// transfer; 0: never). The connection stays up.
  std::uint64_t stall_after = 0;
};

/// A device speaking the devgate protocol over WebSocket, header-only on Asio: connect, send,
/// receive with resume (sequence numbers kept across reconnects, duplicates dropped) and
/// firmware download with SHA-256 verification (partial images kept across reconnects).
///
/// Everything runs on the given io_context; the public functions may be called from any
/// thread (they post). Set the callbacks before `connect()`; they run on the io_context's
/// thread. Destroy the client only once the io_context no longer runs its handlers (stopped,
/// or closed and drained).
class device_client {
 public:
  /// A client that will connect with `options` on `ioc`.
  device_client(asio::io_context& ioc, device_client_options options)
      : ioc_(ioc), options_(std::move(options)), rng_(std::random_device{}()) {}
  device_client(const device_client&) = delete;
  device_client& operator=(const device_client&) = delete;

  /// The welcome message (state, last_seq, replay count) after each (re)connection.
  std::function<void(const nlohmann::json&)> on_welcome;
  /// A sequenced message, once (duplicates from a resume are dropped before this).
  std::function<void(std::uint64_t seq, const nlohmann::json&)> on_deliver;
  /// An `event` (topic message).
  std::function<void(const nlohmann::json&)> on_event;
  /// Any other text message (sent, error, subscribed, firmware_available...).
  std::function<void(const nlohmann::json&)> on_text;
  /// A firmware transfer ended: `ok` when the server confirmed it verified.
  std::function<void(const std::string& version, bool ok, const std::string& reason)> on_firmware;
  /// The connection ended: the server's close code, the code this client failed it with
  /// (1002, 1007, 1009), 1006 when it dropped without one, or 0 when the connection or
  /// handshake failed.
  std::function<void(std::uint16_t code)> on_closed;

  /// Connects (or reconnects) and sends hello with the last sequence number received.
  void connect() {
    asio::post(ioc_, [this] { start_connect(); });
  }
  /// Sends `data` into the pipeline; with `id`, the server answers `sent`, and until it does
  /// the send is kept and sent again after each reconnection (give sends increasing ids).
  void send(nlohmann::json data, std::optional<std::uint64_t> id = std::nullopt) {
    nlohmann::json j{{"type", "send"}, {"data", std::move(data)}};
    if (!id) {
      send_json(std::move(j));
      return;
    }
    j["id"] = *id;
    asio::post(ioc_, [this, id = *id, t = j.dump()]() mutable {
      write_frame(websocket::opcode::text, std::as_bytes(std::span(t.data(), t.size())));
      unacked_.insert_or_assign(id, std::move(t));
      while (unacked_.size() > options_.max_unacknowledged) {
        unacked_.erase(unacked_.begin());
        ++unacked_dropped_;
      }
      unacked_count_ = unacked_.size();
    });
  }
  /// Sends any JSON message (tests use it for malformed requests).
  void send_json(nlohmann::json j) { send_text(j.dump()); }
  /// Sends raw text as one text frame.
  void send_text(std::string text) {
    asio::post(ioc_, [this, t = std::move(text)] {
      write_frame(websocket::opcode::text, std::as_bytes(std::span(t.data(), t.size())));
    });
  }
  /// Subscribes to a topic (server, stats, fleet).
  void subscribe(std::string topic) { send_json({{"type", "subscribe"}, {"topic", topic}}); }
  /// Acknowledges sequenced messages up to `seq`.
  void ack(std::uint64_t seq) { send_json({{"type", "ack"}, {"seq", seq}}); }
  /// Starts an orderly close with `code`.
  void close(std::uint16_t code = 1000) {
    asio::post(ioc_, [this, code] {
      const auto payload = websocket::encode_close_payload(static_cast<close_code>(code), {});
      write_frame(websocket::opcode::close, payload);
      closing_ = true;
    });
  }
  /// Drops the TCP connection at once, without a close frame (simulates a network failure).
  void abort() {
    asio::post(ioc_, [this] { drop(1006); });
  }
  /// Gives this device `f` from the next firmware chunk or result on (a fleet script).
  void set_faults(device_faults f) {
    asio::post(ioc_, [this, f] { faults_ = f; });
  }

  /// Sends with an id not yet answered `sent` (sent again after each welcome).
  [[nodiscard]] std::size_t unacknowledged() const noexcept { return unacked_count_.load(); }
  /// Unanswered sends let go because more than `max_unacknowledged` were kept.
  [[nodiscard]] std::uint64_t unacknowledged_dropped() const noexcept {
    return unacked_dropped_.load();
  }
  /// `sent` answers received.
  [[nodiscard]] std::uint64_t sent_answers() const noexcept { return sent_answers_.load(); }
  /// Highest sequence number received (kept across reconnects).
  [[nodiscard]] std::uint64_t last_seq() const noexcept { return last_seq_.load(); }
  /// True between the welcome and the end of the connection.
  [[nodiscard]] bool connected() const noexcept { return connected_.load(); }
  /// Welcome messages received (one per successful connection).
  [[nodiscard]] std::uint64_t welcomes() const noexcept { return welcomes_.load(); }
  /// Sequenced messages dropped as duplicates.
  [[nodiscard]] std::uint64_t duplicates() const noexcept { return duplicates_.load(); }
  /// Firmware updates the server confirmed verified.
  [[nodiscard]] std::uint64_t firmware_verified() const noexcept { return fw_verified_.load(); }
  /// Transfers this client asked to restart from byte 0 (`fw_restart`: it lacked the bytes
  /// before the server's resume offset).
  [[nodiscard]] std::uint64_t firmware_restarts() const noexcept { return fw_restarts_.load(); }
  /// Firmware chunks received (all transfers).
  [[nodiscard]] std::uint64_t chunks_received() const noexcept { return chunks_.load(); }
  /// The SHA-256 (hex) this client computed over the last complete image.
  [[nodiscard]] std::string last_image_sha256() const {
    std::lock_guard lock(sha_mutex_);
    return last_sha_;
  }

 private:
  struct reader_sink {
    device_client& c;
    void on_message(payload_kind k, shared_bytes b) { c.handle_message(k, std::move(b)); }
    void on_ping(std::span<const std::byte> p) { c.write_frame(websocket::opcode::pong, p); }
    void on_pong(std::span<const std::byte> /*p*/) {}
    void on_close(std::uint16_t code, std::string_view /*reason*/) { c.peer_closed(code); }
  };

  void start_connect() {
    drop(0, false);
    ++generation_;
    socket_ = std::make_unique<asio::ip::tcp::socket>(ioc_);
    websocket::reader_limits limits;
    limits.max_message_size = options_.max_message_size;
    limits.role = websocket::reader_role::client;
    reader_ = std::make_unique<websocket::frame_reader>(limits);
    writes_.clear();
    writing_ = false;
    closing_ = false;
    open_ = false;
    std::error_code ec;
    const auto address = asio::ip::make_address(options_.host, ec);
    if (ec) {
      if (on_closed) on_closed(0);
      return;
    }
    const auto gen = generation_;
    socket_->async_connect({address, options_.port}, [this, gen](const std::error_code& e) {
      if (gen != generation_) return;
      if (e) {
        drop(0);
        return;
      }
      std::array<std::uint8_t, 16> nonce{};
      for (auto& b : nonce) b = static_cast<std::uint8_t>(rng_());
      key_ = detail::base64_encode(nonce);
      request_ = "GET /ws/" + options_.device_id + " HTTP/1.1\r\nHost: " + options_.host +
                 "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + key_ +
                 "\r\nSec-WebSocket-Version: 13\r\n\r\n";
      asio::async_write(*socket_, asio::buffer(request_),
                        [this, gen](const std::error_code& we, std::size_t) {
                          if (gen != generation_) return;
                          if (we) {
                            drop(0);
                            return;
                          }
                          read_response(gen);
                        });
    });
  }

  // RFC 6455 4.1: the server's 101 with the Sec-WebSocket-Accept of our key.
  void read_response(std::uint64_t gen) {
    response_.consume(response_.size());
    asio::async_read_until(
        *socket_, response_, "\r\n\r\n", [this, gen](const std::error_code& e, std::size_t n) {
          if (gen != generation_) return;
          if (e) {
            drop(0);
            return;
          }
          const auto* p = static_cast<const char*>(response_.data().data());
          const std::string head(p, n);
          const std::string want = "Sec-WebSocket-Accept: " + websocket::accept_key(key_);
          if (!head.starts_with("HTTP/1.1 101") || head.find(want) == std::string::npos) {
            drop(0);
            return;
          }
          response_.consume(n);
          open_ = true;
          nlohmann::json hello{{"type", "hello"},
                               {"protocol", device::protocol_version},
                               {"last_seq", last_seq_.load()}};
          if (!options_.firmware_version.empty()) {
            hello["firmware_version"] = options_.firmware_version;
          }
          if (!options_.attributes.empty()) {
            auto& attrs = hello["attributes"] = nlohmann::json::object();
            for (const auto& [k, v] : options_.attributes) attrs[k] = v;
          }
          const auto text = hello.dump();
          write_frame(websocket::opcode::text, std::as_bytes(std::span(text.data(), text.size())));
          // Bytes that followed the 101 are the first frames.
          if (response_.size() != 0) {
            std::vector<std::byte> early(response_.size());
            std::memcpy(early.data(), response_.data().data(), early.size());
            response_.consume(response_.size());
            if (!feed(early)) return;
          }
          read_loop(gen);
        });
  }

  void read_loop(std::uint64_t gen) {
    socket_->async_read_some(asio::buffer(buffer_),
                             [this, gen](const std::error_code& e, std::size_t n) {
                               if (gen != generation_) return;
                               if (e) {
                                 drop(1006);
                                 return;
                               }
                               if (!feed(std::span<std::byte>(buffer_.data(), n))) return;
                               if (gen == generation_ && socket_) read_loop(gen);
                             });
  }

  // Feeds bytes to the reader; false when the connection ended.
  bool feed(std::span<std::byte> bytes) {
    const auto gen = generation_;
    reader_sink sink{*this};
    if (reader_->consume(bytes, sink) != websocket::read_status::ok) {
      const auto code = reader_->error();
      write_frame(websocket::opcode::close, websocket::encode_close_payload(code, {}));
      drop(static_cast<std::uint16_t>(code));
      return false;
    }
    return gen == generation_ && socket_ != nullptr;
  }

  void peer_closed(std::uint16_t code) {
    if (!closing_) {
      // RFC 6455 5.5.1: echo the close, then the server closes TCP.
      write_frame(
          websocket::opcode::close,
          websocket::encode_close_payload(static_cast<close_code>(code == 1005 ? 1000 : code), {}));
    }
    closed_code_ = code;
    closing_ = true;
    // Wait for the echo to be written and the server's FIN (the read loop ends with EOF).
  }

  // Ends the connection and reports `code` (once per connection).
  void drop(std::uint16_t code, bool report = true) {
    if (!socket_) return;
    std::error_code ignored;
    socket_->shutdown(asio::socket_base::shutdown_both, ignored);
    socket_->close(ignored);
    socket_.reset();
    ++generation_;
    const bool was = connected_.exchange(false);
    (void)was;
    if (closed_code_ != 0) code = closed_code_;
    closed_code_ = 0;
    if (report && on_closed) on_closed(code);
  }

  void write_frame(websocket::opcode op, std::span<const std::byte> payload) {
    if (!socket_ || !open_) return;
    std::array<std::byte, 4> key{};
    const std::uint32_t r = rng_();
    std::memcpy(key.data(), &r, 4);
    writes_.push_back(websocket::encode_client_frame(op, true, payload, key));
    if (!writing_) write_next();
  }
  void write_next() {
    if (writes_.empty() || !socket_) {
      writing_ = false;
      return;
    }
    writing_ = true;
    const auto gen = generation_;
    asio::async_write(*socket_, asio::buffer(writes_.front()),
                      [this, gen](const std::error_code& e, std::size_t) {
                        if (gen != generation_) return;
                        writes_.pop_front();
                        if (e) {
                          writing_ = false;
                          drop(1006);
                          return;
                        }
                        write_next();
                      });
  }

  void handle_message(payload_kind kind, shared_bytes bytes) {
    if (kind == payload_kind::binary) {
      handle_chunk(bytes);
      return;
    }
    auto j = nlohmann::json::parse(bytes.view(), nullptr, false);
    if (j.is_discarded() || !j.is_object()) return;
    const auto type = j.value("type", "");
    if (type == "welcome") {
      connected_ = true;
      ++welcomes_;
      if (on_welcome) on_welcome(j);
      // What the previous connections left unanswered goes again, same ids, in order: the
      // server answers a resend it already dispatched without dispatching it again.
      for (const auto& [id, text] : unacked_) {
        write_frame(websocket::opcode::text, std::as_bytes(std::span(text.data(), text.size())));
      }
      // A result whose fw_status was lost with the previous connection: the welcome says.
      if (fw_reported_ && j.contains("state") && j["state"].contains("firmware")) {
        const auto& f = j["state"]["firmware"];
        const auto status = f.value("status", "");
        if (device::get_uint(f, "rollout").value_or(0) == fw_rollout_ &&
            (status == "verified" || status == "failed")) {
          fw_reported_ = false;
          if (status == "verified") {
            ++fw_verified_;
            options_.firmware_version = fw_version_;
          }
          if (on_firmware) on_firmware(fw_version_, status == "verified", f.value("reason", ""));
        }
      }
    } else if (type == "deliver") {
      const auto seq = device::get_uint(j, "seq").value_or(0);
      if (seq <= last_seq_.load()) {
        ++duplicates_;
      } else {
        last_seq_ = seq;
        if (on_deliver) on_deliver(seq, j);
      }
      if (options_.auto_ack && seq != 0) ack_now(seq);
    } else if (type == "sent") {
      if (const auto id = device::get_uint(j, "id")) {
        unacked_.erase(*id);
        unacked_count_ = unacked_.size();
      }
      ++sent_answers_;
      if (on_text) on_text(j);
    } else if (type == "event") {
      if (on_event) on_event(j);
    } else if (type == "firmware") {
      start_firmware(j);
    } else if (type == "fw_status") {
      fw_reported_ = false;
      const bool ok = j.value("status", "") == "verified";
      if (ok) {
        ++fw_verified_;
        options_.firmware_version = fw_version_;
      }
      if (on_firmware) on_firmware(fw_version_, ok, j.value("reason", ""));
    } else {
      if (type == "error" && j.value("code", "") == "unknown_type" &&
          j.value("ref", "") == "fw_restart") {
        // A server older than fw_restart: the image cannot be had again in this rollout.
        const auto text = nlohmann::json{{"type", "fw_result"},
                                         {"rollout", fw_rollout_},
                                         {"ok", false},
                                         {"reason", "partial image lost"}}
                              .dump();
        write_frame(websocket::opcode::text, std::as_bytes(std::span(text.data(), text.size())));
      }
      if (on_text) on_text(j);
    }
  }

  void ack_now(std::uint64_t seq) {
    const auto text = nlohmann::json{{"type", "ack"}, {"seq", seq}}.dump();
    write_frame(websocket::opcode::text, std::as_bytes(std::span(text.data(), text.size())));
  }

  void start_firmware(const nlohmann::json& j) {
    const auto rollout = device::get_uint(j, "rollout").value_or(0);
    const auto size = device::get_uint(j, "size").value_or(0);
    const auto offset = device::get_uint(j, "offset").value_or(0);
    bool lost = false;
    if (rollout != fw_rollout_ || fw_image_.size() != size || offset > fw_received_) {
      // A new image, or one whose first `offset` bytes we do not hold (this client started
      // after they came): then the server is asked for it again from byte 0.
      lost = offset > 0;
      fw_rollout_ = rollout;
      fw_image_.assign(size, std::byte{0});
      fw_received_ = 0;
    }
    fw_version_ = j.value("version", "");
    fw_sha_ = j.value("sha256", "");
    fw_reported_ = false;
    if (lost) {
      // A new `firmware` at offset 0 follows; chunks still in flight are dropped meanwhile
      // (their offset is not the next byte expected).
      const auto text = nlohmann::json{{"type", "fw_restart"}, {"rollout", rollout}}.dump();
      write_frame(websocket::opcode::text, std::as_bytes(std::span(text.data(), text.size())));
      ++fw_restarts_;
      return;
    }
    fw_received_ = offset;
    maybe_finish();  // every byte was acknowledged before a drop: only the result is missing
  }

  void handle_chunk(const shared_bytes& bytes) {
    const auto h = device::decode_chunk_header(bytes.bytes());
    if (!h || h->rollout != fw_rollout_) return;
    if (h->offset != fw_received_ || h->offset + std::uint64_t{h->length} > fw_image_.size()) {
      return;  // a chunk from before a resume; the stream continues at our offset
    }
    if (faults_.stall_after != 0 && fw_received_ >= faults_.stall_after) return;  // stalled
    std::memcpy(fw_image_.data() + h->offset, bytes.data() + device::chunk_header_size, h->length);
    fw_received_ += h->length;
    ++chunks_;
    const auto text =
        nlohmann::json{{"type", "fw_ack"}, {"rollout", fw_rollout_}, {"offset", fw_received_}}
            .dump();
    write_frame(websocket::opcode::text, std::as_bytes(std::span(text.data(), text.size())));
    maybe_finish();
  }

  // With the whole image: hash it and report the result once.
  void maybe_finish() {
    if (fw_received_ == fw_image_.size() && !fw_image_.empty() && !fw_reported_) {
      fw_reported_ = true;
      if (faults_.fail_verification) fw_image_[0] ^= std::byte{0xFF};  // a corrupt write
      const auto sha = detail::hex_encode(detail::sha256(fw_image_));
      {
        std::lock_guard lock(sha_mutex_);
        last_sha_ = sha;
      }
      nlohmann::json result{
          {"type", "fw_result"}, {"rollout", fw_rollout_}, {"ok", sha == fw_sha_}, {"sha256", sha}};
      if (sha != fw_sha_) result["reason"] = "sha256 mismatch on the device";
      const auto t = result.dump();
      write_frame(websocket::opcode::text, std::as_bytes(std::span(t.data(), t.size())));
    }
  }

  asio::io_context& ioc_;
  device_client_options options_;
  std::mt19937 rng_;  // masking keys and nonces: unpredictable enough for a device simulator
  std::unique_ptr<asio::ip::tcp::socket> socket_;
  std::unique_ptr<websocket::frame_reader> reader_;
  std::array<std::byte, 16384> buffer_{};
  asio::streambuf response_;
  std::string key_;
  std::string request_;
  std::deque<std::vector<std::byte>> writes_;
  bool writing_ = false;
  bool closing_ = false;
  bool open_ = false;
  std::uint16_t closed_code_ = 0;
  std::uint64_t generation_ = 0;
  // Firmware in progress.
  std::uint64_t fw_rollout_ = 0;
  std::vector<std::byte> fw_image_;
  std::uint64_t fw_received_ = 0;
  std::string fw_version_;
  std::string fw_sha_;
  bool fw_reported_ = false;
  device_faults faults_;
  // Figures readable from any thread.
  std::map<std::uint64_t, std::string> unacked_;  // id -> the send's text, until `sent`
  std::atomic<std::size_t> unacked_count_{0};
  std::atomic<std::uint64_t> unacked_dropped_{0};
  std::atomic<std::uint64_t> sent_answers_{0};
  std::atomic<std::uint64_t> last_seq_{0};
  std::atomic<bool> connected_{false};
  std::atomic<std::uint64_t> welcomes_{0};
  std::atomic<std::uint64_t> duplicates_{0};
  std::atomic<std::uint64_t> fw_verified_{0};
  std::atomic<std::uint64_t> fw_restarts_{0};
  std::atomic<std::uint64_t> chunks_{0};
  mutable std::mutex sha_mutex_;
  std::string last_sha_;
};

}  // namespace devgate::client
