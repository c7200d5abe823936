#!/usr/bin/env node
// Node's `ws` (npm package "ws", 8.x) as a baseline for the load scenarios: the server a
// JavaScript developer would run instead of wsfleet. One process, one event loop.
//
//   node loadtest/node_ws_server.js --port PORT [--mode echo|broadcast] [--host 127.0.0.1]
//       [--report-count]
//
// `ws` is not part of this repository: install it anywhere and point NODE_PATH at the
// node_modules folder, e.g.
//   npm install --prefix /tmp/nodews ws && NODE_PATH=/tmp/nodews/node_modules node ...
// Without it the script prints "ws module not installed" on stderr and exits with status 5
// (the scenario harness checks first and reports the server as not installed).
//
// mode echo: every message goes back to its sender with the same opcode (text/binary).
// mode broadcast: every message goes to every other open client with the same opcode: the loop
// of ws's README ("client !== ws && client.readyState === WebSocket.OPEN").
// perMessageDeflate is off (ws's default for servers), as for the other servers.
//
// Once listening it prints "listening HOST:PORT". SIGTERM and SIGINT close every client with
// 1001 and exit with status 0 (after at most 2 s). With --report-count it prints
// "connected C received R deliveries D" on exit (D: send() calls).
"use strict";

let WebSocket;
try {
  WebSocket = require("ws");
} catch (e) {
  process.stderr.write(`ws module not installed (${e.code || e.message}); set NODE_PATH\n`);
  process.exit(5);
}

function option(name, fallback) {
  const args = process.argv.slice(2);
  for (let i = 0; i < args.length; i++) {
    if (args[i] === `--${name}`) {
      return i + 1 < args.length ? args[i + 1] : "";
    }
    if (args[i].startsWith(`--${name}=`)) {
      return args[i].slice(name.length + 3);
    }
  }
  return fallback;
}

const port = Number.parseInt(option("port", "-1"), 10);
const host = option("host", "127.0.0.1");
const mode = option("mode", "echo");
const reportCount = process.argv.includes("--report-count");
if (!(port >= 0 && port < 65536) || (mode !== "echo" && mode !== "broadcast")) {
  process.stderr.write(`bad arguments: ${process.argv.slice(2).join(" ")}\n`);
  process.exit(4);
}

const counts = { connected: 0, received: 0, deliveries: 0 };
const wss = new WebSocket.WebSocketServer({
  host,
  port,
  perMessageDeflate: false,
  maxPayload: 64 * 1024 * 1024,
  clientTracking: true,
});

wss.on("connection", (ws) => {
  counts.connected++;
  ws.on("error", () => {}); // a peer that vanishes under load is not an error of the server
  if (mode === "echo") {
    ws.on("message", (data, isBinary) => {
      counts.received++;
      ws.send(data, { binary: isBinary });
      counts.deliveries++;
    });
  } else {
    ws.on("message", (data, isBinary) => {
      counts.received++;
      for (const client of wss.clients) {
        if (client !== ws && client.readyState === WebSocket.OPEN) {
          client.send(data, { binary: isBinary });
          counts.deliveries++;
        }
      }
    });
  }
});

wss.on("listening", () => {
  const address = wss.address();
  process.stdout.write(`listening ${address.address}:${address.port}\n`);
});

wss.on("error", (e) => {
  process.stderr.write(`listen on ${host}:${port} failed: ${e.message}\n`);
  process.exit(3);
});

let stopping = false;
function stop() {
  if (stopping) {
    return;
  }
  stopping = true;
  for (const client of wss.clients) {
    client.close(1001, "server stopping");
  }
  const done = () => {
    if (reportCount) {
      process.stdout.write(
        `connected ${counts.connected} received ${counts.received} ` +
          `deliveries ${counts.deliveries}\n`,
      );
    }
    process.exit(0);
  };
  // Wait (bounded) for the close handshakes; a stuck client cannot hold the process.
  const timer = setTimeout(() => {
    for (const client of wss.clients) {
      client.terminate();
    }
    done();
  }, 2000);
  wss.close(() => {
    clearTimeout(timer);
    done();
  });
}

process.on("SIGTERM", stop);
process.on("SIGINT", stop);
