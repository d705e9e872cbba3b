#pragma once

#include <hiredis/hiredis.h>

#include <cstddef>  // std::size_t
#include <string>   // strings, statuses, errors
#include <vector>   // arrays

namespace devgate::redis {

/// The kind of a Redis reply (RESP2), as hiredis reports it.
enum class reply_type {
  string = REDIS_REPLY_STRING,    ///< A bulk string.
  array = REDIS_REPLY_ARRAY,      ///< An array of replies.
  integer = REDIS_REPLY_INTEGER,  ///< An integer.
  nil = REDIS_REPLY_NIL,          ///< The null reply.
  status = REDIS_REPLY_STATUS,    ///< A status line (`OK`).
  error = REDIS_REPLY_ERROR,      ///< An error reply (`ERR ...`, `WRONGTYPE ...`).
};

/// An owned copy of a hiredis reply, for callers that keep a reply past its callback
/// (`connection::call`). Callbacks on the hot path read the `redisReply` in place instead.
struct reply {
  reply_type type = reply_type::nil;  ///< What the reply is.
  long long integer = 0;              ///< The value of an integer reply.
  std::string str;                    ///< The bytes of a string, status or error reply.
  std::vector<reply> elements;        ///< The items of an array reply.

  /// Deep-copies `r` (a null pointer gives a nil reply).
  static reply from(const redisReply* r) {
    reply out;
    if (r == nullptr) return out;
    out.type = static_cast<reply_type>(r->type);
    out.integer = r->integer;
    if (r->str != nullptr) out.str.assign(r->str, r->len);
    out.elements.reserve(r->elements);
    for (std::size_t i = 0; i < r->elements; ++i) out.elements.push_back(from(r->element[i]));
    return out;
  }
};

}  // namespace devgate::redis
