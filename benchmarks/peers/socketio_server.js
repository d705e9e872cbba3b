// The Socket.IO peer of the device-path benchmarks (benchmarks/README.md, run.sh --device): what a
// Socket.IO user writes for the devgate device path. Every "msg" a client emits goes to a counting
// handler (the sink) and is acknowledged through the client's callback. GET /count answers
// {"count":N} (read by devgate_devload after the run, off the measured path).
//
//   node benchmarks/peers/socketio_server.js <port>
//
// socket.io is pinned by benchmarks/peers/package-lock.json (npm ci --prefix benchmarks/peers).
'use strict';
const http = require('http');
const { Server } = require('socket.io');

const port = Number(process.argv[2] || 9103);
let count = 0;

const httpServer = http.createServer((req, res) => {
  if (req.url === '/count') {
    res.writeHead(200, { 'Content-Type': 'application/json', 'Cache-Control': 'no-store' });
    res.end(JSON.stringify({ count }) + '\n');
    return;
  }
  res.writeHead(404);
  res.end();
});

// WebSocket transport only (the generator does not poll); no compression, no client bundle.
const io = new Server(httpServer, { transports: ['websocket'], serveClient: false, perMessageDeflate: false });

// The sink: counts the message; the acknowledgement tells the device it was taken.
function sink(data) {
  if (typeof data === 'string') count += 1;
}

io.on('connection', (socket) => {
  socket.on('msg', (data, ack) => {
    sink(data);
    if (typeof ack === 'function') ack();
  });
});

httpServer.listen(port, '127.0.0.1', () => {
  console.log(`listening on ${port}`);
});
const stop = () => { io.close(); process.exit(0); };
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
