// A headless Chromium as a WebSocket client of a wsfleet echo server (run.sh starts one).
//
// usage: node check.mjs ws://HOST:PORT [--step-timeout MS] [--compression]
//   --compression  the server negotiates permessage-deflate: the extension step expects
//                  ws.extensions to name it (without: expects no extension, though
//                  Chromium always offers it)
// Environment: CHROMIUM (the browser binary; default /usr/bin/chromium, Debian's).
//
// Each step runs in the page (about:blank) on a connection of its own, so that one failed
// step does not hide the others, and has a deadline inside the page and another here.
// Prints "PASS step: detail" or "FAIL step: detail" per step, then a summary line; exit
// status 0 when every step passed, 1 when one failed, 2 on a usage or browser error.
import { chromium } from 'playwright-core';

const args = process.argv.slice(2);
let url = null;
let stepTimeout = 10000;
let compression = false;
for (let i = 0; i < args.length; i++) {
  if (args[i] === '--step-timeout') stepTimeout = Number(args[++i]);
  else if (args[i] === '--compression') compression = true;
  else if (!url && /^wss?:\/\//.test(args[i])) url = args[i];
  else {
    console.error(`check.mjs: unexpected argument ${args[i]}`);
    process.exit(2);
  }
}
if (!url || !(stepTimeout > 0)) {
  console.error('usage: node check.mjs ws://HOST:PORT [--step-timeout MS] [--compression]');
  process.exit(2);
}

// The steps, as page functions: each gets {url, timeout, compression} and resolves to
// {ok, detail}. Everything they need is defined inside them (they are serialized into the page).
const STEPS = [
  [
    'permessage-deflate negotiated as the server is configured, a compressible echo',
    async ({ url, timeout, compression }) => {
      const ws = new WebSocket(url);
      try {
        const message = 'a compressible message, '.repeat(2000);
        const reply = await new Promise((resolve, reject) => {
          const timer = setTimeout(() => reject(new Error(`no echo within ${timeout} ms`)), timeout);
          ws.onopen = () => ws.send(message);
          ws.onmessage = (e) => { clearTimeout(timer); resolve(e.data); };
          ws.onclose = (e) => { clearTimeout(timer); reject(new Error(`closed ${e.code} "${e.reason}" before the echo`)); };
        });
        const negotiated = ws.extensions;
        const deflate = negotiated.startsWith('permessage-deflate');
        if (deflate !== compression) {
          return { ok: false, detail: `ws.extensions is ${JSON.stringify(negotiated)}, expected ${compression ? 'permessage-deflate' : 'none'}` };
        }
        if (reply !== message) return { ok: false, detail: `the echo differs (${String(reply).length} chars)` };
        return { ok: true, detail: `ws.extensions ${JSON.stringify(negotiated)}, ${message.length} chars back` };
      } finally {
        ws.onclose = null;
        ws.close();
      }
    },
  ],
  [
    '1 MiB binary echoed byte for byte',
    async ({ url, timeout }) => {
      const size = 1 << 20;
      const sent = new Uint8Array(size);
      let x = 0x9e3779b9; // xorshift32: bytes that differ everywhere, the same on every run
      for (let i = 0; i < size; i++) {
        x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
        sent[i] = x & 0xff;
      }
      const ws = new WebSocket(url);
      ws.binaryType = 'arraybuffer';
      try {
        const reply = await new Promise((resolve, reject) => {
          const timer = setTimeout(() => reject(new Error(`no echo within ${timeout} ms`)), timeout);
          ws.onopen = () => ws.send(sent);
          ws.onmessage = (e) => { clearTimeout(timer); resolve(e.data); };
          ws.onclose = (e) => { clearTimeout(timer); reject(new Error(`closed ${e.code} "${e.reason}" before the echo`)); };
        });
        if (!(reply instanceof ArrayBuffer)) return { ok: false, detail: `got a ${typeof reply} message, not binary` };
        const got = new Uint8Array(reply);
        if (got.length !== size) return { ok: false, detail: `got ${got.length} bytes, sent ${size}` };
        for (let i = 0; i < size; i++) {
          if (got[i] !== sent[i]) return { ok: false, detail: `byte ${i} differs` };
        }
        return { ok: true, detail: `${size} bytes back, identical` };
      } finally {
        ws.onclose = null;
        ws.close();
      }
    },
  ],
  [
    'empty text and empty binary messages echoed',
    async ({ url, timeout }) => {
      const ws = new WebSocket(url);
      ws.binaryType = 'arraybuffer';
      try {
        const replies = await new Promise((resolve, reject) => {
          const got = [];
          const timer = setTimeout(() => reject(new Error(`${got.length} of 2 echoes within ${timeout} ms`)), timeout);
          ws.onopen = () => { ws.send(''); ws.send(new ArrayBuffer(0)); };
          ws.onmessage = (e) => {
            got.push(e.data);
            if (got.length === 2) { clearTimeout(timer); resolve(got); }
          };
          ws.onclose = (e) => { clearTimeout(timer); reject(new Error(`closed ${e.code} "${e.reason}" after ${got.length} echoes`)); };
        });
        const [text, binary] = replies;
        if (text !== '') return { ok: false, detail: `first echo is not an empty text message: ${typeof text}` };
        if (!(binary instanceof ArrayBuffer) || binary.byteLength !== 0) {
          return { ok: false, detail: `second echo is not an empty binary message: ${typeof binary}` };
        }
        return { ok: true, detail: 'empty text, then empty binary' };
      } finally {
        ws.onclose = null;
        ws.close();
      }
    },
  ],
  [
    '200-message burst echoed in order',
    async ({ url, timeout }) => {
      const count = 200;
      const ws = new WebSocket(url);
      ws.binaryType = 'arraybuffer';
      try {
        const got = await new Promise((resolve, reject) => {
          const got = [];
          const timer = setTimeout(() => reject(new Error(`${got.length} of ${count} echoes within ${timeout} ms`)), timeout);
          // One synchronous loop: the browser may put them in as few TCP segments as it likes.
          ws.onopen = () => { for (let i = 0; i < count; i++) ws.send(`burst ${i}`); };
          ws.onmessage = (e) => {
            got.push(e.data);
            if (got.length === count) { clearTimeout(timer); resolve(got); }
          };
          ws.onclose = (e) => { clearTimeout(timer); reject(new Error(`closed ${e.code} "${e.reason}" after ${got.length} echoes`)); };
        });
        for (let i = 0; i < count; i++) {
          if (got[i] !== `burst ${i}`) return { ok: false, detail: `echo ${i} is ${JSON.stringify(got[i])}` };
        }
        return { ok: true, detail: `${count} echoes, in order` };
      } finally {
        ws.onclose = null;
        ws.close();
      }
    },
  ],
  [
    'client close 4000 "bye" seen as a clean 4000 "bye"',
    async ({ url, timeout }) => {
      const ws = new WebSocket(url);
      const event = await new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no close event within ${timeout} ms`)), timeout);
        // An echo first: the close must come after the connection has carried data.
        ws.onopen = () => ws.send('before the close');
        ws.onmessage = () => ws.close(4000, 'bye');
        ws.onclose = (e) => { clearTimeout(timer); resolve({ code: e.code, reason: e.reason, wasClean: e.wasClean }); };
      });
      const ok = event.code === 4000 && event.reason === 'bye' && event.wasClean === true;
      return { ok, detail: `close event: code ${event.code}, reason ${JSON.stringify(event.reason)}, wasClean ${event.wasClean}` };
    },
  ],
];

/** Rejects after ms: the Node-side bound on a step, in case the page itself hangs. */
function deadline(ms, what) {
  return new Promise((_, reject) => setTimeout(() => reject(new Error(`${what}: no answer from the page within ${ms} ms`)), ms).unref());
}

const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
let browser;
try {
  browser = await Promise.race([
    // Chromium's Local Network Access checks refuse a WebSocket from about:blank (a public,
    // opaque origin) to a loopback address (net::ERR_BLOCKED_BY_LOCAL_NETWORK_ACCESS_CHECKS):
    // that is the browser's policy, not the server's to test, so it is turned off.
    chromium.launch({
      executablePath,
      headless: true,
      args: ['--disable-features=LocalNetworkAccessChecks'],
    }),
    deadline(30000, 'launching the browser'),
  ]);
} catch (err) {
  console.error(`check.mjs: cannot start ${executablePath}: ${err.message}`);
  process.exit(2);
}
let failed = 0;
try {
  const page = await browser.newPage();
  await page.goto('about:blank');
  console.log(`browser: ${executablePath} ${browser.version()}, server ${url}`);
  for (const [name, step] of STEPS) {
    let result;
    try {
      result = await Promise.race([
        page.evaluate(step, { url, timeout: stepTimeout, compression }),
        deadline(stepTimeout + 5000, name),
      ]);
    } catch (err) {
      result = { ok: false, detail: err.message.split('\n')[0] };
    }
    if (!result.ok) failed++;
    console.log(`${result.ok ? 'PASS' : 'FAIL'} ${name}: ${result.detail}`);
  }
} finally {
  await Promise.race([browser.close(), deadline(10000, 'closing the browser')]).catch(() => {});
}
console.log(`browser check: ${STEPS.length - failed} of ${STEPS.length} steps passed`);
process.exit(failed ? 1 : 0);
