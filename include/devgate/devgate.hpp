#pragma once

/// devgate: a header-only C++20 device gateway engine. Include this one header.
///
/// The folders are the architecture (see docs/ARCHITECTURE.md):
///   core/       vocabulary types: shared immutable bytes, error codes
///   transport/  what a transport must provide (concept), the way back to it, in-process transport
///   pipeline/   queue -> fetcher<demand> -> worker pool -> sinks; the gateway composes them
///               with a transport (the one composition root); internals in pipeline/detail/
///   websocket/  the reference transport: RFC 6455 server on standalone Asio and epoll (Linux);
///               its internals (reactor, session, TCP and TLS streams, queues) in websocket/detail/
///   device/     the device hub, built on a gateway: registry, delivery, protocol v1 dispatch
///               (docs/PROTOCOL.md), pub/sub
///   auth/       who may connect: the authenticator concept, JWT and client-certificate
///               authenticators, allow_all, the Origin allow-list, the gate a server runs
///   store/      per-device state across connections: the concept, the in-memory store, and the
///               write-behind front that keeps store calls off the network threads
///   firmware/   images held once and cut into chunks, transfer slots, the rollout engine,
///               rollout campaigns (waves, thresholds, rate)
///   client/     a C++ device client on Asio (tests, benchmarks, simulated devices)
///   detail/     internals several layers share (OpenSSL wrappers); not part of the API

#include "devgate/version.hpp"  // version numbers

#include "devgate/core/bytes.hpp"         // shared_bytes: immutable, reference-counted payloads
#include "devgate/core/error.hpp"         // devgate::errc and its std::error_category
#include "devgate/core/stop_signals.hpp"  // stop_signals: wait for SIGINT/SIGTERM in main()

#include "devgate/transport/in_process.hpp"     // in_process_transport: host code plays the devices
#include "devgate/transport/reply_channel.hpp"  // reply_channel: the type-erased way back to sessions
#include "devgate/transport/transport.hpp"      // the transport concept and its vocabulary

#include "devgate/pipeline/demand.hpp"    // demand policies (fixed<N>, adaptive)
#include "devgate/pipeline/fetcher.hpp"   // fetcher: partitions, tickets, bulk pull by demand
#include "devgate/pipeline/gateway.hpp"   // gateway: a transport feeding a pipeline
#include "devgate/pipeline/message.hpp"   // message: payload, device id, sequence, timestamps
#include "devgate/pipeline/metrics.hpp"   // metrics snapshot and Prometheus rendering
#include "devgate/pipeline/pipeline.hpp"  // pipeline: queue -> fetcher -> workers -> sink
#include "devgate/pipeline/queue.hpp"     // queue policies (lockfree, locked), overflow policy
#include "devgate/pipeline/sink.hpp"      // sink concept, callback/fan-out sinks, dispatch context
#include "devgate/pipeline/worker_pool.hpp"  // worker pool policies (fixed, dynamic)

#include "devgate/websocket/frame.hpp"      // RFC 6455 frame headers, masking, close payloads
#include "devgate/websocket/handshake.hpp"  // RFC 6455 opening handshake checks and 101 reply
#include "devgate/websocket/http.hpp"       // strict bounded HTTP/1.1 request parser, responses
#include "devgate/websocket/reader.hpp"     // inbound frame state machine: checks, reassembly
#include "devgate/websocket/server_options.hpp"  // server_options, http_reply, error replies
#include "devgate/websocket/static_files.hpp"    // static_files(root): a route for plain GETs
#include "devgate/websocket/tls.hpp"             // tls_options: wss/https (OpenSSL 3), reload
#include "devgate/websocket/utf8.hpp"            // incremental UTF-8 validation (RFC 3629)
#if defined(__linux__)
#include "devgate/websocket/server.hpp"  // websocket::server: the reference transport (Linux)
#endif

#include "devgate/auth/allow_all.hpp"      // allow_all: development only, warns at start
#include "devgate/auth/authenticator.hpp"  // authenticator concept, request, result, completion
#include "devgate/auth/client_certificate_authenticator.hpp"  // device id from a client cert
#include "devgate/auth/gate.hpp"    // gate(): Origin allow-list + authenticator for a server
#include "devgate/auth/origin.hpp"  // origin_allow_list: exact scheme, host and port
#include "devgate/auth/token_authenticator.hpp"  // JWT (HS256, ES256), key ring, revocation

#include "devgate/store/memory_state_store.hpp"  // memory_state_store: the default state store
#include "devgate/store/state_store.hpp"  // state_store concept: per-device state across connections
#include "devgate/store/write_behind.hpp"  // write_behind: store writes off the network threads

#include "devgate/device/delivery.hpp"  // delivery: sequence numbers, replay buffer, ordered outbox
#include "devgate/device/device_id.hpp"  // device ids and /ws/<id> identification (400 otherwise)
#include "devgate/device/dispatch.hpp"  // protocol_dispatch: parse, check and route device messages
#include "devgate/device/hub.hpp"       // device::hub: the parts composed on a gateway
#include "devgate/device/hub_options.hpp"  // hub_options and hub_stats
#include "devgate/device/hub_sink.hpp"     // hub_sink: the user's sink, then the server log
#include "devgate/device/protocol.hpp"     // the device wire protocol v1 (docs/PROTOCOL.md)
#include "devgate/device/pubsub.hpp"       // topics shared by devices and host callbacks
#include "devgate/device/record.hpp"       // device_record: what the hub keeps per device
#include "devgate/device/registry.hpp"     // registry: device records, live sessions, takeover

#include "devgate/firmware/campaign.hpp"  // campaign: waves, thresholds, rate, retries
#include "devgate/firmware/image.hpp"     // firmware image: held once, cut into wire chunks
#include "devgate/firmware/rollout.hpp"   // rollout_engine: per-device transfer state machine
#include "devgate/firmware/slots.hpp"     // transfer_slots: at most N transfers at once
#include "devgate/firmware/tally.hpp"     // tally: a rollout's fleet totals, kept as they change

#include "devgate/client/device_client.hpp"  // device_client: a device speaking protocol v1

#include "devgate/detail/crypto.hpp"  // SHA-1, SHA-256, base64 over OpenSSL
