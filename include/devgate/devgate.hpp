#pragma once

/// devgate: a header-only C++20 device gateway engine. Include this one header.
///
/// The folders are the architecture (see docs/ARCHITECTURE.md):
///   core/       vocabulary types: shared immutable bytes, error codes
///   transport/  what a transport must provide (concept) and the in-process transport
///   pipeline/   queue -> fetcher<demand> -> worker pool -> sinks, composed into the gateway
///   websocket/  the reference transport: RFC 6455 server on standalone Asio
///   detail/     internals (OpenSSL wrappers, parsers); not part of the API

#include "devgate/version.hpp"  // version numbers

#include "devgate/core/bytes.hpp"  // shared_bytes: immutable, reference-counted payloads
#include "devgate/core/error.hpp"  // devgate::errc and its std::error_category

#include "devgate/transport/transport.hpp"  // the transport concept and its vocabulary

#include "devgate/websocket/http.hpp"       // strict bounded HTTP/1.1 request parser, responses
#include "devgate/websocket/handshake.hpp"  // RFC 6455 opening handshake checks and 101 reply

#include "devgate/detail/crypto.hpp"  // SHA-1, SHA-256, base64 over OpenSSL
