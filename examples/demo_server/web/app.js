// The devgate demo page: this tab is a device speaking the devgate device protocol
// (docs/PROTOCOL.md, version 1) and a live view of the gateway. Plain JS, no build step.
//
// What it keeps across reconnects (and, in localStorage, across reloads):
// - last_seq: the highest `deliver` it received. Sent in hello, so the gateway replays only what
//   is missing; a deliver at or below it is a duplicate and is dropped. Acked shortly after.
// - the messages it sent but has no answer for. Each `send` carries an id and is answered, in
//   order, by `sent` (accepted, with the device's lifetime count) or an `error` (refused). After
//   a reconnect, welcome.state.messages_sent says how many of the unanswered ones the gateway
//   accepted; only the others are sent again. So a message is neither lost nor counted twice.
// - the firmware it installed (reported in hello), and a partial image while a transfer runs.
'use strict';

(function () {
  const PROTOCOL = 1;
  const FACTORY_VERSION = '1.0.0';
  const MAX_IN_FLIGHT = 64;
  const LOG_LIMIT = 200;
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_MAX_MS = 10000;

  const $ = (id) => document.getElementById(id);
  const deviceId = decodeURIComponent(location.pathname.slice(1));
  const key = (name) => `devgate:${deviceId}:${name}`;
  const storage = {
    get(name, fallback) {
      try { const v = localStorage.getItem(key(name)); return v === null ? fallback : v; } catch (e) { return fallback; }
    },
    set(name, value) { try { localStorage.setItem(key(name), String(value)); } catch (e) { /* private mode */ } },
  };

  // ---- state ------------------------------------------------------------------------------
  let ws = null;
  let open = false;            // between welcome and close
  let stopped = false;         // replaced by another tab (4000) or refused: no auto-reconnect
  let attempt = 0;             // reconnect attempts since the last welcome
  let reconnectTimer = null;
  let lastSeq = Number(storage.get('last_seq', '0')) || 0;
  let ackedSeq = 0;
  let ackTimer = null;
  let confirmed = null;        // the gateway's messages_sent for this device (null: unknown yet)
  let sendId = 0;
  let queue = [];              // messages not sent yet (or to send again)
  let inFlight = [];           // sent, no answer yet, in order
  let refused = [];            // refused with queue_full/closed: sent again later
  let retryTimer = null;
  let lastReceipt = null;
  let installed = storage.get('firmware', FACTORY_VERSION);
  let fw = null;               // the transfer: {rollout, version, size, sha256, buf, have, ...}
  let workersMax = null;
  const log = new Map();       // "device#seq" -> <li>

  // ---- rendering --------------------------------------------------------------------------
  function setStatus(text, detail, cls) {
    $('connection-status').textContent = text;
    $('connection-detail').textContent = detail || '';
    $('conn-dot').className = 'dot ' + (cls || '');
  }
  function renderMessages() {
    $('messages-sent').textContent = confirmed === null ? '–' : String(confirmed);
    const waiting = queue.length + inFlight.length + refused.length;
    const parts = [];
    if (waiting > 0) parts.push(`${waiting} waiting to be accepted`);
    if (lastReceipt) parts.push(`#${lastReceipt.message} dispatched by worker ${lastReceipt.worker}`);
    $('messages-detail').textContent = parts.join(' · ') || '\u00a0';
  }
  const mib = (n) => (n / (1024 * 1024)).toFixed(n < 1024 * 1024 ? 2 : 1) + ' MiB';
  let progressQueued = false;
  function renderFirmware() {
    $('firmware-version').textContent = installed;
    if (progressQueued) return;
    progressQueued = true;
    requestAnimationFrame(() => {
      progressQueued = false;
      const bar = $('firmware-progress');
      if (fw) {
        bar.value = fw.size ? Math.floor((fw.have / fw.size) * 100) : 0;
        const pct = fw.size ? ((fw.have / fw.size) * 100).toFixed(0) : '0';
        $('firmware-detail').textContent = fw.state === 'transferring'
          ? `${fw.version}: ${mib(fw.have)} of ${mib(fw.size)} (${pct}%)`
          : `${fw.version}: ${mib(fw.size)}, sha256 ${fw.sha256.slice(0, 16)}…`;
      }
      $('firmware-status').textContent = fw ? fw.label : '\u00a0';
      $('firmware-status').className = 'fw-status ' + (fw ? fw.state : '');
    });
  }
  function setFirmware(state, label) {
    if (!fw) return;
    fw.state = state;
    fw.label = label;
    renderFirmware();
  }

  // While offline the gateway figures are unknown, not frozen: blank them until the next stats.
  function markStale() {
    $('figures').classList.add('stale');
    for (const id of ['connected-devices', 'queue-depth', 'workers-alive', 'msgs-per-s']) $(id).textContent = '–';
  }
  function renderStats(s) {
    $('figures').classList.remove('stale');
    $('connected-devices').textContent = String(s.connected);
    $('queue-depth').textContent = String(s.queue_depth);
    // A cluster node sends the cluster's figures, summed over its live nodes.
    const nodes = typeof s.nodes === 'number' ? s.nodes : 1;
    $('gateway-title').textContent = typeof s.nodes === 'number' ? `Gateway · ${nodes} node${nodes === 1 ? '' : 's'}` : 'Gateway';
    $('workers-alive').textContent = String(s.workers_alive);
    $('workers-max').textContent = workersMax === null ? '' : ` / ${workersMax * nodes}`;
    $('msgs-per-s').textContent = s.msgs_per_s >= 10 ? s.msgs_per_s.toFixed(0) : s.msgs_per_s.toFixed(1);
    $('dispatched').textContent = String(s.dispatched);
    const r = s.rollout;
    if (r && r.rollout > 0) {
      const devices = r.pending + r.transferring + r.verified + r.failed + r.skipped;
      const done = r.verified + r.skipped;
      const bytes = r.bytes_acked + r.skipped * r.size;
      $('rollout-progress').value = devices && r.size ? Math.min(100, Math.floor((bytes / (devices * r.size)) * 100)) : 0;
      const parts = [`${r.version}: ${done}/${devices} devices up to date`];
      if (r.transferring) parts.push(`${r.transferring} transferring`);
      if (r.pending) parts.push(`${r.pending} pending`);
      if (r.failed) parts.push(`${r.failed} failed`);
      $('rollout-text').textContent = parts.join(' · ');
    }
    renderCampaign(s.campaign);
  }

  // The newest rollout campaign (docs/ROLLOUTS.md): its state (paused or aborted with the
  // reason), and per wave a progress bar of the devices done and the counts per status.
  function renderCampaign(c) {
    const box = $('campaign');
    if (!c) { box.hidden = true; return; }
    box.hidden = false;
    $('campaign-name').textContent = `${c.id}${c.name ? ` · ${c.name}` : ''} · ${c.version}`;
    const done = c.counts.verified + c.counts.skipped;
    $('campaign-state').textContent = `${c.state} · ${done}/${c.devices} up to date`;
    $('campaign-reason').textContent = c.reason || '';
    const list = $('campaign-waves');
    list.replaceChildren(...c.waves.map((w, i) => {
      const li = document.createElement('li');
      li.className = w.started ? 'started' : 'waiting';
      const name = document.createElement('span');
      name.className = 'small';
      name.textContent = `Wave ${i + 1} (${w.size})`;
      const bar = document.createElement('progress');
      const finished = ['verified', 'skipped', 'failed', 'timed_out', 'cancelled', 'superseded']
        .reduce((n, k) => n + (w.counts[k] || 0), 0);
      bar.max = Math.max(1, w.size);
      bar.value = finished;
      const counts = document.createElement('span');
      counts.className = 'small muted counts';
      counts.textContent = Object.entries(w.counts).filter(([, n]) => n > 0).map(([k, n]) => `${n} ${k.replace('_', ' ')}`).join(' · ') || 'empty';
      li.append(name, bar, counts);
      return li;
    }));
  }

  const pad = (n, w) => String(n).padStart(w, '0');
  function clock(ms) {
    const d = new Date(ms);
    return `${pad(d.getHours(), 2)}:${pad(d.getMinutes(), 2)}:${pad(d.getSeconds(), 2)}.${pad(d.getMilliseconds(), 3)}`;
  }
  const latency = (us) => (us < 1000 ? `${us} µs` : `${(us / 1000).toFixed(us < 10000 ? 1 : 0)} ms`);
  function span(cls, text) {
    const e = document.createElement('span');
    e.className = cls;
    e.textContent = text;
    return e;
  }
  // One entry per dispatched message, keyed by device and number: a message the page already
  // shows (from the live topic or the log fetched after a reconnect) is never added twice.
  function addLogEntry(d) {
    if (!d || typeof d.device !== 'string' || typeof d.seq !== 'number') return;
    const k = `${d.device}#${d.seq}`;
    if (log.has(k)) return;
    const list = $('server-log');
    const newer = (a, b) => a.time_ms > b.time_ms || (a.time_ms === b.time_ms && (a.device > b.device || (a.device === b.device && a.seq > b.seq)));
    if (log.size >= LOG_LIMIT && !newer(d, list.lastElementChild.entry)) return;
    const li = document.createElement('li');
    li.dataset.testid = 'log-entry';
    li.entry = d;
    if (d.device === deviceId) li.className = 'mine';
    li.append(span('time', clock(d.time_ms)), span('device', d.device), span('seq', `#${d.seq}`),
      span('worker', `worker ${d.worker}`), span('latency', latency(d.latency_us)));
    let before = list.firstElementChild;
    while (before && newer(before.entry, d)) before = before.nextElementSibling;
    list.insertBefore(li, before);
    log.set(k, li);
    while (log.size > LOG_LIMIT) {
      const last = list.lastElementChild;
      log.delete(`${last.entry.device}#${last.entry.seq}`);
      last.remove();
    }
    $('log-empty').hidden = log.size > 0;
  }
  async function fetchLog() {
    try {
      const r = await fetch('/api/log', { cache: 'no-store' });
      if (!r.ok) return;
      for (const ev of await r.json()) addLogEntry(ev.data);
    } catch (e) { /* the live topic still works; the next reconnect fetches again */ }
  }

  // ---- connection -------------------------------------------------------------------------
  function send(obj) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(obj));
  }
  function connect() {
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    if (stopped) return;
    setStatus('connecting', attempt ? `attempt ${attempt + 1}` : '', 'wait');
    const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws/${encodeURIComponent(deviceId)}`;
    // With authentication on, the page's device token comes in the URL fragment
    // (/<id>#token=<jwt>), which the browser never sends in a request; it is offered as a
    // subprotocol beside devgate.v1 (docs/PROTOCOL.md section 1). The server never hands out tokens.
    const token = new URLSearchParams(location.hash.slice(1)).get('token');
    const sock = token ? new WebSocket(url, ['devgate.v1', 'devgate.bearer.' + token]) : new WebSocket(url);
    sock.binaryType = 'arraybuffer';
    ws = sock;
    sock.onopen = () => {
      send({ type: 'hello', protocol: PROTOCOL, last_seq: lastSeq, firmware_version: installed });
    };
    sock.onmessage = (ev) => {
      if (ws !== sock) return;
      if (typeof ev.data === 'string') {
        let msg;
        try { msg = JSON.parse(ev.data); } catch (e) { return; }
        onText(msg);
      } else {
        onChunk(ev.data);
      }
    };
    sock.onclose = (ev) => {
      if (ws !== sock) return;
      ws = null;
      open = false;
      clearTimeout(retryTimer);
      retryTimer = null;
      if (fw && fw.state === 'transferring') setFirmware('paused', 'paused: resumes on reconnect');
      markStale();
      if (ev.code === 4000) {
        stopped = true;
        setStatus('replaced', 'another tab opened this device; reload to take it back', 'bad');
        return;
      }
      if (ev.code === 4001) {
        stopped = true;
        setStatus('refused', 'the gateway does not speak this protocol version', 'bad');
        return;
      }
      scheduleReconnect(ev.code === 1001 ? 'gateway restarting' : `connection lost (${ev.code})`);
    };
  }
  // Exponential backoff with jitter: a restarted gateway is not hit by every tab at once.
  function scheduleReconnect(why) {
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** attempt);
    const delay = Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
    attempt += 1;
    setStatus('reconnecting', `${why}; retrying in ${(delay / 1000).toFixed(1)} s`, 'wait');
    reconnectTimer = setTimeout(connect, delay);
  }
  window.addEventListener('online', () => { if (!ws && !stopped) { attempt = 0; connect(); } });

  // ---- protocol ---------------------------------------------------------------------------
  function onText(msg) {
    switch (msg.type) {
      case 'welcome': return onWelcome(msg);
      case 'deliver': return onDeliver(msg);
      case 'event': return onEvent(msg);
      case 'sent': return onSent(msg);
      case 'error': return onError(msg);
      case 'firmware_available': return onFirmwareAvailable(msg);
      case 'firmware': return onFirmware(msg);
      case 'fw_status': return onFwStatus(msg);
      default: return undefined;  // subscribed, unsubscribed, future types
    }
  }

  function onWelcome(msg) {
    open = true;
    attempt = 0;
    setStatus('connected', `as ${deviceId}`, 'ok');
    // A gateway that lost its sequence numbers (restarted) starts again below our last_seq.
    if (msg.last_seq < lastSeq) {
      lastSeq = msg.last_seq;
      storage.set('last_seq', lastSeq);
    }
    ackedSeq = lastSeq;
    // Which of the unanswered messages did the gateway accept before the connection ended?
    const count = msg.state.messages_sent;
    const accepted = confirmed === null ? 0 : Math.max(0, Math.min(inFlight.length, count - confirmed));
    queue = refused.concat(inFlight.slice(accepted), queue);
    inFlight = [];
    refused = [];
    confirmed = count;
    renderMessages();
    const st = msg.state.firmware;
    if (!fw && st && st.rollout > 0 && st.version === installed) {
      fw = { rollout: st.rollout, version: st.version, size: 0, have: 0, sha256: '', state: 'installed', label: 'up to date' };
      $('firmware-progress').value = 100;
      renderFirmware();
    }
    send({ type: 'subscribe', topic: 'server' });
    send({ type: 'subscribe', topic: 'stats' });
    fetchLog();
    pump();
  }

  function onDeliver(msg) {
    if (typeof msg.seq !== 'number' || msg.seq <= lastSeq) return;  // a duplicate from a resume
    lastSeq = msg.seq;
    storage.set('last_seq', lastSeq);
    const d = msg.data;
    if (d && d.kind === 'dispatched') {
      lastReceipt = d;
      renderMessages();
    }
    if (!ackTimer) {
      ackTimer = setTimeout(() => {
        ackTimer = null;
        if (open && lastSeq > ackedSeq) {
          send({ type: 'ack', seq: lastSeq });
          ackedSeq = lastSeq;
        }
      }, 50);
    }
  }

  function onEvent(msg) {
    if (msg.topic === 'server') addLogEntry(msg.data);
    else if (msg.topic === 'stats') renderStats(msg.data);
  }

  function pump() {
    while (open && queue.length > 0 && inFlight.length < MAX_IN_FLIGHT) {
      const m = queue.shift();
      // A resend keeps its id (the server answers one it already dispatched without dispatching
      // it again); a new send's id is above every id this device used, across page loads too
      // (docs/PROTOCOL.md, "Acknowledgements": a well-behaved device).
      if (m.id === undefined) m.id = sendId = Math.max(sendId + 1, Date.now());
      inFlight.push(m);
      send({ type: 'send', id: m.id, data: m.data });
    }
    renderMessages();
  }
  function onSent(msg) {
    const i = inFlight.findIndex((m) => m.id === msg.id);
    if (i >= 0) inFlight.splice(i, 1);
    confirmed = msg.messages_sent;
    pump();
  }
  function onError(msg) {
    const refusal = ['queue_full', 'closed', 'not_dispatched', 'too_many_in_flight'];
    if (msg.ref === 'send' && refusal.includes(msg.code)) {
      // The error names the refused send's id (older gateways did not: then the oldest
      // unanswered send is the refused one, as answers come in order).
      const i = typeof msg.id === 'number' ? inFlight.findIndex((m) => m.id === msg.id) : 0;
      if (i >= 0 && i < inFlight.length) refused.push(inFlight.splice(i, 1)[0]);
      if (msg.code !== 'closed' && !retryTimer) {
        retryTimer = setTimeout(() => {
          retryTimer = null;
          queue = refused.concat(queue);
          refused = [];
          pump();
        }, 500 + Math.random() * 500);
      }
      renderMessages();
      return;
    }
    if (msg.code === 'bad_resume') return;  // handled in onWelcome: the gateway restarted
    if (msg.code === 'unknown_rollout') return;  // a late ack of a superseded rollout
    console.warn('gateway error', msg);
    $('notice').textContent = `gateway error: ${msg.code}: ${msg.message}`;
  }

  // ---- firmware ---------------------------------------------------------------------------
  function onFirmwareAvailable(msg) {
    if (msg.version === installed) return;
    if (!fw || fw.rollout !== msg.rollout || fw.sha256 !== msg.sha256) {
      fw = { rollout: msg.rollout, version: msg.version, size: msg.size, sha256: msg.sha256, buf: null, have: 0 };
      $('firmware-progress').value = 0;
    }
    setFirmware('pending', `${msg.version} available: waiting for a transfer slot`);
  }
  function onFirmware(msg) {
    const same = fw && fw.buf && fw.rollout === msg.rollout && fw.sha256 === msg.sha256 && fw.size === msg.size;
    if (!same) {
      fw = { rollout: msg.rollout, version: msg.version, size: msg.size, sha256: msg.sha256, buf: new Uint8Array(msg.size), have: 0, lost: false };
    }
    // Chunks resume at msg.offset. Bytes below it we do not hold (the tab was reloaded
    // mid-transfer) cannot be asked for again: the hash check will fail and say so.
    if (msg.offset > fw.have) fw.lost = true;
    fw.have = msg.offset;
    setFirmware('transferring', `downloading ${msg.version}`);
    if (fw.have >= fw.size) verify(fw);
  }
  function onChunk(buffer) {
    if (buffer.byteLength < 16) return;
    const dv = new DataView(buffer);
    const type = dv.getUint8(0);
    const hlen = dv.getUint8(1);
    const rollout = dv.getUint32(4);
    const offset = dv.getUint32(8);
    const length = dv.getUint32(12);
    if (type !== 1 || hlen < 16 || length !== buffer.byteLength - hlen) return;
    if (!fw || !fw.buf || fw.rollout !== rollout || fw.state !== 'transferring') return;
    if (offset !== fw.have || offset + length > fw.size) return;  // stale chunk of an older stream
    fw.buf.set(new Uint8Array(buffer, hlen, length), offset);
    fw.have = offset + length;
    send({ type: 'fw_ack', rollout, offset: fw.have });
    renderFirmware();
    if (fw.have === fw.size) verify(fw);
  }
  function hex(buffer) {
    return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, '0')).join('');
  }
  // The device checks the image itself before it reports anything installed.
  async function verify(t) {
    setFirmware('verifying', 'verifying SHA-256…');
    let digest = null;
    let reason = '';
    if (!(window.crypto && crypto.subtle)) {
      reason = 'WebCrypto unavailable (open the page on localhost or over https)';
    } else {
      digest = hex(await crypto.subtle.digest('SHA-256', t.buf));
      if (digest !== t.sha256) reason = t.lost ? 'sha256 mismatch (the tab was reloaded mid-transfer)' : 'sha256 mismatch';
    }
    if (fw !== t || !open) return;  // superseded or disconnected: the next welcome resumes it
    if (reason) {
      send({ type: 'fw_result', rollout: t.rollout, ok: false, reason });
      setFirmware('failed', `failed: ${reason}`);
      return;
    }
    t.computed = digest;
    send({ type: 'fw_result', rollout: t.rollout, ok: true, sha256: digest });
    setFirmware('verifying', 'SHA-256 ok; confirming with the gateway…');
  }
  function onFwStatus(msg) {
    if (!fw || fw.rollout !== msg.rollout) return;
    if (msg.status === 'verified') {
      installed = fw.version;
      storage.set('firmware', installed);
      fw.buf = null;  // free the image
      $('firmware-progress').value = 100;
      setFirmware('installed', 'installed · SHA-256 verified');
    } else {
      setFirmware('failed', `failed: ${msg.reason || msg.status}`);
    }
  }

  // ---- buttons ----------------------------------------------------------------------------
  let counter = 0;
  function queueMessages(n) {
    for (let i = 0; i < n; i += 1) {
      counter += 1;
      queue.push({ data: { text: `hello from ${deviceId}`, n: counter, at: Date.now() } });
    }
    pump();
  }
  $('send-message').addEventListener('click', () => queueMessages(1));
  $('send-burst').addEventListener('click', () => queueMessages(200));
  // The operator API takes only POST with the operator's bearer token (docs/SECURITY.md,
  // "Operator API"): the page asks for it once and keeps it in this tab's memory only (no
  // cookie, no storage), so no other page, link or form can start a rollout on its behalf.
  let operatorToken = '';
  let operatorApi = true;  // /api/info says whether the demo runs with --operator-token-file
  $('update-device').addEventListener('click', async () => {
    const button = $('update-device');
    button.disabled = true;
    try {
      if (!operatorApi) throw new Error('the demo runs without --operator-token-file');
      if (!operatorToken) {
        operatorToken = (window.prompt('Operator token (the contents of the demo\'s --operator-token-file):') || '').trim();
        if (!operatorToken) throw new Error('no operator token given');
      }
      const r = await fetch('/api/firmware/release', {
        method: 'POST',
        cache: 'no-store',
        credentials: 'omit',
        headers: { Authorization: `Bearer ${operatorToken}` },
      });
      if (r.status === 401 || r.status === 403) operatorToken = '';  // ask again next time
      if (!r.ok) throw new Error(`HTTP ${r.status}: ${(await r.text()).trim()}`);
      const j = await r.json();
      $('notice').textContent = `firmware ${j.version} (${mib(j.size)}) published to the fleet`;
    } catch (e) {
      $('notice').textContent = `could not publish firmware: ${e.message}`;
    } finally {
      button.disabled = false;
    }
  });

  // ---- start ------------------------------------------------------------------------------
  $('device-name').textContent = deviceId;
  document.title = `${deviceId} · devgate demo`;
  renderFirmware();
  renderMessages();
  fetch('/api/info', { cache: 'no-store' }).then((r) => r.json()).then((info) => {
    workersMax = info.workers_max;
    operatorApi = info.operator_api !== false;
    $('workers-max').textContent = ` / ${workersMax}`;
  }).catch(() => {});
  connect();
}());
