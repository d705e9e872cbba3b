#!/usr/bin/env node
// End-to-end test of the demo server in a real browser: Debian's chromium (headless), driven by
// playwright-core (tests/peers, pinned). What a person would do and see:
//   /marco and /fridge open; SEND MESSAGE x3 in /marco -> "3" and three log entries in both
//   pages, each naming a worker; close /marco and reopen it -> still 3; UPDATE DEVICE (the
//   operator token typed into the page's prompt, sent as a bearer header in a POST) -> both
//   pages reach 100% and show the new version; restart the server (one message sent while it
//   is down) -> both pages reconnect, 2 devices connected, /marco shows 4, four log entries
//   each page, no duplicates; /metrics and /healthz answer.
// With --tls 1, all of it over https and wss: the test makes a CA and an ECDSA P-256 server
// certificate for localhost with the openssl command, the demo serves them (--tls-cert/--tls-key),
// and Chromium trusts exactly that server key (--ignore-certificate-errors-spki-list with its
// SHA-256), so the browser's TLS checks run against the real handshake; plain http on the port
// gets no page.
//
//   node tests/e2e/demo.e2e.js --server <demo_server> [--out <dir for screenshots>]
//        [--web-root <dir>] [--chromium /usr/bin/chromium] [--timeout-s 120] [--tls 1]
//
// Exits 0 when every step passed; otherwise prints the failing step and exits 1.
'use strict';

const { spawn, execFileSync } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');

// ---- arguments ---------------------------------------------------------------------------
const args = { out: process.cwd(), chromium: '/usr/bin/chromium', 'timeout-s': '120', tls: '0' };
for (let i = 2; i < process.argv.length; i += 1) {
  const a = process.argv[i];
  if (!a.startsWith('--') || i + 1 >= process.argv.length) {
    console.error(`usage: demo.e2e.js --server <demo_server> [--out DIR] [--web-root DIR] [--chromium PATH] [--timeout-s N] [--tls 1]\n(bad argument ${a})`);
    process.exit(2);
  }
  args[a.slice(2)] = process.argv[++i];
}
if (!args.server) {
  console.error('demo.e2e.js: --server <path to demo_server> is required');
  process.exit(2);
}

let chromium;
try {
  ({ chromium } = require(path.join(__dirname, '..', 'peers', 'node_modules', 'playwright-core')));
} catch (e) {
  console.error('demo.e2e.js: playwright-core is missing: run `npm ci --prefix tests/peers` (scripts/install-deps.sh does)');
  process.exit(1);
}
if (!fs.existsSync(args.chromium)) {
  console.error(`demo.e2e.js: no browser at ${args.chromium}: install Debian's chromium (scripts/install-deps.sh does)`);
  process.exit(1);
}

// ---- helpers -----------------------------------------------------------------------------
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'devgate-e2e-'));
const stateDir = path.join(tmp, 'state');
// The operator token, made for this run (nothing secret is committed).
const operatorToken = require('node:crypto').randomBytes(18).toString('base64url');
const operatorTokenFile = path.join(tmp, 'operator-token');
fs.writeFileSync(operatorTokenFile, `${operatorToken}\n`, { mode: 0o600 });
const tls = args.tls === '1';
const shotPrefix = tls ? 'tls-' : '';
// Over TLS: a CA and a server certificate for localhost, made for this run; Chromium is told to
// trust the server's key by its SPKI hash (base64 of the SHA-256 of its DER public key).
let tlsArgs = [];
let spkiHash = '';
if (tls) {
  const sh = (cmd) => execFileSync('sh', ['-c', cmd], { cwd: tmp, stdio: ['ignore', 'pipe', 'pipe'] }).toString().trim();
  sh('openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=devgate-test-ca -keyout ca.key -out ca.pem');
  sh('openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost -keyout server.key -out server.csr');
  fs.writeFileSync(path.join(tmp, 'san.ext'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\n');
  sh('openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile san.ext -out server.pem');
  spkiHash = sh('openssl x509 -in server.pem -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64');
  tlsArgs = ['--tls-cert', path.join(tmp, 'server.pem'), '--tls-key', path.join(tmp, 'server.key')];
}
const outDir = path.resolve(args.out);
fs.mkdirSync(outDir, { recursive: true });
let server = null;
let serverLog = '';
let browser = null;
let step = 'start';
const pageErrors = [];

function log(msg) {
  console.log(`[${(process.uptime()).toFixed(1).padStart(5)} s] ${msg}`);
}
function fail(msg) {
  const e = new Error(msg);
  e.step = step;
  throw e;
}
async function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function startServer(port) {
  return new Promise((resolve, reject) => {
    const argv = ['--port', String(port), '--listen', '127.0.0.1', '--threads', '2',
      '--state-dir', stateDir, '--firmware-size', String(4 << 20),
      '--operator-token-file', operatorTokenFile, ...tlsArgs];
    if (args['web-root']) argv.push('--web-root', args['web-root']);
    const child = spawn(args.server, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    const onData = (d) => {
      out += d.toString();
      if (/listening on \d+/.test(out)) {
        child.stdout.off('data', onData);
        resolve(child);
      }
    };
    child.stdout.on('data', onData);
    child.stdout.on('data', (d) => { serverLog += d.toString(); });
    child.stderr.on('data', (d) => { serverLog += d.toString(); });
    child.on('exit', (code, sig) => {
      serverLog += `[demo_server exited: code ${code} signal ${sig}]\n`;
      reject(new Error(`demo_server exited before listening (code ${code}, signal ${sig}):\n${out}`));
    });
    child.on('error', reject);
  });
}
function stopServer(child) {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) {
      resolve({ code: child.exitCode, signal: child.signalCode });
      return;
    }
    child.once('exit', (code, signal) => resolve({ code, signal }));
    child.kill('SIGTERM');
  });
}

// Polls `probe` (run in the page) until `check(value)` holds; fails with `what` and the last value.
async function waitFor(page, what, probe, check, timeoutMs = 15000) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try { last = await page.evaluate(probe); } catch (e) { last = `(evaluate failed: ${e.message})`; }
    if (check(last)) return last;
    if (Date.now() > deadline) fail(`${what}: still ${JSON.stringify(last)} after ${timeoutMs / 1000} s`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
const text = (testid) => new Function(`const e = document.querySelector('[data-testid="${testid}"]'); return e ? e.textContent.trim() : null;`);
const logEntries = () => Array.from(document.querySelectorAll('[data-testid="server-log"] [data-testid="log-entry"]'), (e) => e.textContent);
const progress = () => { const p = document.querySelector('[data-testid="firmware-progress"]'); return p ? { tag: p.tagName, value: p.value, max: p.max } : null; };

async function openDevice(context, base, id) {
  const page = await context.newPage();
  page.on('pageerror', (e) => pageErrors.push(`${id}: ${e.message}`));
  const resp = await page.goto(`${base}/${id}`);
  if (!resp || resp.status() !== 200) fail(`GET /${id} answered ${resp && resp.status()}`);
  await waitFor(page, `/${id}: connection-status`, text('connection-status'), (v) => v === 'connected');
  const name = await page.evaluate(text('device-name'));
  if (name !== id) fail(`/${id}: device-name shows ${JSON.stringify(name)}`);
  return page;
}
async function expectLog(page, id, n, mustName) {
  const entries = await waitFor(page, `/${id}: log entries`, logEntries, (v) => Array.isArray(v) && v.length >= n);
  if (entries.length !== n) fail(`/${id}: ${entries.length} log entries, expected ${n}: ${JSON.stringify(entries)}`);
  if (new Set(entries).size !== entries.length) fail(`/${id}: duplicate log entries: ${JSON.stringify(entries)}`);
  for (const e of entries) {
    if (!/worker \d+/.test(e)) fail(`/${id}: log entry does not name a worker: ${e}`);
    if (mustName && !e.includes(mustName)) fail(`/${id}: log entry does not name ${mustName}: ${e}`);
  }
  for (let k = 1; k <= n; k += 1) {
    if (!entries.some((e) => e.includes(`#${k}`))) fail(`/${id}: no log entry for message #${k}: ${JSON.stringify(entries)}`);
  }
  return entries;
}
async function shot(page, name) {
  const file = path.join(outDir, shotPrefix + name);
  await page.screenshot({ path: file, fullPage: true });
  log(`screenshot ${file}`);
}

// ---- the test ----------------------------------------------------------------------------
async function main() {
  const port = await freePort();
  const base = tls ? `https://localhost:${port}` : `http://127.0.0.1:${port}`;
  step = 'start the demo server';
  server = await startServer(port);
  log(`demo_server on ${base} (state ${stateDir})`);

  step = 'launch chromium';
  const userData = path.join(tmp, 'profile');
  browser = await chromium.launchPersistentContext(userData, {
    executablePath: args.chromium,
    headless: true,
    viewport: { width: 1280, height: 860 },
    args: ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      ...(tls ? [`--ignore-certificate-errors-spki-list=${spkiHash}`] : [])],
  });
  if (tls) {
    step = 'plain http on the TLS port';
    const page = await browser.newPage();
    let served = false;
    try {
      const r = await page.goto(`http://localhost:${port}/marco`, { timeout: 10000 });
      served = !!r && r.status() === 200 && (await r.text()).includes('data-testid');
    } catch (e) { /* refused, as it should be */ }
    await page.close();
    if (served) fail('the TLS port served the page over plain http');
    log('plain http on the TLS port: no page');
  }

  step = 'open /marco and /fridge';
  let marco = await openDevice(browser, base, 'marco');
  const fridge = await openDevice(browser, base, 'fridge');
  if (tls) {
    for (const [p, id] of [[marco, 'marco'], [fridge, 'fridge']]) {
      const proto = await p.evaluate(() => location.protocol);
      if (proto !== 'https:') fail(`/${id}: served over ${proto}`);
    }
  }
  for (const [p, id] of [[marco, 'marco'], [fridge, 'fridge']]) {
    await waitFor(p, `/${id}: connected-devices`, text('connected-devices'), (v) => v === '2');
    await waitFor(p, `/${id}: messages-sent`, text('messages-sent'), (v) => v === '0');
  }
  log('both pages connected; connected-devices 2');

  step = 'send three messages from /marco';
  for (let i = 0; i < 3; i += 1) await marco.click('[data-testid="send-message"]');
  await waitFor(marco, '/marco: messages-sent after 3 clicks', text('messages-sent'), (v) => v === '3');
  await expectLog(marco, 'marco', 3, 'marco');
  await expectLog(fridge, 'fridge', 3, 'marco');
  log('messages-sent 3; three log entries naming a worker in both pages');

  step = 'close /marco and reopen it';
  await marco.close();
  await waitFor(fridge, '/fridge: connected-devices after /marco closed', text('connected-devices'), (v) => v === '1');
  marco = await openDevice(browser, base, 'marco');
  await waitFor(marco, '/marco: messages-sent after reopening', text('messages-sent'), (v) => v === '3');
  await expectLog(marco, 'marco', 3, 'marco');
  log('reopened /marco: messages-sent still 3, log restored');

  step = 'update the fleet from /marco';
  const before = await marco.evaluate(text('firmware-version'));
  // The page asks for the operator token (docs/SECURITY.md, "Operator API"): type it in.
  marco.once('dialog', (d) => d.accept(operatorToken));
  const [release] = await Promise.all([
    marco.waitForResponse((r) => r.url().endsWith('/api/firmware/release'), { timeout: 15000 }),
    marco.click('[data-testid="update-device"]'),
  ]);
  if (release.status() !== 202) fail(`POST /api/firmware/release answered ${release.status()}`);
  if (release.request().method() !== 'POST') fail(`the page sent ${release.request().method()}, not POST`);
  const { version } = await release.json();
  if (!version || version === before) fail(`release version ${JSON.stringify(version)} (was ${before})`);
  for (const [p, id] of [[marco, 'marco'], [fridge, 'fridge']]) {
    await waitFor(p, `/${id}: firmware-version ${version}`, text('firmware-version'), (v) => v === version, 60000);
    const pr = await waitFor(p, `/${id}: firmware-progress at 100%`, progress, (v) => v && v.max > 0 && v.value === v.max, 10000);
    if (pr.tag !== 'PROGRESS') fail(`/${id}: firmware-progress is a <${pr.tag}>, not a <progress>`);
  }
  log(`both pages installed ${version} (was ${before}), progress 100%`);
  await shot(marco, 'demo-marco-updated.png');

  step = 'restart the demo server';
  const stopped = await stopServer(server);
  if (stopped.code !== 0) fail(`demo_server exited with ${JSON.stringify(stopped)} on SIGTERM\n${serverLog}`);
  for (const [p, id] of [[marco, 'marco'], [fridge, 'fridge']]) {
    await waitFor(p, `/${id}: connection-status while the server is down`, text('connection-status'), (v) => v !== 'connected');
    const stale = await p.evaluate(text('connected-devices'));
    if (/^\d+$/.test(stale)) fail(`/${id}: connected-devices still shows ${stale} while the server is down`);
  }
  await marco.click('[data-testid="send-message"]');  // sent while the gateway is down
  await shot(marco, 'demo-marco-offline.png');
  server = await startServer(port);
  log('server restarted');
  for (const [p, id] of [[marco, 'marco'], [fridge, 'fridge']]) {
    await waitFor(p, `/${id}: connection-status after the restart`, text('connection-status'), (v) => v === 'connected', 30000);
    await waitFor(p, `/${id}: connected-devices after the restart`, text('connected-devices'), (v) => v === '2');
  }
  await waitFor(marco, '/marco: messages-sent after the restart (3 + 1 sent while down)', text('messages-sent'), (v) => v === '4');
  await expectLog(marco, 'marco', 4, 'marco');
  await expectLog(fridge, 'fridge', 4, 'marco');
  for (const [p, id] of [[marco, 'marco'], [fridge, 'fridge']]) {
    const v = await p.evaluate(text('firmware-version'));
    if (v !== version) fail(`/${id}: firmware-version ${v} after the restart, expected ${version}`);
  }
  log('both reconnected; connected-devices 2; messages-sent 4; 4 log entries each, no duplicates');

  step = 'metrics and healthz';
  // Fetched by the page (same origin, over TLS too: the browser's trust, not the test's).
  const get = (p) => marco.evaluate(async (u) => { const r = await fetch(u); return { status: r.status, body: await r.text() }; }, p);
  const health = await get('/healthz');
  if (health.status !== 200 || health.body.trim() !== 'ok') fail(`/healthz answered ${health.status}`);
  const metrics = await get('/metrics');
  const { body } = metrics;
  if (metrics.status !== 200) fail(`/metrics answered ${metrics.status}`);
  for (const m of ['devgate_dispatched_total', 'devgate_queue_depth', 'devgate_workers_alive', 'devgate_connected_devices 2']) {
    if (!body.includes(m)) fail(`/metrics has no ${m}:\n${body}`);
  }

  step = 'a campaign on the page';
  // Started through the operator API (the page's own fetch, with the bearer token), two waves
  // of 50%: both pages update, and the page shows the campaign, its waves and its state.
  const created = await marco.evaluate(async (token) => {
    const r = await fetch('/api/campaigns', {
      method: 'POST', cache: 'no-store', credentials: 'omit',
      headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ name: 'browser', waves: [{ percent: 50 }, { percent: 50 }] }),
    });
    return { status: r.status, body: await r.json() };
  }, operatorToken);
  if (created.status !== 202) fail(`POST /api/campaigns answered ${created.status}: ${JSON.stringify(created.body)}`);
  const campaignVersion = created.body.version;
  for (const [p, id] of [[marco, 'marco'], [fridge, 'fridge']]) {
    await waitFor(p, `/${id}: firmware-version ${campaignVersion} from the campaign`, text('firmware-version'), (v) => v === campaignVersion, 60000);
  }
  await waitFor(marco, '/marco: campaign state completed', text('campaign-state'), (v) => v.startsWith('completed'), 15000);
  const waves = await marco.evaluate(() => [...document.querySelectorAll('#campaign-waves li progress')].map((b) => [b.value, b.max]));
  if (waves.length !== 2 || waves.some(([v, m]) => v !== m)) fail(`campaign waves on the page: ${JSON.stringify(waves)}`);
  log(`campaign ${created.body.campaign} (${campaignVersion}) in 2 waves completed, shown on the page`);
  await shot(marco, 'demo-marco-campaign.png');

  step = 'screenshots';
  await waitFor(marco, '/marco: rollout text', () => document.getElementById('rollout-text').textContent, (v) => v.includes(campaignVersion));
  await shot(marco, 'demo-marco.png');
  await shot(fridge, 'demo-fridge.png');
  if (pageErrors.length) fail(`uncaught errors in the pages: ${pageErrors.join('; ')}`);

  step = 'stop the demo server';
  const last = await stopServer(server);
  server = null;
  if (last.code !== 0) fail(`demo_server exited with ${JSON.stringify(last)} on SIGTERM\n${serverLog}`);
  if (!/stopped: \d+ messages dispatched, state .* saved/.test(serverLog)) fail(`demo_server did not report a graceful stop:\n${serverLog}`);
  log('PASS');
}

const budget = setTimeout(() => {
  console.error(`FAIL (step "${step}"): the whole test took longer than ${args['timeout-s']} s`);
  cleanup().finally(() => process.exit(1));
}, Number(args['timeout-s']) * 1000);

async function cleanup() {
  try { if (browser) await browser.close(); } catch (e) { /* already gone */ }
  if (server) await stopServer(server);
  fs.rmSync(tmp, { recursive: true, force: true });
}

main().then(async () => {
  clearTimeout(budget);
  await cleanup();
  process.exit(0);
}, async (e) => {
  clearTimeout(budget);
  console.error(`FAIL (step "${e.step || step}"): ${e.message}`);
  console.error(`--- demo_server output ---\n${serverLog}`);
  try {
    for (const [i, p] of (browser ? browser.pages() : []).entries()) await shot(p, `failure-${i}.png`);
  } catch (err) { /* the browser may be what failed */ }
  await cleanup();
  process.exit(1);
});
