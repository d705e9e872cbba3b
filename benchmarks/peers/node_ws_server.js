// node_ws_server.js: Node.js with `ws` (the version pinned in tests/peers/package-lock.json)
// speaking the bench protocol of benchmarks/README.md, written as ws's README does it.
//
// Echoes every text and binary message; the text "broadcast <bytes>" sends one binary payload of
// that size (one Buffer, shared) to every other open client.
//
// With a certificate chain and its key (PEM files) it serves wss: an https server (Node's TLS
// defaults) carries the WebSocket server, as ws's README shows for wss.
//
//   node node_ws_server.js [port [cert.pem key.pem]]
//                                     prints "listening on <port>"; stops on SIGINT/SIGTERM
'use strict';
const fs = require('fs');
const https = require('https');
const path = require('path');
const { WebSocketServer, WebSocket } = require(path.join(__dirname, '..', '..', 'tests', 'peers',
                                                        'node_modules', 'ws'));

const port = Number(process.argv[2] || 9104);
const [certFile, keyFile] = process.argv.slice(3, 5);
const common = {
  perMessageDeflate: false,  // ws's default; stated so the comparison is plainly uncompressed
  maxPayload: 64 << 20,
};
let wss;
if (certFile && keyFile) {
  const server = https.createServer({ cert: fs.readFileSync(certFile), key: fs.readFileSync(keyFile) });
  wss = new WebSocketServer({ server, ...common });
  server.listen({ host: '127.0.0.1', port, backlog: 4096 }, () => {
    console.log(`listening on ${server.address().port}`);
  });
} else {
  wss = new WebSocketServer({ host: '127.0.0.1', port, backlog: 4096, ...common });
  wss.on('listening', () => console.log(`listening on ${wss.address().port}`));
}

wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => {
    if (!isBinary) {
      const text = data.toString();
      if (text.startsWith('broadcast ')) {
        const payload = Buffer.alloc(Number(text.slice(10)));
        for (const client of wss.clients) {
          if (client !== ws && client.readyState === WebSocket.OPEN) {
            client.send(payload, { binary: true });
          }
        }
        return;
      }
    }
    ws.send(data, { binary: isBinary });
  });
});
for (const signal of ['SIGINT', 'SIGTERM']) process.on(signal, () => process.exit(0));
