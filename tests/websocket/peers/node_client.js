// A scripted WebSocket client on the Node `ws` package (pinned in tests/peers/package.json),
// driven by tests/websocket/server.cpp against devgate's server running an echo handler.
//
//   node node_client.js <ws-url> <scenario> [args...]
//
// Exit code 0 means the scenario passed; anything else is a failure with a message on stderr.
'use strict';

const path = require('path');
const crypto = require('crypto');
const WebSocket = require(path.join(__dirname, '..', '..', 'peers', 'node_modules', 'ws'));

const [url, scenario, ...args] = process.argv.slice(2);

function fail(msg) {
  console.error(`node peer (${scenario}): ${msg}`);
  process.exit(1);
}

function open(target = url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(target, { maxPayload: 64 * 1024 * 1024, perMessageDeflate: false });
    ws.once('open', () => resolve(ws));
    ws.once('error', reject);
  });
}

// Resolves with the next message as {data, isBinary}.
function next(ws) {
  return new Promise((resolve, reject) => {
    const onClose = (code) => reject(new Error(`closed with ${code} while waiting for a message`));
    ws.once('close', onClose);
    ws.once('message', (data, isBinary) => {
      ws.off('close', onClose);
      resolve({ data, isBinary });
    });
  });
}

function closed(ws) {
  return new Promise((resolve) => ws.once('close', (code, reason) => resolve({ code, reason: reason.toString() })));
}

function textOf(size) {
  // Mixed ASCII and multi-byte characters so that UTF-8 validation sees real sequences.
  const unit = 'devgate-\u00e9\u4e2d\u{1F600}';
  let s = unit.repeat(Math.ceil(size / Buffer.byteLength(unit)) + 1);
  let buf = Buffer.from(s);
  // Cut at a character boundary at or below size.
  let n = Math.min(size, buf.length);
  while (n > 0 && (buf[n] & 0xc0) === 0x80) n--;
  return buf.subarray(0, n).toString();
}

async function messages() {
  const ws = await open();
  const sizes = [0, 1, 125, 126, 127, 65535, 65536, 65537, 1 << 20, 16 * 1024 * 1024];
  for (const size of sizes) {
    const bin = crypto.randomBytes(size);
    ws.send(bin, { binary: true });
    const got = await next(ws);
    if (!got.isBinary || !Buffer.from(got.data).equals(bin)) fail(`binary echo of ${size} bytes differs`);
    const text = textOf(size);
    ws.send(text);
    const gotText = await next(ws);
    if (gotText.isBinary || gotText.data.toString() !== text) fail(`text echo of ~${size} bytes differs`);
  }
  ws.close(1000, 'done');
  const c = await closed(ws);
  if (c.code !== 1000) fail(`close code ${c.code}, expected 1000`);
}

async function fragmented() {
  const ws = await open();
  // A text message in three fragments with a 4-byte character split across the first two.
  const whole = Buffer.from('start-\u{1F600}-middle-\u00e9-end');
  const parts = [whole.subarray(0, 8), whole.subarray(8, 20), whole.subarray(20)];
  ws.send(parts[0], { binary: false, fin: false });
  ws.send(parts[1], { binary: false, fin: false });
  ws.send(parts[2], { binary: false, fin: true });
  const got = await next(ws);
  if (got.isBinary || !Buffer.from(got.data).equals(whole)) fail('fragmented text echo differs');
  // A binary message in many fragments, with a ping in between (control frames may interleave).
  const bin = crypto.randomBytes(300000);
  for (let off = 0; off < bin.length; off += 70000) {
    const end = Math.min(off + 70000, bin.length);
    ws.send(bin.subarray(off, end), { binary: true, fin: end === bin.length });
    if (off === 70000) ws.ping('mid');
  }
  const gotBin = await next(ws);
  if (!gotBin.isBinary || !Buffer.from(gotBin.data).equals(bin)) fail('fragmented binary echo differs');
  ws.close(1000);
  await closed(ws);
}

async function ping() {
  const ws = await open();
  const payload = Buffer.from('ping-payload-123');
  const pong = new Promise((resolve) => ws.once('pong', resolve));
  ws.ping(payload);
  const got = await pong;
  if (!Buffer.from(got).equals(payload)) fail('pong payload differs from ping payload');
  ws.close(1000);
  await closed(ws);
}

// The server pings an idle session (the test sets a short idle timeout); ws answers by itself.
async function serverPing() {
  const ws = await open();
  const pinged = new Promise((resolve) => ws.once('ping', resolve));
  const timer = setTimeout(() => fail('no ping from the server within 20 s'), 20000);
  await pinged;
  clearTimeout(timer);
  // Still usable after the ping/pong round.
  ws.send('after-ping');
  const got = await next(ws);
  if (got.data.toString() !== 'after-ping') fail('echo after ping differs');
  ws.close(1000);
  await closed(ws);
}

async function closeClient() {
  for (const [code, reason] of [[1000, 'bye'], [1001, ''], [4001, 'app-specific']]) {
    const ws = await open();
    ws.close(code, reason);
    const c = await closed(ws);
    if (c.code !== code) fail(`client close ${code}: server answered ${c.code}`);
  }
}

async function closeServer() {
  const ws = await open();
  const c = closed(ws);
  ws.send('!close 4002 server-says-bye');
  const got = await c;
  if (got.code !== 4002 || got.reason !== 'server-says-bye') {
    fail(`server close: got ${got.code} "${got.reason}"`);
  }
}

async function errorReply() {
  const ws = await open();
  ws.send('!reject');
  const got = await next(ws);
  const text = got.data.toString();
  let parsed;
  try { parsed = JSON.parse(text); } catch (e) { fail(`error reply is not JSON: ${text}`); }
  if (parsed.type !== 'error' || parsed.code !== 'queue_full') fail(`unexpected error reply ${text}`);
  ws.close(1000);
  await closed(ws);
}

// Waits for the server to close the session with `code` (the test stops the server).
async function awaitClose() {
  const expected = Number(args[0] || 1001);
  const ws = await open();
  const c = closed(ws);
  console.log('ready');
  const got = await c;
  if (got.code !== expected) fail(`expected close ${expected}, got ${got.code}`);
}

async function concurrent() {
  const clients = Number(args[0] || 300);
  const perClient = Number(args[1] || 20);
  const sockets = await Promise.all(Array.from({ length: clients }, (_, i) => open(`${url}/c${i}`)));
  await Promise.all(sockets.map(async (ws, i) => {
    for (let k = 0; k < perClient; k++) {
      const msg = `client ${i} message ${k} ` + 'x'.repeat((i * 7 + k * 13) % 300);
      ws.send(msg);
      const got = await next(ws);
      if (got.data.toString() !== msg) fail(`client ${i} got a different echo`);
    }
  }));
  await Promise.all(sockets.map((ws) => { const c = closed(ws); ws.close(1000); return c; }));
}

// Receives broadcasts: connects, prints "ready", expects `count` copies of one message.
async function receive() {
  const count = Number(args[0] || 1);
  const ws = await open();
  let n = 0;
  let first = null;
  const done = new Promise((resolve) => {
    ws.on('message', (data) => {
      const s = data.toString();
      if (first === null) first = s;
      if (s !== first) fail('broadcast payloads differ');
      if (++n === count) resolve();
    });
  });
  console.log('ready');
  await done;
  ws.close(1000);
  await closed(ws);
}

const scenarios = {
  messages, fragmented, ping, 'server-ping': serverPing, 'close-client': closeClient,
  'close-server': closeServer, 'error-reply': errorReply, 'await-close': awaitClose,
  concurrent, receive,
};

if (!scenarios[scenario]) fail(`unknown scenario ${scenario}`);
const watchdog = setTimeout(() => fail('timed out after 240 s'), 240000);
scenarios[scenario]().then(() => { clearTimeout(watchdog); process.exit(0); }, (e) => fail(e.stack || String(e)));
