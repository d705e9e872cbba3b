#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>    // std::copy
#include <array>        // chunk headers
#include <charconv>     // std::to_chars
#include <cstddef>      // std::byte, std::size_t
#include <cstdint>      // wire integers
#include <optional>     // decode results
#include <span>         // chunk bytes
#include <string>       // JSON text
#include <string_view>  // names
#include <utility>      // attribute pairs
#include <vector>       // attributes

#include "devgate/core/bytes.hpp"
#include "devgate/transport/transport.hpp"  // close_code

/// The devgate device protocol, version 1 (docs/PROTOCOL.md is the specification): JSON text
/// control messages in both directions and binary firmware chunks from server to device.
namespace devgate::device {

/// The protocol version a device announces in `hello`; the server speaks only this one.
inline constexpr int protocol_version = 1;

// Application close codes: RFC 6455 7.4.2 reserves 4000-4999 for applications.

/// A newer session with the same device id took over; the device must not reconnect on its own.
inline constexpr close_code close_replaced = static_cast<close_code>(4000);
/// The device asked for a protocol version the server does not speak.
inline constexpr close_code close_unsupported_version = static_cast<close_code>(4001);
/// The device sent too many bad messages in one session (see hub_options::max_errors).
inline constexpr close_code close_too_many_errors = static_cast<close_code>(4002);

/// The `code` of an `error` message: what the device did wrong or why a request failed.
enum class error : std::uint8_t {
  bad_json,             ///< The text is not JSON (or nests deeper than the limit).
  bad_message,          ///< JSON, but not an object with the fields its type needs.
  unknown_type,         ///< `type` names no device message.
  hello_required,       ///< A device message or binary frame came before `hello`.
  duplicate_hello,      ///< A second `hello` in one session.
  unsupported_version,  ///< `hello.protocol` is not 1 (the session is then closed with 4001).
  bad_resume,           ///< `hello.last_seq` is beyond what the server ever sent.
  bad_ack,              ///< `ack.seq` is beyond the last sent or below one already acknowledged.
  bad_topic,            ///< (Un)subscribing to a topic other than server, stats and fleet.
  too_big,              ///< The message is over `hub_options::max_message_bytes`.
  queue_full,           ///< The pipeline is at capacity; the message was not accepted.
  closed,               ///< The gateway is stopping; the message was not accepted.
  bad_fw_ack,           ///< `fw_ack.offset` is beyond what was sent, misaligned or backwards.
  unknown_rollout,      ///< `fw_ack`/`fw_result`/`fw_restart` names a rollout it is not in.
  topic_not_allowed,    ///< The host's topic policy does not let this device subscribe to it.
  /// Ack policy on_dispatch: the sink did not take the message (it failed past its retries, or
  /// the pipeline dropped it); nothing was recorded, so a resend with the same id is dispatched.
  not_dispatched,
  /// Ack policy on_dispatch: the device has `dispatch_window::span` sends in flight already.
  too_many_in_flight,
};

/// The wire name of `e`.
[[nodiscard]] constexpr std::string_view to_string(error e) noexcept {
  switch (e) {
    case error::bad_json:
      return "bad_json";
    case error::bad_message:
      return "bad_message";
    case error::unknown_type:
      return "unknown_type";
    case error::hello_required:
      return "hello_required";
    case error::duplicate_hello:
      return "duplicate_hello";
    case error::unsupported_version:
      return "unsupported_version";
    case error::bad_resume:
      return "bad_resume";
    case error::bad_ack:
      return "bad_ack";
    case error::bad_topic:
      return "bad_topic";
    case error::too_big:
      return "too_big";
    case error::queue_full:
      return "queue_full";
    case error::closed:
      return "closed";
    case error::bad_fw_ack:
      return "bad_fw_ack";
    case error::unknown_rollout:
      return "unknown_rollout";
    case error::topic_not_allowed:
      return "topic_not_allowed";
    case error::not_dispatched:
      return "not_dispatched";
    case error::too_many_in_flight:
      return "too_many_in_flight";
  }
  return "bad_message";
}

/// A sentence telling the device's developer what to do about `e`.
[[nodiscard]] constexpr std::string_view describe(error e) noexcept {
  switch (e) {
    case error::bad_json:
      return "the message is not valid JSON (or nests deeper than 32 levels)";
    case error::bad_message:
      return "the message must be a JSON object with the fields its type requires";
    case error::unknown_type:
      return "unknown message type; see docs/PROTOCOL.md for the device messages";
    case error::hello_required:
      return "send hello first: {\"type\":\"hello\",\"protocol\":1}";
    case error::duplicate_hello:
      return "hello was already received in this session";
    case error::unsupported_version:
      return "this server speaks protocol 1 only";
    case error::bad_resume:
      return "last_seq is beyond the last sequence number sent; everything unacknowledged is "
             "sent again";
    case error::bad_ack:
      return "ack.seq must be between the last acknowledged and the last received sequence";
    case error::bad_topic:
      return "devices may subscribe to server, stats and fleet only";
    case error::too_big:
      return "the message is over the size limit; send smaller messages";
    case error::queue_full:
      return "the gateway is at capacity; the message was not accepted, retry later";
    case error::closed:
      return "the gateway is stopping; reconnect later";
    case error::bad_fw_ack:
      return "fw_ack.offset must be a chunk boundary (or the image size) between the last "
             "acknowledged offset and the bytes sent";
    case error::unknown_rollout:
      return "no firmware transfer with that rollout id is in progress for this device";
    case error::topic_not_allowed:
      return "this gateway does not let this device subscribe to that topic (devices get fleet "
             "unless the host allows more)";
    case error::not_dispatched:
      return "the message did not reach the sink and was not recorded; send it again (same id)";
    case error::too_many_in_flight:
      return "too many sends await their sent answer; wait for some before sending more";
  }
  return "";
}

/// The topics devgate itself defines.
namespace topics {
/// Every dispatched message (device, sequence, worker, times): the server log.
inline constexpr std::string_view server = "server";
/// The pub/sub name of the server log's batched subscribers (`subscribe` with `batch: true`):
/// not a wire topic (`#` is not a topic character), their frames say `server`.
inline constexpr std::string_view server_batched = "server#batch";
/// Gateway figures published by `hub::publish_stats`.
inline constexpr std::string_view stats = "stats";
/// Every connected device is on it; messages are shared frames, not sequenced.
inline constexpr std::string_view fleet = "fleet";
/// Prefix of the per-device topics `device/<id>`: sequenced, kept and resumed.
inline constexpr std::string_view device_prefix = "device/";
}  // namespace topics

// ---- binary firmware chunks ---------------------------------------------------------------
//
//   0       1       2               4                               8
//   +-------+-------+---------------+-------------------------------+
//   | type  | hlen  | flags         | rollout id (u32)              |
//   +-------+-------+---------------+-------------------------------+
//   | offset (u32)                  | length (u32)                  |
//   +-------------------------------+-------------------------------+
//   | data (length bytes) ...
//   All integers big-endian (DataView's default); type = 1; hlen = 16; flags bit 0 = last chunk.

/// Bytes before the data of a firmware chunk.
inline constexpr std::size_t chunk_header_size = 16;
/// The `type` byte of a firmware chunk.
inline constexpr std::uint8_t chunk_type_firmware = 1;
/// Largest image a chunk header can address.
inline constexpr std::uint64_t max_firmware_size = 0xFFFFFFFFu;

/// The fields of a firmware chunk header.
struct chunk_header {
  std::uint32_t rollout = 0;  ///< Which rollout (image) the chunk belongs to.
  std::uint32_t offset = 0;   ///< Where the data goes in the image.
  std::uint32_t length = 0;   ///< Data bytes after the header.
  bool last = false;          ///< The image's final chunk.
};

namespace detail_protocol {
inline void put32(std::byte* p, std::uint32_t v) noexcept {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::byte>(v >> (24 - 8 * i));
}
inline std::uint32_t get32(const std::byte* p) noexcept {
  std::uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v = (v << 8) | static_cast<std::uint8_t>(p[i]);
  return v;
}
}  // namespace detail_protocol

/// Writes `h` in the wire layout above.
inline void encode_chunk_header(std::span<std::byte, chunk_header_size> out,
                                const chunk_header& h) noexcept {
  out[0] = static_cast<std::byte>(chunk_type_firmware);
  out[1] = static_cast<std::byte>(chunk_header_size);
  out[2] = std::byte{0};
  out[3] = static_cast<std::byte>(h.last ? 1 : 0);
  detail_protocol::put32(out.data() + 4, h.rollout);
  detail_protocol::put32(out.data() + 8, h.offset);
  detail_protocol::put32(out.data() + 12, h.length);
}

/// Reads a chunk header; std::nullopt unless `in` is a whole, well-formed firmware chunk.
[[nodiscard]] inline std::optional<chunk_header> decode_chunk_header(
    std::span<const std::byte> in) noexcept {
  if (in.size() < chunk_header_size) return std::nullopt;
  if (static_cast<std::uint8_t>(in[0]) != chunk_type_firmware) return std::nullopt;
  const auto hlen = static_cast<std::uint8_t>(in[1]);
  if (hlen < chunk_header_size || hlen > in.size()) return std::nullopt;
  chunk_header h;
  h.last = (static_cast<std::uint8_t>(in[3]) & 1) != 0;
  h.rollout = detail_protocol::get32(in.data() + 4);
  h.offset = detail_protocol::get32(in.data() + 8);
  h.length = detail_protocol::get32(in.data() + 12);
  if (h.length != in.size() - hlen) return std::nullopt;
  return h;
}

// ---- JSON ---------------------------------------------------------------------------------

/// Deepest nesting accepted in a device message (keeps re-serialising bounded).
inline constexpr int max_json_depth = 32;

/// Parses a device's text message: std::nullopt for malformed JSON or nesting deeper than
/// `max_json_depth` (checked before parsing). Never throws.
[[nodiscard]] inline std::optional<nlohmann::json> parse_json(std::string_view text) {
  int depth = 0;
  bool in_string = false;
  bool escaped = false;
  for (const char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_json_depth) return std::nullopt;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  auto j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return std::nullopt;
  return j;
}

/// The fields of a `send` message, read in one pass without building a JSON tree: the hub's
/// path for the message devices send most.
struct send_fields {
  shared_bytes data;                ///< The characters of `data` (a string).
  std::optional<std::uint64_t> id;  ///< `id`, when present.
};

namespace detail_protocol {
// A SAX pass that accepts exactly the common `send`: a JSON object with `"type":"send"`, a
// string `data`, an optional non-negative integer `id`, each at most once, and any other
// members (ignored, nested at most `max_json_depth`). Anything else stops the pass early: the
// caller then parses the message as a tree, which gives every other case its exact answer.
class send_reader {
 public:
  using json = nlohmann::json;
  bool null() { return other(); }
  bool boolean(bool /*v*/) { return other(); }
  bool number_integer(json::number_integer_t v) {
    if (v < 0) return other();
    return number_unsigned(static_cast<json::number_unsigned_t>(v));
  }
  bool number_unsigned(json::number_unsigned_t v) {
    if (depth_ != 1 || field_ == field::other) return true;
    if (field_ != field::id) return false;
    out_.id = v;
    return true;
  }
  bool number_float(json::number_float_t /*v*/, const json::string_t& /*text*/) { return other(); }
  bool string(json::string_t& v) {
    if (depth_ != 1 || field_ == field::other) return true;
    if (field_ == field::type) return v == "send";
    if (field_ != field::data) return false;
    out_.data = shared_bytes::copy_of(std::string_view(v));
    return true;
  }
  bool binary(json::binary_t& /*v*/) { return false; }
  bool start_object(std::size_t /*n*/) { return open(); }
  bool start_array(std::size_t /*n*/) { return depth_ != 0 && open(); }
  bool end_object() { return close(); }
  bool end_array() { return close(); }
  bool key(json::string_t& k) {
    if (depth_ != 1) return true;
    field_ = k == "type"   ? field::type
             : k == "data" ? field::data
             : k == "id"   ? field::id
                           : field::other;
    if (field_ == field::other) return true;
    const auto bit = static_cast<unsigned>(1u << static_cast<unsigned>(field_));
    if ((seen_ & bit) != 0) return false;  // a repeated field: the tree path decides
    seen_ |= bit;
    return true;
  }
  bool parse_error(std::size_t /*pos*/, const std::string& /*token*/,
                   const nlohmann::detail::exception& /*e*/) {
    return false;
  }
  // The fields, if the whole text was a `send` this pass accepts.
  std::optional<send_fields> take(bool parsed) {
    constexpr unsigned need =
        (1u << static_cast<unsigned>(field::type)) | (1u << static_cast<unsigned>(field::data));
    if (!parsed || (seen_ & need) != need) return std::nullopt;
    return std::move(out_);
  }

 private:
  enum class field : std::uint8_t { type, data, id, other };
  // A scalar that is never the value of `type`, `data` or `id`.
  bool other() const noexcept { return depth_ != 1 || field_ == field::other; }
  bool open() {
    if (depth_ == 1 && field_ != field::other) return false;
    return ++depth_ <= max_json_depth;
  }
  bool close() {
    --depth_;
    return true;
  }
  int depth_ = 0;
  field field_ = field::other;
  unsigned seen_ = 0;
  send_fields out_;
};
}  // namespace detail_protocol

/// Reads `text` as a `send` with a string `data` in one pass; std::nullopt when it is anything
/// else (another type, non-string data, a malformed field, not JSON), which `parse_json` and
/// the field checks then answer exactly. Never throws.
[[nodiscard]] inline std::optional<send_fields> read_send(std::string_view text) {
  detail_protocol::send_reader reader;
  const bool parsed = nlohmann::json::sax_parse(text.begin(), text.end(), &reader,
                                                nlohmann::json::input_format_t::json,
                                                /*strict=*/true, /*ignore_comments=*/false);
  return reader.take(parsed);
}

/// The `sent` answer: `{"id":<id>,"messages_sent":<n>,"type":"sent"}`.
[[nodiscard]] inline shared_bytes make_sent(std::uint64_t id, std::uint64_t messages_sent) {
  constexpr int digits = 20;  // of the largest 64-bit number
  char buf[80];               // the three strings and two numbers
  constexpr std::string_view a = R"({"id":)";
  constexpr std::string_view b = R"(,"messages_sent":)";
  constexpr std::string_view c = R"(,"type":"sent"})";
  char* p = std::copy(a.begin(), a.end(), buf);
  p = std::to_chars(p, p + digits, id).ptr;
  p = std::copy(b.begin(), b.end(), p);
  p = std::to_chars(p, p + digits, messages_sent).ptr;
  p = std::copy(c.begin(), c.end(), p);
  return shared_bytes::copy_of(std::string_view(buf, static_cast<std::size_t>(p - buf)));
}

/// `j[key]` as an unsigned integer, or std::nullopt if absent or not a non-negative integer.
[[nodiscard]] inline std::optional<std::uint64_t> get_uint(const nlohmann::json& j,
                                                           std::string_view key) {
  const auto it = j.find(key);
  if (it == j.end() || !it->is_number_integer()) return std::nullopt;
  if (it->is_number_unsigned()) return it->get<std::uint64_t>();
  const auto v = it->get<std::int64_t>();
  if (v < 0) return std::nullopt;
  return static_cast<std::uint64_t>(v);
}

/// `j[key]` as a string, or std::nullopt if absent or not a string.
[[nodiscard]] inline std::optional<std::string> get_string(const nlohmann::json& j,
                                                           std::string_view key) {
  const auto it = j.find(key);
  if (it == j.end() || !it->is_string()) return std::nullopt;
  return it->get<std::string>();
}

/// Attributes a device may report in hello (`attributes`), and the bytes of each key and value.
inline constexpr std::size_t max_attributes = 16;
/// Bytes of an attribute's name (at least 1).
inline constexpr std::size_t max_attribute_key = 64;
/// Bytes of an attribute's value.
inline constexpr std::size_t max_attribute_value = 128;

/// `j["attributes"]` (an object of strings within the limits above) as pairs in the order
/// sent; an empty list when absent, std::nullopt when malformed or over a limit.
[[nodiscard]] inline std::optional<std::vector<std::pair<std::string, std::string>>> get_attributes(
    const nlohmann::json& j) {
  std::vector<std::pair<std::string, std::string>> out;
  const auto it = j.find("attributes");
  if (it == j.end()) return out;
  if (!it->is_object() || it->size() > max_attributes) return std::nullopt;
  for (const auto& [k, v] : it->items()) {
    if (k.empty() || k.size() > max_attribute_key || !v.is_string()) return std::nullopt;
    const auto& value = v.get_ref<const std::string&>();
    if (value.size() > max_attribute_value) return std::nullopt;
    out.emplace_back(k, value);
  }
  return out;
}

/// JSON text as a shared payload (the one copy made of an outgoing control message).
[[nodiscard]] inline shared_bytes to_payload(const nlohmann::json& j) {
  return shared_bytes::copy_of(
      std::string_view(j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)));
}

/// An `error` message: `{"type":"error","code":..,"message":..,"ref":..,"id":..}` (`ref`: the
/// type of the offending message when known; `id`: the refused `send`'s id, when it had one).
[[nodiscard]] inline shared_bytes make_error(error e, std::string_view ref = {},
                                             std::optional<std::uint64_t> id = std::nullopt) {
  nlohmann::json j{{"type", "error"}, {"code", to_string(e)}, {"message", describe(e)}};
  if (!ref.empty()) j["ref"] = ref;
  if (id) j["id"] = *id;  // the refused send's id
  return to_payload(j);
}

/// Builds `{"type":"<type>","seq":<seq>,"topic":"<topic>","data":<data_json>}` (seq omitted
/// when 0) around `data_json`, which is already JSON text: one allocation, no re-parse.
[[nodiscard]] inline shared_bytes make_envelope(std::string_view type, std::uint64_t seq,
                                                std::string_view topic,
                                                std::string_view data_json) {
  std::string out;
  out.reserve(48 + topic.size() + data_json.size());
  out.append(R"({"type":")").append(type).append("\"");
  if (seq != 0) out.append(R"(,"seq":)").append(std::to_string(seq));
  // Topics are validated ([A-Za-z0-9._/-]) before they get here: no escaping needed.
  out.append(R"(,"topic":")").append(topic).append(R"(","data":)");
  out.append(data_json).append("}");
  return shared_bytes::copy_of(std::string_view(out));
}

/// True when `topic` is 1 to 200 characters of [A-Za-z0-9._/-].
[[nodiscard]] constexpr bool is_valid_topic(std::string_view topic) noexcept {
  if (topic.empty() || topic.size() > 200) return false;
  for (const char c : topic) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-' || c == '/';
    if (!ok) return false;
  }
  return true;
}

}  // namespace devgate::device
